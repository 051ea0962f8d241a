"""Sampling throughput: the lax.scan samplers against a host-side loop of single steps.

For each model (digits, cifar10) and sampler (ancestral DDPM over T steps, DDIM over
--ddim_steps), in a fresh process each:
  * scan: `sampling.make_pmapped_sampler` (the library's path: one lax.scan over the steps,
    pmapped over the local devices), called `--iters` times back to back per timed window;
  * loop: the same model, batch and devices, a Python loop on the host that calls a pmapped
    single reverse step (network + update, bench_util.reverse_step_fn) once per timestep: the
    pattern the library's sampler replaces;
  * images/s of both, their ratio (scan / loop), image-steps/s (images/s x steps, independent of
    T), compile time of the scan sampler (JAX's compile events during its first call), MFU
    (forward FLOPs from XLA's cost analysis x steps x images/s / peak, peaks as in
    train_throughput.py) and peak memory (device peak_bytes_in_use, or peak RSS on CPU).

The per-step cost does not depend on T, so on CPU the CIFAR-10 model runs a reduced T (default
100, --num_timesteps) to finish; the table states T. The paper sampled 256 CIFAR-10 images in
17 s on a TPU v3-8; `--gpu_paper` times exactly that workload (256 images, T = 1000 ancestral
steps, and DDIM-50) on the local accelerator(s).

Run (accelerator defaults):
  python benchmarks/sample_throughput.py
  python benchmarks/sample_throughput.py --gpu_paper [--dtype bfloat16]
CPU settings of run_all.sh:
  python benchmarks/sample_throughput.py --per_device_batch digits=64,cifar10=2 \
      --num_timesteps digits=1000,cifar10=100 --out benchmarks/results/sample.json
Smoke test: add --quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_util  # noqa: E402

SAMPLERS = ("ddpm", "ddim")
COLUMNS = (
    ("model", "model", "s"),
    ("dtype", "dtype", "s"),
    ("sampler", "sampler", "s"),
    ("T", "num_timesteps", "d"),
    ("steps", "num_steps", "d"),
    ("images", "images_per_call", "d"),
    ("compile s", "compile_s", ".1f"),
    ("s/call scan", "scan_s_per_call", ".3g"),
    ("images/s scan", "scan_images_per_s", ".4g"),
    ("images/s loop", "loop_images_per_s", ".4g"),
    ("scan/loop", "scan_over_loop", ".3f"),
    ("img-steps/s", "scan_image_steps_per_s", ".4g"),
    ("MFU %", "mfu_pct", ".2f"),
    ("peak MiB scan", "scan_peak_mem_mib", ".0f"),
    ("peak MiB loop", "loop_peak_mem_mib", ".0f"),
    ("recompiles", "recompiles", "d"),
)
PAPER = "Ho et al. 2020: 256 CIFAR-10 samples (T = 1000) in 17 s on a TPU v3-8."


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,cifar10")
    parser.add_argument("--samplers", default="ddpm,ddim")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--per_device_batch",
        default=None,
        help="N or digits=N,cifar10=M (default digits=256, cifar10=64; CPU: 64, 2; quick: 8, 1)",
    )
    parser.add_argument(
        "--num_timesteps",
        default=None,
        help="T, or digits=T,cifar10=T (default 1000; CPU: cifar10=100; quick: 20, 10)",
    )
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=None, help="sampler calls per window (1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows (default 2)")
    parser.add_argument("--no_loop", action="store_true", help="skip the host-loop baseline")
    parser.add_argument(
        "--gpu_paper",
        action="store_true",
        help="the paper's workload: cifar10, 256 images over all devices, T = 1000",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak")
    bench_util.add_config_flags(parser)
    bench_util.add_common_flags(
        parser, os.path.join(bench_util.DEFAULT_RESULTS_DIR, "sample_throughput.json")
    )
    args = parser.parse_args(argv)
    if args.gpu_paper:
        args.models = "cifar10"
    args.models = bench_util.parse_list(args.models, bench_util.MODELS, "--models")
    args.samplers = bench_util.parse_list(args.samplers, SAMPLERS, "--samplers")
    return args


def resolve_counts(args, on_cpu: bool, num_devices: int) -> None:
    """Fills the defaults that depend on --quick, --gpu_paper and the backend."""
    if args.quick:
        batch, steps, counts = dict(digits=8, cifar10=1), dict(digits=20, cifar10=10), (1, 1)
    elif on_cpu:
        batch, steps, counts = dict(digits=64, cifar10=2), dict(digits=1000, cifar10=100), (1, 1)
    else:
        batch, steps, counts = dict(digits=256, cifar10=64), dict(digits=1000, cifar10=1000), (1, 2)
    if args.gpu_paper:
        if 256 % num_devices:
            raise SystemExit(f"--gpu_paper: 256 images do not split over {num_devices} devices")
        batch["cifar10"], steps["cifar10"] = 256 // num_devices, 1000
    args.batch = bench_util.parse_per_model(args.per_device_batch, batch)
    args.steps = bench_util.parse_per_model(args.num_timesteps, steps)
    for name, value in zip(("iters", "repeats"), counts):
        if getattr(args, name) is None:
            setattr(args, name, value)


# --------------------------------------------------------------------------------------------
# One case (runs in its own process).
# --------------------------------------------------------------------------------------------


def probe(case: dict[str, Any]) -> dict[str, Any]:
    import jax

    peak, source = bench_util.device_peak_flops(case.get("peak_tflops"))
    return {
        "env": bench_util.environment(),
        "peak_flops": peak,
        "peak_source": source,
        "num_devices": jax.local_device_count(),
    }


class _Case:
    """What the scan and loop measurements of one case share: model, params, schedule."""

    def __init__(self, case: dict[str, Any]):
        import jax
        from flax import jax_utils

        from ddpm_jax import diffusion, sampling, schedules, train

        bench_util.apply_prng_impl(case["prng_impl"])
        config = bench_util.get_config(case["model"], case["dtype"], case["overrides"])
        config.diffusion.num_timesteps = case["num_timesteps"]
        self.case, self.config = case, config
        self.model = train.create_model(config)
        self.schedule = schedules.make_schedule(
            config.diffusion.beta_schedule, case["num_timesteps"]
        )
        params = bench_util.init_params(config, self.model)
        self.fwd_flops_per_image = _forward_flops_per_image(self.model, config, params)
        self.params = jax_utils.replicate(params)
        self.num_devices = jax.local_device_count()
        self.image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
        self.mean_type = diffusion.ModelMeanType(config.diffusion.model_mean_type)
        self.var_type = diffusion.ModelVarType(config.diffusion.model_var_type)
        T = case["num_timesteps"]
        if case["sampler"] == "ddpm":
            self.ts = list(range(T - 1, -1, -1))
        else:
            self.ts = [int(t) for t in sampling.ddim_timesteps(T, case["ddim_steps"])[::-1]]
        self.t_prevs = self.ts[1:] + [-1]


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    if case.get("probe"):
        return probe(case)
    events = bench_util.CompileEvents()
    c = _Case(case)
    row = dict(case, devices=c.num_devices, num_steps=len(c.ts))
    row["images_per_call"] = case["batch"] * c.num_devices
    row.update(_scan(c, events))
    if not case["no_loop"]:
        row.update(_loop(c, events))
        row["scan_over_loop"] = row["scan_images_per_s"] / row["loop_images_per_s"]
    row["scan_image_steps_per_s"] = row["scan_images_per_s"] * len(c.ts)
    if c.fwd_flops_per_image and case["peak_flops"] == case["peak_flops"]:
        achieved = c.fwd_flops_per_image * row["scan_image_steps_per_s"]
        row["achieved_tflops"] = achieved / 1e12
        row["mfu_pct"] = 100.0 * achieved / case["peak_flops"]
    if c.fwd_flops_per_image:
        row["fwd_gflop_per_image"] = c.fwd_flops_per_image / 1e9
    return row


def _scan(c: _Case, events: bench_util.CompileEvents) -> dict[str, Any]:
    """The library's pmapped lax.scan sampler: compile, then timed calls."""
    import jax

    from ddpm_jax import sampling

    case = c.case
    sample_fn = sampling.make_pmapped_sampler(
        c.model.apply,
        c.schedule,
        per_device_batch=case["batch"],
        image_shape=c.image_shape,
        model_mean_type=c.mean_type,
        model_var_type=c.var_type,
        clip_denoised=c.config.sample.clip_denoised,
        sampler=case["sampler"],
        ddim_steps=min(case["ddim_steps"], case["num_timesteps"]),
        ddim_eta=0.0,
    )
    rng = jax.random.key(0)
    events.reset()
    start = time.perf_counter()
    jax.block_until_ready(sample_fn(rng, c.params).images)
    out = {"scan_first_call_s": time.perf_counter() - start}
    out["compile_events"] = dict(events.durations)
    out["compile_s"] = sum(events.durations.values())
    # Fresh keys for the timed calls, made (and sliced: that compiles too) before the window.
    keys = iter(list(jax.random.split(jax.random.key(1), case["iters"] * case["repeats"])))
    events.reset()
    bench_util.reset_peak_memory()

    def window():
        images = None
        for _ in range(case["iters"]):
            images = sample_fn(next(keys), c.params).images
        jax.block_until_ready(images)

    times = bench_util.timed_windows(window, case["repeats"])
    peak, source = bench_util.peak_memory_bytes()
    per_call = bench_util.median(times) / case["iters"]
    out.update(
        recompiles=events.backend_compiles,
        scan_window_s=times,
        scan_s_per_call=per_call,
        scan_images_per_s=case["batch"] * c.num_devices / per_call,
        scan_peak_mem_mib=bench_util.mib(peak),
        peak_mem_source=source,
    )
    return out


