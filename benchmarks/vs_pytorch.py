"""Ours against PyTorch on the same network, machine, batch and run: train and sampling steps.

The PyTorch network is diffusers' UNet2DModel built from `convert.diffusers_config` for the
model's config; its freshly initialised weights are converted with `convert.from_diffusers`
and used for our UNet too, which checks that the two are the same network, tensor for tensor.

  * training step: q_sample at random t, the network, the MSE loss, backward, global-norm
    clipping at 1, Adam, EMA update. Ours is the pmap-ed `train.make_p_train_step` on one device
    (`--jax_step scanned` puts it in a length-1 lax.scan, as before the fix in RESULTS.md);
    PyTorch's is the same sequence written out (torch.optim.Adam, torch._foreach_lerp_ EMA).
  * sampling step: one network call and one ancestral update (Algorithm 2). Ours is the body of
    the library's sampler jitted alone (bench_util.reverse_step_fn); PyTorch's is the same
    update in torch ops under inference_mode.

Both get `--warmup` untimed steps (which include compilation), then `--iters` steps back to back,
synchronised at the end, median of `--repeats` windows. Reported: images/s of each and the
ratio ours / theirs (above 1: we are faster).

On a GPU: `--bf16` (our config.model.dtype = bfloat16; torch.autocast(bfloat16) for PyTorch)
and `--torch_compile` (torch.compile of the UNet). float32 on GPU lets both use TF32 matmuls
(JAX's default precision; torch.backends.*.allow_tf32 = True).

Needs torch, diffusers and jax in one interpreter:
  /tmp/venv311/bin/python benchmarks/vs_pytorch.py                 # CPU, defaults below
  python benchmarks/vs_pytorch.py --bf16 --torch_compile           # on a GPU box
Smoke test: add --quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# JAX must not reserve most of the GPU: PyTorch shares it in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_util  # noqa: E402

COLUMNS = (
    ("model", "model", "s"),
    ("what", "what", "s"),
    ("precision", "precision", "s"),
    ("batch", "batch", "d"),
    ("ours images/s", "ours_images_per_s", ".4g"),
    ("torch images/s", "torch_images_per_s", ".4g"),
    ("ours/torch", "ratio", ".3f"),
    ("ours ms/step", "ours_step_ms", ".1f"),
    ("torch ms/step", "torch_step_ms", ".1f"),
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,cifar10")
    parser.add_argument(
        "--per_device_batch",
        default=None,
        help="N or digits=N,cifar10=M (default 128; CPU: digits=32, cifar10=2; quick: 8, 1)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; CPU 3)")
    parser.add_argument("--iters", type=int, default=None, help="steps per window (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows (default 3)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute on both sides")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--jax_step", default="library", choices=bench_util.TRAIN_VARIANTS)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--torch_threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--skip_sample", action="store_true")
    bench_util.add_common_flags(
        parser, os.path.join(bench_util.DEFAULT_RESULTS_DIR, "vs_pytorch.json"), cases=False
    )
    args = parser.parse_args(argv)
    args.models = bench_util.parse_list(args.models, bench_util.MODELS, "--models")
    return args


def resolve_counts(args, on_cpu: bool) -> None:
    # PyTorch on CPU needs a few steps before it settles (oneDNN primitive caches, Adam state).
    if args.quick:
        defaults, counts = {"digits": 8, "cifar10": 1}, (2, 2, 1)
    elif on_cpu:
        defaults, counts = {"digits": 32, "cifar10": 2}, (3, 3, 1)
    else:
        defaults, counts = {"digits": 128, "cifar10": 128}, (5, 20, 3)
    bench_util.apply_counts(args, defaults, counts)


def _time(step, sync, args) -> float:
    """Seconds per step: warm-up, then the median of timed windows of back-to-back steps."""
    for _ in range(args.warmup):
        step()
    sync()

    def window():
        for _ in range(args.iters):
            step()
        sync()

    return bench_util.median(bench_util.timed_windows(window, args.repeats)) / args.iters


# --------------------------------------------------------------------------------------------
# Shared model set-up.
# --------------------------------------------------------------------------------------------


class Pair:
    """The config, our model and schedule, and the PyTorch twin holding the same weights."""

    def __init__(self, name: str, args, torch_device):
        import diffusers
        import torch

        from ddpm_jax import convert, train

        self.name = name
        self.config = bench_util.get_config(name, "bfloat16" if args.bf16 else "float32")
        data = self.config.data
        self.shape = (data.image_size, data.image_size, data.channels)
        torch.manual_seed(0)
        cfg = convert.diffusers_config(self.config.model, data.image_size, data.channels)
        self.torch_model = diffusers.UNet2DModel(**cfg).to(torch_device)
        self.params = convert.from_diffusers(self.torch_model.state_dict(), self.config)
        self.model = train.create_model(self.config)
        self.schedule = train.create_schedule(self.config)
        self.num_params = sum(p.numel() for p in self.torch_model.parameters())


# --------------------------------------------------------------------------------------------
# JAX (ours).
# --------------------------------------------------------------------------------------------


def jax_train(pair: Pair, b: int, args) -> float:
    import jax

    from ddpm_jax import train

    config = pair.config
    config.train.batch_size = b
    state = train.create_train_state(jax.random.key(0), config, pair.model)
    params = jax.tree.map(jax.numpy.asarray, pair.params)
    state = state.replace(params=params, ema_params=params, opt_state=state.tx.init(params))
    device = jax.local_devices()[:1]
    pstate = train.replicate(state, devices=device)
    p_step = bench_util.make_train_step(config, pair.schedule, args.jax_step)
    batch = bench_util.device_batch(config, num_devices=1, per_device_batch=b, steps=1)
    rng = jax.random.key(1)
    holder = {"state": pstate, "metrics": None}

    def step():
        holder["state"], holder["metrics"] = p_step(holder["state"], batch, rng)

    return _time(step, lambda: jax.block_until_ready(holder), args)


def jax_sample_step(pair: Pair, b: int, args) -> float:
    import jax

    from ddpm_jax import diffusion

    config = pair.config
    step = bench_util.reverse_step_fn(
        pair.model.apply,
        pair.schedule,
        sampler="ddpm",
        model_mean_type=diffusion.ModelMeanType(config.diffusion.model_mean_type),
        model_var_type=diffusion.ModelVarType(config.diffusion.model_var_type),
        clip_denoised=config.sample.clip_denoised,
    )
    step = jax.jit(step)
    device = jax.local_devices()[0]
    params = jax.device_put(pair.params, device)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (b, *pair.shape)), device)
    rng = jax.random.key(1)
    num_timesteps = pair.schedule.num_timesteps
    holder = {"x": x, "i": 0}

    def one():
        t = num_timesteps - 1 - holder["i"] % num_timesteps
        holder["x"] = step(params, holder["x"], t, t - 1, rng)
        holder["i"] += 1

    return _time(one, lambda: jax.block_until_ready(holder["x"]), args)


# --------------------------------------------------------------------------------------------
# PyTorch (theirs).
# --------------------------------------------------------------------------------------------


class _TorchSchedule:
    """The schedule's per-timestep coefficients as torch tensors on the device."""

    def __init__(self, schedule, device):
        import numpy as np
        import torch

        def as_tensor(name):
            return torch.tensor(np.array(getattr(schedule, name)), device=device)

        self.sqrt_ab = as_tensor("sqrt_alphas_cumprod")
        self.sqrt_1m_ab = as_tensor("sqrt_one_minus_alphas_cumprod")
        self.sqrt_recip_ab = as_tensor("sqrt_recip_alphas_cumprod")
        self.sqrt_recipm1_ab = as_tensor("sqrt_recipm1_alphas_cumprod")
        self.coef1 = as_tensor("posterior_mean_coef1")
        self.coef2 = as_tensor("posterior_mean_coef2")
        self.sigma = as_tensor("betas").sqrt()  # fixed_large
        self.num_timesteps = len(self.sqrt_ab)


