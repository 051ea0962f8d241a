"""Checkpoints written before the module restructure (tests/data/pre_restructure) still restore,
sample and resume, and hold what today's code trains from the same config and seed."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from configs import test as test_config
from ddpm_jax import checkpoint, train, train_state
from ddpm_jax.commands import sample as sample_command

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "pre_restructure")


def _config():
    """The config the fixture was written with (see its README.md)."""
    config = test_config.get_config()
    config.train.num_steps = 2
    config.train.checkpoint_every = 2
    config.train.sample_every = 100
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    return config


def _copy(tmp_path) -> str:
    workdir = str(tmp_path / "old")
    shutil.copytree(FIXTURE, workdir)
    return workdir


def test_an_old_checkpoint_restores_and_equals_what_todays_code_trains(tmp_path):
    old = _copy(tmp_path)
    ema, config, step = train_state.restore_ema_params(old)
    assert step == 2 and tuple(config.model.ch_mult) == (1,)
    assert config.sample.ddim_spacing == "uniform"  # a field added since: its default
    new = train.train_and_evaluate(_config(), str(tmp_path / "new"))
    with checkpoint.Checkpointer(old, train_state.LAYOUT, read_only=True) as ckpt:
        _, out = checkpoint.restore(ckpt, items=("params", "opt_state", "meta"))
    assert out["meta"] == {"step": 2, "num_skipped": 0}
    # Written on 2 devices, recomputed on 8: the same math up to the order of the pmean.
    for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(new.ema_params), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)


def test_an_old_checkpoint_resumes_and_samples(tmp_path):
    old = _copy(tmp_path)
    config = _config()
    config.train.num_steps = 3
    state = train.train_and_evaluate(config, old)
    assert int(state.step) == 3
    out = sample_command.generate(old, num_samples=8, batch_size=8)
    assert sample_command.read_shards(out).shape == (8, 8, 8, 1)
