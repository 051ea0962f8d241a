"""Training: the train state with EMA, the per-device train step, and the training loop.

The step is written for one device and wrapped once with `jax.pmap(..., axis_name="batch")` in
`make_p_train_step`; gradients and metrics are averaged with `lax.pmean` over that axis. Every
random draw inside the step comes from `fold_in(fold_in(rng, step), device)`, so the loop carries
no key and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
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
from flax import jax_utils
from flax.training import train_state

from ddpm_jax import checkpoint, diffusion, image_grid, input_pipeline, sampling, schedules
from ddpm_jax.models import unet

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
    """Raises ValueError/TypeError naming the field and value of the first invalid setting."""
    schedules.get_beta_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps)
    diffusion.ModelMeanType(config.diffusion.model_mean_type)
    diffusion.ModelVarType(config.diffusion.model_var_type)
    if config.diffusion.loss_weighting not in ("none", "min_snr"):
        raise ValueError(
            f"config.diffusion.loss_weighting={config.diffusion.loss_weighting!r}: "
            "expected 'none' or 'min_snr'"
        )
    _check_positive_int(config.train, "batch_size", "config.train")
    _check_positive_int(config.train, "num_steps", "config.train", allow_zero=True)
    _check_positive_int(config.train, "steps_per_dispatch", "config.train")
    for field in ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints"):
        _check_positive_int(config.train, field, "config.train")
    if config.train.batch_size % device_count:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by the "
            f"{device_count} devices of this job"
        )
    if not config.optim.learning_rate > 0:
        raise ValueError(f"config.optim.learning_rate={config.optim.learning_rate}: must be > 0")
    if config.optim.warmup_steps < 0:
        raise ValueError(f"config.optim.warmup_steps={config.optim.warmup_steps}: must be >= 0")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"config.train.ema_decay={config.train.ema_decay}: must be in [0, 1)")
    if config.train.nonfinite not in ("stop", "skip"):
        raise ValueError(
            f"config.train.nonfinite={config.train.nonfinite!r}: expected 'stop' or 'skip'"
        )
    if config.sample.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"config.sample.sampler={config.sample.sampler!r}: expected ddpm|ddim")
    levels = len(config.model.ch_mult)
    size = config.data.image_size
    if size % (2 ** (levels - 1)):
        raise ValueError(
            f"config.data.image_size={size} is not divisible by 2**(len(ch_mult)-1)="
            f"{2 ** (levels - 1)} (config.model.ch_mult={tuple(config.model.ch_mult)})"
        )


def _check_positive_int(section, field: str, prefix: str, allow_zero: bool = False) -> None:
    value = section[field]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{prefix}.{field}={value!r}: expected an int")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{prefix}.{field}={value}: must be {'>= 0' if allow_zero else '> 0'}")


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
    """Initialises parameters (from `rng`), the optimiser state and the EMA copy."""
    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    params = jax.jit(functools.partial(model.init, train=False))(rng, x, t, y)["params"]
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=create_optimizer(config.optim),
        ema_params=params,
        num_skipped=jnp.zeros((), jnp.int32),
    )
    # A strongly typed step: TrainState.create's Python 0 would become a weakly typed array, and
    # the step's output (strong int32) would then trigger a second compilation of the step.
    return state.replace(step=jnp.zeros((), jnp.int32))


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
    grad_norm = optax.global_norm(grads)
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
    """Several steps in one dispatch: `lax.scan` of `step_fn` over the leading batch axis."""
    return jax.lax.scan(lambda s, b: step_fn(s, b, rng), state, batches)


def replicate(tree, devices=None):
    """Copies `tree` onto every local device, laid out exactly as a pmap over 'batch' returns it.

    `flax.jax_utils.replicate` gives arrays on a differently named mesh, which makes the first
    call of a pmap-ed step with its own outputs compile the whole step a second time.
    """
    copies = jax_utils.replicate(tree, devices=devices)
    return jax.pmap(lambda x: x, axis_name="batch", devices=devices)(copies)


def make_p_train_step(config: ml_collections.ConfigDict, schedule) -> Callable:
    """The per-device step bound to the config, scanned `steps_per_dispatch` times, pmap-ed."""
    step_fn = functools.partial(
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
    fused = functools.partial(multi_train_step, step_fn=step_fn)
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
    """Records SIGTERM (TPU-VM preemption notice) so the loop can checkpoint and exit."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: finishing the step, then checkpointing.")
        self.received = True

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
            host = jax.device_get(jax.tree.map(lambda m: m[0], metrics))  # replicas agree
            for i in range(np.shape(host["loss"])[0]):
                rows.append((first_step + i, {k: float(v[i]) for k, v in host.items()}))
        self._pending = []
        return rows


