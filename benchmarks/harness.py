"""What the benchmark scripts share: configs, peaks, memory, timing, the measured cases, output.

Everything under test is built by the library (`experiment`, `train_state`, `train`, `sampling`,
`parallel`); this module only times it. A case can run in a fresh process (`isolated`), so that
its compile starts cold and the device's peak memory belongs to it alone.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # configs/ and ddpm_jax/ of this checkout

# Dense peak TFLOP/s per device, (bf16, f32), matched in order against the lower-case device kind.
# NVIDIA H100 SXM / H200 SXM datasheets: BF16 Tensor Core 1,979 with sparsity = 989 dense; TF32
# Tensor Core 989 with sparsity = 495 dense (XLA:GPU runs f32 dots in TF32 at default precision).
# A100 datasheet: BF16 312, TF32 156. TPUs (Cloud TPU docs, bf16 per chip; f32 matmuls run as
# bf16 passes at default precision, so the same peak): v4 275, v5e 197, v5p 459, v6e 918.
PEAK_TFLOPS = (
    ("h200", 989.0, 495.0),
    ("h100", 989.0, 495.0),
    ("a100", 312.0, 156.0),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5", 459.0, 459.0),
    ("tpu v6", 918.0, 918.0),
)


def get_config(name: str, dtype: str = "float32", *, tiny: bool = False):
    """configs/<name>.py with config.model.dtype; tiny: a one-level UNet on 8x8 images, T = 10."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.dtype = dtype
    if tiny:
        config.data.image_size = 8
        config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,))
        config.diffusion.num_timesteps = 10
        config.sample.ddim_steps = 5
    return config


# --------------------------------------------------------------------------------------------
# Machine, peaks, memory.
# --------------------------------------------------------------------------------------------


def environment(extra: Sequence[str] = ()) -> dict[str, Any]:
    """Date, CPU, devices and package versions."""
    from importlib import metadata

    import jax

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    names = ("jax", "jaxlib", "flax", "optax", "numpy", *extra)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "backend": jax.default_backend(),
        "device_kind": jax.local_devices()[0].device_kind,
        "local_devices": jax.local_device_count(),
        "versions": {"python": platform.python_version(), **{n: version(n) for n in names}},
    }


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for `dtype`, its source); CPU: a measured f32 matmul."""
    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu":
        rate = _matmul_flops()
        return rate, f"measured f32 1024^3 matmul, {rate / 1e9:.0f} GFLOP/s (whole CPU)"
    kind = device.device_kind.lower()
    for key, bf16, f32 in PEAK_TFLOPS:
        if key in kind:
            tflops = bf16 if dtype == "bfloat16" else f32
            return tflops * 1e12, f"{key} dense {dtype} {tflops:g} TFLOP/s (datasheet)"
    return float("nan"), f"device kind {device.device_kind!r} not in harness.PEAK_TFLOPS"


def _matmul_flops(n: int = 1024, reps: int = 8) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / time_per_call(lambda: f(a), jax.block_until_ready, iters=reps, repeats=3)


def reset_peak_rss() -> None:
    """Resets the process's peak RSS (Linux clear_refs 5); device peaks cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib() -> tuple[float, str]:
    """(peak MiB, what): device 0's peak_bytes_in_use, else the process's peak RSS."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process peak RSS"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process ru_maxrss"


def cost_flops(compiled) -> float | None:
    """FLOPs of a compiled (or lowered) program per device, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return (analysis or {}).get("flops")


# --------------------------------------------------------------------------------------------
# Timing and isolation.
# --------------------------------------------------------------------------------------------


