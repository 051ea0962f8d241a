"""Samplers: ancestral DDPM (Algorithm 2, Ho et al. 2020), DDIM (Song et al. 2021), respaced
ancestral (Nichol & Dhariwal 2021) and DPM-Solver++(2M) (Lu et al. 2022), with classifier-free
guidance (Ho & Salimans 2021) for any of them. `SamplerSpec` chooses; `draw` dispatches.

Each sampler is one `jax.lax.scan` over reversed timesteps, so the traced program has the same
size for T = 10 and T = 1000. Randomness is explicit and split once, up front:

    rng -> (rng_x, rng_steps);  x_T ~ N(0, I) from rng_x;  step_rngs = split(rng_steps, S)

and step_rngs[i] drives the i-th step of the scan (timestep T-1-i for the ancestral sampler), fed
to the scan as `xs` (DPM-Solver++ draws no noise and uses rng_x only). The network is injected
as `denoise_fn(x_t, t) -> model_output`, t int32 [B]; `make_denoise_fn` closes flax params (and
class labels, and the guidance weight) into one. `make_pmapped_sampler` runs the sampler on
every local device, each device on its own key.

The few-step samplers that read the schedule's values (respaced, and the "logsnr" spacing)
need a concrete schedule: close it over (as `make_pmapped_sampler` does) rather than passing it
through jit as a traced argument.

Typical use (jit once, call many times; params go in as an argument, not baked-in constants):

    @jax.jit
    def draw(rng, params):
        return sampling.sample(
            rng, sampling.make_denoise_fn(model.apply, params), schedule, (64, 32, 32, 3),
            model_mean_type=diffusion.ModelMeanType.EPSILON,
            model_var_type=diffusion.ModelVarType.FIXED_LARGE)

    images = sampling.to_uint8(draw(jax.random.key(0), ema_params))  # uint8 [64, 32, 32, 3]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, parallel
from ddpm_jax.schedules import DiffusionSchedule

# denoise_fn(x_t [B, ...] float, t [B] int32) -> model_output [B, ...] (eps, x_0 or v).
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
# step_fn(x_t, t [B], t_prev [B], rng) -> (x_prev, pred_xstart): one reverse step, network inside.
_StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class Sampler(diffusion.Choice):
    """Which reverse chain to run."""

    ANCESTRAL = "ddpm"  # Algorithm 2 of Ho et al. 2020: all T steps
    DDIM = "ddim"  # Song et al. 2021: `steps` strided steps, noise scaled by eta
    RESPACED = "respaced"  # Nichol & Dhariwal 2021, Sec. 4: Algorithm 2 on `steps` timesteps
    DPM_SOLVER_PP = "dpm++2m"  # Lu et al. 2022, Alg. 2: multistep, second order, deterministic


class Spacing(diffusion.Choice):
    """How a few-step sampler picks its timesteps out of the T of training."""

    UNIFORM = "uniform"
    QUADRATIC = "quadratic"  # dense near t = 0 (Song et al. 2021, CIFAR-10)
    LOGSNR = "logsnr"  # uniform in lambda = log(alpha / sigma) (Lu et al. 2022); nearest index


class SpecError(ValueError):
    """A SamplerSpec field the schedule cannot run; `field` names it (e.g. "steps")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Everything that chooses a sampler: built once, handed to `make_pmapped_sampler` / `draw`.

    steps and spacing are read by the few-step samplers (DDIM, respaced, DPM-Solver++), eta by
    DDIM alone; the ancestral sampler always runs all T steps. guidance is the classifier-free
    guidance weight w of every sampler (0: off; needs a class-conditional model with a null
    class). Strings are converted to the enums.
    """

    sampler: Sampler = Sampler.ANCESTRAL
    # An int S, or improved-DDPM's section counts (10, 10, 5) (or "10,10,5"): T split into equal
    # sections with that many evenly spaced steps each (`section_timesteps`; spacing unused).
    steps: int | tuple[int, ...] = 50
    eta: float = 0.0
    spacing: Spacing = Spacing.UNIFORM
    clip_denoised: bool = True
    guidance: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "sampler", Sampler(self.sampler))
        object.__setattr__(self, "spacing", Spacing(self.spacing))
        if isinstance(self.steps, str):
            try:
                steps = tuple(int(count) for count in self.steps.split(","))
            except ValueError as e:
                raise ValueError(
                    f"steps={self.steps!r}: expected an int or counts '10,10,5'"
                ) from e
            object.__setattr__(self, "steps", steps)
        elif isinstance(self.steps, list):
            object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "guidance", _check_guidance(self.guidance))

    def validate(self, num_timesteps: int) -> SamplerSpec:
        """Raises SpecError (its `.field` the field at fault) for what the schedule cannot run."""
        checks = []
        if self.sampler is not Sampler.ANCESTRAL:
            checks.append(("steps", lambda: check_num_steps(num_timesteps, self.steps)))
        if self.sampler is Sampler.DDIM:
            checks.append(("eta", lambda: _check_eta(self.eta)))
        for field, check in checks:
            try:
                check()
            except ValueError as e:
                raise SpecError(field, str(e)) from None
        return self

    @property
    def tag(self) -> str:
        """A short name for output directories: "ddpm", "ddim50-eta0", "dpm++2m20-g3"."""
        steps = "-".join(map(str, self.steps)) if isinstance(self.steps, tuple) else self.steps
        if self.sampler is Sampler.ANCESTRAL:
            name = "ddpm"
        elif self.sampler is Sampler.DDIM:
            name = f"ddim{steps}-eta{self.eta:g}"
        else:
            name = f"{self.sampler.value}{steps}"
        return f"{name}-g{self.guidance:g}" if self.guidance else name


class Trajectory(NamedTuple):
    """The chain at recorded steps, in sampling order (K frames)."""

    t: jax.Array  # int32 [K]: the timestep of each frame, decreasing
    x_t: jax.Array  # [K, *shape]: the chain's state entering step t (frame 0 of `sample` is x_T)
    pred_xstart: jax.Array  # [K, *shape]: x_0 predicted from x_t at step t (clipped if asked)


class Samples(NamedTuple):
    """What a pmapped sampler returns for the local devices (n = local devices * batch)."""

    images: jax.Array  # float32 [n, H, W, C] in about [-1, 1]; `to_uint8` for files
    labels: jax.Array | None  # int32 [n] class labels, or None when unconditional


# --------------------------------------------------------------------------------------------
# The chain: one lax.scan shared by both samplers.
# --------------------------------------------------------------------------------------------


def _record(frames, slot, x_t, pred_xstart):
    """Writes (x_t, pred_xstart) into frame `slot` of the buffers, or nothing when slot < 0."""
    index = jnp.maximum(slot, 0)

    def write(buf, value):
        return buf.at[index].set(jnp.where(slot >= 0, value, buf[index]))

    return write(frames[0], x_t), write(frames[1], pred_xstart)


def _run_chain(
    step_fn: _StepFn,
    x_T: jax.Array,
    ts: np.ndarray,
    t_prevs: np.ndarray,
    step_rngs: jax.Array,
    record_ts: np.ndarray | None,
):
    """Scans step_fn over ts (decreasing) from x_T; returns x_0, or (x_0, Trajectory).

    record_ts: None (no trajectory) or the timesteps to record, a subset of ts in ts's order.
    The recorded frames live in a fixed [K, ...] buffer in the carry, written with a mask, so
    that neither memory nor the traced program grows with the number of steps.
    """
    batch = x_T.shape[0]
    if step_rngs.shape[:1] != ts.shape:
        raise ValueError(f"need one key per step: {step_rngs.shape[0]} keys for {len(ts)} steps")
    if record_ts is None:
        slots = np.full(ts.shape, -1, np.int32)
    else:
        slot_of = {int(t): k for k, t in enumerate(record_ts)}
        slots = np.array([slot_of.get(int(t), -1) for t in ts], np.int32)

    def body(carry, xs):
        x_t, frames = carry
        t, t_prev, rng, slot = xs
        t_vec = jnp.full((batch,), t, jnp.int32)
        t_prev_vec = jnp.full((batch,), t_prev, jnp.int32)
        x_prev, pred_xstart = step_fn(x_t, t_vec, t_prev_vec, rng)
        if frames is not None:
            frames = _record(frames, slot, x_t, pred_xstart)
        return (x_prev, frames), None

    frames = None
    if record_ts is not None:
        empty = jnp.zeros((len(record_ts), *x_T.shape), x_T.dtype)
        frames = (empty, empty)
    xs = (
        jnp.asarray(ts, jnp.int32),
        jnp.asarray(t_prevs, jnp.int32),
        step_rngs,
        jnp.asarray(slots),
    )
    (x_0, frames), _ = jax.lax.scan(body, (x_T, frames), xs)
    if record_ts is None:
        return x_0
    return x_0, Trajectory(jnp.asarray(record_ts, jnp.int32), *frames)


def _model_output(
    denoise_fn: DenoiseFn, x_t: jax.Array, t: jax.Array, var_type=None, *, mean_only=False
) -> jax.Array:
    """Calls the network and checks its output against x_t: [B, ..., C], or [B, ..., 2C] for a
    learned variance, of which mean_only keeps the first C (for samplers that need no sigma)."""
    out = denoise_fn(x_t, t)
    channels = x_t.shape[-1] * (2 if diffusion.learns_variance(var_type) else 1)
    if out.shape != (*x_t.shape[:-1], channels):
        raise ValueError(
            f"denoise_fn returned shape {out.shape}; expected {(*x_t.shape[:-1], channels)}"
        )
    return (out[..., : x_t.shape[-1]] if mean_only else out).astype(x_t.dtype)


def _split_rngs(rng: jax.Array, shape: Sequence[int], num_steps: int, dtype):
    """rng -> (x_T ~ N(0, I) [shape], per-step keys [num_steps]); see the module docstring."""
    rng_x, rng_steps = jax.random.split(rng)
    x_T = jax.random.normal(rng_x, tuple(shape), dtype)
    return x_T, jax.random.split(rng_steps, num_steps)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
    return shape


# --------------------------------------------------------------------------------------------
# Ancestral sampling, Algorithm 2 of Ho et al. 2020.
# --------------------------------------------------------------------------------------------


def _trajectory_steps(num_timesteps: int, trajectory_steps) -> np.ndarray:
    """The timesteps to record, validated, deduplicated and in sampling (decreasing) order."""
    if trajectory_steps is None:
        return np.arange(num_timesteps - 1, -1, -1)
    steps = sorted({int(t) for t in trajectory_steps}, reverse=True)
    if not steps or steps[0] > num_timesteps - 1 or steps[-1] < 0:
        raise ValueError(
            f"trajectory_steps must be timesteps in [0, {num_timesteps - 1}], "
            f"got {trajectory_steps!r}"
        )
    return np.asarray(steps)


def p_sample_loop(
    step_rngs: jax.Array,
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    trajectory_steps: Sequence[int] | None = None,
):
    """Algorithm 2 from a given x_T with given per-step keys (what `sample` runs).

    Args:
      step_rngs: keys [T]; step_rngs[i] draws the noise z of timestep T-1-i. The last key (t = 0)
        is never used: the final step adds no noise.
      denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
      schedule: the forward process.
      x_T: [B, ...] the starting noise.
      model_mean_type / model_var_type: diffusion.ModelMeanType / ModelVarType (or their values).
      clip_denoised: clip the predicted x_0 to [-1, 1] at each step.
      return_trajectory: also return a Trajectory.
      trajectory_steps: timesteps to record (static ints); None records all T steps, which costs
        2 * T * x_T.size floats: prefer a few steps for large T or large batches.

    Returns:
      x_0 [B, ...] (x_T's dtype), or (x_0, Trajectory) if return_trajectory.
    """
    mean_type = diffusion.ModelMeanType(model_mean_type)
    var_type = diffusion.ModelVarType(model_var_type)
    num_timesteps = schedule.num_timesteps
    if trajectory_steps is not None and not return_trajectory:
        raise ValueError("trajectory_steps given but return_trajectory=False")
    record = _trajectory_steps(num_timesteps, trajectory_steps) if return_trajectory else None

    def step_fn(x_t, t, t_prev, rng):
        del t_prev  # always t - 1 here
        noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
        return diffusion.p_sample_step(
            schedule,
            _model_output(denoise_fn, x_t, t, var_type),
            x_t,
            t,
            noise,
            model_mean_type=mean_type,
            model_var_type=var_type,
            clip_denoised=clip_denoised,
        )

    ts = np.arange(num_timesteps - 1, -1, -1)
    return _run_chain(step_fn, x_T, ts, ts - 1, step_rngs, record)


def sample(
    rng: jax.Array,
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    trajectory_steps: Sequence[int] | None = None,
):
    """Draws x_0 ~ p_theta by ancestral sampling (Algorithm 2, Ho et al. 2020).

    x_T ~ N(0, I); for t = T-1 .. 0: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at t = 0.
    Keys: rng -> (rng_x, rng_steps); x_T from rng_x; jax.random.split(rng_steps, T)[i] drives
    timestep T-1-i. Wrap in jax.jit (shape and the keyword arguments are static).

    Args:
      rng: a jax.random.key.
      denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
      schedule: the forward process (T = schedule.num_timesteps steps are run).
      shape: [B, ...] of the samples, e.g. (B, H, W, C).
      model_mean_type, model_var_type, clip_denoised, return_trajectory, trajectory_steps:
        see `p_sample_loop`.

    Returns:
      x_0 float32 [shape], or (x_0, Trajectory) if return_trajectory.
    """
    shape = _check_shape(shape)
    x_T, step_rngs = _split_rngs(rng, shape, schedule.num_timesteps, jnp.float32)
    return p_sample_loop(
        step_rngs,
        denoise_fn,
        schedule,
        x_T,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
        return_trajectory=return_trajectory,
        trajectory_steps=trajectory_steps,
    )


# --------------------------------------------------------------------------------------------
# DDIM, Song et al. 2021.
# --------------------------------------------------------------------------------------------


def check_num_steps(num_timesteps: int, num_steps) -> int:
    """The number of steps S, or ValueError unless num_steps is an int in [1, T] or section
    counts that `section_timesteps` can place."""
    T, S = int(num_timesteps), num_steps
    if isinstance(S, tuple):
        return len(section_timesteps(T, S))
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or not 1 <= S <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    return int(S)


def _strictly_increasing(raw: np.ndarray, num_timesteps: int) -> np.ndarray:
    """The nearest strictly increasing sequence in [0, T-1] to raw (sorted): pushed up, then down.

    With u_i = t_i - i: u = max-accumulate(raw - i) is non-decreasing, and so is min(u, T - S).
    """
    offsets = np.arange(len(raw))
    up = np.maximum.accumulate(np.maximum(raw, 0) - offsets)
    return np.minimum(up, num_timesteps - len(raw)) + offsets


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing=Spacing.UNIFORM) -> np.ndarray:
    """The S = num_steps timesteps DDIM visits: distinct, increasing, the last one T-1.

    "uniform": t_i = floor((i+1) T / S) - 1 (every timestep when S = T); "quadratic": t_i =
    floor((i+1)^2 T / S^2) - 1, dense near t = 0 (Song et al. 2021 use it for CIFAR-10), pushed
    up where needed to keep the S timesteps distinct. Both start the chain at t = T-1, where
    x_T ~ N(0, I) is the forward process's end. Sampling runs them in reverse. "logsnr" needs
    the schedule: see `sampler_timesteps`.

    Raises:
      ValueError: num_steps outside [1, T] or unknown spacing (naming the value).
    """
    T = int(num_timesteps)
    S = check_num_steps(T, num_steps)
    spacing = Spacing(spacing)
    i = np.arange(1, S + 1, dtype=np.int64)
    if spacing is Spacing.UNIFORM:
        raw = i * T // S - 1
    elif spacing is Spacing.QUADRATIC:
        raw = i * i * T // (S * S) - 1
    else:
        raise ValueError("spacing 'logsnr' depends on the schedule: use sampler_timesteps")
    # raw_j <= (j+1) T/S - 1 <= T - S + j for both spacings, so t_{S-1} stays T - 1.
    return _strictly_increasing(raw, T)


def _alpha_bars(schedule: DiffusionSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_bar, 1 - alpha_bar) float64 [T] read from a concrete (not traced) schedule."""
    try:
        alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
        # 1 - alpha_bar from its float64-precomputed root: no float32 cancellation near t = 0.
        one_minus = np.square(np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64))
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(
            "this sampler reads the schedule's values when it is built: close the schedule "
            "over (a constant), do not pass it through jit as a traced argument"
        ) from e
    return alpha_bar, one_minus


