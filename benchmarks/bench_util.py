"""Shared helpers of the benchmark scripts: environment, peaks, memory, timing, cases, output.

Each benchmark runs every case (a model and a setting) in a fresh Python process of its own, so
that compile times start from a cold cache and the peak memory of one case is not inflated by the
cases before it. The parent process measures nothing heavy: it spawns the cases, collects one JSON
line from each, prints a table and writes the JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

RESULT_PREFIX = "@@BENCH_RESULT "
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS_DIR = os.path.join(HERE, "results")

# Dense bf16 peak per chip, TFLOP/s, and how many JAX devices one chip shows (TPU v2/v3 expose
# each of their two TensorCores as a device). Matched in order against device_kind, lower case.
PEAK_TFLOPS_BF16 = (
    ("h200", 989.0, 1),
    ("h100", 989.0, 1),
    ("a100", 312.0, 1),
    ("tpu v2", 45.0, 2),
    ("tpu v3", 123.0, 2),
    ("tpu v4", 275.0, 1),
    ("tpu v5 lite", 197.0, 1),
    ("tpu v5e", 197.0, 1),
    ("tpu v5p", 459.0, 1),
    ("tpu v5", 459.0, 1),
    ("tpu v6 lite", 918.0, 1),
    ("tpu v6e", 918.0, 1),
)

MODELS = ("digits", "cifar10")


# --------------------------------------------------------------------------------------------
# Environment.
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(extra_versions: Iterable[str] = ()) -> dict[str, Any]:
    """Machine, devices and package versions, for the JSON and RESULTS.md."""
    import jax

    devices = jax.local_devices()
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", *extra_versions):
        versions[name] = package_version(name)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "local_devices": len(devices),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


# --------------------------------------------------------------------------------------------
# Peak FLOP/s.
# --------------------------------------------------------------------------------------------


def measure_matmul_flops(n: int = 2048, min_seconds: float = 0.5, dtype: str = "float32") -> float:
    """The best rate of an n x n matmul on the default device, FLOP/s (2 n^3 per product)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while True:
            out = f(a)
            reps += 1
            out.block_until_ready()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 3:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def device_peak_flops(override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of all local devices together, where the number comes from).

    Accelerators: the dense bf16 table (PEAK_TFLOPS_BF16) times the local devices; CPU: the
    measured float32 matmul rate of this process (all cores; XLA:CPU shares them between its
    devices). `override_tflops` is a per-device peak in TFLOP/s.
    """
    import jax

    devices = jax.local_devices()
    if override_tflops:
        return override_tflops * 1e12 * len(devices), f"--peak_tflops {override_tflops}/device"
    if devices[0].platform == "cpu":
        rate = measure_matmul_flops()
        return rate, f"measured f32 2048^3 matmul, {rate / 1e9:.0f} GFLOP/s (whole CPU)"
    kind = devices[0].device_kind.lower()
    for key, tflops, devices_per_chip in PEAK_TFLOPS_BF16:
        if key in kind:
            per_device = tflops / devices_per_chip
            return per_device * 1e12 * len(devices), f"{key} bf16 dense {tflops} TFLOP/s/chip"
    return float("nan"), f"unknown device kind {devices[0].device_kind!r} (use --peak_tflops)"


# --------------------------------------------------------------------------------------------
# Memory.
# --------------------------------------------------------------------------------------------


def reset_peak_memory() -> None:
    """Resets the process's peak RSS (Linux: clear_refs 5); device peaks cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> tuple[int | None, str]:
    """(peak bytes, what was measured): device peak_bytes_in_use, else the process's peak RSS."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (device 0)"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process peak RSS (VmHWM)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process ru_maxrss"


def xla_memory(compiled) -> dict[str, int] | None:
    """XLA's static buffer sizes of a compiled executable (per device), or None."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if stats is None:
        return None
    fields = ("argument", "output", "alias", "temp", "generated_code")
    sizes = {f: int(getattr(stats, f"{f}_size_in_bytes", 0)) for f in fields}
    sizes["total"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return sizes


def flops_of(compiled_or_lowered) -> tuple[float | None, float | None]:
    """(flops, bytes accessed) from XLA's cost analysis (per device, loop bodies counted once)."""
    analysis = compiled_or_lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None, None
    return analysis.get("flops"), analysis.get("bytes accessed")


# --------------------------------------------------------------------------------------------
# Compilation events.
# --------------------------------------------------------------------------------------------


class CompileEvents:
    """Counts and times JAX's compilation events (jax.monitoring) while installed."""

    NAMES = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "backend_compile_s",
    }

    def __init__(self):
        self.durations: dict[str, float] = {}
        self.backend_compiles = 0
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        del kwargs
        key = self.NAMES.get(name)
        if key is None:
            return
        self.durations[key] = self.durations.get(key, 0.0) + duration
        if key == "backend_compile_s":
            self.backend_compiles += 1

    def reset(self) -> None:
        self.durations, self.backend_compiles = {}, 0


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def timed_windows(run_window: Callable[[], None], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of run_window (which must block at its end)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_window()
        times.append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


# --------------------------------------------------------------------------------------------
# Cases in subprocesses.
# --------------------------------------------------------------------------------------------


def add_common_flags(
    parser: argparse.ArgumentParser, default_out: str, *, cases: bool = True
) -> None:
    """--quick and --out; with cases, also the flags of run_cases (--case_timeout, ...)."""
    parser.add_argument("--quick", action="store_true", help="tiny iteration counts (smoke test)")
    parser.add_argument("--out", default=default_out, help="JSON output path")
    if not cases:
        return
    parser.add_argument(
        "--case_timeout", type=float, default=3600.0, help="seconds allowed for one case"
    )
    parser.add_argument(
        "--in_process", action="store_true", help="run cases in this process (debugging)"
    )
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)


