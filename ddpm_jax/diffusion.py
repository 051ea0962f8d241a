"""The DDPM math (Ho et al. 2020) as pure jnp functions of (schedule, arrays).

No model, no config and no random draws live here: the network's output and every noise draw
come in as arguments, so each function is testable on its own and safe under jit / pmap / scan.

Shapes: x_start, x_t, noise, model_output are [B, ...] (NHWC images in [-1, 1]); t is an integer
[B] with index 0 the paper's t = 1. Coefficients sched[t] are gathered and reshaped to
[B, 1, ..., 1] so they broadcast against x.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.scipy import special

from ddpm_jax.schedules import DiffusionSchedule


class Choice(enum.Enum):
    """An Enum built from its string value, with an error that lists the allowed values."""

    @classmethod
    def _missing_(cls, value):
        allowed = [m.value for m in cls]
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; expected one of {allowed}")


class ModelMeanType(Choice):
    """What the network predicts."""

    EPSILON = "epsilon"  # the noise, Eq. (11) (the paper's choice)
    START_X = "x_start"  # x_0 itself
    V = "v"  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, Salimans & Ho 2022


class ModelVarType(Choice):
    """The reverse-process variance sigma_t^2: fixed (Sec. 3.2) or learned (Nichol & Dhariwal)."""

    FIXED_SMALL = "fixed_small"  # sigma_t^2 = beta-tilde_t, the posterior variance
    FIXED_LARGE = "fixed_large"  # sigma_t^2 = beta_t
    # Nichol & Dhariwal 2021, Eq. (15): the network's extra C channels v in [-1, 1] give
    # log sigma^2 = frac log beta + (1 - frac) log beta-tilde, frac = (v + 1) / 2.
    LEARNED_RANGE = "learned_range"


def learns_variance(model_var_type) -> bool:
    """Whether the network outputs variance channels (2C) beside the mean's (C); None: no."""
    return model_var_type is not None and ModelVarType(model_var_type) is ModelVarType.LEARNED_RANGE


def split_model_output(model_output, x_t, model_var_type):
    """(mean output [B, ..., C], variance values [B, ..., C] or None) of the network's output,
    which is [B, ..., 2C] (mean channels first) for a learned variance, else x_t's shape."""
    if not learns_variance(model_var_type):
        _check_same_shape(model_output=model_output, x_t=x_t)
        return model_output, None
    channels = x_t.shape[-1]
    chex.assert_shape(
        model_output,
        (*x_t.shape[:-1], 2 * channels),
        custom_message=f"a learned variance needs 2C = {2 * channels} output channels",
    )
    return model_output[..., :channels], model_output[..., channels:]


class LossWeighting(Choice):
    """Per-example weights of L_simple."""

    NONE = "none"  # the paper's unweighted L_simple
    MIN_SNR = "min_snr"  # min(SNR, gamma) / SNR for epsilon (Hang et al. 2023)


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """How to read the network's output: what it predicts and the reverse variance it implies.

    Strings are accepted and converted (`ModelOutput("epsilon", "fixed_large")`).
    """

    mean_type: ModelMeanType = ModelMeanType.EPSILON
    var_type: ModelVarType = ModelVarType.FIXED_LARGE

    def __post_init__(self):
        object.__setattr__(self, "mean_type", ModelMeanType(self.mean_type))
        object.__setattr__(self, "var_type", ModelVarType(self.var_type))


class PMeanVariance(NamedTuple):
    """Moments of p(x_{t-1} | x_t) and the x_0 they imply; each [B, ...] like x_t."""

    mean: jnp.ndarray
    variance: jnp.ndarray
    log_variance: jnp.ndarray
    pred_xstart: jnp.ndarray


# ----------------------------------------------------------------------------------- helpers


def _check_t(t: jnp.ndarray, x: jnp.ndarray, name: str = "t") -> None:
    """Asserts that t is an integer [B] vector matching the batch of x [B, ...]."""
    chex.assert_rank(t, 1, custom_message=f"{name} must be an int vector [B]")
    chex.assert_type(t, int, custom_message=f"{name} must be an integer timestep index")
    chex.assert_axis_dimension(
        x, 0, t.shape[0], custom_message=f"x {x.shape} and {name} {t.shape} disagree on B"
    )