def logsnr_timesteps(schedule: DiffusionSchedule, num_steps: int) -> np.ndarray:
    """S increasing timesteps, from 0 to T-1, whose lambda = log(alpha / sigma) are nearest to
    S values uniform in lambda between lambda(T-1) and lambda(0) (Lu et al. 2022, Sec. 3.4).

    The discrete schedule is kept (the network only knows integer timesteps): each uniform
    lambda is rounded to the timestep of nearest lambda, then ties are pushed apart.
    """
    T = schedule.num_timesteps
    S = check_num_steps(T, num_steps)
    alpha_bar, one_minus = _alpha_bars(schedule)
    lam = 0.5 * (np.log(alpha_bar) - np.log(one_minus))  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], S)[::-1]  # S = 1: lambda(T-1) alone
    raw = np.argmin(np.abs(lam[None, :] - targets[:, None]), axis=1)
    return _strictly_increasing(np.sort(raw), T)


def section_timesteps(num_timesteps: int, counts: Sequence[int]) -> np.ndarray:
    """Improved-DDPM's section counts (Nichol & Dhariwal 2021, App.): T split into len(counts)
    sections of near-equal length L (the first T mod n one longer), with counts[i] timesteps
    round(j (L - 1) / (counts[i] - 1)) (j < counts[i]) in section i, one at its start if 1.

    Raises:
      ValueError: a count that is not an int in [1, L] (naming it), or no counts.
    """
    T, counts = int(num_timesteps), tuple(counts)
    if not counts or len(counts) > T:
        raise ValueError(f"section counts must be 1 to {T} ints, got {counts!r}")
    size, extra = divmod(T, len(counts))
    start, picked = 0, []
    for i, count in enumerate(counts):
        length = size + (i < extra)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise ValueError(f"section count {count!r} is not an int (counts {counts!r})")
        if not 1 <= count <= length:
            raise ValueError(f"section {i} has {length} timesteps: cannot take {count}")
        stride = (length - 1) / (count - 1) if count > 1 else 0.0
        picked += [start + round(j * stride) for j in range(count)]
        start += length
    return np.asarray(picked, np.int64)


