"""The FID and export commands end to end, on a random-weight Inception (the real weights file
is the only thing a real run adds) and the digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from safetensors.numpy import load_file

from configs import test as test_config
from ddpm_jax import cli, convert, fid, input_pipeline, train_state
from ddpm_jax.commands import sample as sample_command
from ddpm_jax.models import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("fid")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "inception.npz")
    inception.save_weights(inception.random_params(seed=0), path)
    return path


@pytest.fixture(scope="module")
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _digits(split, n):
    return input_pipeline.digits_source(split).images[:n]


def test_fid_stats_then_eval_fid_equal_the_direct_computation(
    weights, parsed_flags, workdir, tmp_path, capsys
):
    stats = str(tmp_path / "stats.npz")
    config = test_config.get_config()
    with flagsaver.flagsaver(
        config=config, split="test", num_examples=24, fid_weights=weights, out=stats
    ):
        cli.main(["ddpm-jax", "fid-stats"])
    mu_ref, sigma_ref = fid.load_stats(stats)
    feature_fn = fid.make_feature_fn(inception.load_weights(weights))
    direct = feature_fn(_digits("test", 24))
    mu, sigma = fid.statistics(direct.pool)
    np.testing.assert_allclose(mu_ref, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma_ref, sigma, rtol=1e-6, atol=1e-9)

    samples = str(tmp_path / "samples")
    images = _digits("train", 20)
    sample_command.write_npz_atomically(os.path.join(samples, "samples_00000.npz"), arr_0=images)
    with flagsaver.flagsaver(
        workdir=workdir, samples=samples, fid=True, ref=stats, fid_weights=weights
    ):
        cli.main(["ddpm-jax", "eval"])
    path = os.path.join(workdir, "eval", "fid-samples-n20.json")
    assert path in capsys.readouterr().out
    with open(path) as f:
        figures = json.load(f)
    out = feature_fn(images)
    expected = fid.frechet_distance(*fid.statistics(out.pool), mu_ref, sigma_ref)
    assert figures["num_samples"] == 20
    assert figures["fid"] == pytest.approx(expected, rel=1e-6)
    is_mean, _ = fid.inception_score(out.logits_unbiased)
    assert figures["inception_score"] == pytest.approx(is_mean, rel=1e-6)


def test_fid_without_weights_says_where_to_get_them(workdir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "eval", "--workdir", workdir, "--fid",
         "--samples", str(tmp_path), "--ref", str(tmp_path / "s.npz"),
         "--fid_weights", str(tmp_path / "missing.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and inception.WEIGHTS_FILENAME in lines[0], result.stderr
    assert "ddpm-jax fid-weights" in lines[0]


def test_export_writes_a_diffusers_directory_that_imports_back_bitwise(
    parsed_flags, workdir, tmp_path, capsys
):
    out = str(tmp_path / "exported")
    with flagsaver.flagsaver(workdir=workdir, out=out):
        cli.main(["ddpm-jax", "export"])
    assert "step 0" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["_class_name"] == "UNet2DModel"
    assert os.path.isfile(os.path.join(out, "scheduler", "scheduler_config.json"))
    state_dict = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    params, config, _ = train_state.restore_ema_params(workdir)
    back = convert.from_diffusers(state_dict, config)
    flat_a = dict(_flat(params))
    flat_b = dict(_flat(back))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert np.asarray(flat_a[key]).tobytes() == np.asarray(flat_b[key]).tobytes(), key


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def test_fid_during_training_is_logged_at_fid_every(weights, tmp_path):
    from ddpm_jax import experiment, train

    stats = str(tmp_path / "ref.npz")
    feature_fn = fid.make_feature_fn(inception.load_weights(weights))
    fid.save_stats(stats, *fid.statistics(feature_fn(_digits("test", 16)).pool))
    config = test_config.get_config()
    config.eval.fid_every = 3
    config.eval.fid_num_samples = 12
    config.eval.fid_batch = 8
    config.eval.fid_ref = stats
    config.eval.fid_weights = weights
    config.train.parallelism = "shard_map"  # the FID sampler follows the train step's wrapper
    train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    scored = [row for row in rows if "eval/fid" in row]
    assert [row["step"] for row in scored] == [3, 6]
    assert all(np.isfinite(row["eval/fid"]) and row["eval/fid"] > 0 for row in scored)
    assert all(row["eval/inception_score"] >= 1.0 for row in scored)

    config.eval.fid_ref = str(tmp_path / "absent.npz")
    with pytest.raises(experiment.ConfigError, match="config.eval.fid_ref='.*absent.npz'"):
        train.train_and_evaluate(config, str(tmp_path / "run2"))
