"""The benchmark scripts run: gpu_check.py --quick takes every branch; each script's --help."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
    "train_throughput",
    "sample_throughput",
    "vs_pytorch",
    "gpu_check",
    "report",
    "sampler_quality",
)


def _run(script: str, *args: str, timeout: float = 900) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", f"{script}.py"), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    assert "usage" in _run(script, "--help")  # vs_pytorch and gpu_check import no torch here


def _numbers(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.slow
def test_gpu_check_quick_runs_every_section(tmp_path):
    _run("gpu_check", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    train = result["train"]
    assert {(r["dtype"], r["steps_per_dispatch"]) for r in train} == {
        (d, k) for d in ("bfloat16", "float32") for k in (1, 2)
    }
    assert {r["global_batch"] for r in train} == {2, 4}
    assert [r["sampler"] for r in result["sample"]] == ["ddpm", "ddim10-eta0"]
    keys = ("images_per_s", "step_ms", "mfu_pct", "peak_mem_mib", "compile_s", "gflop_per_image")
    for row in train:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in keys), row
    for row in result["sample"]:
        assert math.isfinite(row["images_per_s"]) and row["s_per_call"] > 0, row
    if "skipped" in result["peer"]:
        assert "not installed" in result["peer"]["skipped"]
    else:
        assert all(math.isfinite(x) for x in _numbers(result["peer"]))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_throughput", "sample_throughput"])
def test_quick_tables(script, tmp_path):
    out = _run(script, "--quick", "--out", str(tmp_path / "r.json"))
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["rows"] and not any("error" in r for r in payload["rows"]), payload["rows"]
    assert "| digits |" in out.replace("|  digits |", "| digits |")