def sampler_timesteps(schedule: DiffusionSchedule, num_steps, spacing) -> np.ndarray:
    """The S increasing timesteps a few-step sampler visits (the last T-1), for any Spacing, or
    for section counts (num_steps a tuple; spacing unused; the last is T-1 unless the last
    count is 1)."""
    if isinstance(num_steps, tuple):
        return section_timesteps(schedule.num_timesteps, num_steps)
    if Spacing(spacing) is Spacing.LOGSNR:
        return logsnr_timesteps(schedule, num_steps)
    return ddim_timesteps(schedule.num_timesteps, num_steps, spacing)


def _check_guidance(guidance) -> float:
    try:
        value = float(guidance)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"guidance must be a Python number >= 0, got {guidance!r}") from e
    if not (np.isfinite(value) and value >= 0.0):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    return value


def _check_eta(eta) -> float:
    try:
        value = float(eta)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"eta must be a Python number in [0, 1], got {eta!r}") from e
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    return value


def ddim_sample(
    rng: jax.Array,
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    *,
    num_steps: int,
    eta: float = 0.0,
    spacing=Spacing.UNIFORM,
    model_mean_type,
    model_var_type=diffusion.ModelVarType.FIXED_LARGE,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
):
    """Draws x_0 with DDIM (Song et al. 2021, Eq. 12) on S = num_steps strided timesteps.

    The timesteps t_S > ... > t_1 (`ddim_timesteps`) are paired with their successors t_prev,
    the last pair being (t_1, -1): alpha_bar = 1, i.e. x_0. eta = 0 is deterministic given x_T;
    eta = 1 with S = T is ancestral sampling with the fixed_small variance, step for step
    (same keys: rng -> (rng_x, rng_steps), split(rng_steps, S)[i] drives the i-th step).

    Args:
      rng: a jax.random.key.
      denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
      schedule: the forward process the model was trained with.
      shape: [B, ...] of the samples.
      num_steps: S in [1, T] (static).
      eta: in [0, 1] (a static Python number); 0 draws no noise at all.
      spacing: a Spacing (or "uniform" / "quadratic" / "logsnr").
      model_mean_type: diffusion.ModelMeanType (or its value).
      model_var_type: only says whether the network also outputs variance channels (ignored).
      clip_denoised: clip the predicted x_0 to [-1, 1] at each step.
      return_trajectory: also return a Trajectory of all S steps (x_t entering each step).

    Returns:
      x_0 float32 [shape], or (x_0, Trajectory) if return_trajectory.

    Raises:
      ValueError: num_steps outside [1, T], eta outside [0, 1], or an unknown spacing.
    """
    shape = _check_shape(shape)
    ts_up = sampler_timesteps(schedule, num_steps, spacing)
    eta = _check_eta(eta)
    mean_type = diffusion.ModelMeanType(model_mean_type)
    var_type = diffusion.ModelVarType(model_var_type)

    def step_fn(x_t, t, t_prev, rng):
        if eta == 0.0:  # sigma_t = 0: skip drawing noise that would be multiplied by 0
            noise = jnp.zeros_like(x_t)
        else:
            noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
        return diffusion.ddim_step(
            schedule,
            _model_output(denoise_fn, x_t, t, var_type, mean_only=True),
            x_t,
            t,
            t_prev,
            noise,
            eta=eta,
            model_mean_type=mean_type,
            clip_denoised=clip_denoised,
        )

    ts = ts_up[::-1]
    t_prevs = np.append(ts[1:], -1)
    x_T, step_rngs = _split_rngs(rng, shape, len(ts), jnp.float32)
    return _run_chain(step_fn, x_T, ts, t_prevs, step_rngs, ts if return_trajectory else None)


