"""Writes benchmarks/RESULTS.md from the JSON files of a run (benchmarks/results/*.json).

Run (run_all.sh does it last):
  python benchmarks/report.py --results benchmarks/results --out benchmarks/RESULTS.md \
      [--note "preliminary, noisy (shared machine)"]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_util  # noqa: E402

SECTIONS = (
    ("train_throughput", "Training step (`train_throughput.py`)"),
    ("sample_throughput", "Sampling (`sample_throughput.py`)"),
    ("vs_pytorch", "Against PyTorch (`vs_pytorch.py`)"),
)

METHOD = """\
## How the numbers are taken

* Every case of `train_throughput.py` and `sample_throughput.py` runs in a fresh process: compile
  times start cold (no persistent cache) and peak memory belongs to that case alone. On CPU the
  peak is the process's peak RSS (VmHWM, reset before the timed steps), which includes the
  JAX runtime itself (~0.5-1 GiB); on accelerators it is the device's `peak_bytes_in_use`.
  "XLA MiB" is XLA's static estimate for the compiled step (arguments + outputs - donated
  buffers + temporaries).
* Throughput: steps dispatched back to back and synchronised once at the end of a window (as the
  training loop runs), after untimed warm-up steps; the median window. "recompiles" counts XLA
  compilations during the timed windows (0 expected).
* FLOPs come from XLA's cost analysis: of the compiled training step (per device; the body of
  the `steps_per_dispatch` scan counts once, so it is per step) and of the lowered forward pass.
  MFU = FLOPs/step x steps/s / peak; the peak is the dense bf16 rate of the accelerator (H100/H200
  989, TPU v3 123, v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s per chip) or, on CPU, the float32
  matmul rate measured on the machine at the start of the run (so CPU MFU is relative to what
  this CPU reaches on a large matmul, for both dtypes).
* Sampling on CPU runs the CIFAR-10 model with a reduced T (stated in the table): the cost per step
  does not depend on T; "img-steps/s" (images/s x steps) compares across T.
  "scan/loop" is the library's lax.scan sampler over a host loop that calls a pmapped single step
  once per timestep (same model, batch and devices).
* `vs_pytorch.py` runs diffusers' UNet2DModel built by `convert.diffusers_config` with the same
  weights (converted by `convert.from_diffusers`, which checks every tensor), in the same process,
  on the same device, at the same batch; ours/torch > 1 means we are faster.
* References: CIFAR-10 forward ~11.7 GFLOP per 32x32 image, a training step ~35 GFLOP per image;
  the paper trained at 21 steps/s at batch 128 on a TPU v3-8 and sampled 256 images in 17 s there.
"""


GPU_TODO = """\
Not measured yet: no GPU was lent in the sessions so far. On a GPU host (JAX with CUDA; torch,
diffusers for the last line), with the scripts' accelerator defaults:

