"""Noise schedules: numpy float64 betas, and the frozen pytree of coefficients derived from them.

Everything here is precomputed once in float64 (as the paper's code does) and cast to float32 in
one step, so that products such as `alphas_cumprod` over 1000 steps carry no float32 drift.

Timestep convention: index t in {0, ..., T-1}; index 0 is the paper's t = 1.
"""

from __future__ import annotations

import math
import numbers

import flax
import jax.numpy as jnp
import numpy as np

# Beta range of Ho et al. 2020 (Sec. 4) for a 1000-step chain; other lengths are rescaled by
# 1000 / T (as in Nichol & Dhariwal 2021) so that every chain ends close to pure noise.
REFERENCE_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
MAX_BETA = 0.999  # keeps alphas_cumprod > 0, so every coefficient below stays finite.


def _check_num_timesteps(num_timesteps) -> int:
    """Returns num_timesteps as an int, or raises ValueError if it is not an integer >= 1."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral):
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    return int(num_timesteps)


def _ramp(num_timesteps: int) -> np.ndarray:
    """Fractions 0..1 along a T-step ramp; a one-step chain sits at the end of the ramp."""
    if num_timesteps == 1:
        return np.ones(1)
    return np.linspace(0.0, 1.0, num_timesteps)


def _scaled_range(num_timesteps: int, beta_start: float, beta_end: float, max_beta: float):
    """Endpoints given for a 1000-step chain, rescaled to T steps and capped at max_beta."""
    if not 0.0 < beta_start <= beta_end:
        raise ValueError(f"need 0 < beta_start <= beta_end, got {beta_start!r}, {beta_end!r}")
    scale = REFERENCE_STEPS / num_timesteps
    return min(scale * beta_start, max_beta), min(scale * beta_end, max_beta)


def linear_schedule(
    num_timesteps: int,
    *,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    max_beta: float = MAX_BETA,
) -> np.ndarray:
    """Linear betas: Ho et al. 2020 (1e-4 .. 0.02 at T=1000), endpoints scaled by 1000/T."""
    start, end = _scaled_range(num_timesteps, beta_start, beta_end, max_beta)
    return start + (end - start) * _ramp(num_timesteps)


def quad_schedule(
    num_timesteps: int,
    *,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    max_beta: float = MAX_BETA,
) -> np.ndarray:
    """Betas whose square roots are linear (the paper code's "quad"), endpoints as for linear."""
    start, end = _scaled_range(num_timesteps, beta_start, beta_end, max_beta)
    root = math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * _ramp(num_timesteps)
    return root**2


def sigmoid_schedule(
    num_timesteps: int,
    *,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    max_beta: float = MAX_BETA,
) -> np.ndarray:
    """Betas start + (end - start) * sigmoid(u), u linear over [-6, 6]; endpoints as for linear."""
    start, end = _scaled_range(num_timesteps, beta_start, beta_end, max_beta)
    u = -6.0 + 12.0 * _ramp(num_timesteps)
    return start + (end - start) / (1.0 + np.exp(-u))


def const_schedule(
    num_timesteps: int, *, beta: float = BETA_END, max_beta: float = MAX_BETA
) -> np.ndarray:
    """Constant betas (beta at T=1000, scaled by 1000/T and capped like linear)."""
    return np.full(num_timesteps, min(beta * REFERENCE_STEPS / num_timesteps, max_beta))


def jsd_schedule(num_timesteps: int, *, max_beta: float = MAX_BETA) -> np.ndarray:
    """Betas 1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al. 2015); the final 1 capped at max_beta.

    With max_beta=1 the last step destroys the signal exactly (alphas_cumprod[-1] == 0), which
    makes the x0-from-noise coefficients infinite; the default cap keeps them finite.
    """
    return np.minimum(1.0 / np.arange(num_timesteps, 0, -1, dtype=np.float64), max_beta)


def cosine_schedule(num_timesteps: int, *, s: float = 0.008, max_beta: float = MAX_BETA):
    """Nichol & Dhariwal 2021, Eq. (17): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + s) / (1.0 + s) * np.pi / 2.0) ** 2
    # beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped to avoid the singularity at t = T.
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


_SCHEDULES = {
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "quad": quad_schedule,
    "sigmoid": sigmoid_schedule,
    "const": const_schedule,
    "jsd": jsd_schedule,
}


def check_betas(betas) -> np.ndarray:
    """Returns betas as float64 [T], or raises ValueError unless it is 1-D, non-empty, in (0, 1]."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    bad = ~((betas > 0.0) & (betas <= 1.0))  # also catches NaN
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"betas must lie in (0, 1], got betas[{i}] = {float(betas[i])!r}")
    return betas


def get_beta_schedule(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """Returns the named beta schedule.

    Args:
      name: one of "linear", "cosine", "quad", "sigmoid", "const", "jsd".
      num_timesteps: T, an int >= 1.
      **kwargs: options of that schedule (e.g. beta_start, beta_end, max_beta; s for cosine).

    Returns:
      betas: float64 [T], each in (0, 1].

    Raises:
      ValueError: unknown name, bad T, or betas outside (0, 1].
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(_SCHEDULES)}")
    num_timesteps = _check_num_timesteps(num_timesteps)
    return check_betas(_SCHEDULES[name](num_timesteps, **kwargs))


@flax.struct.dataclass
class DiffusionSchedule:
    """Coefficients of the forward process, float32 [T] each (the paper code's names).

    A pytree of arrays: pass it to jit / pmap / scan as an ordinary argument.
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray  # alpha_bar_t, Eq. (4)
    alphas_cumprod_prev: jnp.ndarray  # alpha_bar_{t-1}, with alpha_bar at index -1 equal to 1
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray  # beta-tilde_t, Eq. (7); 0 at index 0
    posterior_log_variance_clipped: jnp.ndarray  # log beta-tilde, index 0 replaced by index 1
    posterior_mean_coef1: jnp.ndarray  # multiplies x_0 in mu-tilde, Eq. (7)
    posterior_mean_coef2: jnp.ndarray  # multiplies x_t in mu-tilde, Eq. (7)

    @property
    def num_timesteps(self) -> int:
        """T, read from the array shape (static under jit)."""
        return self.betas.shape[-1]

    @classmethod
    def from_betas(cls, betas) -> DiffusionSchedule:
        """Precomputes every coefficient in float64 from betas [T] in (0, 1], then casts once."""
        betas = check_betas(betas)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Eq. (7), Ho et al. 2020: beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta-tilde at index 0 is 0; the paper's code logs index 1 there instead. A one-step
        # chain has no index 1, so it uses beta_0 (the fixed_large choice).
        first = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
        arrays = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            # Eq. (7): mu-tilde = coef1 x_0 + coef2 x_t.
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
        )
        return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def make_schedule(name: str, num_timesteps: int, **kwargs) -> DiffusionSchedule:
    """DiffusionSchedule.from_betas(get_beta_schedule(name, num_timesteps, **kwargs))."""
    return DiffusionSchedule.from_betas(get_beta_schedule(name, num_timesteps, **kwargs))