# --------------------------------------------------------------------------------------------
# Respaced ancestral sampling, Nichol & Dhariwal 2021, Sec. 4.
# --------------------------------------------------------------------------------------------


def respaced_schedule(schedule: DiffusionSchedule, timesteps: Sequence[int]) -> DiffusionSchedule:
    """The forward process restricted to `timesteps` (increasing), as a chain of its own.

    Its alpha_bar are the schedule's at those timesteps, so its betas are
    beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} (alpha_bar_{t_{-1}} = 1), and every
    coefficient (beta-tilde', the posterior coefficients) follows in float64 from them.
    """
    ts = np.asarray(timesteps, np.int64)
    if ts.ndim != 1 or not len(ts) or (np.diff(ts) <= 0).any() or ts[0] < 0:
        raise ValueError(f"timesteps must be increasing indices >= 0, got {timesteps!r}")
    alpha_bar, one_minus = _alpha_bars(schedule)
    prev_alpha_bar = np.append(1.0, alpha_bar[ts[:-1]])
    prev_one_minus = np.append(0.0, one_minus[ts[:-1]])
    # 1 - ab_t / ab_s from the float32 schedule, whichever way loses less: near t = 0 as
    # ((1 - ab_t) - (1 - ab_s)) / ab_s (both accurate, no 1 - 0.9999... cancellation), and
    # where alpha_bar is small as 1 - ab_t / ab_s (a ratio of accurate small numbers).
    near_start = one_minus[ts] < prev_alpha_bar
    betas = np.where(
        near_start,
        (one_minus[ts] - prev_one_minus) / prev_alpha_bar,
        1.0 - alpha_bar[ts] / prev_alpha_bar,
    )
    return DiffusionSchedule.from_betas(betas)


