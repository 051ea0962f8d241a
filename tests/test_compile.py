"""`ddpm-jax compile`: the real train step and sampler compiled for a TPU slice on a CPU machine.

Needs the TPU compiler (`pip install 'ddpm-jax[tpu]'`, i.e. libtpu); skipped without it. The
programs are configs/test.py's (seconds to compile; a CIFAR-10 step takes minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs import test as test_config
from ddpm_jax import aot, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(
        not aot.libtpu_available(),
        reason="libtpu is not installed (pip install 'ddpm-jax[tpu]'): no TPU compiler",
    ),
    pytest.mark.xdist_group("tpu_compile"),
]


@pytest.fixture(scope="module")
def reports():
    config = test_config.get_config()
    return {
        kind: aot.compile_step(config, "v5e:2x2", batch_per_chip=4, parallelism=kind)
        for kind in parallel.Parallelism
    }


@pytest.mark.parametrize("kind", list(parallel.Parallelism))
def test_train_step_compiles_for_v5e_with_an_all_reduce_and_fits(reports, kind):
    report = reports[kind]
    assert report.chips == 4 and report.parallelism == kind.value
    assert report.collectives["all-reduce"] >= 1  # the pmean of the gradients
    assert 0 < report.total_bytes <= report.hbm_capacity_bytes == 16 * aot.GiB
    assert report.fits and report.argument_bytes > 0 and report.temp_bytes > 0
    assert report.alias_bytes > 0  # the donated state's buffers are reused for the new state
    assert report.flops > 0 and report.bytes_accessed > 0
    assert report.roofline_s == max(
        report.flops / aot.CHIPS["v5e"].peak_flops,
        report.bytes_accessed / aot.CHIPS["v5e"].hbm_bandwidth,
    )


def test_both_wrappers_compile_the_same_arithmetic(reports):
    p, s = reports[parallel.Parallelism.PMAP], reports[parallel.Parallelism.SHARD_MAP]
    assert s.flops == pytest.approx(p.flops, rel=0.01)
    assert s.collectives == p.collectives


def test_the_sampler_compiles_with_its_whole_scan():
    config = test_config.get_config()
    report = aot.compile_step(
        config, "v5e-4", batch_per_chip=2, what=aot.What.SAMPLE, parallelism="shard_map"
    )
    assert report.what == "sample" and report.loop_steps == config.diffusion.num_timesteps
    assert report.fits and report.flops > 0
    assert report.collectives["all-reduce"] == 0  # each chip samples on its own


def test_topology_names_map_to_get_topology_desc_names():
    assert aot.topology_name("v5e-16") == aot.topology_name("v5litepod-16") == "v5e:4x4"
    assert aot.topology_name("v4-8") == "v4:2x2x1" and aot.topology_name("v6e:2x4") == "v6e:2x4"
    for name, chips in [("v4-8", 4), ("v4-32", 16), ("v5e-16", 16), ("v5p-8", 4), ("v6e-8", 8)]:
        assert len(aot.tpu_devices(name)) == chips, name
    with pytest.raises(ValueError, match="unknown TPU topology"):
        aot.topology_name("v9-8")


def test_command_that_does_not_fit_exits_3_saying_by_how_much():
    cmd = [
        sys.executable, "-m", "ddpm_jax.main", "compile",
        "--config", os.path.join(REPO, "configs", "test.py"),
        "--config.model.ch=512", "--config.model.ch_mult=(1,2,4,4)",
        "--topology", "v5e-4", "--batch_per_chip", "4096", "--parallelism", "shard_map",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == aot.NOT_FITTING_EXIT_CODE, text[-3000:]
    # The TPU compiler refuses it (CompileTimeHbmOom, naming what it needs and has), or it
    # compiles and the report says by how much it is over.
    assert "DOES NOT FIT" in proc.stdout
    assert "exceeds available HBM" in proc.stdout or "over the chip's 16.00 GiB" in proc.stdout


def test_the_readme_compile_command_runs_and_reports_the_chip():
    with open(os.path.join(REPO, "README.md")) as f:
        (line,) = [x for x in f.read().splitlines() if x.startswith("ddpm-jax compile ")]
    cmd = [sys.executable, "-m", "ddpm_jax.main", *line.split()[1:]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "all-reduce" in proc.stdout and "GiB" in proc.stdout, proc.stdout