def _first_nonfinite(rows) -> tuple[int, str] | None:
    for step, row in rows:
        if row["finite"] < 1.0:
            bad = "loss" if not np.isfinite(row["loss"]) else "grad_norm"
            return step, f"{bad}={row[bad]}"
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from the newest complete checkpoint in `workdir`) and writes samples.

    Returns the final (unreplicated) train state.
    """
    device_count = jax.device_count()
    local_devices = jax.local_device_count()
    validate_config(config, device_count=device_count)
    input_pipeline.get_dataset_info(config.data)  # the data match the config, before any writes
    is_main = jax.process_index() == 0
    k = config.train.steps_per_dispatch

    rng = jax.random.key(config.seed)
    init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
    del rng
    schedule = create_schedule(config)
    model = create_model(config)
    state = create_train_state(init_rng, config, model)

    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    start_step = 0
    if ckpt.latest_step() is not None:
        state = _restore_state(ckpt, state)
        start_step = int(state.step)
        logging.info("Resumed from the checkpoint of step %d.", start_step)

    data = input_pipeline.make_train_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=local_devices,
    )
    p_train_step = make_p_train_step(config, schedule)
    writer = _Writer(workdir) if is_main else None
    pstate = replicate(state)
    metric_log = _MetricLog()
    num_steps = config.train.num_steps
    step = start_step
    t_last, step_last = time.perf_counter(), step
    progress = progress_bar(start_step, num_steps, enabled=is_main)
    try:
        with _SigtermFlag() as sigterm:
            while step < num_steps:
                n = min(k, num_steps - step)
                pstate, metrics = p_train_step(pstate, _stack_batches(data, n), step_rng)
                metric_log.add(step, metrics)
                step += n
                progress.update(n)
                if _crossed(step, n, config.train.log_every) or step == num_steps:
                    rows = _checked(metric_log.flush(), config)
                    now = time.perf_counter()
                    rate = (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    if writer is not None and rows:
                        writer.scalars(step, rows[-1][1], rate, config.train.batch_size)
                        progress.set_postfix(loss=f"{rows[-1][1]['loss']:.4f}")
                preempted = sigterm.received or ckpt.reached_preemption(step)
                if (
                    _crossed(step, n, config.train.checkpoint_every)
                    or step == num_steps
                    or preempted
                ):
                    _checked(metric_log.flush(), config)
                    _save(ckpt, pstate, step, config)
                if preempted:
                    ckpt.wait_until_finished()
                    logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
                    raise Preempted(step)
                if _crossed(step, n, config.train.sample_every) or step == num_steps:
                    ema = jax_utils.unreplicate(pstate.ema_params)
                    images = sample_grid(
                        jax.random.fold_in(sample_rng, step), config, model, ema, schedule
                    )
                    if writer is not None:
                        writer.images(step, images)
        ckpt.wait_until_finished()
    finally:
        progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()
        if hasattr(data, "close"):
            data.close()
    return jax_utils.unreplicate(pstate)


def _crossed(step: int, n: int, every: int) -> bool:
    """Whether the last dispatch (steps step-n+1 .. step) reached a multiple of `every`."""
    return step // every > (step - n) // every


def _checked(rows, config):
    """Stops on a non-finite step (stop mode) or when too many were skipped (skip mode)."""
    bad = _first_nonfinite(rows)
    if bad is None:
        return rows
    step, what = bad
    if config.train.nonfinite == "stop":
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}; stopping without checkpointing this state "
            "(set config.train.nonfinite='skip' to skip such updates)"
        )
    skipped = sum(1 for _, r in rows if r["finite"] < 1.0)
    logging.warning("Skipped %d non-finite update(s), first at step %d (%s).", skipped, step, what)
    return rows


def _restore_state(ckpt: checkpoint.Checkpointer, state: TrainState) -> TrainState:
    target = {
        "params": state.params,
        "ema_params": state.ema_params,
        "opt_state": state.opt_state,
    }
    restored = ckpt.restore(target=target)
    meta = restored["meta"]
    return state.replace(
        step=jnp.asarray(meta["step"], jnp.int32),
        params=restored["params"],
        ema_params=restored["ema_params"],
        opt_state=restored["opt_state"],
        num_skipped=jnp.asarray(meta.get("num_skipped", 0), jnp.int32),
    )


def _save(ckpt: checkpoint.Checkpointer, pstate: TrainState, step: int, config) -> None:
    state = jax.device_get(jax_utils.unreplicate(pstate))
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