def _check_same_shape(**arrays: jnp.ndarray) -> None:
    """Asserts that the named arrays share one shape (the error names every shape)."""
    described = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    chex.assert_equal_shape(list(arrays.values()), custom_message=f"shapes differ: {described}")


def _per_example(values: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Reshapes [B] values to [B, 1, ..., 1], broadcastable to x [B, ...]."""
    return values.reshape(values.shape + (1,) * (x.ndim - 1))


def _extract(arr: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Gathers arr[t] ([T] -> [B]) and reshapes it to [B, 1, ..., 1], broadcastable to x."""
    return _per_example(arr[t], x)


def _mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ------------------------------------------------------------------------ forward process q


def q_mean_variance(schedule: DiffusionSchedule, x_start, t):
    """Moments of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Eq. (4).

    Args:
      schedule: the DiffusionSchedule.
      x_start: [B, ...] clean data x_0.
      t: int [B] timestep indices.

    Returns:
      (mean, variance, log_variance), each [B, ...].
    """
    _check_t(t, x_start)
    mean = _extract(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = jnp.broadcast_to(
        _extract(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x_start), x_start.shape
    )
    log_variance = jnp.broadcast_to(
        _extract(schedule.log_one_minus_alphas_cumprod, t, x_start), x_start.shape
    )
    return mean, variance, log_variance


def q_sample(schedule: DiffusionSchedule, x_start, t, noise):
    """Draws x_t ~ q(x_t | x_0) given the noise: sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, Eq. (4).

    Args:
      schedule: the DiffusionSchedule.
      x_start: [B, ...] clean data x_0.
      t: int [B] timestep indices.
      noise: [B, ...] standard normal eps, same shape as x_start.

    Returns:
      x_t: [B, ...].
    """
    _check_t(t, x_start)
    _check_same_shape(x_start=x_start, noise=noise)
    return (
        _extract(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
        + _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(schedule: DiffusionSchedule, x_start, x_t, t):
    """Moments of the forward posterior q(x_{t-1} | x_t, x_0), Eqs. (6)-(7).

    Args:
      schedule: the DiffusionSchedule.
      x_start: [B, ...] x_0.
      x_t: [B, ...] the noisy sample at t.
      t: int [B] timestep indices.

    Returns:
      (mean, variance, log_variance_clipped), each [B, ...]; at t == 0 the variance is 0 and the
      log variance is the clipped one (log beta-tilde at index 1).
    """
    _check_t(t, x_t)
    _check_same_shape(x_start=x_start, x_t=x_t)
    # Eq. (7): mu-tilde_t = coef1 x_0 + coef2 x_t.
    mean = (
        _extract(schedule.posterior_mean_coef1, t, x_t) * x_start
        + _extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = jnp.broadcast_to(_extract(schedule.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(
        _extract(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape
    )
    return mean, variance, log_variance


# --------------------------------------------------------- conversions between parameterisations


def predict_start_from_noise(schedule: DiffusionSchedule, x_t, t, noise):
    """x_0 = x_t / sqrt(ab_t) - sqrt(1/ab_t - 1) eps: Eq. (4) solved for x_0. Shapes [B, ...]."""
    _check_t(t, x_t)
    _check_same_shape(x_t=x_t, noise=noise)
    return (
        _extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * noise
    )


def predict_noise_from_start(schedule: DiffusionSchedule, x_t, t, pred_xstart):
    """eps = (x_t / sqrt(ab_t) - x_0) / sqrt(1/ab_t - 1): Eq. (4) solved for eps. [B, ...]."""
    _check_t(t, x_t)
    _check_same_shape(x_t=x_t, pred_xstart=pred_xstart)
    return (_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def predict_v(schedule: DiffusionSchedule, x_start, t, noise):
    """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022, Sec. 4). Shapes [B, ...]."""
    _check_t(t, x_start)
    _check_same_shape(x_start=x_start, noise=noise)
    return (
        _extract(schedule.sqrt_alphas_cumprod, t, x_start) * noise
        - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
    )


def predict_start_from_v(schedule: DiffusionSchedule, x_t, t, v):
    """x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v (Salimans & Ho 2022). Shapes [B, ...]."""
    _check_t(t, x_t)
    _check_same_shape(x_t=x_t, v=v)
    return (
        _extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
        - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_noise_from_v(schedule: DiffusionSchedule, x_t, t, v):
    """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v (Salimans & Ho 2022). Shapes [B, ...]."""
    _check_t(t, x_t)
    _check_same_shape(x_t=x_t, v=v)
    return (
        _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + _extract(schedule.sqrt_alphas_cumprod, t, x_t) * v
    )


def training_target(schedule: DiffusionSchedule, x_start, t, noise, *, model_mean_type):
    """What the network is trained to output: eps, x_0 or v (Eq. (14) regresses eps).

    Args:
      schedule: the DiffusionSchedule.
      x_start: [B, ...] x_0.
      t: int [B].
      noise: [B, ...] the eps used to make x_t.
      model_mean_type: a ModelMeanType (or its string value).

    Returns:
      target: [B, ...].
    """
    model_mean_type = ModelMeanType(model_mean_type)
    _check_t(t, x_start)
    _check_same_shape(x_start=x_start, noise=noise)
    if model_mean_type is ModelMeanType.EPSILON:
        return noise
    if model_mean_type is ModelMeanType.START_X:
        return x_start
    return predict_v(schedule, x_start, t, noise)


def _pred_xstart(schedule, model_output, x_t, t, model_mean_type, clip_denoised):
    """The x_0 implied by the network output, optionally clipped to the data range [-1, 1]."""
    if model_mean_type is ModelMeanType.EPSILON:
        pred_xstart = predict_start_from_noise(schedule, x_t, t, model_output)
    elif model_mean_type is ModelMeanType.START_X:
        pred_xstart = model_output
    else:
        pred_xstart = predict_start_from_v(schedule, x_t, t, model_output)
    return jnp.clip(pred_xstart, -1.0, 1.0) if clip_denoised else pred_xstart


def classifier_free_guidance(cond_output, uncond_output, guidance: float, *, channels: int):
    """(1 + w) eps(x, y) - w eps(x, null) (Ho & Salimans 2021, Eq. 6) on the first `channels`
    channels; any further (variance) channels are the conditional ones. Shapes [B, ..., C'].

    The combination has weights summing to 1, so it is the same affine combination whether the
    network predicts eps, x_0 or v: guiding the raw output guides eps.
    """
    _check_same_shape(cond_output=cond_output, uncond_output=uncond_output)
    mean = (1.0 + guidance) * cond_output[..., :channels] - guidance * uncond_output[..., :channels]
    return jnp.concatenate([mean, cond_output[..., channels:]], axis=-1)


# ------------------------------------------------------------------------ reverse process p


def _model_variance(schedule: DiffusionSchedule, model_var_type: ModelVarType):
    """(sigma_t^2 [T], log sigma_t^2 [T]) for a fixed variance type (Sec. 3.2), as the paper's
    code: fixed_small's variance is beta-tilde (0 at index 0, where no noise is added) while its
    log variance is the clipped one that the decoder L_0 uses."""
    if model_var_type is ModelVarType.FIXED_SMALL:
        return schedule.posterior_variance, schedule.posterior_log_variance_clipped
    # fixed_large: sigma_t^2 = beta_t, except at index 0 where the paper's code uses beta-tilde
    # at index 1 (for a better decoder L_0); a one-step chain keeps beta_0.
    first = schedule.posterior_variance[1:2] if schedule.num_timesteps > 1 else schedule.betas[:1]
    variance = jnp.concatenate([first, schedule.betas[1:]])
    log_variance = jnp.concatenate(
        [schedule.posterior_log_variance_clipped[:1], jnp.log(schedule.betas[1:])]
    )
    return variance, log_variance


def learned_range_log_variance(schedule: DiffusionSchedule, var_values, t):
    """log sigma_t^2 = frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1) / 2
    (Nichol & Dhariwal 2021, Eq. (15)). The two ends are exactly the fixed_large and fixed_small
    log variances, index 0 included (both log beta-tilde_1 there, the decoder's variance),
    so v = +1 / -1 reproduce those types; v is not clipped. var_values [B, ...], t int [B]."""
    _check_t(t, var_values)
    min_log = _extract(_model_variance(schedule, ModelVarType.FIXED_SMALL)[1], t, var_values)
    max_log = _extract(_model_variance(schedule, ModelVarType.FIXED_LARGE)[1], t, var_values)
    frac = 0.5 * (var_values + 1.0)
    return frac * max_log + (1.0 - frac) * min_log


def p_mean_variance(
    schedule: DiffusionSchedule,
    model_output,
    x_t,
    t,
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool,
) -> PMeanVariance:
    """Moments of p_theta(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_hat), sigma_t^2 I), Eqs. (1), (7).

    The mean is the posterior mean at the predicted x_0 (clipped to [-1, 1] if clip_denoised),
    which for the epsilon parameterisation and no clipping equals Eq. (11).

    Args:
      schedule: the DiffusionSchedule.
      model_output: [B, ...] the network's eps, x_0 or v; [B, ..., 2C] (then the variance
        values v in the last C channels) for a learned variance.
      x_t: [B, ...].
      t: int [B].
      model_mean_type: a ModelMeanType (or its string value).
      model_var_type: a ModelVarType (or its string value).
      clip_denoised: clip the predicted x_0 to [-1, 1].

    Returns:
      PMeanVariance(mean, variance, log_variance, pred_xstart), each [B, ...]. Sampling and the
      bound use log_variance; at t == 0 fixed_small's variance is 0, its log variance clipped.
    """
    model_mean_type = ModelMeanType(model_mean_type)
    model_var_type = ModelVarType(model_var_type)
    _check_t(t, x_t)
    model_output, var_values = split_model_output(model_output, x_t, model_var_type)
    if var_values is None:
        variance, log_variance = (
            jnp.broadcast_to(_extract(v, t, x_t), x_t.shape)
            for v in _model_variance(schedule, model_var_type)
        )
    else:
        log_variance = learned_range_log_variance(schedule, var_values, t)
        variance = jnp.exp(log_variance)
    pred_xstart = _pred_xstart(schedule, model_output, x_t, t, model_mean_type, clip_denoised)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_xstart)


def p_sample_step(
    schedule: DiffusionSchedule,
    model_output,
    x_t,
    t,
    noise,
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool,
):
    """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t == 0.

    Args:
      schedule: the DiffusionSchedule.
      model_output: [B, ...] the network's output at (x_t, t).
      x_t: [B, ...].
      t: int [B].
      noise: [B, ...] standard normal z (ignored where t == 0).
      model_mean_type, model_var_type, clip_denoised: as for p_mean_variance.

    Returns:
      (x_prev [B, ...], pred_xstart [B, ...]).
    """
    _check_same_shape(x_t=x_t, noise=noise)
    out = p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
    )
    # Algorithm 2, line 4: z = 0 at the last step (index 0); a mask, never a negative index.
    nonzero = _per_example((t != 0).astype(x_t.dtype), x_t)
    x_prev = out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise
    return x_prev, out.pred_xstart


def ddim_step(
    schedule: DiffusionSchedule,
    model_output,
    x_t,
    t,
    t_prev,
    noise,
    *,
    eta: float,
    model_mean_type,
    clip_denoised: bool,
):
    """One DDIM step from t to t_prev < t (Song et al. 2021, Eq. (12)); eta=0 is deterministic.

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev) (Eq. (16)).

    Args:
      schedule: the DiffusionSchedule.
      model_output: [B, ...] the network's output at (x_t, t).
      x_t: [B, ...].
      t: int [B].
      t_prev: int [B]; -1 means "past the end of the chain" (alpha_bar = 1, returns x0_hat).
      noise: [B, ...] standard normal z (only used where eta > 0).
      eta: 0 for DDIM, 1 for the DDPM posterior variance.
      model_mean_type: a ModelMeanType (or its string value).
      clip_denoised: clip the predicted x_0 to [-1, 1].

    Returns:
      (x_prev [B, ...], pred_xstart [B, ...]).
    """
    model_mean_type = ModelMeanType(model_mean_type)
    _check_t(t, x_t)
    _check_t(t_prev, x_t, name="t_prev")
    _check_same_shape(model_output=model_output, x_t=x_t, noise=noise)
    pred_xstart = _pred_xstart(schedule, model_output, x_t, t, model_mean_type, clip_denoised)
    # Re-derive eps from the (possibly clipped) x_0 so that the two stay consistent.
    eps = predict_noise_from_start(schedule, x_t, t, pred_xstart)
    alpha_bar = _extract(schedule.alphas_cumprod, t, x_t)
    gathered = _extract(schedule.alphas_cumprod, jnp.maximum(t_prev, 0), x_t)
    alpha_bar_prev = jnp.where(_per_example(t_prev >= 0, x_t), gathered, 1.0)
    sigma = eta * jnp.sqrt(
        jnp.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar), 0.0)
        * jnp.maximum(1.0 - alpha_bar / alpha_bar_prev, 0.0)
    )
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0))
    x_prev = jnp.sqrt(alpha_bar_prev) * pred_xstart + direction * eps + sigma * noise
    return x_prev, pred_xstart


def dpm_solver_pp_step(
    schedule: DiffusionSchedule,
    model_output,
    x_t,
    t,
    t_prev,
    prev_pred_xstart,
    prev_h,
    *,
    model_mean_type,
    clip_denoised: bool,
):
    """One step of DPM-Solver++(2M) from t to t_prev < t (Lu et al. 2022, Algorithm 2).

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda_prev -
    lambda_t and x0_hat the data prediction at (x_t, t):

        x_prev = (sigma_prev / sigma_t) x_t + alpha_prev (1 - e^{-h}) D,
        D = x0_hat + (h / (2 h_last)) (x0_hat - x0_hat_last)     (second order, r = h_last / h)

    and D = x0_hat (first order, i.e. DDIM with eta = 0) where there is no previous step
    (prev_h <= 0) or at the end of the chain (t_prev = -1: sigma_prev = 0, h = inf), where the
    step returns x0_hat: the paper's lower order at the final step.

    Args:
      schedule: the DiffusionSchedule.
      model_output: [B, ...] the network's output at (x_t, t).
      x_t: [B, ...].
      t: int [B].
      t_prev: int [B]; -1 means the end of the chain (alpha_bar = 1).
      prev_pred_xstart: [B, ...] x0_hat of the previous step (anything where prev_h <= 0).
      prev_h: float [B] the previous step's h; <= 0 for none.
      model_mean_type: a ModelMeanType (or its string value).
      clip_denoised: clip the predicted x_0 to [-1, 1] (thresholding of the data prediction).

    Returns:
      (x_prev [B, ...], pred_xstart [B, ...], h float [B]; 0 at the end of the chain).
    """
    model_mean_type = ModelMeanType(model_mean_type)
    _check_t(t, x_t)
    _check_t(t_prev, x_t, name="t_prev")
    _check_same_shape(model_output=model_output, x_t=x_t, prev_pred_xstart=prev_pred_xstart)
    pred_xstart = _pred_xstart(schedule, model_output, x_t, t, model_mean_type, clip_denoised)
    inside = t_prev >= 0
    index_prev = jnp.maximum(t_prev, 0)
    lam = jnp.log(schedule.sqrt_alphas_cumprod) - jnp.log(schedule.sqrt_one_minus_alphas_cumprod)
    h = jnp.where(inside, lam[index_prev] - lam[t], 0.0)  # [B]
    second = inside & (prev_h > 0)
    half_ratio = jnp.where(second, h / (2.0 * jnp.where(second, prev_h, 1.0)), 0.0)  # 1 / (2r)
    d = pred_xstart + _per_example(half_ratio, x_t) * (pred_xstart - prev_pred_xstart)
    sigma_ratio = jnp.where(
        inside,
        schedule.sqrt_one_minus_alphas_cumprod[index_prev]
        / schedule.sqrt_one_minus_alphas_cumprod[t],
        0.0,
    )
    alpha_prev = jnp.where(inside, schedule.sqrt_alphas_cumprod[index_prev], 1.0)
    one_minus_exp = jnp.where(inside, -jnp.expm1(-h), 1.0)  # 1 - e^{-h}
    x_prev = (
        _per_example(sigma_ratio, x_t) * x_t + _per_example(alpha_prev * one_minus_exp, x_t) * d
    )
    return x_prev, pred_xstart, h


# ------------------------------------------------------------------------------------ losses


def loss_simple(model_output, target, *, weights=None):
    """L_simple, Eq. (14): per-example mean over non-batch axes of (output - target)^2.

    Args:
      model_output: [B, ...].
      target: [B, ...] eps, x_0 or v (see training_target).
      weights: optional [B] per-example weights (see loss_weights).

    Returns:
      loss: [B].
    """
    _check_same_shape(model_output=model_output, target=target)
    loss = _mean_flat(jnp.square(model_output - target))
    if weights is not None:
        chex.assert_shape(weights, loss.shape, custom_message="weights must be [B]")
        loss = loss * weights
    return loss


def loss_hybrid(
    schedule: DiffusionSchedule,
    model_output,
    x_start,
    x_t,
    t,
    target,
    *,
    model_mean_type,
    vlb_weight: float,
    weights=None,
):
    """L_hybrid = L_simple + lambda L_vlb per example (Nichol & Dhariwal 2021, Eq. (16)).

    model_output is [B, ..., 2C] (mean channels, then the variance values v of LEARNED_RANGE).
    L_vlb = sum_t L_t is estimated as T L_t at the sampled t (bits/dim, `vb_terms_bpd`,
    no clipping), with the mean channels under stop_gradient: the bound trains the variance
    only, L_simple the mean. lambda = vlb_weight (0.001 in the paper, whose code weights the
    per-t term by T / 1000, the same thing).

    Returns:
      loss: [B].
    """
    mean_output, var_values = split_model_output(model_output, x_t, ModelVarType.LEARNED_RANGE)
    simple = loss_simple(mean_output, target, weights=weights)
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_values], axis=-1)
    vb, _ = vb_terms_bpd(
        schedule,
        frozen,
        x_start,
        x_t,
        t,
        model_mean_type=model_mean_type,
        model_var_type=ModelVarType.LEARNED_RANGE,
        clip_denoised=False,
    )
    return simple + vlb_weight * schedule.num_timesteps * vb


def snr(schedule: DiffusionSchedule, t):
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t): int [B] -> float [B]."""
    chex.assert_rank(t, 1, custom_message="t must be an int vector [B]")
    chex.assert_type(t, int, custom_message="t must be an integer timestep index")
    # The ratio of precomputed square roots avoids float32 cancellation in 1 - alpha_bar.
    return jnp.square(schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])


def loss_weights(schedule: DiffusionSchedule, t, *, weighting, model_mean_type, gamma: float = 5.0):
    """Per-example loss weights for L_simple.

    "none": ones. "min_snr": Min-SNR-gamma (Hang et al. 2023), i.e. the x_0 loss weighted by
    min(SNR, gamma), expressed for the chosen target: eps -> min(SNR, gamma) / SNR,
    x_0 -> min(SNR, gamma), v -> min(SNR, gamma) / (SNR + 1).

    Args:
      schedule: the DiffusionSchedule.
      t: int [B].
      weighting: a LossWeighting (or its value: "none" or "min_snr").
      model_mean_type: a ModelMeanType (or its string value).
      gamma: the SNR clip of min_snr.

    Returns:
      weights: float32 [B].
    """
    model_mean_type = ModelMeanType(model_mean_type)
    s = snr(schedule, t)
    weighting = LossWeighting(weighting)
    if weighting is LossWeighting.NONE:
        return jnp.ones_like(s)
    clipped = jnp.minimum(s, gamma)
    if model_mean_type is ModelMeanType.EPSILON:
        return jnp.minimum(1.0, gamma / s)  # = min(SNR, gamma) / SNR, finite even at SNR = 0
    if model_mean_type is ModelMeanType.START_X:
        return clipped
    return clipped / (s + 1.0)


# ------------------------------------------------------------------ variational bound (bits/dim)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (inputs broadcast)."""
    # 0.5 (e^d - 1 - d + (mean1 - mean2)^2 / var2) with d = logvar1 - logvar2. Written with
    # expm1 because for nearly equal variances (e.g. the prior term L_T, d ~ -4e-5) the
    # float32 sum -1 + ... + e^d would lose every significant digit.
    d = logvar1 - logvar2
    return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_prob_between(lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo < hi, differenced in the tail where it is accurate."""
    upper = (lo + hi) > 0.0  # in the upper tail use Phi(-lo) - Phi(-hi): no 1 - 1 cancellation
    delta = jnp.where(
        upper, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo)
    )
    return jnp.log(jnp.maximum(delta, 1e-12))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log-probability of 8-bit data under a Gaussian discretised to 256 bins, Eq. (13).

    Each value x in {-1, -1 + 2/255, ..., 1} owns the bin [x - 1/255, x + 1/255]; the two edge
    bins extend to -inf and +inf, so the 256 probabilities sum to 1.

    Args:
      x: [B, ...] data rescaled to [-1, 1].
      means: [B, ...] Gaussian means.
      log_scales: [B, ...] log standard deviations.

    Returns:
      log_probs: [B, ...] in nats.
    """
    _check_same_shape(x=x, means=means, log_scales=log_scales)
    inv_stdv = jnp.exp(-log_scales)
    lo = inv_stdv * (x - means - 1.0 / 255.0)
    hi = inv_stdv * (x - means + 1.0 / 255.0)
    log_cdf_hi = special.log_ndtr(hi)  # bin 0: (-inf, -1 + 1/255]
    log_one_minus_cdf_lo = special.log_ndtr(-lo)  # bin 255: [1 - 1/255, inf)
    return jnp.where(
        x < -0.999,
        log_cdf_hi,
        jnp.where(x > 0.999, log_one_minus_cdf_lo, _log_prob_between(lo, hi)),
    )


def prior_bpd(schedule: DiffusionSchedule, x_start):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, Eq. (5).

    Args:
      schedule: the DiffusionSchedule.
      x_start: [B, ...] data in [-1, 1].

    Returns:
      bpd: [B].
    """
    t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(schedule, x_start, t)
    kl = normal_kl(mean, log_variance, 0.0, 0.0)
    return _mean_flat(kl) / math.log(2.0)


def vb_terms_bpd(
    schedule: DiffusionSchedule,
    model_output,
    x_start,
    x_t,
    t,
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool,
):
    """One term of the variational bound, Eq. (5), in bits per dimension.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) where t > 0, and the decoder
    L_0 = -log p(x_0 | x_1) (Eq. (13)) where t == 0, chosen per example.

    Args:
      schedule: the DiffusionSchedule.
      model_output: [B, ...] the network's output at (x_t, t).
      x_start: [B, ...] data in [-1, 1] (8-bit values for L_0 to be a likelihood).
      x_t: [B, ...] a sample of q(x_t | x_0).
      t: int [B].
      model_mean_type, model_var_type, clip_denoised: as for p_mean_variance.

    Returns:
      (bpd [B], pred_xstart [B, ...]).
    """
    _check_same_shape(x_start=x_start, x_t=x_t)
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
    out = p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
    )
    kl = normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out.mean, log_scales=0.5 * out.log_variance
    )
    bpd = jnp.where(t == 0, _mean_flat(decoder_nll), _mean_flat(kl)) / math.log(2.0)
    return bpd, out.pred_xstart
