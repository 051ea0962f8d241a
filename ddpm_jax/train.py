"""Training: the train state with EMA, the per-device train step, and the training loop.

The step is written for one device and wrapped once with `jax.pmap(..., axis_name="batch")` in
`make_p_train_step`; gradients and metrics are averaged with `lax.pmean` over that axis. Every
random draw inside the step comes from `fold_in(fold_in(rng, step), device)`, so the loop carries
no key and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from ddpm_jax import checkpoint, diffusion, image_grid, input_pipeline, sampling, schedules
from ddpm_jax.models import layers, unet

# Exit code of a job stopped by SIGTERM after writing its checkpoint (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75


class TrainState(train_state.TrainState):
    """Optax train state plus the EMA of the parameters and a count of skipped updates."""

    ema_params: Any
    num_skipped: jax.Array


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf (the job stops, no checkpoint is written)."""


class Preempted(SystemExit):
    """Raised after a SIGTERM once the checkpoint of the current step is safely written."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


# --------------------------------------------------------------------------------------------
# Construction from the config (the only place that reads the whole config).
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict, *, device_count: int) -> None:
    """Raises ValueError/TypeError naming the field and value of the first invalid setting.

    Checks every field the trainer reads, before anything is built or written, so that a typo
    in an 800k-step job fails in seconds rather than after the data, model and compile.
    """
    _check_int(config, "seed", minimum=0)
    _validate_data(config.data)
    _validate_model(config.model, image_size=config.data.image_size)
    _validate_diffusion(config.diffusion)
    _validate_optim(config.optim)
    _validate_train(config.train, device_count=device_count)
    _validate_sample(config.sample, num_timesteps=config.diffusion.num_timesteps)


def _validate_data(data: ml_collections.ConfigDict) -> None:
    for field in ("name", "split"):
        if not isinstance(data[field], str) or not data[field]:
            raise TypeError(f"config.data.{field}={data[field]!r}: expected a non-empty string")
    _check_int(data, "image_size", minimum=1, prefix="config.data")
    _check_int(data, "channels", minimum=1, prefix="config.data")
    _check_bool(data, "random_flip", prefix="config.data")
    _check_bool(data, "class_conditional", prefix="config.data")
    if data.class_conditional:
        _check_int(data, "num_classes", minimum=1, prefix="config.data")


def _validate_model(model: ml_collections.ConfigDict, *, image_size: int) -> None:
    p = "config.model"
    _check_int(model, "ch", minimum=1, prefix=p)
    _check_int(model, "num_res_blocks", minimum=1, prefix=p)
    ch_mult = model.ch_mult
    if (
        not isinstance(ch_mult, (tuple, list))
        or not ch_mult
        or not all(_is_int(m) and m >= 1 for m in ch_mult)
    ):
        raise ValueError(f"{p}.ch_mult={ch_mult!r}: expected a non-empty tuple of ints >= 1")
    if not isinstance(model.attn_resolutions, (tuple, list)) or not all(
        _is_int(r) and r >= 1 for r in model.attn_resolutions
    ):
        raise ValueError(
            f"{p}.attn_resolutions={model.attn_resolutions!r}: expected a tuple of ints >= 1"
        )
    widths = [model.ch * m for m in ch_mult]
    if any(w % layers.NUM_GROUPS for w in widths):
        raise ValueError(
            f"{p}.ch={model.ch} with ch_mult={tuple(ch_mult)} gives widths {widths}: each must "
            f"be a multiple of {layers.NUM_GROUPS} (GroupNorm groups)"
        )
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"config.data.image_size={image_size} is not divisible by 2**(len(ch_mult)-1)="
            f"{factor} ({p}.ch_mult={tuple(ch_mult)})"
        )
    _check_number(model, "dropout", low=0.0, high=1.0, high_open=True, prefix=p)
    _check_bool(model, "resamp_with_conv", prefix=p)
    try:
        dtype = jnp.dtype(model.dtype)
    except TypeError as e:
        raise TypeError(f"{p}.dtype={model.dtype!r}: not a dtype") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{p}.dtype={model.dtype!r}: expected a float type (float32, bfloat16)")


def _validate_diffusion(cfg: ml_collections.ConfigDict) -> None:
    p = "config.diffusion"
    _check_int(cfg, "num_timesteps", minimum=1, prefix=p)
    for field, check in [
        ("beta_schedule", lambda v: schedules.get_beta_schedule(v, cfg.num_timesteps)),
        ("model_mean_type", diffusion.ModelMeanType),
        ("model_var_type", diffusion.ModelVarType),
    ]:
        try:
            check(cfg[field])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{p}.{field}={cfg[field]!r}: {e}") from e
    if cfg.loss_weighting not in ("none", "min_snr"):
        raise ValueError(f"{p}.loss_weighting={cfg.loss_weighting!r}: expected 'none' or 'min_snr'")
    _check_number(cfg, "min_snr_gamma", low=0.0, low_open=True, prefix=p)


def _validate_optim(optim: ml_collections.ConfigDict) -> None:
    p = "config.optim"
    _check_number(optim, "learning_rate", low=0.0, low_open=True, prefix=p)
    _check_int(optim, "warmup_steps", minimum=0, prefix=p)
    _check_number(optim, "grad_clip_norm", low=0.0, low_open=True, prefix=p)
    for field in ("beta1", "beta2"):
        _check_number(optim, field, low=0.0, high=1.0, high_open=True, prefix=p)
    _check_number(optim, "eps", low=0.0, low_open=True, prefix=p)


def _validate_train(train: ml_collections.ConfigDict, *, device_count: int) -> None:
    p = "config.train"
    _check_int(train, "num_steps", minimum=0, prefix=p)
    _check_int(train, "max_skipped_steps", minimum=0, prefix=p)
    for field in (
        "batch_size",
        "steps_per_dispatch",
        "log_every",
        "checkpoint_every",
        "sample_every",
        "keep_checkpoints",
    ):
        _check_int(train, field, minimum=1, prefix=p)
    if train.batch_size % device_count:
        raise ValueError(
            f"{p}.batch_size={train.batch_size} is not divisible by the "
            f"{device_count} devices of this job"
        )
    _check_number(train, "ema_decay", low=0.0, high=1.0, high_open=True, prefix=p)
    _check_bool(train, "ema_warmup", prefix=p)
    if train.nonfinite not in ("stop", "skip"):
        raise ValueError(f"{p}.nonfinite={train.nonfinite!r}: expected 'stop' or 'skip'")


def _validate_sample(sample: ml_collections.ConfigDict, *, num_timesteps: int) -> None:
    p = "config.sample"
    if sample.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"{p}.sampler={sample.sampler!r}: expected 'ddpm' or 'ddim'")
    _check_int(sample, "num_grid", minimum=1, prefix=p)
    _check_int(sample, "ddim_steps", minimum=1, prefix=p)
    if sample.sampler == "ddim" and sample.ddim_steps > num_timesteps:
        raise ValueError(
            f"{p}.ddim_steps={sample.ddim_steps}: more than the {num_timesteps} diffusion steps"
        )
    _check_number(sample, "ddim_eta", low=0.0, high=1.0, prefix=p)
    _check_bool(sample, "clip_denoised", prefix=p)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(section, field: str, *, minimum: int, prefix: str = "config") -> None:
    value = section[field]
    if not _is_int(value):
        raise TypeError(f"{prefix}.{field}={value!r}: expected an int")
    if value < minimum:
        raise ValueError(f"{prefix}.{field}={value!r}: must be >= {minimum}")


def _check_bool(section, field: str, *, prefix: str) -> None:
    if not isinstance(section[field], (bool, np.bool_)):
        raise TypeError(f"{prefix}.{field}={section[field]!r}: expected True or False")


def _check_number(
    section,
    field: str,
    *,
    prefix: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite real number in [low, high], with either end open if asked."""
    value = section[field]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{prefix}.{field}={value!r}: expected a number")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        bounds = f"{'>' if low_open else '>='} {low:g}"
        if math.isfinite(high):
            bounds += f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{prefix}.{field}={value!r}: must be a finite number {bounds}")