def _torch_net(pair: Pair, args):
    import torch

    net = pair.torch_model
    return torch.compile(net) if args.torch_compile else net


def _autocast(device, args):
    import contextlib

    import torch

    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def torch_train(pair: Pair, b: int, device, sync, args) -> float:
    import torch
    import torch.nn.functional as F

    config = pair.config
    net = _torch_net(pair, args)
    pair.torch_model.train()
    params = [p for p in pair.torch_model.parameters() if p.requires_grad]
    optim = config.optim
    opt = torch.optim.Adam(
        params, lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), eps=optim.eps
    )
    ema = [p.detach().clone() for p in params]
    sched = _TorchSchedule(pair.schedule, device)
    size, channels = config.data.image_size, config.data.channels
    x0 = torch.rand(b, channels, size, size, device=device) * 2 - 1
    decay = config.train.ema_decay

    def step():
        t = torch.randint(0, sched.num_timesteps, (b,), device=device)
        noise = torch.randn_like(x0)
        coef = lambda c: c[t].view(-1, 1, 1, 1)
        x_t = coef(sched.sqrt_ab) * x0 + coef(sched.sqrt_1m_ab) * noise
        with _autocast(device, args):
            eps = net(x_t, t).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip_norm)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)

    return _time(step, sync, args)