def respaced_sample(
    rng: jax.Array,
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    *,
    num_steps: int,
    spacing=Spacing.UNIFORM,
    model_mean_type,
    model_var_type,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
):
    """Draws x_0 by Algorithm 2 on the S = num_steps timesteps of `sampler_timesteps`.

    The chain is the respaced one (`respaced_schedule`): its means, beta' and beta-tilde' (and a
    learned variance's interpolation between them) are its own, while the network is called
    with the original timestep indices t_i. Keys as for `sample` with S steps; with S = T it is
    `sample`. The schedule must be concrete (closed over, not a traced argument).

    Args:
      rng, denoise_fn, schedule, shape: as for `sample`.
      num_steps: S in [1, T] (static).
      spacing: a Spacing (or its value).
      model_mean_type, model_var_type, clip_denoised: as for `p_sample_loop`.
      return_trajectory: also return a Trajectory of all S steps (t: original timesteps).

    Returns:
      x_0 float32 [shape], or (x_0, Trajectory) if return_trajectory.
    """
    shape = _check_shape(shape)
    ts = sampler_timesteps(schedule, num_steps, spacing)
    original_t = jnp.asarray(ts, jnp.int32)
    x_T, step_rngs = _split_rngs(rng, shape, len(ts), jnp.float32)
    out = p_sample_loop(
        step_rngs,
        lambda x_t, i: denoise_fn(x_t, original_t[i]),
        respaced_schedule(schedule, ts),
        x_T,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
        return_trajectory=return_trajectory,
    )
    if not return_trajectory:
        return out
    x_0, traj = out
    return x_0, traj._replace(t=original_t[traj.t])


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M), Lu et al. 2022.
# --------------------------------------------------------------------------------------------