def create_model(config: ml_collections.ConfigDict) -> unet.UNet:
    """The UNet of config.model, with out_ch from the data and labels if class-conditional."""
    num_classes = config.data.num_classes if config.data.class_conditional else None
    return unet.UNet(**config.model, out_ch=config.data.channels, num_classes=num_classes)


def create_schedule(config: ml_collections.ConfigDict) -> schedules.DiffusionSchedule:
    return schedules.make_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps)


def create_learning_rate_fn(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to the learning rate, then constant (Ho et al. 2020, App. B)."""
    if optim.warmup_steps == 0:
        return optax.constant_schedule(optim.learning_rate)
    return optax.linear_schedule(0.0, optim.learning_rate, transition_steps=optim.warmup_steps)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam with the warm-up schedule."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adam(create_learning_rate_fn(optim), b1=optim.beta1, b2=optim.beta2, eps=optim.eps),
    )


def create_train_state(
    rng: jax.Array, config: ml_collections.ConfigDict, model: unet.UNet
) -> TrainState:
    """Initialises parameters (from `rng`), the optimiser state and the EMA copy.

    One jitted program (cached by the persistent compilation cache), rather than the optimiser's
    zeros built eagerly, leaf by leaf, each shape a small compilation at every start.
    """
    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    tx = create_optimizer(config.optim)

    def init(rng):
        params = model.init(rng, x, t, y, train=False)["params"]
        state = TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            ema_params=params,
            num_skipped=jnp.zeros((), jnp.int32),
        )
        # A strongly typed step: TrainState.create's Python 0 would be weakly typed, and the
        # step's output (strong int32) would then trigger a second compilation of the step.
        return state.replace(step=jnp.zeros((), jnp.int32))

    return jax.jit(init)(rng)


# --------------------------------------------------------------------------------------------
# The step (one device).
# --------------------------------------------------------------------------------------------


def diffusion_loss(
    params,
    *,
    apply_fn: Callable,
    schedule: schedules.DiffusionSchedule,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    labels: jax.Array | None,
    dropout_rng: jax.Array,
    model_mean_type: diffusion.ModelMeanType,
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """L_simple (Algorithm 1) for given t and noise: the mean over this device's batch."""
    x_t = diffusion.q_sample(schedule, x_start, t, noise)
    target = diffusion.training_target(schedule, x_start, t, noise, model_mean_type=model_mean_type)
    weights = diffusion.loss_weights(
        schedule, t, weighting=loss_weighting, model_mean_type=model_mean_type, gamma=min_snr_gamma
    )
    output = apply_fn({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_rng})
    return jnp.mean(diffusion.loss_simple(output, target, weights=weights))


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay; with warm-up min(decay, (1 + step) / (10 + step)) so early EMA tracks."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    schedule: schedules.DiffusionSchedule,
    model_mean_type: diffusion.ModelMeanType,
    loss_weighting: str,
    min_snr_gamma: float,
    ema_decay: float,
    ema_warmup: bool,
    learning_rate_fn: optax.Schedule,
    class_conditional: bool,
    axis_name: str = "batch",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on one device's batch; collectives over `axis_name`.

    Args:
      state: this device's replica of the train state.
      batch: {"image": [b, H, W, C] float32 in [-1, 1], "label": [b] int32, ...}.
      rng: the run's key, the same on every device; per-step and per-device keys are derived.

    Returns:
      The new state (unchanged but for the step and skip counter if the update was not finite)
      and metrics averaged over all devices.
    """
    x_start = batch["image"]
    chex.assert_rank(x_start, 4)
    rng = jax.random.fold_in(rng, state.step)
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    t = jax.random.randint(t_rng, (x_start.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)

    loss_fn = functools.partial(
        diffusion_loss,
        apply_fn=state.apply_fn,
        schedule=schedule,
        x_start=x_start,
        t=t,
        noise=noise,
        labels=batch["label"] if class_conditional else None,
        dropout_rng=dropout_rng,
        model_mean_type=model_mean_type,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
    )
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updated = state.apply_gradients(grads=grads)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, updated.params)
    updated = updated.replace(ema_params=ema)
    # A non-finite update leaves params, optimiser state and EMA as they were.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = updated.replace(
        params=keep(updated.params, state.params),
        opt_state=keep(updated.opt_state, state.opt_state),
        ema_params=keep(updated.ema_params, state.ema_params),
        num_skipped=state.num_skipped + (1 - finite.astype(jnp.int32)),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_fn(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return new_state, metrics


def multi_train_step(state, batches, rng, *, step_fn):
    """Several steps in one dispatch: `lax.scan` of `step_fn` over the leading batch axis.

    With one batch the step is called directly, not scanned: XLA:CPU runs the gradient
    convolutions inside a loop body 6-28x slower than outside one (jax-ml/jax#12868;
    `benchmarks/train_throughput.py --variants library,scanned` measures it), so on CPU use
    `steps_per_dispatch = 1`. On GPU and TPU the scan saves host round trips.
    """
    if jax.tree.leaves(batches)[0].shape[0] == 1:
        state, metrics = step_fn(state, jax.tree.map(lambda x: x[0], batches), rng)
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, b: step_fn(s, b, rng), state, batches)


def replicate(tree, devices=None):
    """Copies `tree` onto every local device, laid out exactly as a pmap over 'batch' returns it.

    `flax.jax_utils.replicate` gives arrays on a differently named mesh, which makes the first
    call of a pmap-ed step with its own outputs compile the whole step a second time; it also
    compiles a `stack` per leaf shape. Here: one identity pmap over host copies.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    copies = jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), tree
    )
    return jax.pmap(lambda x: x, axis_name="batch", devices=devices)(copies)


