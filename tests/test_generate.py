"""The `sample` command: shards, resume, determinism, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax.commands import sample as sample_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shards(out):
    return sorted(n for n in os.listdir(out) if n.endswith(".npz"))


def test_writes_uint8_shards_with_the_last_one_trimmed(workdir, tmp_path):
    out = sample_command.generate(
        workdir, out_dir=str(tmp_path / "s"), num_samples=20, batch_size=16
    )
    assert _shards(out) == ["samples_00000.npz", "samples_00001.npz"]
    images = sample_command.read_shards(out)
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 1)
    assert os.path.exists(os.path.join(out, "grid.png"))
    with np.load(os.path.join(out, "samples_00001.npz"), allow_pickle=False) as f:
        assert f["arr_0"].shape == (4, 8, 8, 1)


def test_same_seed_same_images_and_rerun_resumes_without_rewriting(workdir, tmp_path):
    out = str(tmp_path / "s")
    sample_command.generate(workdir, out_dir=out, num_samples=48, batch_size=16, seed=3)
    first = sample_command.read_shards(out)
    kept = os.path.join(out, "samples_00000.npz")
    mtime = os.stat(kept).st_mtime_ns
    os.remove(os.path.join(out, "samples_00002.npz"))  # as if interrupted before the last shard
    sample_command.generate(workdir, out_dir=out, num_samples=48, batch_size=16, seed=3)
    assert os.stat(kept).st_mtime_ns == mtime  # finished shards are skipped, not redone
    np.testing.assert_array_equal(sample_command.read_shards(out), first)
    other = sample_command.generate(
        workdir, out_dir=str(tmp_path / "o"), num_samples=16, batch_size=16, seed=4
    )
    assert not np.array_equal(sample_command.read_shards(other), first[:16])


def test_ddim_sampler_from_the_command(workdir, tmp_path):
    out = sample_command.generate(
        workdir,
        out_dir=str(tmp_path / "d"),
        num_samples=8,
        batch_size=8,
        sampler="ddim",
        steps=5,
        eta=0.0,
    )
    assert sample_command.read_shards(out).shape == (8, 8, 8, 1)


@pytest.mark.parametrize(("sampler", "spacing"), [("respaced", "uniform"), ("dpm++2m", "logsnr")])
def test_few_step_samplers_from_the_command(workdir, tmp_path, sampler, spacing):
    out = sample_command.generate(
        workdir,
        out_dir=str(tmp_path / sampler),
        num_samples=8,
        batch_size=8,
        sampler=sampler,
        steps=4,
        spacing=spacing,
    )
    images = sample_command.read_shards(out)
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8


def test_an_interrupted_write_leaves_no_shard_that_looks_complete(workdir, tmp_path, monkeypatch):
    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    out = str(tmp_path / "s")
    with pytest.raises(OSError, match="disk full"):
        sample_command.generate(workdir, out_dir=out, num_samples=8, batch_size=8)
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_samples": 0}, ValueError, "num_samples=0"),
        ({"batch_size": 12}, ValueError, "batch_size=12"),
        ({"out_dir": "../escape"}, ValueError, "'..'"),
    ],
)
def test_bad_arguments_are_refused(workdir, kwargs, error, message):
    args = {"num_samples": 8, "batch_size": 8, **kwargs}
    with pytest.raises(error, match=message):
        sample_command.generate(workdir, **args)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        sample_command.generate(str(tmp_path), num_samples=8, batch_size=8)


@pytest.mark.slow
def test_command_line_train_then_sample(tmp_path):
    """The installed entry point, as a user runs it: `train`, then `sample` from its checkpoint."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    workdir = str(tmp_path / "run")
    base = [sys.executable, "-m", "ddpm_jax.main"]
    subprocess.run(
        base
        + [
            "train",
            "--config",
            os.path.join(REPO, "configs/test.py"),
            "--workdir",
            workdir,
            "--config.train.num_steps=2",
            "--config.train.sample_every=2",
        ],
        check=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_00000002.png"]
    subprocess.run(
        base + ["sample", "--workdir", workdir, "--num_samples", "6", "--batch_size", "4"],
        check=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    out = os.path.join(workdir, "generated", "ddpm-seed0")
    assert sample_command.read_shards(out).shape == (6, 8, 8, 1)
    bad = subprocess.run(
        base + ["sample", "--workdir", str(tmp_path / "none"), "--num_samples", "4"],
        env=env,
        cwd=REPO,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error: No complete checkpoint" in bad.stderr
