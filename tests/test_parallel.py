"""The two device wrappers (parallel.Parallelism): pmap and jit(shard_map) run the same step.

On 8 fake CPU devices: train steps, a whole run resumed across wrappers, a preemption, the
sampler and the bits/dim evaluator give the same numbers under both. They are compared bit for
bit: in JAX >= 0.8 `jax.pmap` is itself a jit of a shard_map (with the replication check off),
so both wrappers hand XLA the same per-device program and the same all-reduces; only the state's
layout differs (pmap: a [devices, ...] stack; shard_map: one replicated global array).
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import (
    experiment,
    input_pipeline,
    likelihood,
    loop_utils,
    parallel,
    sampling,
    train,
    train_state,
)

PMAP, SHARD_MAP = parallel.Parallelism.PMAP, parallel.Parallelism.SHARD_MAP
BOTH = (PMAP, SHARD_MAP)

pytestmark = pytest.mark.xdist_group("parallel")


def _config(parallelism=PMAP, **train_overrides):
    config = test_config.get_config()
    config.train.parallelism = parallelism.value
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def _flat(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_bitwise_equal(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
        assert fa[key].tobytes() == fb[key].tobytes(), f"{key} differs"


def _state_trees(state) -> dict:
    return {
        "params": state.params,
        "ema_params": state.ema_params,
        "opt_state": state.opt_state,
        "step": state.step,
        "num_skipped": state.num_skipped,
    }


# --------------------------------------------------------------------------------------------
# The interface.
# --------------------------------------------------------------------------------------------


def test_the_shard_map_wrapper_spans_all_devices_and_lays_out_like_pmap():
    place = parallel.Place
    fn = lambda s, x, r: (s + jax.lax.pmean(x.sum(), parallel.AXIS), x * 2)
    host = np.arange(16, dtype=np.float32).reshape(8, 2)
    out = {}
    for kind in BOTH:
        w = parallel.Wrapper(kind)
        wrapped = w.wrap(
            fn,
            in_places=(place.REPLICATED, place.PER_DEVICE, place.SAME),
            out_places=(place.REPLICATED, place.PER_DEVICE),
        )
        state = w.replicate(np.zeros(3, np.float32))
        s, x = wrapped(state, w.put(host, place.PER_DEVICE), w.put(jax.random.key(0), place.SAME))
        out[kind] = (parallel.first_replica(s), np.asarray(w.local_rows(x)))
        assert w.num_devices == 8
    assert parallel.Wrapper(SHARD_MAP).mesh.axis_names == (parallel.AXIS,)
    np.testing.assert_array_equal(out[PMAP][0], np.full(3, 15.0, np.float32))  # mean of rows
    for a, b in zip(out[PMAP], out[SHARD_MAP]):
        np.testing.assert_array_equal(a, b)


def test_parallelism_is_validated_and_free_to_change_on_resume():
    config = _config()
    config.train.parallelism = "pjit"
    with pytest.raises(experiment.ConfigError, match=r"config\.train\.parallelism='pjit'"):
        experiment.validate_config(config, device_count=8)
    saved = experiment.to_json(_config(PMAP))
    assert experiment.config_changes(saved, _config(SHARD_MAP)) == []


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def _batches(config, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size, c = config.data.image_size, config.data.channels
    per_device = config.train.batch_size // 8
    for _ in range(steps):
        image = rng.uniform(-1, 1, (8, 1, per_device, size, size, c)).astype(np.float32)
        label = rng.integers(0, 10, (8, 1, per_device)).astype(np.int32)
        yield {"image": image, "label": label}


def _train_steps(kind, steps: int = 3):
    config = _config(kind)
    schedule = experiment.create_schedule(config)
    state = train_state.create(jax.random.key(0), config, experiment.create_model(config))
    wrapper = parallel.Wrapper(kind)
    step = train.make_p_train_step(config, schedule, wrapper)
    pstate = wrapper.replicate(state)
    rng = wrapper.put(jax.random.key(1), parallel.Place.SAME)
    losses = []
    for batch in _batches(config, steps):
        pstate, metrics = step(pstate, wrapper.put(batch, parallel.Place.PER_DEVICE), rng)
        losses.append(parallel.first_replica(metrics)["loss"])
    return parallel.first_replica(pstate), np.concatenate(losses)


def test_train_steps_under_both_wrappers_give_the_same_state_bitwise():
    (p_state, p_losses), (s_state, s_losses) = (_train_steps(kind) for kind in BOTH)
    assert int(s_state.step) == 3
    np.testing.assert_array_equal(s_losses, p_losses)
    _assert_bitwise_equal(_state_trees(s_state), _state_trees(p_state))


def test_shard_map_keeps_the_state_one_replicated_global_array():
    config = _config(SHARD_MAP)
    wrapper = parallel.Wrapper(SHARD_MAP)
    state = train_state.create(jax.random.key(0), config, experiment.create_model(config))
    step = train.make_p_train_step(config, experiment.create_schedule(config), wrapper)
    pstate = wrapper.replicate(state)
    batch = next(_batches(config, 1))
    rng = wrapper.put(jax.random.key(1), parallel.Place.SAME)
    new, metrics = step(pstate, wrapper.put(batch, parallel.Place.PER_DEVICE), rng)
    for old, leaf in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        assert leaf.shape == old.shape and leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == 8
    assert metrics["loss"].shape == (1,)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(pstate.params))  # donated


def _run(workdir, config, *, sigterm_at=None):
    """train_and_evaluate, or the exception it raised; SIGTERM as the batch of a step is taken."""
    if sigterm_at is None:
        return train.train_and_evaluate(config, str(workdir))
    real = input_pipeline.make_train_iterator

    def iterator(*args, start_step, **kwargs):
        for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
            if step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(input_pipeline, "make_train_iterator", iterator)
        try:
            return train.train_and_evaluate(config, str(workdir))
        except loop_utils.Preempted as e:
            return e


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps of configs/test.py under pmap, in one go."""
    return _run(tmp_path_factory.mktemp("uninterrupted"), _config(PMAP, num_steps=6))