def first_replica(tree):
    """Replica 0 of a pmap-replicated tree, as numpy copies made on the host.

    Unlike `flax.jax_utils.unreplicate` (`x[0]`), no device op: nothing to compile per leaf
    shape, and it works on the host-local replicas of a multi-process job. A copy, because on
    CPU `np.asarray` may alias the device buffer, which the next (donating) step reuses.
    """
    return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data)[0], tree)


def make_step_fn(config: ml_collections.ConfigDict, schedule) -> Callable:
    """`train_step` bound to the config: step(state, batch, rng) -> (state, metrics), one device."""
    return functools.partial(
        train_step,
        schedule=schedule,
        model_mean_type=diffusion.ModelMeanType(config.diffusion.model_mean_type),
        loss_weighting=config.diffusion.loss_weighting,
        min_snr_gamma=config.diffusion.min_snr_gamma,
        ema_decay=config.train.ema_decay,
        ema_warmup=config.train.ema_warmup,
        learning_rate_fn=create_learning_rate_fn(config.optim),
        class_conditional=config.data.class_conditional,
    )


def make_p_train_step(config: ml_collections.ConfigDict, schedule) -> Callable:
    """The per-device step, fused over the batches' [steps] axis (`multi_train_step`), pmap-ed.

    p_step(state, batches, rng): state replicated over the local devices, batches shaped
    [devices, steps, b, H, W, C], rng the run's key (not mapped); metrics [devices, steps].
    """
    fused = functools.partial(multi_train_step, step_fn=make_step_fn(config, schedule))
    return jax.pmap(fused, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))


