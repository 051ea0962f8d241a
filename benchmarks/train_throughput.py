"""Throughput of the pmap-ed training step (train.make_p_train_step): images/s, MFU, memory.

For each model (digits, cifar10 = the paper's 35.7M-parameter UNet) and compute dtype
(config.model.dtype), in a fresh process each:
  * compile: wall time of `p_step.lower(...)` and `.compile()` (JAX reuses that executable
    for the calls that follow: the timed calls report 0 backend compiles, checked);
  * throughput: `--iters` steps dispatched back to back, blocked at the end (as the training
    loop runs), median over `--repeats` windows, after `--warmup` steps;
  * FLOPs per step from XLA's cost analysis of the compiled step (per device; XLA counts the
    body of the steps_per_dispatch scan once, so this is per step), and the forward pass's
    FLOPs per image from the lowered `model.apply` (reference: ~11.7 GFLOP per 32x32 CIFAR-10
    image forward, ~35 GFLOP per image for a training step);
  * MFU = FLOPs/step x steps/s / peak, the peak being the dense bf16 rate of the accelerator
    (bench_util.PEAK_TFLOPS_BF16) or, on CPU, the measured float32 matmul rate of this machine;
  * peak memory: the device's peak_bytes_in_use, or the process's peak RSS on CPU; and XLA's
    static estimate (arguments + outputs - donated + temporaries) of the compiled step.

The paper trained CIFAR-10 at 21 steps/s at batch 128 on a TPU v3-8 (2688 images/s).

Run (accelerator defaults: per-device batch 128, 20 timed steps x 3):
  python benchmarks/train_throughput.py
CPU settings of run_all.sh:
  python benchmarks/train_throughput.py --per_device_batch digits=32,cifar10=2 --iters 2 \
      --repeats 1 --warmup 1 --variants library,scanned --out benchmarks/results/train.json
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

COLUMNS = (
    ("model", "model", "s"),
    ("dtype", "dtype", "s"),
    ("step", "variant", "s"),
    ("batch", "global_batch", "d"),
    ("params M", "params_m", ".1f"),
    ("compile s", "compile_s", ".1f"),
    ("ms/step", "step_ms", ".1f"),
    ("steps/s", "steps_per_s", ".3g"),
    ("images/s", "images_per_s", ".4g"),
    ("GFLOP/img train", "train_gflop_per_image", ".3g"),
    ("GFLOP/img fwd", "fwd_gflop_per_image", ".3g"),
    ("MFU %", "mfu_pct", ".2f"),
    ("peak MiB", "peak_mem_mib", ".0f"),
    ("XLA MiB", "xla_mem_mib", ".0f"),
    ("recompiles", "recompiles", "d"),
    ("donated", "state_donated", "s"),
)

PAPER = "Ho et al. 2020: CIFAR-10 at 21 steps/s, batch 128, TPU v3-8 (2688 images/s)."


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,cifar10")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--variants",
        default="library",
        help="library (train.make_p_train_step) and/or scanned (the step inside a lax.scan even "
        "for steps_per_dispatch=1: the library before the fix, see RESULTS.md)",
    )
    parser.add_argument(
        "--per_device_batch",
        default=None,
        help="N, or digits=N,cifar10=M (default 128; CPU: digits=32, cifar10=2; quick: 8, 1)",
    )
    parser.add_argument("--steps_per_dispatch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    parser.add_argument("--iters", type=int, default=None, help="steps per window (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows (default 3)")
    parser.add_argument(
        "--host_batch",
        action="store_true",
        help="pass the batch as numpy every step (as the training loop does) instead of "
        "keeping it on the devices",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak")
    bench_util.add_config_flags(parser)
    bench_util.add_common_flags(
        parser, os.path.join(bench_util.DEFAULT_RESULTS_DIR, "train_throughput.json")
    )
    args = parser.parse_args(argv)
    args.models = bench_util.parse_list(args.models, bench_util.MODELS, "--models")
    args.dtypes = bench_util.parse_list(args.dtypes, ("float32", "bfloat16"), "--dtypes")
    args.variants = bench_util.parse_list(args.variants, bench_util.TRAIN_VARIANTS, "--variants")
    return args


def resolve_counts(args, on_cpu: bool) -> None:
    """Fills the defaults that depend on --quick and on the backend."""
    if args.quick:
        defaults, counts = {"digits": 8, "cifar10": 1}, (0, 1, 1)
    elif on_cpu:
        defaults, counts = {"digits": 32, "cifar10": 2}, (1, 2, 1)
    else:
        defaults, counts = {"digits": 128, "cifar10": 128}, (3, 20, 3)
    bench_util.apply_counts(args, defaults, counts)


# --------------------------------------------------------------------------------------------
# One case (runs in its own process).
# --------------------------------------------------------------------------------------------


def probe(case: dict[str, Any]) -> dict[str, Any]:
    """The environment and the peak FLOP/s, measured in a child like the cases."""
    peak, source = bench_util.device_peak_flops(case.get("peak_tflops"))
    return {"env": bench_util.environment(), "peak_flops": peak, "peak_source": source}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    if case.get("probe"):
        return probe(case)
    import jax

    from ddpm_jax import train

    bench_util.apply_prng_impl(case["prng_impl"])
    events = bench_util.CompileEvents()
    config = bench_util.get_config(case["model"], case["dtype"], case["overrides"])
    num_devices = jax.local_device_count()
    b, k = case["batch"], case["steps_per_dispatch"]
    config.train.batch_size = b * num_devices
    config.train.steps_per_dispatch = k
    schedule = train.create_schedule(config)
    model = train.create_model(config)
    state = train.create_train_state(jax.random.key(0), config, model)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    pstate = train.replicate(state)
    del state
    p_step = bench_util.make_train_step(config, schedule, case["variant"])
    batch = bench_util.device_batch(config, num_devices=num_devices, per_device_batch=b, steps=k)
    if case["host_batch"]:
        batch = jax.device_get(batch)
    rng = jax.random.key(1)

    row = dict(case, devices=num_devices, global_batch=b * num_devices, steps_per_dispatch=k)
    row["params_m"] = num_params / 1e6
    events.reset()
    start = time.perf_counter()
    lowered = p_step.lower(pstate, batch, rng)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    row["lower_s"] = lowered_at - start
    row["compile_s"] = time.perf_counter() - start
    row["compile_events"] = dict(events.durations)
    row.update(_step_flops(compiled, case, config, p_step, pstate, rng))
    row["fwd_gflop_per_image"] = _forward_gflop_per_image(model, config, b)
    xla_mem = bench_util.xla_memory(compiled)
    row["xla_memory"] = xla_mem
    row["xla_mem_mib"] = bench_util.mib(xla_mem["total"]) if xla_mem else None
    del lowered, compiled

    old_leaf = jax.tree.leaves(pstate.params)[0]
    start = time.perf_counter()
    pstate, metrics = p_step(pstate, batch, rng)
    jax.block_until_ready((pstate, metrics))
    row["first_call_s"] = time.perf_counter() - start
    row["state_donated"] = str(old_leaf.is_deleted())
    del old_leaf
    for _ in range(case["warmup"]):
        pstate, metrics = p_step(pstate, batch, rng)
    jax.block_until_ready((pstate, metrics))

    events.reset()
    bench_util.reset_peak_memory()

    def window():
        nonlocal pstate, metrics
        for _ in range(case["iters"]):
            pstate, metrics = p_step(pstate, batch, rng)
        jax.block_until_ready((pstate, metrics))

    times = bench_util.timed_windows(window, case["repeats"])
    peak, source = bench_util.peak_memory_bytes()
    row.update(peak_mem_mib=bench_util.mib(peak), peak_mem_source=source)
    row["recompiles"] = events.backend_compiles
    row["window_s"] = times
    row["loss"] = float(jax.device_get(metrics["loss"]).reshape(-1)[-1])
    return _rates(row, bench_util.median(times) / (case["iters"] * k), case)


def _step_flops(compiled, case, config, p_step, pstate, rng):
    """FLOPs and bytes of one step, per device (a steps=1 compile when k > 1; see docstring)."""
    if case["steps_per_dispatch"] > 1:
        import jax

        num_devices = jax.local_device_count()
        one = bench_util.device_batch(
            config, num_devices=num_devices, per_device_batch=case["batch"], steps=1
        )
        compiled = p_step.lower(pstate, one, rng).compile()
    flops, bytes_accessed = bench_util.flops_of(compiled)
    out = {"flops_per_step_per_device": flops, "bytes_per_step_per_device": bytes_accessed}
    if flops:
        out["train_gflop_per_image"] = flops / case["batch"] / 1e9
    return out


def _forward_gflop_per_image(model, config, batch: int) -> float | None:
    """XLA's FLOPs of model.apply(train=False) per image, from the lowered (uncompiled) HLO."""
    import jax
    import jax.numpy as jnp

    size, channels = config.data.image_size, config.data.channels
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda: bench_util.init_params(config, model))
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    try:
        flops, _ = bench_util.flops_of(apply.lower(params, x, t))
    except Exception:  # noqa: BLE001 - an unlowered cost analysis is optional
        return None
    return None if flops is None else flops / batch / 1e9


