"""The train step and loop: pmap semantics, learning, resume, and bad input."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from ddpm_jax import (
    checkpoint,
    diffusion,
    experiment,
    input_pipeline,
    loop_utils,
    parallel,
    train,
    train_state,
)


def _config(**train_overrides):
    config = test_config.get_config()
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def _batch(config, n_devices, per_device, seed=0):
    rng = np.random.default_rng(seed)
    size, c = config.data.image_size, config.data.channels
    image = rng.uniform(-1, 1, (n_devices, per_device, size, size, c)).astype(np.float32)
    label = rng.integers(0, 10, (n_devices, per_device)).astype(np.int32)
    return {"image": image, "label": label}


def _step_fn(config, n_devices):
    """A pmap-ed single step over the first `n_devices` devices."""
    step = train.make_step_fn(config, experiment.create_schedule(config))
    return parallel.pmap(step, in_axes=(0, 0, None), devices=jax.devices()[:n_devices])


def _state(config, n_devices):
    model = experiment.create_model(config)
    state = train_state.create(jax.random.key(0), config, model)
    return parallel.replicate(state, devices=jax.devices()[:n_devices])


def test_pmapped_step_keeps_replicas_identical_and_metrics_finite():
    config = _config()
    n = 8
    state = _state(config, n)
    step = _step_fn(config, n)
    batch = _batch(config, n, 2)
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(1))
    for name in ("loss", "grad_norm", "learning_rate"):
        values = np.asarray(metrics[name])
        assert np.all(np.isfinite(values)), name
        np.testing.assert_array_equal(values, values[0])  # pmean: every device reports the same
    for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.ema_params):
        leaf = np.asarray(leaf)
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    assert int(state.step[0]) == 2
    # The parameters moved, and the EMA lies between the initial and the current parameters.
    init = train_state.create(jax.random.key(0), config, experiment.create_model(config))
    moved = [
        np.abs(np.asarray(p[0]) - np.asarray(q)).max()
        for p, q in zip(jax.tree.leaves(state.params), jax.tree.leaves(init.params))
    ]
    assert max(moved) > 0


def test_each_step_and_device_draws_t_and_noise_from_fold_in_rng_step_device():
    """With a network that outputs 0, L_simple is mean(eps^2): the pmean-ed loss reveals the
    noise every device drew. It must be fold_in(fold_in(rng, step), device) -> split(3)[1]."""
    config = _config()
    n, b, shape = 4, 2, (8, 8, 1)
    schedule = experiment.create_schedule(config)

    def zero_net(variables, x_t, t, labels, train, rngs):
        return jnp.zeros_like(x_t) * variables["params"]["w"]

    state = train_state.TrainState.create(
        apply_fn=zero_net,
        params={"w": jnp.ones(())},
        tx=optax.sgd(0.0),
        ema_params={"w": jnp.ones(())},
        num_skipped=jnp.zeros((), jnp.int32),
    )
    step_fn = train.make_step_fn(config, schedule)
    p_step = parallel.pmap(step_fn, in_axes=(None, 0, None), devices=jax.devices()[:n])
    batch = {"image": np.zeros((n, b, *shape), np.float32), "label": np.zeros((n, b), np.int32)}
    rng = jax.random.key(7)
    for step in (0, 5):
        _, metrics = p_step(state.replace(step=jnp.int32(step)), batch, rng)

        def expected_noise(d, step=step):
            key = jax.random.fold_in(jax.random.fold_in(rng, step), d)
            return jax.random.normal(jax.random.split(key, 3)[1], (b, *shape))

        expected = np.mean([np.mean(np.square(expected_noise(d))) for d in range(n)])
        np.testing.assert_allclose(float(metrics["loss"][0]), expected, rtol=1e-5)


def test_loss_falls_on_a_fixed_batch():
    config = _config()
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 0
    n = 2
    state = _state(config, n)
    step = _step_fn(config, n)
    batch = _batch(config, n, 8, seed=3)
    losses = []
    for i in range(50):
        state, metrics = step(state, batch, jax.random.key(i % 2))
        losses.append(float(metrics["loss"][0]))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


def test_pmap_gradient_equals_single_device_gradient_of_the_whole_batch():
    """pmean of per-device gradients (b each, 4 devices) == gradient on one device with 4b."""
    config = _config()
    schedule = experiment.create_schedule(config)
    model = experiment.create_model(config)
    state = train_state.create(jax.random.key(0), config, model)
    n, b = 4, 3
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (n * b, 8, 8, 1)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, schedule.num_timesteps, (n * b,)).astype(np.int32)
    loss = functools.partial(
        train.diffusion_loss,
        apply_fn=model.apply,
        schedule=schedule,
        labels=None,
        dropout_rng=jax.random.key(0),
        model_mean_type=diffusion.ModelMeanType.EPSILON,
    )

    def grad_fn(params, x, t, noise):
        return jax.grad(lambda p: loss(p, x_start=x, t=t, noise=noise))(params)

    whole = jax.jit(grad_fn)(state.params, x, t, noise)
    split = lambda a: a.reshape((n, b) + a.shape[1:])
    pmapped = jax.pmap(
        lambda p, x, t, e: jax.lax.pmean(grad_fn(p, x, t, e), "batch"),
        axis_name="batch",
        in_axes=(None, 0, 0, 0),
        devices=jax.devices()[:n],
    )(state.params, split(x), split(t), split(noise))
    for a, g in zip(jax.tree.leaves(whole), jax.tree.leaves(pmapped)):
        np.testing.assert_allclose(np.asarray(g[0]), np.asarray(a), rtol=2e-4, atol=1e-6)


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_end_to_end_digits_writes_checkpoint_samples_and_events(tmp_path):
    config = _config()
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == config.train.num_steps
    assert checkpoint.Checkpointer(str(tmp_path), train_state.LAYOUT).latest_step() == 6
    pngs = os.listdir(tmp_path / "samples")
    assert pngs == ["step_00000006.png"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_fused_steps_equal_single_steps(tmp_path):
    """steps_per_dispatch=3 (lax.scan inside pmap) reaches the same state as 1 step per call."""
    one = train.train_and_evaluate(_config(steps_per_dispatch=1), str(tmp_path / "one"))
    three = train.train_and_evaluate(_config(steps_per_dispatch=3), str(tmp_path / "three"))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(three.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _loop_primitives(jaxpr) -> set[str]:
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while"):
            found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    found |= _loop_primitives(sub)
    return found


def test_one_step_per_dispatch_runs_outside_any_loop_and_k_steps_in_one_scan():
    """A loop around the step makes XLA:CPU's backward convolutions ~15x slower (RESULTS.md)."""

    def step_fn(state, batch, rng):
        new = state + jax.numpy.sum(batch["image"]) + jax.random.uniform(rng)
        return new, {"loss": new}

    fused = functools.partial(train.multi_train_step, step_fn=step_fn)
    rng = jax.random.key(0)
    for k, expected in ((1, set()), (3, {"scan"})):
        batches = {"image": np.ones((k, 2, 4, 4, 1), np.float32)}
        jaxpr = jax.make_jaxpr(fused)(np.float32(0), batches, rng).jaxpr
        assert _loop_primitives(jaxpr) == expected, k
        state, metrics = fused(np.float32(0), batches, rng)
        assert metrics["loss"].shape == (k,)
        np.testing.assert_allclose(metrics["loss"][-1], state)