# --------------------------------------------------------------------------------------------
# Sampling during training.
# --------------------------------------------------------------------------------------------


def sample_grid(
    rng: jax.Array, config: ml_collections.ConfigDict, model: unet.UNet, ema_params, schedule
) -> np.ndarray:
    """`config.sample.num_grid` uint8 EMA samples [N, H, W, C], drawn on all local devices."""
    return sampling.sample_images(
        rng,
        apply_fn=model.apply,
        params=ema_params,
        schedule=schedule,
        num_samples=config.sample.num_grid,
        image_shape=(config.data.image_size, config.data.image_size, config.data.channels),
        sampler=config.sample.sampler,
        ddim_steps=config.sample.ddim_steps,
        ddim_eta=config.sample.ddim_eta,
        model_mean_type=diffusion.ModelMeanType(config.diffusion.model_mean_type),
        model_var_type=diffusion.ModelVarType(config.diffusion.model_var_type),
        clip_denoised=config.sample.clip_denoised,
        num_classes=config.data.num_classes if config.data.class_conditional else None,
    )


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


class _SigtermFlag:
    """Records SIGTERM (a TPU-VM / SLURM preemption notice) so the loop can checkpoint and exit.

    Only for single-process jobs: on a multi-process job JAX's preemption sync manager owns
    SIGTERM (it agrees on a common step across hosts, read with `ckpt.reached_preemption`), and
    replacing its handler would leave the hosts stopping at different steps.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received = False
        self._previous = None

    def __enter__(self):
        if self.enabled:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True  # only a flag: the loop logs and acts between steps

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _stack_batches(it: Iterator[dict], k: int) -> dict[str, np.ndarray]:
    """k host batches [D, b, ...] -> one dispatch [D, k, b, ...] (the images and labels)."""
    batches = [next(it) for _ in range(k)]
    return {key: np.stack([b[key] for b in batches], axis=1) for key in ("image", "label")}


class _MetricLog:
    """Collects per-step device metrics without a host sync; checks and logs them on demand."""

    def __init__(self):
        self._pending: list[tuple[int, dict]] = []

    def add(self, first_step: int, metrics: dict) -> None:
        self._pending.append((first_step, metrics))

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Fetches pending metrics: one (step, {name: value}) per step, in order."""
        rows = []
        for first_step, metrics in self._pending:
            host = first_replica(metrics)  # the replicas agree (pmean)
            for i in range(np.shape(host["loss"])[0]):
                rows.append((first_step + i, {k: float(v[i]) for k, v in host.items()}))
        self._pending = []
        return rows