def dpm_solver_pp_sample(
    rng: jax.Array,
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    *,
    num_steps: int,
    spacing=Spacing.LOGSNR,
    model_mean_type,
    model_var_type=diffusion.ModelVarType.FIXED_LARGE,
    clip_denoised: bool = True,
):
    """Draws x_0 with DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): S network calls, no noise.

    The S timesteps of `sampler_timesteps` are visited in reverse, paired with their successors
    as in DDIM (the last with -1: alpha_bar = 1). The first step is first order (DDIM), the
    others second order from the previous data prediction, kept in the scan's carry with its
    step h; the final step, to sigma = 0, is first order and returns x0_hat.

    Keys: rng -> (rng_x, unused) as `ddim_sample` splits it, so both start from the same x_T.

    Args:
      rng, denoise_fn, schedule, shape: as for `ddim_sample`.
      num_steps: S in [1, T] (static).
      spacing: a Spacing; "logsnr" (the paper's choice) needs a concrete schedule.
      model_mean_type: diffusion.ModelMeanType (or its value).
      model_var_type: only says whether the network also outputs variance channels (ignored).
      clip_denoised: clip the predicted x_0 to [-1, 1] at each step.

    Returns:
      x_0 float32 [shape].
    """
    shape = _check_shape(shape)
    ts = sampler_timesteps(schedule, num_steps, spacing)[::-1]
    t_prevs = np.append(ts[1:], -1)
    mean_type = diffusion.ModelMeanType(model_mean_type)
    var_type = diffusion.ModelVarType(model_var_type)
    x_T, _ = _split_rngs(rng, shape, len(ts), jnp.float32)
    batch = shape[0]

    def body(carry, xs):
        x_t, prev_pred_xstart, prev_h = carry
        t = jnp.full((batch,), xs[0], jnp.int32)
        t_prev = jnp.full((batch,), xs[1], jnp.int32)
        x_prev, pred_xstart, h = diffusion.dpm_solver_pp_step(
            schedule,
            _model_output(denoise_fn, x_t, t, var_type, mean_only=True),
            x_t,
            t,
            t_prev,
            prev_pred_xstart,
            prev_h,
            model_mean_type=mean_type,
            clip_denoised=clip_denoised,
        )
        return (x_prev, pred_xstart, h), None

    carry = (x_T, jnp.zeros_like(x_T), jnp.zeros((batch,), jnp.float32))
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(t_prevs, jnp.int32))
    (x_0, _, _), _ = jax.lax.scan(body, carry, xs)
    return x_0


