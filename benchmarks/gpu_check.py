"""One command for a GPU (H100/H200): train step, samplers and the PyTorch peer, in <= 8 minutes.

Writes <out>/gpu_check.json (after every section, so a timeout keeps what finished) and
<out>/gpu_check.log. Sections:
  * train: configs/cifar10.py (35.7M params) in bfloat16 and float32, global batch 128 and the
    largest of 512/256 that fits, steps_per_dispatch 1 and 8: images/s, ms/step, compile s,
    GFLOP per image (cost analysis of the compiled step), MFU against harness.PEAK_TFLOPS (H100
    and H200 SXM: 989 dense bf16, 495 dense TF32 - NVIDIA datasheets), peak memory
    (memory_stats()['peak_bytes_in_use']), each (dtype, batch) in a fresh process;
  * sample: 256 images, 1,000 ancestral steps and DDIM-50, `sampling.make_pmapped_sampler`
    (--sample_dtype), wall time per call after compile, images/s;
  * peer: diffusers UNet2DModel (convert.diffusers_config), batch 128, bf16 autocast,
    torch.compile, the same Adam + clip + EMA step timed the same way, and 256 images x 1,000
    steps of the same reverse step; skipped with the reason when torch/diffusers are missing.
A section that would start after --budget_s is skipped with the reason recorded.

On the device (it has torch, jax[cuda], flax; not diffusers, ml_collections, ...), carry wheels:
  here:   pip download --no-deps -d wheels/ diffusers ml_collections huggingface_hub \
              safetensors absl-py etils chex optax orbax-checkpoint tensorboardX tqdm
  there:  pip install --no-index --no-deps wheels/* && pip install --no-deps -e . \
          && python benchmarks/gpu_check.py --out benchmarks/results_gpu
Smoke test of every branch on a CPU in well under a minute (tests/test_benchmarks.py):
  JAX_PLATFORMS=cpu python benchmarks/gpu_check.py --quick --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

log = logging.getLogger("gpu_check")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(harness.HERE, "results_gpu"))
    parser.add_argument("--budget_s", type=float, default=450.0, help="start no section after")
    parser.add_argument("--sample_dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=10, help="dispatches per timed window")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU (smoke test)")
    args = parser.parse_args(argv)
    # (model, batches: the base then the candidates for the largest, ks, images, peer batch)
    if args.quick:
        args.sizes = dict(tiny=True, batches=(2, (4,)), ks=(1, 2), images=2, iters=1)
        args.sizes["largest_for"] = ("bfloat16",)  # every branch once, fewer compiles
    else:
        args.sizes = dict(tiny=False, batches=(128, (512, 256)), ks=(1, 8), images=256)
        args.sizes["largest_for"] = ("bfloat16", "float32")
        args.sizes["iters"] = args.iters
    return args


def train_case(dtype: str, batch: int, sizes: dict) -> list[dict]:
    """One (dtype, global batch) in this process, a row per steps_per_dispatch."""
    import jax

    config = harness.get_config("cifar10", dtype, tiny=sizes["tiny"])
    per_device = batch // jax.local_device_count()
    rows = harness.measure_train(
        config, per_device_batch=per_device, steps_per_dispatch=sizes["ks"], warmup=2,
        iters=sizes["iters"], repeats=2,
    )  # fmt: skip
    return [dict(row, dtype=dtype) for row in rows]


def train_section(sizes: dict) -> list[dict]:
    base, candidates = sizes["batches"]
    rows = []
    for dtype in ("bfloat16", "float32"):
        rows += harness.isolated(train_case, dtype, base, sizes)
        for batch in candidates if dtype in sizes["largest_for"] else ():  # largest that fits
            try:
                rows += harness.isolated(train_case, dtype, batch, sizes)
                break
            except Exception as e:  # noqa: BLE001 - an OOM is an answer here
                if not harness.out_of_memory(e):
                    raise
                rows.append({"dtype": dtype, "global_batch": batch, "error": "out of memory"})
    return rows


def sample_case(sampler: str, dtype: str, sizes: dict) -> dict:
    from ddpm_jax import experiment

    config = harness.get_config("cifar10", dtype, tiny=sizes["tiny"])
    steps = min(50, config.diffusion.num_timesteps)
    spec = experiment.sampler_spec(config, sampler=sampler, steps=steps, eta=0.0)
    return dict(harness.measure_sampler(config, spec, num_images=sizes["images"]), dtype=dtype)


def peer_case(sizes: dict) -> dict:
    """The diffusers UNet2DModel: a train step and a full ancestral chain, bf16, compiled."""
    import peer_torch

    config = harness.get_config("cifar10", "bfloat16", tiny=sizes["tiny"])
    device, sync = peer_torch.device_and_sync()
    compile_ = device.type == "cuda"  # inductor on CPU is minutes: compile only on the GPU
    unet = peer_torch.build_unet(config, device)
    batch = sizes["batches"][0]
    step = peer_torch.train_step(config, unet, batch, device, bf16=True, compile=compile_)
    start = time.perf_counter()
    step(), step(), sync()
    compile_s = time.perf_counter() - start
    step_s = harness.time_per_call(step, sync, iters=sizes["iters"], repeats=2)
    reverse = peer_torch.reverse_step(config, unet, device, bf16=True, compile=compile_)
    n = sizes["images"]
    peer_torch.sample(config, reverse, n, device, steps=2), sync()
    start = time.perf_counter()
    peer_torch.sample(config, reverse, n, device), sync()
    sample_s = time.perf_counter() - start
    return {
        "device": str(device), "torch_compile": compile_, "global_batch": batch,
        "train_compile_s": compile_s, "train_step_ms": 1e3 * step_s,
        "train_images_per_s": batch / step_s, "sample_images": n,
        "sample_steps": config.diffusion.num_timesteps, "sample_s": sample_s,
        "sample_images_per_s": n / sample_s,
    }  # fmt: skip


def peer_missing() -> str | None:
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(f"{args.out}/gpu_check.log", "w")],
    )  # fmt: skip
    start, sizes = time.perf_counter(), args.sizes
    result = {"quick": args.quick, "sizes": sizes, "env": harness.environment(("torch",))}
    peer_skip = peer_missing()
    sections = {
        "train": lambda: train_section(sizes),
        "sample": lambda: [
            harness.isolated(sample_case, s, args.sample_dtype, sizes) for s in ("ddpm", "ddim")
        ],
        "peer": lambda: {"skipped": peer_skip} if peer_skip else harness.isolated(peer_case, sizes),
    }  # fmt: skip
    for name, run in sections.items():
        elapsed = time.perf_counter() - start
        log.info("section %s (%.0f s elapsed)", name, elapsed)
        if elapsed > args.budget_s:
            result[name] = {"skipped": f"time budget: {elapsed:.0f} s > {args.budget_s:.0f} s"}
        else:
            try:
                result[name] = run()
            except Exception as e:  # noqa: BLE001 - record it, run the next section
                log.exception("section %s failed", name)
                result[name] = {"error": repr(e)[:1000]}
        log.info("%s: %s", name, json.dumps(result[name], default=str))
        result["wall_s"] = time.perf_counter() - start
        harness.write_json(os.path.join(args.out, "gpu_check.json"), result)
    train_columns = (
        ("dtype", "dtype", "s"), ("batch", "global_batch", "d"), ("k", "steps_per_dispatch", "d"),
        ("compile s", "compile_s", ".1f"), ("ms/step", "step_ms", ".1f"),
        ("images/s", "images_per_s", ".4g"), ("MFU %", "mfu_pct", ".1f"),
        ("peak MiB", "peak_mem_mib", ".0f"),
    )  # fmt: skip
    if isinstance(result["train"], list):
        print(harness.format_table(result["train"], train_columns))
    if isinstance(result["sample"], list):
        print(harness.format_table(result["sample"], (
            ("sampler", "sampler", "s"), ("images", "images", "d"), ("s/call", "s_per_call", ".2f"),
            ("images/s", "images_per_s", ".4g"), ("compile s", "compile_s", ".1f"),
        )))  # fmt: skip
    print(f"peer: {json.dumps(result['peer'], default=str)}\nwall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