def torch_sample_step(pair: Pair, b: int, device, sync, args) -> float:
    import torch

    net = _torch_net(pair, args)
    pair.torch_model.eval()
    sched = _TorchSchedule(pair.schedule, device)
    size, channels = pair.config.data.image_size, pair.config.data.channels
    holder = {"x": torch.randn(b, channels, size, size, device=device), "i": 0}

    @torch.inference_mode()
    def one():
        t = sched.num_timesteps - 1 - holder["i"] % sched.num_timesteps
        x = holder["x"]
        with _autocast(device, args):
            eps = net(x, torch.full((b,), t, device=device)).sample.float()
        x0 = (sched.sqrt_recip_ab[t] * x - sched.sqrt_recipm1_ab[t] * eps).clamp(-1.0, 1.0)
        mean = sched.coef1[t] * x0 + sched.coef2[t] * x
        holder["x"] = mean + (sched.sigma[t] * torch.randn_like(x) if t > 0 else 0.0)
        holder["i"] += 1

    return _time(one, sync, args)


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def _torch_device(args):
    import torch

    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def _row(pair: Pair, what: str, b: int, ours_s: float, theirs_s: float, args) -> dict[str, Any]:
    precision = "bf16" if args.bf16 else "fp32"
    if args.torch_compile:
        precision += " +torch.compile"
    return {
        "model": pair.name,
        "what": what,
        "precision": precision,
        "batch": b,
        "params_m": pair.num_params / 1e6,
        "ours_step_ms": ours_s * 1e3,
        "torch_step_ms": theirs_s * 1e3,
        "ours_images_per_s": b / ours_s,
        "torch_images_per_s": b / theirs_s,
        "ratio": theirs_s / ours_s,
        "jax_step": args.jax_step if what == "train step" else "jit(reverse step)",
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device, sync = _torch_device(args)
    resolve_counts(args, device.type == "cpu")
    rows = []
    for name in args.models:
        b = args.batch[name]
        print(f"[{name}] batch {b}", file=sys.stderr, flush=True)
        pair = Pair(name, args, device)
        if not args.skip_train:
            ours = jax_train(pair, b, args)
            theirs = torch_train(pair, b, device, sync, args)
            rows.append(_row(pair, "train step", b, ours, theirs, args))
            print(bench_util.format_table(rows[-1:], COLUMNS), file=sys.stderr, flush=True)
        if not args.skip_sample:
            ours = jax_sample_step(pair, b, args)
            theirs = torch_sample_step(pair, b, device, sync, args)
            rows.append(_row(pair, "sample step", b, ours, theirs, args))
            print(bench_util.format_table(rows[-1:], COLUMNS), file=sys.stderr, flush=True)
    env = bench_util.environment(extra_versions=("torch", "diffusers"))
    env["torch_device"] = str(device)
    env["torch_threads"] = torch.get_num_threads()
    print(
        f"\nours (JAX {env['versions']['jax']}, {env['backend']}) vs PyTorch "
        f"{env['versions']['torch']} ({device}, {env['torch_threads']} threads), "
        f"diffusers {env['versions']['diffusers']}; {env['cpu']}, {env['cpu_count']} cores\n"
    )
    print(bench_util.format_table(rows, COLUMNS))
    bench_util.finish("vs_pytorch", args, {"env": env}, COLUMNS, rows)


if __name__ == "__main__":
    main()