# --------------------------------------------------------------------------------------------
# Models, labels and devices.
# --------------------------------------------------------------------------------------------


def make_denoise_fn(
    apply_fn: Callable,
    params,
    *,
    labels: jax.Array | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
) -> DenoiseFn:
    """Closes flax params (and class labels) into denoise_fn(x_t, t) for the samplers.

    With guidance w > 0 (classifier-free guidance, Ho & Salimans 2021) each call is ONE network
    call on the batch doubled, [x_t; x_t] with labels [y; null], combined as
    (1 + w) eps(x_t, y) - w eps(x_t, null) (`diffusion.classifier_free_guidance`).

    Args:
      apply_fn: a flax `Module.apply`, called as apply_fn({"params": params}, x_t, t[, labels],
        train=False) (labels are passed only when given).
      params: the parameter tree (e.g. the EMA parameters).
      labels: int32 [B] class labels for class-conditional sampling; see `sample_labels`.
      guidance: the guidance weight w >= 0; 0 calls the network once on the batch as it is.
      null_label: the label of "no class" (the model's num_classes), needed when w > 0.
    """
    guidance = _check_guidance(guidance)
    if guidance and (labels is None or null_label is None):
        raise ValueError(
            f"guidance={guidance:g} needs class labels and a null label (a class-conditional "
            "model trained with label dropout)"
        )

    def denoise_fn(x_t, t):
        variables = {"params": params}
        if labels is None:
            return apply_fn(variables, x_t, t, train=False)
        if not guidance:
            return apply_fn(variables, x_t, t, labels, train=False)
        nulls = jnp.full_like(labels, null_label)
        both = apply_fn(
            variables,
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, nulls]),
            train=False,
        )
        cond, uncond = jnp.split(both, 2)
        return diffusion.classifier_free_guidance(cond, uncond, guidance, channels=x_t.shape[-1])

    return denoise_fn


def draw(
    rng: jax.Array,
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    *,
    spec: SamplerSpec,
    output: diffusion.ModelOutput,
) -> jax.Array:
    """x_0 [shape] from the sampler `spec` names (one lax.scan; wrap in jit or pmap)."""
    mean_type, var_type = output.mean_type, output.var_type
    common = dict(model_mean_type=mean_type, clip_denoised=spec.clip_denoised)
    if spec.sampler is Sampler.ANCESTRAL:
        return sample(rng, denoise_fn, schedule, shape, model_var_type=var_type, **common)
    few = dict(num_steps=spec.steps, spacing=spec.spacing, **common)
    if spec.sampler is Sampler.RESPACED:
        return respaced_sample(rng, denoise_fn, schedule, shape, model_var_type=var_type, **few)
    if spec.sampler is Sampler.DPM_SOLVER_PP:
        return dpm_solver_pp_sample(
            rng, denoise_fn, schedule, shape, model_var_type=var_type, **few
        )
    return ddim_sample(
        rng, denoise_fn, schedule, shape, eta=spec.eta, model_var_type=var_type, **few
    )