def _loop(c: _Case, events: bench_util.CompileEvents) -> dict[str, Any]:
    """A host loop calling a pmapped single step once per timestep (same model and batch)."""
    import jax

    case = c.case
    step = bench_util.reverse_step_fn(
        c.model.apply,
        c.schedule,
        sampler=case["sampler"],
        model_mean_type=c.mean_type,
        model_var_type=c.var_type,
        clip_denoised=c.config.sample.clip_denoised,
    )
    p_step = jax.pmap(step, axis_name="batch", in_axes=(0, 0, None, None, 0))
    shape = (c.num_devices, case["batch"], *c.image_shape)
    x_T = jax.pmap(lambda k: jax.random.normal(k, shape[1:]))(
        jax.random.split(jax.random.key(1), c.num_devices)
    )
    keys = jax.random.split(jax.random.key(2), c.num_devices)
    # Two untimed steps: the first compiles for x_T, the second for the step's own output.
    x = p_step(c.params, x_T, c.ts[0], c.t_prevs[0], keys)
    jax.block_until_ready(p_step(c.params, x, c.ts[1 % len(c.ts)], c.t_prevs[1 % len(c.ts)], keys))

    def window():
        x = x_T
        for t, t_prev in zip(c.ts, c.t_prevs):
            x = p_step(c.params, x, t, t_prev, keys)
        jax.block_until_ready(x)

    events.reset()
    bench_util.reset_peak_memory()
    times = bench_util.timed_windows(window, case["repeats"])
    peak, _ = bench_util.peak_memory_bytes()
    per_call = bench_util.median(times)
    return {
        "loop_window_s": times,
        "loop_s_per_call": per_call,
        "loop_images_per_s": case["batch"] * c.num_devices / per_call,
        "loop_peak_mem_mib": bench_util.mib(peak),
        "loop_recompiles": events.backend_compiles,
    }