def _nan_at(monkeypatch, bad_step):
    """Makes the data iterator put a NaN into the batch of `bad_step`."""
    real = input_pipeline.make_train_iterator

    def poisoned(*args, start_step, **kwargs):
        for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
            if step == bad_step:
                batch = dict(batch, image=batch["image"].copy())
                batch["image"][0, 0, 0, 0, 0] = np.nan
            yield batch

    monkeypatch.setattr(input_pipeline, "make_train_iterator", poisoned)


def test_nonfinite_loss_stops_without_checkpointing_the_bad_state(tmp_path, monkeypatch):
    _nan_at(monkeypatch, bad_step=4)
    config = _config(num_steps=6, checkpoint_every=2, log_every=1)
    with pytest.raises(loop_utils.NonFiniteLossError, match="step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path), train_state.LAYOUT).latest_step() == 4


def test_nonfinite_skip_mode_leaves_params_unchanged_and_counts(tmp_path, monkeypatch):
    _nan_at(monkeypatch, bad_step=2)
    config = _config(num_steps=3, log_every=1)
    config.train.nonfinite = "skip"
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.num_skipped) == 1
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))


def test_label_dropout_replaces_labels_by_the_null_class_from_a_fourth_key():
    """A network that outputs 1000 where its label is the null class (10): the pmean-ed loss
    reveals which labels were dropped; they must be bernoulli(split(key, 4)[3], p), and the
    noise split(key, 4)[1]."""
    config = _config(label_dropout=0.5)
    config.data.class_conditional = True
    n, b, shape = 4, 16, (8, 8, 1)
    schedule = experiment.create_schedule(config)

    def null_net(variables, x_t, t, labels, train, rngs):
        dropped = (labels == 10).astype(x_t.dtype)[:, None, None, None]
        return jnp.zeros_like(x_t) + 1000.0 * dropped * variables["params"]["w"]

    state = train_state.TrainState.create(
        apply_fn=null_net,
        params={"w": jnp.ones(())},
        tx=optax.sgd(0.0),
        ema_params={"w": jnp.ones(())},
        num_skipped=jnp.zeros((), jnp.int32),
    )
    p_step = parallel.pmap(
        train.make_step_fn(config, schedule), in_axes=(None, 0, None), devices=jax.devices()[:n]
    )
    batch = {"image": np.zeros((n, b, *shape), np.float32), "label": np.zeros((n, b), np.int32)}
    rng = jax.random.key(3)
    _, metrics = p_step(state, batch, rng)
    losses, dropped = [], []
    for d in range(n):
        keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, 0), d), 4)
        drop = np.asarray(jax.random.bernoulli(keys[3], 0.5, (b,)), np.float64)
        noise = np.asarray(jax.random.normal(keys[1], (b, *shape)), np.float64)
        losses.append(np.mean(np.square(1000.0 * drop[:, None, None, None] - noise)))
        dropped.append(drop)
    np.testing.assert_allclose(float(metrics["loss"][0]), np.mean(losses), rtol=1e-5)
    assert 0.3 < np.mean(dropped) < 0.7


def test_learned_variance_trains_with_the_hybrid_loss():
    """learned_range: the UNet outputs 2C channels and the step minimises L_simple + lambda L_vlb
    (the loss itself is tested in test_diffusion); loss and gradients are finite."""
    config = _config()
    config.diffusion.model_var_type = "learned_range"
    model = experiment.create_model(config)
    assert model.out_ch == 2 * config.data.channels
    n = 2
    state, step = _state(config, n), _step_fn(config, n)
    state, metrics = step(state, _batch(config, n, 2), jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    assert np.all(np.isfinite(np.asarray(metrics["grad_norm"])))