def sample_labels(rng: jax.Array, batch_size: int, num_classes: int) -> jax.Array:
    """Class labels int32 [batch_size], uniform over {0, ..., num_classes-1}."""
    return jax.random.randint(rng, (batch_size,), 0, num_classes, dtype=jnp.int32)


def to_uint8(x) -> jax.Array:
    """[-1, 1] floats -> uint8 [0, 255]: round(clip((x + 1) * 127.5, 0, 255))."""
    return jnp.round(jnp.clip((jnp.asarray(x) + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def _device_sample(
    rng, params, device_index, labels, *, apply_fn, schedule, shape, num_classes, spec, output
):
    """One device's batch: key fold_in(rng, device_index) -> (labels key, sampling key)."""
    rng_labels, rng_sample = jax.random.split(jax.random.fold_in(rng, device_index))
    if labels is None and num_classes is not None:
        labels = sample_labels(rng_labels, shape[0], num_classes)
    denoise_fn = make_denoise_fn(
        apply_fn, params, labels=labels, guidance=spec.guidance, null_label=num_classes
    )
    images = draw(rng_sample, denoise_fn, schedule, shape, spec=spec, output=output)
    return images, labels


def make_pmapped_sampler(
    apply_fn: Callable,
    schedule: DiffusionSchedule,
    spec: SamplerSpec,
    output: diffusion.ModelOutput,
    *,
    per_device_batch: int,
    image_shape: Sequence[int],
    num_classes: int | None = None,
    parallelism: parallel.Parallelism = parallel.Parallelism.PMAP,
) -> Callable[..., Samples]:
    """Builds (once) a sampler that runs on every local device, wrapped over `parallel.AXIS`.

    Device d of this host samples with fold_in(rng, process_index * local_device_count + d), so
    every host of a multi-host slice, called with the same rng, draws its own distinct part
    (every host must make the call: a pmap is one program across hosts). Call the result with
    fold_in(rng, batch_number) to draw batch after batch; it compiles once.

    Args:
      apply_fn, schedule: the flax apply and the forward process (see `make_denoise_fn`).
      spec: which sampler, its steps, eta, spacing and clipping.
      output: how to read the network's output (mean and variance types).
      per_device_batch: samples per device.
      image_shape: (H, W, C).
      num_classes: for class-conditional models: labels are drawn uniformly per device unless
        given; None for unconditional models. With spec.guidance > 0 the label num_classes is
        the null class (the model must have one: label dropout in training).
      parallelism: the device wrapper (pmap, or jit(shard_map) over all devices); the samples
        are the same either way.

    Returns:
      sample_fn(rng, params_replicated, labels=None) -> Samples(images float32 [n, H, W, C],
      labels int32 [n] or None), n = local_device_count * per_device_batch; params_replicated
      from `parallel.Wrapper(parallelism).replicate`; labels, if given, is int32 [n].
    """
    shape = _check_shape((per_device_batch, *image_shape))
    spec.validate(schedule.num_timesteps)  # fail here rather than at the first call
    if spec.guidance and num_classes is None:
        raise ValueError(f"guidance={spec.guidance:g} needs a class-conditional model")
    device_fn = functools.partial(
        _device_sample,
        apply_fn=apply_fn,
        schedule=schedule,
        shape=shape,
        num_classes=num_classes,
        spec=spec,
        output=output,
    )
    wrapper = parallel.Wrapper(parallelism)
    place = parallel.Place
    p_sample = wrapper.wrap(
        device_fn,
        in_places=(place.SAME, place.REPLICATED, place.PER_DEVICE, place.PER_DEVICE),
        out_places=(place.PER_DEVICE, place.PER_DEVICE),
    )
    num_devices = jax.local_device_count()
    device_indices = wrapper.put(parallel.local_device_indices(), place.PER_DEVICE)

    def sample_fn(rng, params_replicated, labels=None) -> Samples:
        if labels is not None:
            labels = jnp.asarray(labels, jnp.int32).reshape(num_devices, per_device_batch)
        rng, labels = wrapper.put(rng, place.SAME), wrapper.put(labels, place.PER_DEVICE)
        out = p_sample(rng, params_replicated, device_indices, labels)
        images, labels = wrapper.local_rows(out)
        images = images.reshape(num_devices * per_device_batch, *image_shape)
        return Samples(images, None if labels is None else labels.reshape(-1))

    return sample_fn