def _forward_flops_per_image(model, config, params) -> float | None:
    """XLA's FLOPs of one model.apply(train=False) per image (lowered HLO, batch 8)."""
    import jax
    import jax.numpy as jnp

    size, channels = config.data.image_size, config.data.channels
    x = jax.ShapeDtypeStruct((8, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((8,), jnp.int32)
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    try:
        flops, _ = bench_util.flops_of(apply.lower(params, x, t))
    except Exception:  # noqa: BLE001 - optional
        return None
    return None if flops is None else flops / 8


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = bench_util.start(argv, args, run_case)
    if started is None:
        return
    run, info = started
    resolve_counts(args, info["env"]["backend"] == "cpu", info["num_devices"])
    cases = [
        dict(
            model=model,
            dtype=args.dtype,
            sampler=sampler,
            batch=args.batch[model],
            num_timesteps=args.steps[model],
            ddim_steps=min(args.ddim_steps, args.steps[model]),
            iters=args.iters,
            repeats=args.repeats,
            no_loop=args.no_loop,
            overrides=args.set,
            prng_impl=args.prng_impl,
            peak_flops=info["peak_flops"],
        )
        for model in args.models
        for sampler in args.samplers
    ]
    rows = run(cases)
    print(f"\n{bench_util.header('sampling throughput', info)}\n")
    print(bench_util.format_table(rows, COLUMNS))
    print(f"\n{PAPER}")
    if args.gpu_paper:
        for row in rows:
            if "scan_s_per_call" in row:
                print(
                    f"  ours, {row['sampler']} ({row['num_steps']} steps): "
                    f"{row['scan_s_per_call']:.2f} s for {row['images_per_call']} images"
                )
    bench_util.finish("sample_throughput", args, info, COLUMNS, rows)


if __name__ == "__main__":
    main()
