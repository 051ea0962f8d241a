"""The `ddpm-jax` command line: per-subcommand flags, one-line errors with exit 2, a quiet log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(REPO, "configs", "test.py")

pytestmark = pytest.mark.xdist_group("cli")


def _run(*args, timeout=600):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    return subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(result) -> list[str]:
    """stderr without absl's own log records (they start with I/W + a date)."""
    return [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not (line[:1] in "IWE" and line[1:5].isdigit())
    ]


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["train", "--config", TEST_CONFIG, "--batch_size", "256"],
            "usage error: --batch_size is not a flag of `train`: the training batch is "
            "--config.train.batch_size",
        ),
        (["train", "--config", TEST_CONFIG, "--seed", "3"], "--seed is not a flag of `train`"),
        (
            ["train", "--config", TEST_CONFIG, "--config.train.batch_size=0"],
            "error: config.train.batch_size=0: must be >= 1",
        ),
        (
            ["train", "--config", TEST_CONFIG, "--config.diffusion.beta_schedule=linaer"],
            "error: config.diffusion.beta_schedule='linaer'",
        ),
        (["train", "--config", TEST_CONFIG, "--config.train.batch_sze=3"], "batch_sze"),
        (["sample", "--num_samples", "0"], "error: --num_samples=0: must be > 0"),
        (["sample", "--config", TEST_CONFIG], "--config is not a flag of `sample`"),
        (["eval", "--num_samples", "4"], "--num_samples is not a flag of `eval`"),
        (["frobnicate"], "usage: ddpm-jax {train|sample|eval|"),
    ],
)
def test_bad_input_is_one_line_naming_it_and_exit_2(tmp_path, args, expected):
    result = _run(*args, "--workdir", str(tmp_path / "run"))
    lines = _error_lines(result)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_traceback_flag_shows_the_traceback(tmp_path):
    result = _run(
        "train", "--config", TEST_CONFIG, "--workdir", str(tmp_path), "--traceback",
        "--config.train.batch_size=0",
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ConfigError: config.train.batch_size=0" in result.stderr


def test_an_explicit_zero_is_used_and_refused_not_taken_for_absent(workdir, tmp_path):
    result = _run("sample", "--workdir", workdir, "--sampler", "ddim", "--steps", "0")
    assert result.returncode == 2
    assert _error_lines(result) == ["error: --steps=0: num_steps must be an int in [1, 20], got 0"]


def test_help_lists_the_flags_of_the_subcommand_only():
    result = _run("train", "--help")
    assert result.returncode == 0
    assert "--config" in result.stdout and "--workdir" in result.stdout
    assert "--batch_size" not in result.stdout and "--num_samples" not in result.stdout
    sample = _run("sample", "--help").stdout
    assert "--num_samples" in sample and "--steps" in sample and "--config:" not in sample


def test_a_training_run_logs_progress_and_checkpoints_but_not_orbax_internals(tmp_path):
    """6 steps, checkpoints at 3 and 6: our lines only (orbax logs ~90 INFO lines per save)."""
    result = _run("train", "--config", TEST_CONFIG, "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert not [line for line in lines if "orbax" in line or "checkpoint_manager.py" in line]
    assert not [line for line in lines if "xla_bridge.py" in line]
    assert sum("Checkpoint of step" in line for line in lines) == 2
    assert sum(" loss " in line for line in lines) == 3  # log_every=2
    assert len(lines) <= 10, "\n".join(lines)
    verbose = _run(
        "train", "--config", TEST_CONFIG, "--workdir", str(tmp_path / "v"), "--verbosity=1",
        "--config.train.num_steps=3",
    )  # fmt: skip
    assert verbose.returncode == 0 and "checkpoint_manager.py" in verbose.stderr


def test_sampler_and_spacing_choices_are_the_enums():
    from ddpm_jax import cli, sampling

    assert cli.SAMPLERS == tuple(s.value for s in sampling.Sampler)
    assert cli.SPACINGS == tuple(s.value for s in sampling.Spacing)


def test_guidance_flag_reaches_the_spec_and_is_refused_without_a_null_class(workdir, tmp_path):
    """--guidance is a SamplerSpec override; the test model was trained without label dropout."""
    result = _run(
        "sample", "--workdir", workdir, "--sampler", "dpm++2m", "--steps", "4", "--guidance", "2",
        "--out", str(tmp_path / "g"),
    )  # fmt: skip
    assert result.returncode == 2
    assert _error_lines(result) == [
        "error: guidance=2: the model has no null class (it needs config.data.class_conditional "
        "and config.train.label_dropout > 0 in training)"
    ]
    negative = _run("sample", "--workdir", workdir, "--guidance", "-1")
    assert negative.returncode == 2 and "--guidance" in _error_lines(negative)[0]
