"""The PyTorch peer: diffusers' UNet2DModel of the same network, the same train and reverse steps.

The network is built from `convert.diffusers_config` of our config; the schedule's coefficients
are our `experiment.create_schedule`'s, copied to torch. Import only where torch and diffusers
are installed (vs_pytorch.py, gpu_check.py check first).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ddpm_jax import convert, experiment


def device_and_sync() -> tuple[torch.device, callable]:
    """CUDA (TF32 allowed, as XLA's default precision) if present, else the CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda"), lambda *_: torch.cuda.synchronize()
    return torch.device("cpu"), lambda *_: None


def build_unet(config, device, seed: int = 0):
    """diffusers.UNet2DModel for config.model (seeded initial weights) on `device`."""
    import diffusers

    torch.manual_seed(seed)
    cfg = convert.diffusers_config(
        config.model, config.data.image_size, config.data.channels,
        num_classes=experiment.num_classes(config),
    )  # fmt: skip
    return diffusers.UNet2DModel(**cfg).to(device)


class _Coefficients:
    """Per-timestep coefficients of our schedule as float32 tensors on the device."""

    def __init__(self, config, device):
        schedule = experiment.create_schedule(config)
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "betas",
                     "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                     "posterior_mean_coef1", "posterior_mean_coef2"):  # fmt: skip
            value = np.asarray(getattr(schedule, name), np.float32)
            setattr(self, name, torch.tensor(value, device=device))
        self.num_timesteps = schedule.num_timesteps


def _autocast(device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(config, unet, batch: int, device, *, bf16: bool, compile: bool):
    """step() -> loss: q_sample, the network, MSE, backward, clip, Adam, EMA (as train.py)."""
    net = torch.compile(unet) if compile else unet
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    o = config.optim
    opt = torch.optim.Adam(params, lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps)
    ema = [p.detach().clone() for p in params]
    c = _Coefficients(config, device)
    size, channels = config.data.image_size, config.data.channels
    x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1

    def step():
        t = torch.randint(0, c.num_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        x_t = c.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0
        x_t = x_t + c.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise
        with _autocast(device, bf16):
            eps = net(x_t, t).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - config.train.ema_decay)
        return loss

    return step


def reverse_step(config, unet, device, *, bf16: bool, compile: bool):
    """step(x_t, t) -> x_{t-1}: Algorithm 2 with the fixed_large variance, x_0 clipped."""
    net = torch.compile(unet) if compile else unet
    unet.eval()
    c = _Coefficients(config, device)

    @torch.inference_mode()
    def step(x, t: int):
        with _autocast(device, bf16):
            eps = net(x, torch.full((x.shape[0],), t, device=device)).sample.float()
        x0 = c.sqrt_recip_alphas_cumprod[t] * x - c.sqrt_recipm1_alphas_cumprod[t] * eps
        mean = c.posterior_mean_coef1[t] * x0.clamp(-1, 1) + c.posterior_mean_coef2[t] * x
        return mean + (c.betas[t].sqrt() * torch.randn_like(x) if t > 0 else 0.0)

    return step


def sample(config, step, num_images: int, device, steps=None):
    """x_0 [num_images, C, H, W] by `steps` (default all T) reverse steps from x_T ~ N(0, I)."""
    size, channels = config.data.image_size, config.data.channels
    x = torch.randn(num_images, channels, size, size, device=device)
    T = config.diffusion.num_timesteps
    for t in range(T - 1, T - 1 - (steps or T), -1):
        x = step(x, t)
    return x
