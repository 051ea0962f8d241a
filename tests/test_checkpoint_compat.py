"""Checkpoints written before the module restructure (tests/data/pre_restructure) still restore,
sample and resume, and hold what today's code trains from the same config and seed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from configs import test as test_config
from ddpm_jax import checkpoint, train, train_state
from ddpm_jax.commands import sample as sample_command

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "pre_restructure")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fixture's command line (tests/data/pre_restructure/README.md), run by today's code.
FIXTURE_ARGS = [
    "--config.train.num_steps=2",
    "--config.train.checkpoint_every=2",
    "--config.train.sample_every=100",
    "--config.model.ch_mult=(1,)",
    "--config.model.attn_resolutions=()",
]


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


def _restore(workdir):
    with checkpoint.Checkpointer(workdir, train_state.LAYOUT, read_only=True) as ckpt:
        return checkpoint.restore(ckpt, items=("params", "ema_params", "opt_state", "meta"))[1]


def test_an_old_checkpoint_restores_and_equals_what_todays_code_trains(tmp_path):
    old = _copy(tmp_path)
    ema, config, step = train_state.restore_ema_params(old)
    assert step == 2 and tuple(config.model.ch_mult) == (1,)
    assert config.sample.ddim_spacing == "uniform"  # a field added since: its default
    # Today's code, the fixture's command line, the same 2 devices: the same state. (On another
    # device count the pmean's order changes the gradients in the last bits, and Adam's first
    # steps turn near-zero components' signs into differences of the size of the step.)
    new_dir = str(tmp_path / "new")
    subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "train", "--config", "configs/test.py",
         "--workdir", new_dir, *FIXTURE_ARGS],
        cwd=REPO, check=True, capture_output=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    )  # fmt: skip
    saved, new = _restore(old), _restore(new_dir)
    assert saved["meta"] == new["meta"] == {"step": 2, "num_skipped": 0}
    for name in ("params", "ema_params", "opt_state"):
        pairs = zip(jax.tree.leaves(saved[name]), jax.tree.leaves(new[name]), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(saved["ema_params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_old_checkpoint_resumes_and_samples(tmp_path):
    old = _copy(tmp_path)
    config = _config()
    config.train.num_steps = 3
    state = train.train_and_evaluate(config, old)
    assert int(state.step) == 3
    out = sample_command.generate(old, num_samples=8, batch_size=8)
    assert sample_command.read_shards(out).shape == (8, 8, 8, 1)