def run_cases(
    cases: Sequence[dict[str, Any]],
    argv: Sequence[str],
    run_case: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    in_process: bool,
    timeout: float,
) -> list[dict[str, Any]]:
    """Runs each case in a fresh `python <script> <argv> --_case <json>`; returns their rows."""
    rows = []
    for case in cases:
        label = " ".join(f"{k}={v}" for k, v in case.items())
        print(f"[case] {label}", file=sys.stderr, flush=True)
        if in_process:
            rows.append(run_case(case))
            continue
        cmd = [sys.executable, sys.argv[0], *argv, "--_case", json.dumps(case)]
        rows.append(_run_child(cmd, case, timeout))
    return rows


def _run_child(cmd: list[str], case: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(case, error=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    print(tail, file=sys.stderr)
    return dict(case, error=f"exit {proc.returncode}: {tail[-400:]}")


def emit_case_result(row: dict[str, Any]) -> None:
    """What a case's child process prints for the parent (one line)."""
    print(RESULT_PREFIX + json.dumps(row, default=_json_default), flush=True)


def _json_default(value: Any) -> Any:
    try:
        return value.item()
    except AttributeError:
        return str(value)


def strip_case_flag(argv: Sequence[str]) -> list[str]:
    """argv without --_case (and its value) or --in_process, for the children."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--_case":
            skip = True
            continue
        if arg.startswith("--_case=") or arg == "--in_process":
            continue
        out.append(arg)
    return out


# --------------------------------------------------------------------------------------------
# Flags and output.
# --------------------------------------------------------------------------------------------


def parse_per_model(text: str | None, defaults: dict[str, int]) -> dict[str, int]:
    """'64' (every model) or 'digits=64,cifar10=2' (others keep their default) -> {model: int}."""
    values = dict(defaults)
    if not text:
        return values
    if "=" not in text:
        return {name: int(text) for name in values}
    for item in text.split(","):
        name, value = item.split("=")
        if name not in values:
            raise SystemExit(f"unknown model {name!r} in {text!r}; expected one of {MODELS}")
        values[name] = int(value)
    return values


def apply_counts(args, batch_defaults: dict[str, int], counts: tuple[int, int, int]) -> None:
    """Sets args.batch (per model, --per_device_batch over `batch_defaults`) and the
    (warmup, iters, repeats) not given on the command line."""
    args.batch = parse_per_model(args.per_device_batch, batch_defaults)
    for name, value in zip(("warmup", "iters", "repeats"), counts):
        if getattr(args, name) is None:
            setattr(args, name, value)


def parse_list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; expected a comma list of {list(allowed)}")
    return items


def get_config(name: str, dtype: str = "float32", overrides: Sequence[str] = ()):
    """The experiment config of a model (configs/digits.py, configs/cifar10.py).

    overrides: "section.field=value" strings (value a Python literal, else a string), applied
    last, e.g. "model.dropout=0.0".
    """
    import ast

    from configs import cifar10, digits

    config = {"digits": digits, "cifar10": cifar10}[name].get_config()
    config.model.dtype = dtype
    for item in overrides:
        path, _, text = item.partition("=")
        *sections, field = path.split(".")
        node = config
        for section in sections:
            node = node[section]
        if field not in node:
            raise SystemExit(f"--set {item}: config has no field {path!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[field] = value
    return config


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--set (config overrides) and --prng_impl, applied inside each case's process."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field of every model, e.g. --set model.dropout=0.0 (repeatable)",
    )
    parser.add_argument(
        "--prng_impl",
        default=None,
        choices=("threefry2x32", "rbg", "unsafe_rbg"),
        help="jax_default_prng_impl for the run (default: JAX's, threefry2x32)",
    )


def apply_prng_impl(name: str | None) -> None:
    if name:
        import jax

        jax.config.update("jax_default_prng_impl", name)


def start(argv: Sequence[str], args, run_case: Callable[[dict], dict]):
    """The first lines of every script's main: a child runs its case and returns None; the
    parent gets (run, info): run(cases) -> rows, and the probe's environment and peak FLOP/s."""
    import json

    if args._case is not None:
        emit_case_result(run_case(json.loads(args._case)))
        return None
    child_argv = strip_case_flag(argv)
    run = lambda cases: run_cases(
        cases, child_argv, run_case, in_process=args.in_process, timeout=args.case_timeout
    )
    info = run([{"probe": True, "peak_tflops": args.peak_tflops}])[0]
    if "error" in info:
        raise SystemExit(f"probe failed: {info['error']}")
    return run, info


def header(title: str, info: dict[str, Any]) -> str:
    """`title - backend xN (device; CPU, cores), jax V; peak: ...` above a table."""
    env = info["env"]
    return (
        f"{title} - {env['backend']} x{env['local_devices']} "
        f"({env['device_kind']}; {env['cpu']}, {env['cpu_count']} cores), "
        f"jax {env['versions']['jax']}; peak: {info['peak_source']}"
    )


def finish(benchmark: str, args, info: dict[str, Any], columns, rows: list[dict]) -> None:
    """Writes the JSON payload every script writes (read by report.py)."""
    payload = {
        "benchmark": benchmark,
        "env": info["env"],
        "peak_flops": info.get("peak_flops"),
        "peak_source": info.get("peak_source"),
        "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "columns": columns,
        "rows": rows,
    }
    write_json(args.out, payload)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text (and Markdown) table: columns are (header, key, format spec)."""
    header = [h for h, _, _ in columns]
    body = [[_cell(row, key, spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    if "error" in row and key not in row:
        return "error"
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "n/a"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


# --------------------------------------------------------------------------------------------
# Steps under test.
# --------------------------------------------------------------------------------------------

TRAIN_VARIANTS = ("library", "scanned")


def make_train_step(config, schedule, variant: str = "library"):
    """The pmapped train step under test; batches carry a [steps] axis after the device axis.

    "library" is `train.make_p_train_step`: one step called directly when steps_per_dispatch
    is 1, a lax.scan over the steps otherwise. "scanned" always scans, even a single step: the
    library's step before it learnt to skip the length-1 scan, kept to measure what a scan
    costs on XLA:CPU (RESULTS.md). Both map over the leading axis of their arguments, so a
    leading axis of n uses the first n local devices.
    """
    import jax

    from ddpm_jax import train

    if variant == "library":
        return train.make_p_train_step(config, schedule)
    if variant != "scanned":
        raise ValueError(f"unknown train step variant {variant!r}; expected {TRAIN_VARIANTS}")
    step_fn = train.make_step_fn(config, schedule)
    scanned = lambda state, batches, rng: jax.lax.scan(
        lambda s, b: step_fn(s, b, rng), state, batches
    )
    return jax.pmap(scanned, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))


def device_batch(config, *, num_devices: int, per_device_batch: int, steps: int | None, seed=0):
    """A training batch already on the devices, laid out as a pmap returns it.

    Images are uniform in [-1, 1] (the step's cost does not depend on their content), shape
    [num_devices, steps, b, H, W, C], or [num_devices, b, H, W, C] when steps is None.
    """
    import jax
    import numpy as np

    size, channels = config.data.image_size, config.data.channels
    lead = (num_devices,) if steps is None else (num_devices, steps)
    rng = np.random.default_rng(seed)
    batch = {
        "image": rng.uniform(-1, 1, (*lead, per_device_batch, size, size, channels)),
        "label": rng.integers(0, config.data.num_classes, (*lead, per_device_batch)),
    }
    batch = {"image": batch["image"].astype(np.float32), "label": batch["label"].astype(np.int32)}
    devices = jax.local_devices()[:num_devices]
    return jax.pmap(lambda x: x, axis_name="batch", devices=devices)(batch)


def init_params(config, model, seed: int = 0):
    """The model's initial parameters (what train.create_train_state starts from), no optimiser."""
    import functools

    import jax
    import jax.numpy as jnp

    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.key(seed), x, t)["params"]


def reverse_step_fn(
    apply_fn, schedule, *, sampler: str, model_mean_type, model_var_type, clip_denoised=True
):
    """step(params, x_t [B,...], t, t_prev, rng) -> x_prev: one network call and one update.

    The body of one iteration of the library's samplers (Algorithm 2, or DDIM with eta = 0),
    as a standalone function, for the host-loop baseline and the PyTorch comparison. t and
    t_prev are int32 scalars; the step's noise key is fold_in(rng, t).
    """
    import jax
    import jax.numpy as jnp

    from ddpm_jax import diffusion

    mean_type = diffusion.ModelMeanType(model_mean_type)
    var_type = diffusion.ModelVarType(model_var_type)

    def step(params, x_t, t, t_prev, rng):
        t_vec = jnp.full((x_t.shape[0],), t, jnp.int32)
        out = apply_fn({"params": params}, x_t, t_vec, train=False).astype(x_t.dtype)
        if sampler == "ddpm":
            noise = jax.random.normal(jax.random.fold_in(rng, t), x_t.shape, x_t.dtype)
            x_prev, _ = diffusion.p_sample_step(
                schedule,
                out,
                x_t,
                t_vec,
                noise,
                model_mean_type=mean_type,
                model_var_type=var_type,
                clip_denoised=clip_denoised,
            )
            return x_prev
        t_prev_vec = jnp.full((x_t.shape[0],), t_prev, jnp.int32)
        x_prev, _ = diffusion.ddim_step(
            schedule,
            out,
            x_t,
            t_vec,
            t_prev_vec,
            jnp.zeros_like(x_t),
            eta=0.0,
            model_mean_type=mean_type,
            clip_denoised=clip_denoised,
        )
        return x_prev

    return step
