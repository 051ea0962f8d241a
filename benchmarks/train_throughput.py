"""Throughput of the library's train step (train.make_p_train_step): images/s, MFU, memory.

For each model (digits; cifar10 = the paper's 35.7M-parameter UNet) and dtype
(config.model.dtype), in a fresh process each: compile time of the pmapped step, ms/step and
images/s (steps dispatched back to back, synced at the end, median window), FLOPs per step from
XLA's cost analysis of the compiled step, MFU against the device's peak (harness.PEAK_TFLOPS, or
a measured f32 matmul on CPU) and the peak memory (device peak_bytes_in_use, or peak RSS on CPU).
The paper trained CIFAR-10 at 21 steps/s at batch 128 on a TPU v3-8 (2688 images/s).

  python benchmarks/train_throughput.py                          # accelerator: batch 128/device
  python benchmarks/train_throughput.py --cpu                    # run_all.sh's CPU settings
  python benchmarks/train_throughput.py --quick                  # seconds: tiny models, 1 step
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

COLUMNS = (
    ("model", "model", "s"),
    ("dtype", "dtype", "s"),
    ("batch", "global_batch", "d"),
    ("k", "steps_per_dispatch", "d"),
    ("params M", "params_m", ".1f"),
    ("compile s", "compile_s", ".1f"),
    ("ms/step", "step_ms", ".1f"),
    ("images/s", "images_per_s", ".4g"),
    ("GFLOP/img", "gflop_per_image", ".3g"),
    ("MFU %", "mfu_pct", ".2f"),
    ("peak MiB", "peak_mem_mib", ".0f"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="digits,cifar10 (quick: digits)")
    parser.add_argument("--dtypes", default=None, help="float32,bfloat16 (quick: float32)")
    parser.add_argument("--batch", type=int, default=128, help="per-device batch (cifar10)")
    parser.add_argument("--steps_per_dispatch", default="1", help="comma list, e.g. 1,8")
    parser.add_argument("--iters", type=int, default=20, help="dispatches per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows")
    parser.add_argument("--cpu", action="store_true", help="CPU sizes: batch digits 32, cifar 2")
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 step (smoke test)")
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "train.json"))
    args = parser.parse_args(argv)
    args.models = args.models or ("digits" if args.quick else "digits,cifar10")
    args.dtypes = args.dtypes or ("float32" if args.quick else "float32,bfloat16")
    if args.quick or args.cpu:
        args.iters, args.repeats = (1, 1) if args.quick else (3, 1)
    return args


def run_case(model: str, dtype: str, args) -> list[dict]:
    """One (model, dtype) in this process: a row per steps_per_dispatch."""
    config = harness.get_config(model, dtype, tiny=args.quick)
    batch = args.batch
    if args.quick or args.cpu:
        batch = {"digits": 32 if args.cpu else 4}.get(model, 2)
    ks = [int(k) for k in args.steps_per_dispatch.split(",")]
    rows = harness.measure_train(
        config, per_device_batch=batch, steps_per_dispatch=ks, iters=args.iters,
        repeats=args.repeats,
    )  # fmt: skip
    return [dict(row, model=model, dtype=dtype) for row in rows]


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            print(f"[case] {model} {dtype}", file=sys.stderr, flush=True)
            try:
                run = harness.isolated if not args.quick else lambda f, *a: f(*a)
                rows += run(run_case, model, dtype, args)
            except Exception as e:  # noqa: BLE001 - a failed case is a row, not the end
                rows.append({"model": model, "dtype": dtype, "error": repr(e)[:400]})
    harness.report("train_throughput", args, COLUMNS, rows, "train step throughput")


if __name__ == "__main__":
    main()