class _NonFiniteGuard:
    """Stops on a non-finite update ("stop"), or skips them up to a budget ("skip").

    The train step itself never applies a non-finite update; this decides whether the job goes
    on. It runs on every metric flush, and a flush always precedes a checkpoint, so a job that
    stops here has not checkpointed the steps that made it stop.
    """

    def __init__(self, train_config: ml_collections.ConfigDict, num_skipped: int):
        self.mode = train_config.nonfinite
        self.max_skipped = train_config.max_skipped_steps
        self.num_skipped = num_skipped  # over the whole run, resumed runs included

    def check(self, rows: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict]]:
        bad = [(step, _what_is_nonfinite(row)) for step, row in rows if row["finite"] < 1.0]
        if not bad:
            return rows
        step, what = bad[0]
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}; stopping without checkpointing this state "
                "(set config.train.nonfinite='skip' to skip such updates)"
            )
        self.num_skipped += len(bad)
        if self.num_skipped > self.max_skipped:
            raise NonFiniteLossError(
                f"{self.num_skipped} non-finite updates skipped in this run, more than "
                f"config.train.max_skipped_steps={self.max_skipped} (the last at step "
                f"{bad[-1][0]}: {bad[-1][1]}); stopping without checkpointing"
            )
        logging.warning(
            "Skipped %d non-finite update(s), first at step %d (%s); %d of at most %d so far.",
            len(bad),
            step,
            what,
            self.num_skipped,
            self.max_skipped,
        )
        return rows