```
G=benchmarks/results_gpu
python benchmarks/train_throughput.py --out $G/train_throughput.json
python benchmarks/sample_throughput.py --gpu_paper --out $G/sample_throughput.json
python benchmarks/vs_pytorch.py --bf16 --torch_compile --out $G/vs_pytorch.json
python benchmarks/report.py   # renders benchmarks/results_gpu/ here
```"""


def load(results_dir: str) -> dict[str, list[dict]]:
    """benchmark name -> the payloads of its JSON files, in file-name order."""
    found: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            payload = json.load(f)
        payload["_file"] = os.path.basename(path)
        found.setdefault(payload.get("benchmark", "?"), []).append(payload)
    return found


def machine_section(found: dict[str, list[dict]]) -> str:
    lines = ["## Machine", "", "| | |", "|---|---|"]
    first = next((p for name, _ in SECTIONS for p in found.get(name, [])), None)
    if first is None:
        return "\n".join(lines + ["| (no results) | |"])
    env = first["env"]
    lines.append(f"| date (UTC) | {env['date']} |")
    lines.append(f"| CPU | {env['cpu']}, {env['cpu_count']} cores |")
    lines.append(f"| devices | {env['backend']} x{env['local_devices']} ({env['device_kind']}) |")
    for name, _ in SECTIONS:
        for payload in found.get(name, []):
            versions = ", ".join(f"{k} {v}" for k, v in payload["env"]["versions"].items() if v)
            load_avg = payload["env"].get("load_avg_1min")
            load_text = f"; 1-min load average at start {load_avg:.1f}" if load_avg else ""
            peak = payload.get("peak_source")
            peak_text = f"; MFU peak: {peak}" if peak else ""
            lines.append(f"| `{payload['_file']}` | {versions}{load_text}{peak_text} |")
    return "\n".join(lines)


def settings_line(payload: dict) -> str:
    s = dict(payload.get("settings", {}))
    models = s.get("models") or bench_util.MODELS
    for key in ("batch", "steps"):  # per-model settings: only the models that ran
        if isinstance(s.get(key), dict):
            s[key] = ", ".join(f"{m}={v}" for m, v in s[key].items() if m in models)
    labels = {"batch": "per-device batch", "steps": "T"}
    keys = ("batch", "steps", "steps_per_dispatch", "warmup", "iters", "repeats", "quick")
    parts = [f"{labels.get(k, k)}: {s[k]}" for k in keys if s.get(k) is not None]
    for flag in ("bf16", "torch_compile", "jax_step", "dtype", "host_batch", "gpu_paper"):
        if s.get(flag) not in (None, False):
            parts.append(f"{flag}: {s[flag]}")
    return f"`{payload['_file']}`: " + ", ".join(parts)


def benchmark_section(title: str, payloads: list[dict]) -> str:
    rows = [row for p in payloads for row in p["rows"]]
    columns = [tuple(c) for c in payloads[0]["columns"]]
    out = [f"## {title}", ""]
    out += [f"- {settings_line(p)}" for p in payloads]
    out += ["", bench_util.format_table(rows, columns)]
    errors = [r for r in rows if "error" in r]
    out += [f"\n- error in {_case_name(r)}: {r['error'][:300]}" for r in errors]
    return "\n".join(out)


def _case_name(row: dict) -> str:
    keys = ("model", "dtype", "variant", "sampler", "what")
    return " ".join(str(row[k]) for k in keys if k in row)


def scan_penalty(found: dict[str, list[dict]]) -> str:
    """scanned / library step time for each (model, dtype, batch) measured both ways, if any."""
    rows = [r for p in found.get("train_throughput", []) for r in p["rows"] if "step_ms" in r]
    by_key = {(r["model"], r["dtype"], r["variant"], r["global_batch"]): r for r in rows}
    lines = []
    for (model, dtype, variant, batch), row in sorted(by_key.items()):
        scanned = by_key.get((model, dtype, "scanned", batch))
        if variant == "library" and scanned:
            lines.append(
                f"- {model} {dtype} batch {batch}: one step called directly (`make_p_train_step`) "
                f"{row['step_ms']:.0f} ms/step; the same step inside a length-1 `lax.scan` "
                f"{scanned['step_ms']:.0f} ms/step ({scanned['step_ms'] / row['step_ms']:.1f}x)."
            )
    if not lines:
        return ""
    head = (
        "## A lax.scan around the train step on XLA:CPU\n\n"
        "On XLA:CPU the backward-pass convolutions inside a while loop run in a slow generic "
        "form (jax-ml/jax#12868); the forward pass is unaffected (the sampler's scan is fine). "
        "`train.make_p_train_step` used to scan also for steps_per_dispatch = 1; it now calls "
        "the step directly then, and CPU runs should keep steps_per_dispatch = 1. "
        "Before (scanned) and after (library), measured here:\n"
    )
    return head + "\n" + "\n".join(lines)


def jax_version(found: dict[str, list[dict]]) -> str:
    """The JAX version of the PyTorch comparison (its interpreter may differ from the others)."""
    payloads = found.get("vs_pytorch") or [{}]
    return payloads[-1].get("env", {}).get("versions", {}).get("jax") or "?"


def summary_section(found: dict[str, list[dict]]) -> str:
    """The headline figures, computed from the tables below."""
    rows = lambda name: [r for p in found.get(name, []) for r in p["rows"] if "error" not in r]
    lines = []
    for r in rows("train_throughput"):
        if r.get("variant") == "library" and r.get("mfu_pct") is not None:
            lines.append(
                f"- train step, {r['model']} {r['dtype']}, batch {r['global_batch']}: "
                f"{r['images_per_s']:.3g} images/s, MFU {r['mfu_pct']:.0f}%"
            )
    for r in rows("sample_throughput"):
        if r.get("scan_over_loop") is not None:
            lines.append(
                f"- sampling, {r['model']} {r['sampler']}: lax.scan / host loop of jitted steps "
                f"= {r['scan_over_loop']:.2f}"
            )
    for r in rows("vs_pytorch"):
        lines.append(
            f"- ours / PyTorch, {r['model']} {r['what']}, batch {r['batch']}: "
            f"{r['ratio']:.2f} (jax {jax_version(found)})"
        )
    if not lines:
        return ""
    return "## Summary\n\n" + "\n".join(lines)


def digits_section(found: dict[str, list[dict]]) -> str:
    """The digits default end to end (`digits_quality.py`), if it ran."""
    payloads = found.get("digits_quality")
    if not payloads:
        return ""
    r = payloads[-1]
    q, nll, m = r["quality"], r["nll"], r["final_metrics"]
    ref = q["reference"]
    rows = [
        ("train wall time, README command (s)", f"{r.get('train_wall_s', float('nan')):.0f}"),
        (
            "steps/s, images/s (last log window)",
            f"{m['steps_per_sec']:.1f}, {m['images_per_sec']:.0f}",
        ),
        ("final loss (last logged)", f"{m['loss']:.4f}"),
        (f"sample time, {q['num_samples']} samples, T=1000 (s)", f"{r['sample_wall_s']:.0f}"),
        ("samples the classifier recognises (p > 0.9)", f"{q['confident_share']:.1%}"),
        ("real test digits, same classifier", f"{ref['confident_share']:.1%}"),
        (
            "class evenness of samples / real (1 = uniform)",
            f"{q['evenness']:.3f} / {ref['evenness']:.3f}",
        ),
        (f"test NLL, {nll['num_examples']} held-out digits (bits/dim)", f"{nll['bpd']:.3f}"),
    ]
    out = [
        "## The digits default end to end (`digits_quality.py`)",
        "",
        "`python benchmarks/digits_quality.py`: the README's train command (configs/digits.py),",
        "then `ddpm-jax sample` (1,000 EMA samples) and `ddpm-jax eval` (classifier score and",
        "test NLL).",
        f"Environment: {r['env']['cpu']}, {r['env']['cpu_count']} cores, jax {r['env']['jax']}, "
        f"{r['env']['date']}.",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(out)


def render(found: dict[str, list[dict]], note: str | None, gpu: dict[str, list[dict]]) -> str:
    parts = ["# Benchmarks", ""]
    if note:
        parts += [f"> **{note}**", ""]
    parts += [
        "Regenerate with `bash benchmarks/run_all.sh` (CPU settings; about 15 minutes on 2 quiet",
        "cores); on a GPU/TPU host run the scripts with their defaults (see each docstring).",
        "",
        "# CPU",
        "",
        machine_section(found),
    ]
    summary = summary_section(found)
    if summary:
        parts += ["", summary]
    for name, title in SECTIONS:
        if found.get(name):
            parts += ["", benchmark_section(title, found[name])]
    digits = digits_section(found)
    if digits:
        parts += ["", digits]
    penalty = scan_penalty(found)
    if penalty:
        parts += ["", penalty]
    parts += ["", "# GPU", ""]
    if any(gpu.get(name) for name, _ in SECTIONS):
        parts += [machine_section(gpu)]
        for name, title in SECTIONS:
            if gpu.get(name):
                parts += ["", benchmark_section(title, gpu[name])]
    else:
        parts += [GPU_TODO]
    parts += ["", METHOD]
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=bench_util.DEFAULT_RESULTS_DIR)
    parser.add_argument("--out", default=os.path.join(bench_util.HERE, "RESULTS.md"))
    parser.add_argument(
        "--gpu_results",
        default=os.path.join(bench_util.HERE, "results_gpu"),
        help="JSON of the three scripts run on a GPU host (rendered in the GPU section)",
    )
    parser.add_argument("--note", default=None, help="a banner line (e.g. 'preliminary')")
    args = parser.parse_args(argv)
    gpu = load(args.gpu_results) if os.path.isdir(args.gpu_results) else {}
    text = render(load(args.results), args.note, gpu)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
