"""Training: the per-device train step, its device wrapper, and the training loop.

The step is written for one device and wrapped once by a `parallel.Wrapper` (axis
`parallel.AXIS`; pmap or jit(shard_map), config.train.parallelism) in `make_p_train_step`;
gradients and metrics are averaged with `lax.pmean` over that axis. Every random draw inside the
step comes from `fold_in(fold_in(rng, step), device)`, so the loop carries no key and a resumed
run draws exactly what an uninterrupted one would. Both wrappers run this same step.

The objects (model, schedule, optimiser, sampler) come from `experiment`; the train state and its
checkpoint schema from `train_state`; the loop's helpers from `loop_utils`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ddpm_jax import (
    checkpoint,
    diffusion,
    experiment,
    input_pipeline,
    loop_utils,
    parallel,
    sampling,
    schedules,
    train_state,
)

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
    loss_weighting: diffusion.LossWeighting = diffusion.LossWeighting.NONE,
    min_snr_gamma: float = 5.0,
    model_var_type: diffusion.ModelVarType = diffusion.ModelVarType.FIXED_LARGE,
    vlb_weight: float = 0.0,
) -> jax.Array:
    """L_simple (Algorithm 1) for given t and noise: the mean over this device's batch; with a
    learned variance L_hybrid = L_simple + vlb_weight * L_vlb (Nichol & Dhariwal 2021)."""
    x_t = diffusion.q_sample(schedule, x_start, t, noise)
    target = diffusion.training_target(schedule, x_start, t, noise, model_mean_type=model_mean_type)
    weights = diffusion.loss_weights(
        schedule, t, weighting=loss_weighting, model_mean_type=model_mean_type, gamma=min_snr_gamma
    )
    output = apply_fn({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_rng})
    if diffusion.learns_variance(model_var_type):
        loss = diffusion.loss_hybrid(
            schedule,
            output,
            x_start,
            x_t,
            t,
            target,
            model_mean_type=model_mean_type,
            vlb_weight=vlb_weight,
            weights=weights,
        )
        return jnp.mean(loss)
    return jnp.mean(diffusion.loss_simple(output, target, weights=weights))


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay; with warm-up min(decay, (1 + step) / (10 + step)) so early EMA tracks."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: train_state.TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    schedule: schedules.DiffusionSchedule,
    model_mean_type: diffusion.ModelMeanType,
    loss_weighting: diffusion.LossWeighting,
    min_snr_gamma: float,
    model_var_type: diffusion.ModelVarType = diffusion.ModelVarType.FIXED_LARGE,
    vlb_weight: float = 0.0,
    ema_decay: float,
    ema_warmup: bool,
    learning_rate_fn: optax.Schedule,
    class_conditional: bool,
    num_classes: int | None = None,
    label_dropout: float = 0.0,
    axis_name: str = parallel.AXIS,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimisation step on one device's batch; collectives over `axis_name`.

    Args:
      state: this device's replica of the train state.
      batch: {"image": [b, H, W, C] float32 in [-1, 1], "label": [b] int32, ...}.
      rng: the run's key, the same on every device; per-step and per-device keys are derived.
      num_classes, label_dropout: with label_dropout > 0 each label is replaced by the null
        class num_classes with that probability (classifier-free guidance, Ho & Salimans 2021).

    Returns:
      The new state (unchanged but for the step and skip counter if the update was not finite)
      and metrics averaged over all devices.
    """
    x_start = batch["image"]
    chex.assert_rank(x_start, 4)
    rng = jax.random.fold_in(rng, state.step)
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    if label_dropout > 0:  # a fourth key only then: runs without label dropout draw as before
        t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(rng, 4)
    else:
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    t = jax.random.randint(t_rng, (x_start.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)
    labels = batch["label"] if class_conditional else None
    if labels is not None and label_dropout > 0:
        drop = jax.random.bernoulli(label_rng, label_dropout, labels.shape)
        labels = jnp.where(drop, num_classes, labels)

    loss_fn = functools.partial(
        diffusion_loss,
        apply_fn=state.apply_fn,
        schedule=schedule,
        x_start=x_start,
        t=t,
        noise=noise,
        labels=labels,
        dropout_rng=dropout_rng,
        model_mean_type=model_mean_type,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
        model_var_type=model_var_type,
        vlb_weight=vlb_weight,
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
    benchmarks/RESULTS.md records it), so on CPU use `steps_per_dispatch = 1`. On GPU and TPU
    the scan saves host round trips.
    """
    if jax.tree.leaves(batches)[0].shape[0] == 1:
        state, metrics = step_fn(state, jax.tree.map(lambda x: x[0], batches), rng)
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, b: step_fn(s, b, rng), state, batches)


def make_step_fn(config: ml_collections.ConfigDict, schedule) -> Callable:
    """`train_step` bound to the config: step(state, batch, rng) -> (state, metrics), one device."""
    return functools.partial(
        train_step,
        schedule=schedule,
        model_mean_type=diffusion.ModelMeanType(config.diffusion.model_mean_type),
        loss_weighting=diffusion.LossWeighting(config.diffusion.loss_weighting),
        min_snr_gamma=config.diffusion.min_snr_gamma,
        model_var_type=diffusion.ModelVarType(config.diffusion.model_var_type),
        vlb_weight=config.diffusion.vlb_weight,
        ema_decay=config.train.ema_decay,
        ema_warmup=config.train.ema_warmup,
        learning_rate_fn=experiment.create_learning_rate_fn(config.optim),
        class_conditional=config.data.class_conditional,
        num_classes=experiment.num_classes(config),
        label_dropout=config.train.label_dropout if config.data.class_conditional else 0.0,
    )


# (state, batches, rng) -> (state, metrics): the state and metrics the same on every device.
TRAIN_IN_PLACES = (parallel.Place.REPLICATED, parallel.Place.PER_DEVICE, parallel.Place.SAME)
TRAIN_OUT_PLACES = (parallel.Place.REPLICATED, parallel.Place.REPLICATED)


def make_p_train_step(
    config: ml_collections.ConfigDict, schedule, wrapper: parallel.Wrapper | None = None
) -> Callable:
    """The per-device step, fused over the batches' [steps] axis (`multi_train_step`), wrapped.

    p_step(state, batches, rng): state from `wrapper.replicate`, batches from
    `wrapper.put(..., PER_DEVICE)` of host rows [local devices, steps, b, H, W, C], rng the run's
    key (`Place.SAME`); metrics replicated [steps] (pmap: [devices, steps]). The state is donated.
    wrapper: default `parallel.Wrapper(experiment.parallelism(config))`.
    """
    wrapper = wrapper or parallel.Wrapper(experiment.parallelism(config))
    fused = functools.partial(multi_train_step, step_fn=make_step_fn(config, schedule))
    return wrapper.wrap(
        fused, in_places=TRAIN_IN_PLACES, out_places=TRAIN_OUT_PLACES, donate_argnums=(0,)
    )


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    metrics_sink: loop_utils.MetricSink | None = None,
) -> train_state.TrainState:
    """Trains (resuming from the newest complete checkpoint in `workdir`) and writes samples.

    Failure modes (see RELIABILITY.md): an invalid config raises experiment.ConfigError before
    anything is written; SIGTERM (single process) or a multi-host preemption notice ends the
    current step, writes and waits for its checkpoint, then raises `loop_utils.Preempted` (exit
    code 75); a non-finite update raises `loop_utils.NonFiniteLossError` without checkpointing it;
    a failed checkpoint write raises its error within one log interval (or at the next save).

    Args:
      config: the experiment config (validated here).
      workdir: checkpoints, TensorBoard events, metrics.jsonl and sample grids go here.
      metrics_sink: called on process 0 with (step, metrics) for every step, in order, at each
        log interval (metrics: loss, grad_norm, learning_rate, finite).

    Returns the final (unreplicated) train state.
    """
    experiment.validate_config(config, device_count=jax.device_count())
    try:  # the data match the config, before any writes
        input_pipeline.get_dataset_info(config.data)
    except ValueError as e:
        raise experiment.ConfigError(f"config.data.name={config.data.name!r}: {e}") from e
    # From here on a SIGTERM is only recorded: one that arrives during start-up (restore,
    # compile) stops the job before its first step, when there is nothing new to save.
    with loop_utils.SigtermFlag(enabled=jax.process_count() == 1) as sigterm:
        return _train(config, workdir, sigterm, metrics_sink)


def make_grid_sampler(config: ml_collections.ConfigDict, model, schedule) -> Callable:
    """grid(rng, ema_params_replicated) -> `config.sample.num_grid` uint8 samples [N, H, W, C].

    The pmapped sampler is built (and compiled) once, before the loop, and called at every
    `sample_every`.
    """
    num = config.sample.num_grid
    sample_fn = sampling.make_pmapped_sampler(
        model.apply,
        schedule,
        experiment.sampler_spec(config),
        experiment.model_output(config),
        per_device_batch=-(-num // jax.local_device_count()),
        image_shape=experiment.image_shape(config),
        num_classes=experiment.num_classes(config),
        parallelism=experiment.parallelism(config),
    )
    return lambda rng, params: np.asarray(sampling.to_uint8(sample_fn(rng, params).images))[:num]


def make_fid_evaluator(config: ml_collections.ConfigDict, model, schedule) -> Callable:
    """fid(rng, ema_params_replicated) -> {"fid", "inception_score"} of config.eval's samples.

    Built once, before the loop: the sampler (config.sample's) and the Inception network compile
    once. Each host scores its own devices' samples; process 0's figures are logged.
    """
    from ddpm_jax import fid
    from ddpm_jax.models import inception

    sample_fn = sampling.make_pmapped_sampler(
        model.apply,
        schedule,
        experiment.sampler_spec(config),
        experiment.model_output(config),
        per_device_batch=config.eval.fid_batch // jax.device_count(),
        image_shape=experiment.image_shape(config),
        num_classes=experiment.num_classes(config),
        parallelism=experiment.parallelism(config),
    )
    feature_fn = fid.make_feature_fn(inception.load_weights(config.eval.fid_weights))
    return fid.make_sample_fid(
        sample_fn,
        feature_fn,
        fid.load_stats(config.eval.fid_ref),
        num_samples=config.eval.fid_num_samples,
        to_uint8=sampling.to_uint8,
    )


def _train(config, workdir, sigterm, metrics_sink) -> train_state.TrainState:
    """The body of `train_and_evaluate`, after validation, with SIGTERM recorded."""
    is_main = jax.process_index() == 0
    k = config.train.steps_per_dispatch
    # First, so that an unusable workdir fails before the model is built.
    ckpt = checkpoint.Checkpointer(workdir, train_state.LAYOUT, keep=config.train.keep_checkpoints)
    writer = data = progress = None
    try:
        rng = jax.random.key(config.seed)
        init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
        grid_rng, fid_rng = jax.random.split(sample_rng)
        del rng, sample_rng
        schedule = experiment.create_schedule(config)
        model = experiment.create_model(config)
        state = train_state.create(init_rng, config, model)
        start_step = 0
        if ckpt.latest_step() is not None:
            state = train_state.restore(ckpt, state, config)
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
        wrapper = parallel.Wrapper(experiment.parallelism(config))
        p_train_step = make_p_train_step(config, schedule, wrapper)
        grid = make_grid_sampler(config, model, schedule)
        fid_every = config.eval.fid_every
        score_fid = make_fid_evaluator(config, model, schedule) if fid_every else None
        num_steps = config.train.num_steps
        progress = loop_utils.progress_bar(start_step, num_steps, enabled=is_main)
        if is_main:
            writer = loop_utils.Writer(workdir, sink=metrics_sink, log_lines=progress.disable)
        guard = loop_utils.NonFiniteGuard(
            experiment.NonFinite(config.train.nonfinite),
            max_skipped=config.train.max_skipped_steps,
            num_skipped=int(state.num_skipped),
        )
        pstate = wrapper.replicate(state)
        step_rng = wrapper.put(step_rng, parallel.Place.SAME)
        del state
        metric_log = loop_utils.MetricLog()
        step = start_step
        t_last, step_last = time.perf_counter(), step
        if sigterm.received and step < num_steps:
            logging.warning("SIGTERM during start-up: exiting before step %d.", step)
            raise loop_utils.Preempted(step)
        crossed = loop_utils.crossed

        def flush() -> list:
            rows = guard.check(metric_log.flush())
            if writer is not None:
                writer.rows(rows)
            return rows

        while step < num_steps:
            n = min(k, num_steps - step)
            batches = wrapper.put(_stack_batches(data, n), parallel.Place.PER_DEVICE)
            pstate, metrics = p_train_step(pstate, batches, step_rng)
            metric_log.add(step, metrics)
            step += n
            progress.update(n)
            if crossed(step, n, config.train.log_every) or step == num_steps:
                rows = flush()
                ckpt.check_for_errors()  # a failed background write stops the job now
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                if writer is not None and rows:
                    writer.scalars(step, rows[-1][1], rate, config.train.batch_size)
                    progress.set_postfix(loss=f"{rows[-1][1]['loss']:.4f}")
            preempted = sigterm.received or ckpt.reached_preemption(step)
            if crossed(step, n, config.train.checkpoint_every) or step == num_steps or preempted:
                flush()
                _save(ckpt, pstate, config)
            if preempted:
                logging.warning("Preemption notice: waiting for the checkpoint of step %d.", step)
                ckpt.wait_until_finished()
                logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
                raise loop_utils.Preempted(step)
            if crossed(step, n, config.train.sample_every) or step == num_steps:
                images = grid(jax.random.fold_in(grid_rng, step), pstate.ema_params)
                if writer is not None:
                    writer.images(step, images)
            if score_fid is not None and (crossed(step, n, fid_every) or step == num_steps):
                scores = score_fid(jax.random.fold_in(fid_rng, step), pstate.ema_params)
                if writer is not None:
                    writer.eval_scalars(step, scores)
        ckpt.wait_until_finished()
        return jax.device_put(parallel.first_replica(pstate))
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        if hasattr(data, "close"):
            data.close()
        ckpt.close()  # last: it waits for the write in flight, and raises if that failed


def _stack_batches(it: Iterator[dict], k: int) -> dict[str, np.ndarray]:
    """k host batches [D, b, ...] -> one dispatch [D, k, b, ...] (the images and labels)."""
    batches = [next(it) for _ in range(k)]
    return {key: np.stack([b[key] for b in batches], axis=1) for key in ("image", "label")}


def _save(ckpt: checkpoint.Checkpointer, pstate: train_state.TrainState, config) -> None:
    state = parallel.first_replica(pstate)
    if train_state.save(ckpt, state, config):
        logging.info("Checkpoint of step %d: writing to %s.", int(state.step), ckpt.directory)