def _what_is_nonfinite(row: dict[str, float]) -> str:
    bad = "loss" if not np.isfinite(row["loss"]) else "grad_norm"
    return f"{bad}={row[bad]}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from the newest complete checkpoint in `workdir`) and writes samples.

    Failure modes (see RELIABILITY.md): an invalid config raises ValueError/TypeError before
    anything is written; SIGTERM (single process) or a multi-host preemption notice ends the
    current step, writes and waits for its checkpoint, then raises `Preempted` (exit code 75);
    a non-finite update raises `NonFiniteLossError` without checkpointing it; a failed
    checkpoint write raises its error within one log interval (or at the next save).

    Returns the final (unreplicated) train state.
    """
    validate_config(config, device_count=jax.device_count())
    try:  # the data match the config, before any writes
        input_pipeline.get_dataset_info(config.data)
    except ValueError as e:
        raise ValueError(f"config.data (name={config.data.name!r}): {e}") from e
    # From here on a SIGTERM is only recorded: one that arrives during start-up (restore,
    # compile) stops the job before its first step, when there is nothing new to save.
    with _SigtermFlag(enabled=jax.process_count() == 1) as sigterm:
        return _train(config, workdir, sigterm)


def _train(config: ml_collections.ConfigDict, workdir: str, sigterm: _SigtermFlag) -> TrainState:
    """The body of `train_and_evaluate`, after validation, with SIGTERM recorded."""
    is_main = jax.process_index() == 0
    k = config.train.steps_per_dispatch
    # First, so that an unusable workdir fails before the model is built.
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    writer = data = progress = None
    try:
        rng = jax.random.key(config.seed)
        init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
        del rng
        schedule = create_schedule(config)
        model = create_model(config)
        state = create_train_state(init_rng, config, model)
        start_step = 0
        if ckpt.latest_step() is not None:
            state = _restore_state(ckpt, state, config)
            start_step = int(state.step)
            logging.info("Resumed from the checkpoint of step %d.", start_step)
        data = input_pipeline.make_train_iterator(
            config.data,
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            local_device_count=jax.local_device_count(),
        )
        p_train_step = make_p_train_step(config, schedule)
        writer = _Writer(workdir) if is_main else None
        guard = _NonFiniteGuard(config.train, int(state.num_skipped))
        pstate = replicate(state)
        del state
        metric_log = _MetricLog()
        num_steps = config.train.num_steps
        step = start_step
        t_last, step_last = time.perf_counter(), step
        progress = progress_bar(start_step, num_steps, enabled=is_main)
        if sigterm.received and step < num_steps:
            logging.warning("SIGTERM during start-up: exiting before step %d.", step)
            raise Preempted(step)
        while step < num_steps:
            n = min(k, num_steps - step)
            pstate, metrics = p_train_step(pstate, _stack_batches(data, n), step_rng)
            metric_log.add(step, metrics)
            step += n
            progress.update(n)
            if _crossed(step, n, config.train.log_every) or step == num_steps:
                rows = guard.check(metric_log.flush())
                ckpt.check_for_errors()  # a failed background write stops the job now
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                if writer is not None and rows:
                    writer.scalars(step, rows[-1][1], rate, config.train.batch_size)
                    progress.set_postfix(loss=f"{rows[-1][1]['loss']:.4f}")
            preempted = sigterm.received or ckpt.reached_preemption(step)
            if _crossed(step, n, config.train.checkpoint_every) or step == num_steps or preempted:
                guard.check(metric_log.flush())
                _save(ckpt, pstate, step, config)
            if preempted:
                logging.warning("Preemption notice: waiting for the checkpoint of step %d.", step)
                ckpt.wait_until_finished()
                logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
                raise Preempted(step)
            if _crossed(step, n, config.train.sample_every) or step == num_steps:
                ema = first_replica(pstate.ema_params)
                images = sample_grid(
                    jax.random.fold_in(sample_rng, step), config, model, ema, schedule
                )
                if writer is not None:
                    writer.images(step, images)
        ckpt.wait_until_finished()
        return jax.device_put(first_replica(pstate))
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        if hasattr(data, "close"):
            data.close()
        ckpt.close()  # last: it waits for the write in flight, and raises if that failed


def _crossed(step: int, n: int, every: int) -> bool:
    """Whether the last dispatch (steps step-n+1 .. step) reached a multiple of `every`."""
    return step // every > (step - n) // every


# Fields that may change between a run and its resumption without changing what it computes.
_RESUME_FREE_FIELDS = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.keep_checkpoints",
    "data.data_dir",
    "sample.",
)


def _restore_state(
    ckpt: checkpoint.Checkpointer, state: TrainState, config: ml_collections.ConfigDict
) -> TrainState:
    """The newest restorable checkpoint, into the structure (and dtypes) of `state`.

    Raises ValueError naming the first mismatched parameter if the checkpoint was written by
    another model config; warns if it was written with a config that trains differently.
    """
    target = {
        "params": state.params,
        "ema_params": state.ema_params,
        "opt_state": state.opt_state,
    }
    items = (*checkpoint.DEFAULT_RESTORE_ITEMS, "config")
    restored = ckpt.restore(target=target, items=items)
    meta = restored["meta"]
    if restored["config"] is not None:
        changed = _config_changes(restored["config"], config)
        if changed:
            logging.warning(
                "Resuming step %d with a config that differs from the checkpoint's, so the run "
                "will not match an uninterrupted one: %s",
                meta["step"],
                "; ".join(changed),
            )
    return state.replace(
        step=jnp.asarray(meta["step"], jnp.int32),
        params=restored["params"],
        ema_params=restored["ema_params"],
        opt_state=restored["opt_state"],
        num_skipped=jnp.asarray(meta.get("num_skipped", 0), jnp.int32),
    )


def _config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'section.field: saved -> now' for each field that differs (JSON-normalised)."""
    now = checkpoint._jsonable(config.to_dict())  # as the checkpoint stored it
    saved_flat, now_flat = _flatten(saved), _flatten(now)
    keys = sorted(set(saved_flat) | set(now_flat))
    return [
        f"{key}: {saved_flat.get(key, '<absent>')!r} -> {now_flat.get(key, '<absent>')!r}"
        for key in keys
        if not key.startswith(_RESUME_FREE_FIELDS)
        and saved_flat.get(key, "<absent>") != now_flat.get(key, "<absent>")
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _save(ckpt: checkpoint.Checkpointer, pstate: TrainState, step: int, config) -> None:
    state = first_replica(pstate)
    ckpt.save(
        step,
        params=state.params,
        ema_params=state.ema_params,
        opt_state=state.opt_state,
        meta={"step": int(state.step), "num_skipped": int(state.num_skipped)},
        config=config.to_dict(),
        force=True,
    )


def progress_bar(start: int, total: int, *, enabled: bool, unit: str = "step"):
    """A tqdm bar on an interactive terminal of process 0; silent otherwise."""
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        unit=unit,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )


class _Writer:
    """TensorBoard event files, log lines and PNG grids, on process 0 only."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self._workdir = workdir
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, row: dict[str, float], steps_per_sec: float, batch: int):
        values = dict(row, steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * batch)
        values.pop("finite", None)
        for name, value in values.items():
            self._tb.add_scalar(f"train/{name}", value, step)
        # The same figures as JSON lines, readable without TensorBoard (benchmarks, scripts).
        with open(os.path.join(self._workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        logging.info(
            "step %d  loss %.5f  grad_norm %.3f  lr %.2e  %.2f steps/s  %.0f images/s",
            step,
            values["loss"],
            values["grad_norm"],
            values["learning_rate"],
            steps_per_sec,
            values["images_per_sec"],
        )

    def images(self, step: int, images: np.ndarray):
        path = os.path.join(self._workdir, "samples", f"step_{step:08d}.png")
        image_grid.save_png(images, path)
        self._tb.add_image("samples", image_grid.make_grid(images), step, dataformats="HWC")
        logging.info("Wrote %d samples to %s", len(images), path)

    def close(self):
        self._tb.close()
