"""Sampling throughput: the library's lax.scan samplers, and a host loop of single steps.

For each model and sampler (ancestral over T steps; DDIM over --ddim_steps), in a fresh process:
  * scan: `sampling.make_pmapped_sampler` (one lax.scan, pmapped): compile time (first call
    minus a timed call), seconds per call, images/s, image-steps/s, peak memory;
  * loop (ancestral only): the same network and batch, a Python loop that calls a pmapped
    `harness.host_loop_step` (the network + one `diffusion.p_sample_step`) once per timestep:
    the pattern the scan replaces; reported as the ratio scan / loop.
Per-step cost does not depend on T, so --cpu runs cifar10 at T = 100 (the table states T). The
paper sampled 256 CIFAR-10 images (T = 1000) in 17 s on a TPU v3-8; gpu_check.py times that.

  python benchmarks/sample_throughput.py            # accelerator: 256 images per call
  python benchmarks/sample_throughput.py --cpu      # run_all.sh's CPU settings
  python benchmarks/sample_throughput.py --quick    # seconds: a tiny model, T = 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

COLUMNS = (
    ("model", "model", "s"),
    ("sampler", "sampler", "s"),
    ("T", "num_timesteps", "d"),
    ("steps", "steps", "d"),
    ("images", "images", "d"),
    ("compile s", "compile_s", ".1f"),
    ("s/call", "s_per_call", ".3g"),
    ("images/s", "images_per_s", ".4g"),
    ("img-steps/s", "image_steps_per_s", ".4g"),
    ("scan/loop", "scan_over_loop", ".3f"),
    ("peak MiB", "peak_mem_mib", ".0f"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="digits,cifar10 (quick: digits)")
    parser.add_argument("--samplers", default="ddpm,ddim")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--images", type=int, default=256, help="images per call (all devices)")
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--no_loop", action="store_true", help="skip the host-loop baseline")
    parser.add_argument("--cpu", action="store_true", help="CPU sizes: 16 / 1 images, T=100")
    parser.add_argument("--quick", action="store_true", help="a tiny model, T = 10 (smoke test)")
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "sample.json"))
    args = parser.parse_args(argv)
    args.models = args.models or ("digits" if args.quick else "digits,cifar10")
    return args


def run_case(model: str, sampler: str, args) -> dict:
    """One (model, sampler) in this process."""
    from ddpm_jax import experiment

    config = harness.get_config(model, args.dtype, tiny=args.quick)
    images = args.images
    if args.quick or args.cpu:
        images = 2 if args.quick else {"digits": 16}.get(model, 1)
        if args.cpu and model != "digits":
            config.diffusion.num_timesteps = 100
    steps = min(args.ddim_steps, config.diffusion.num_timesteps)
    spec = experiment.sampler_spec(config, sampler=sampler, steps=steps, eta=0.0)
    row = harness.measure_sampler(config, spec, num_images=images)
    row.update(model=model, num_timesteps=config.diffusion.num_timesteps)
    row["image_steps_per_s"] = row["images_per_s"] * row["steps"]
    if sampler == "ddpm" and not args.no_loop:
        row["scan_over_loop"] = host_loop_s(config, images) / row["s_per_call"]
    return row


def host_loop_s(config, images: int) -> float:
    """Seconds to draw `images` with a host loop over a pmapped single step (after a warm-up)."""
    import jax

    from ddpm_jax import experiment, parallel, train_state

    devices = jax.local_device_count()
    model = experiment.create_model(config)
    params = parallel.replicate(train_state.create(jax.random.key(0), config, model).ema_params)
    p_step = parallel.pmap(harness.host_loop_step(config), in_axes=(0, 0, None, None))
    shape = (devices, images // devices, *experiment.image_shape(config))
    x_T = parallel.put_sharded(jax.random.normal(jax.random.key(1), shape))
    rng, T = jax.random.key(2), config.diffusion.num_timesteps
    jax.block_until_ready(p_step(params, p_step(params, x_T, T - 1, rng), T - 2, rng))
    start = time.perf_counter()
    x = x_T
    for t in range(T - 1, -1, -1):
        x = p_step(params, x, t, rng)
    jax.block_until_ready(x)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for sampler in args.samplers.split(","):
            print(f"[case] {model} {sampler}", file=sys.stderr, flush=True)
            try:
                run = harness.isolated if not args.quick else lambda f, *a: f(*a)
                rows.append(run(run_case, model, sampler, args))
            except Exception as e:  # noqa: BLE001 - a failed case is a row, not the end
                rows.append({"model": model, "sampler": sampler, "error": repr(e)[:400]})
    harness.report("sample_throughput", args, COLUMNS, rows, "sampling throughput")


if __name__ == "__main__":
    main()
