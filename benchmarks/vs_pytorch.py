"""Ours against PyTorch on the same network, machine, batch and weights: train and sample steps.

diffusers' UNet2DModel is built from `convert.diffusers_config`; its initial weights, converted
by `convert.from_diffusers` (which checks every tensor), start our train step too.
  * train step: ours `train.make_p_train_step` (harness.measure_train); theirs the same
    q_sample, MSE, backward, clip, Adam and EMA in torch (peer_torch.train_step);
  * sample step: the network and one ancestral update: ours jitted `harness.host_loop_step`
    (one `diffusion.p_sample_step`); theirs peer_torch.reverse_step.
Both: warm-up, then steps back to back synced at the end, median window; ours/torch > 1: faster.

Needs torch and diffusers beside jax (here: /work/venv311):
  python benchmarks/vs_pytorch.py --cpu               # run_all.sh's CPU settings
  python benchmarks/vs_pytorch.py --bf16 --compile    # a GPU (or see gpu_check.py)
  python benchmarks/vs_pytorch.py --quick             # seconds: a tiny model
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

COLUMNS = (
    ("model", "model", "s"),
    ("what", "what", "s"),
    ("precision", "precision", "s"),
    ("batch", "batch", "d"),
    ("ours images/s", "ours_images_per_s", ".4g"),
    ("torch images/s", "torch_images_per_s", ".4g"),
    ("ours/torch", "ratio", ".3f"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="digits,cifar10 (quick: digits)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute on both sides")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--cpu", action="store_true", help="CPU sizes: batch digits 32, cifar 2")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 steps (smoke test)")
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "vs_pytorch.json"))
    args = parser.parse_args(argv)
    args.models = args.models or ("digits" if args.quick else "digits,cifar10")
    if args.quick or args.cpu:
        args.iters, args.repeats = 3, 1
    return args


def compare(name: str, args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import peer_torch

    from ddpm_jax import convert, experiment

    config = harness.get_config(name, "bfloat16" if args.bf16 else "float32", tiny=args.quick)
    b = args.batch if not (args.quick or args.cpu) else {"digits": 32}.get(name, 2)
    device, sync = peer_torch.device_and_sync()
    unet = peer_torch.build_unet(config, device)
    params = convert.from_diffusers(unet.state_dict(), config)
    counts = dict(iters=args.iters, repeats=args.repeats)
    ours = harness.measure_train(config, per_device_batch=b, params=params, **counts)[0]
    step = peer_torch.train_step(config, unet, b, device, bf16=args.bf16, compile=args.compile)
    step(), sync()
    theirs = b / harness.time_per_call(step, sync, **counts)
    rows = [("train step", ours["images_per_s"], theirs)]

    ours_step = jax.jit(harness.host_loop_step(config))
    x, t = jnp.zeros((b, *experiment.image_shape(config))), 5
    rng = jax.random.key(0)
    ours_step(params, x, t, rng).block_until_ready()
    ours = b / harness.time_per_call(
        lambda: ours_step(params, x, t, rng), jax.block_until_ready, **counts
    )
    step = peer_torch.reverse_step(config, unet, device, bf16=args.bf16, compile=args.compile)
    x_torch = torch_zeros(b, config, device)
    step(x_torch, t), sync()
    theirs = b / harness.time_per_call(lambda: step(x_torch, t), sync, **counts)
    rows.append(("sample step", ours, theirs))
    precision = ("bf16" if args.bf16 else "fp32") + (" +torch.compile" if args.compile else "")
    return [
        dict(model=name, what=what, precision=precision, batch=b, ours_images_per_s=o,
             torch_images_per_s=p, ratio=o / p)
        for what, o, p in rows
    ]  # fmt: skip


def torch_zeros(b: int, config, device):
    import torch

    size = config.data.image_size
    return torch.zeros(b, config.data.channels, size, size, device=device)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [row for name in args.models.split(",") for row in compare(name, args)]
    title = "ours vs PyTorch (diffusers UNet2DModel)"
    harness.report("vs_pytorch", args, COLUMNS, rows, title, extra=("torch", "diffusers"))


if __name__ == "__main__":
    main()