def _rates(row: dict[str, Any], step_s: float, case: dict[str, Any]) -> dict[str, Any]:
    row["step_ms"] = step_s * 1e3
    row["steps_per_s"] = 1.0 / step_s
    row["images_per_s"] = row["global_batch"] / step_s
    flops = row.get("flops_per_step_per_device")
    if flops and case["peak_flops"] == case["peak_flops"]:  # not NaN
        achieved = flops * row["devices"] / step_s
        row["achieved_tflops"] = achieved / 1e12
        row["mfu_pct"] = 100.0 * achieved / case["peak_flops"]
    return row


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
    resolve_counts(args, info["env"]["backend"] == "cpu")
    cases = [
        dict(
            model=model,
            dtype=dtype,
            variant=variant,
            batch=args.batch[model],
            steps_per_dispatch=args.steps_per_dispatch,
            warmup=args.warmup,
            iters=args.iters,
            repeats=args.repeats,
            host_batch=args.host_batch,
            overrides=args.set,
            prng_impl=args.prng_impl,
            peak_flops=info["peak_flops"],
        )
        for model in args.models
        for dtype in args.dtypes
        for variant in args.variants
    ]
    rows = run(cases)
    print(f"\n{bench_util.header('train step throughput', info)}\n")
    print(bench_util.format_table(rows, COLUMNS))
    print(f"\n{PAPER}")
    bench_util.finish("train_throughput", args, info, COLUMNS, rows)


if __name__ == "__main__":
    main()