@pytest.mark.parametrize("first, then", [(PMAP, SHARD_MAP), (SHARD_MAP, PMAP)])
def test_a_checkpoint_of_one_wrapper_resumes_under_the_other(tmp_path, uninterrupted, first, then):
    half = _run(tmp_path, _config(first, num_steps=3))
    assert int(half.step) == 3
    resumed = _run(tmp_path, _config(then, num_steps=6))
    _assert_bitwise_equal(_state_trees(resumed), _state_trees(uninterrupted))


def test_sigterm_under_shard_map_checkpoints_the_step_then_resumes_bitwise(tmp_path, uninterrupted):
    preempted = _run(tmp_path, _config(SHARD_MAP, num_steps=6), sigterm_at=1)
    assert isinstance(preempted, loop_utils.Preempted), preempted
    assert preempted.code == loop_utils.PREEMPTED_EXIT_CODE and preempted.step == 2
    resumed = _run(tmp_path, _config(SHARD_MAP, num_steps=6))
    _assert_bitwise_equal(_state_trees(resumed), _state_trees(uninterrupted))


# --------------------------------------------------------------------------------------------
# Sampling and bits/dim.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_params():
    config = test_config.get_config()
    model = experiment.create_model(config)
    state = train_state.create(jax.random.key(0), config, model)
    return config, model, jax.device_get(state.params)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_under_shard_map_equals_pmap(model_and_params, sampler):
    config, model, params = model_and_params
    spec = sampling.SamplerSpec(sampler, steps=5, eta=1.0)
    images = {}
    for kind in BOTH:
        sample_fn = sampling.make_pmapped_sampler(
            model.apply,
            experiment.create_schedule(config),
            spec,
            experiment.model_output(config),
            per_device_batch=2,
            image_shape=experiment.image_shape(config),
            parallelism=kind,
        )
        out = sample_fn(jax.random.key(5), parallel.Wrapper(kind).replicate(params))
        images[kind] = np.asarray(out.images)
    assert images[PMAP].shape == (16, 8, 8, 1)
    assert images[PMAP].tobytes() == images[SHARD_MAP].tobytes()


def test_bits_per_dim_under_shard_map_equals_pmap(model_and_params):
    config, model, params = model_and_params
    summaries = [
        likelihood.evaluate_bpd(
            jax.random.key(2),
            model.apply,
            params,
            experiment.create_schedule(config),
            experiment.model_output(config),
            config.data,
            batch_size=16,
            num_examples=20,  # a full batch and a padded one
            parallelism=kind,
        )
        for kind in BOTH
    ]
    p, s = summaries
    assert p.num_examples == s.num_examples == 20
    assert s.bpd == p.bpd and s.prior_bpd == p.prior_bpd
    np.testing.assert_array_equal(s.terms_bpd, p.terms_bpd)
    np.testing.assert_array_equal(s.example_index, p.example_index)
    np.testing.assert_array_equal(s.example_bpd, p.example_bpd)