def time_per_call(call: Callable, sync: Callable, *, iters: int, repeats: int) -> float:
    """Seconds per call: `iters` calls back to back, synced at the end; the median window."""
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = call()
        sync(out)
        windows.append((time.perf_counter() - start) / iters)
    return sorted(windows)[len(windows) // 2]


def isolated(fn: Callable, *args, timeout: float = 1800.0, **kwargs):
    """fn(*args, **kwargs) in a fresh spawned process (fn importable); its exceptions re-raise."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(fn, args, kwargs).get(timeout)


def out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


# --------------------------------------------------------------------------------------------
# The cases: the library's train step and samplers.
# --------------------------------------------------------------------------------------------


def measure_train(
    config,
    *,
    per_device_batch: int,
    steps_per_dispatch: Sequence[int] = (1,),
    warmup: int = 1,
    iters: int = 3,
    repeats: int = 1,
    params=None,
) -> list[dict[str, Any]]:
    """`train.make_p_train_step` on synthetic batches, one row per steps_per_dispatch k.

    FLOPs per step come from the compiled k = 1 program (the first k should be 1); `params`
    replaces the initial parameters (e.g. converted from a PyTorch twin).
    """
    import jax
    import numpy as np

    from ddpm_jax import experiment, parallel, train, train_state

    devices = jax.local_device_count()
    config.train.batch_size = per_device_batch * devices
    config.train.steps_per_dispatch = max(steps_per_dispatch)
    experiment.validate_config(config, device_count=jax.device_count())
    schedule, model = experiment.create_schedule(config), experiment.create_model(config)
    state = train_state.create(jax.random.key(0), config, model)
    if params is not None:
        params = jax.tree.map(jax.numpy.asarray, params)
        state = state.replace(params=params, ema_params=params, opt_state=state.tx.init(params))
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    pstate, rng = parallel.replicate(state), jax.random.key(1)
    del state
    p_step = train.make_p_train_step(config, schedule)
    peak, peak_source = peak_flops(config.model.dtype)
    rows, flops = [], None
    for k in steps_per_dispatch:
        gen = np.random.default_rng(k)
        lead = (devices, k, per_device_batch)
        batch = parallel.put_sharded(
            {
                "image": gen.uniform(-1, 1, (*lead, *experiment.image_shape(config))).astype("f4"),
                "label": gen.integers(0, config.data.num_classes, lead).astype("i4"),
            }
        )
        start = time.perf_counter()
        compiled = p_step.lower(pstate, batch, rng).compile()
        compile_s = time.perf_counter() - start
        flops = cost_flops(compiled) if flops is None else flops
        for _ in range(max(warmup, 1)):
            pstate, metrics = compiled(pstate, batch, rng)
        jax.block_until_ready(pstate)
        reset_peak_rss()

        def call(compiled=compiled, batch=batch):
            nonlocal pstate
            pstate, metrics = compiled(pstate, batch, rng)
            return metrics

        dispatch_s = time_per_call(call, jax.block_until_ready, iters=iters, repeats=repeats)
        step_s = dispatch_s / k
        memory, memory_source = peak_memory_mib()
        row = {
            "params_m": num_params / 1e6,
            "global_batch": per_device_batch * devices,
            "steps_per_dispatch": k,
            "compile_s": compile_s,
            "step_ms": 1e3 * step_s,
            "images_per_s": per_device_batch * devices / step_s,
            "gflop_per_image": flops / per_device_batch / 1e9 if flops else None,
            "mfu_pct": 100 * flops / step_s / peak if flops else None,
            "peak_mem_mib": memory,
            "memory_source": memory_source,
            "peak_source": peak_source,
            "loss": float(np.asarray(call()["loss"]).reshape(-1)[-1]),
        }
        rows.append(row)
    return rows


def forward_flops_per_image(config) -> float | None:
    """XLA's FLOPs of one network call (train=False) per image, from the lowered program."""
    import jax
    import jax.numpy as jnp

    from ddpm_jax import experiment

    model = experiment.create_model(config)
    x = jax.ShapeDtypeStruct((8, *experiment.image_shape(config)), jnp.float32)
    t = jax.ShapeDtypeStruct((8,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))
    apply = jax.jit(lambda p, x, t: model.apply(p, x, t, train=False))
    flops = cost_flops(apply.lower(params, x, t))
    return flops / 8 if flops else None


def measure_sampler(config, spec, *, num_images: int, repeats: int = 1) -> dict[str, Any]:
    """`sampling.make_pmapped_sampler` drawing num_images over the local devices."""
    import jax

    from ddpm_jax import experiment, parallel, sampling, train_state

    devices = jax.local_device_count()
    if num_images % devices:
        raise ValueError(f"{num_images} images do not split over {devices} devices")
    model = experiment.create_model(config)
    params = train_state.create(jax.random.key(0), config, model).ema_params
    sample_fn = sampling.make_pmapped_sampler(
        model.apply,
        experiment.create_schedule(config),
        spec,
        experiment.model_output(config),
        per_device_batch=num_images // devices,
        image_shape=experiment.image_shape(config),
        num_classes=experiment.num_classes(config),
    )
    params = parallel.replicate(params)
    keys = iter(jax.random.split(jax.random.key(1), repeats + 1))
    start = time.perf_counter()
    jax.block_until_ready(sample_fn(next(keys), params).images)
    first_s = time.perf_counter() - start
    reset_peak_rss()
    call_s = time_per_call(
        lambda: sample_fn(next(keys), params).images,
        jax.block_until_ready,
        iters=1,
        repeats=repeats,
    )
    steps = config.diffusion.num_timesteps if spec.sampler.value == "ddpm" else spec.steps
    memory, source = peak_memory_mib()
    return {
        "sampler": spec.tag,
        "steps": steps,
        "images": num_images,
        "compile_s": max(first_s - call_s, 0.0),
        "s_per_call": call_s,
        "images_per_s": num_images / call_s,
        "peak_mem_mib": memory,
        "memory_source": source,
    }


def host_loop_step(config):
    """step(params, x_t, t, rng) -> x_{t-1}: the network and one `diffusion.p_sample_step`.

    The body of the ancestral sampler, for loops driven from the host (t an int32 scalar).
    """
    import jax
    import jax.numpy as jnp

    from ddpm_jax import diffusion, experiment

    model, schedule = experiment.create_model(config), experiment.create_schedule(config)
    output, clip = experiment.model_output(config), config.sample.clip_denoised

    def step(params, x_t, t, rng):
        t_vec = jnp.full((x_t.shape[0],), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t), x_t.shape, x_t.dtype)
        out = model.apply({"params": params}, x_t, t_vec, train=False)
        x_prev, _ = diffusion.p_sample_step(
            schedule,
            out,
            x_t,
            t_vec,
            noise,
            model_mean_type=output.mean_type,
            model_var_type=output.var_type,
            clip_denoised=clip,
        )
        return x_prev

    return step


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; columns are (header, key, format spec); '-' where a row lacks a key."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "error" if "error" in row else "-"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)

    body = [[h for h, _, _ in columns]] + [[cell(r, k, s) for _, k, s in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(*body)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(body[0]), rule, *(line(r) for r in body[1:])])


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda x: getattr(x, "item", lambda: str(x))())
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def report(benchmark: str, args, columns, rows: list[dict], title: str, extra=()) -> None:
    """Prints the table and writes the JSON every script writes (read by report.py)."""
    env = environment(extra)
    print(
        f"\n{title} - {env['backend']} x{env['local_devices']} ({env['device_kind']}), "
        f"jax {env['versions']['jax']}\n"
    )
    print(format_table(rows, columns))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"benchmark": benchmark, "env": env, "settings": settings, "columns": columns}
    write_json(args.out, {**payload, "rows": rows})
