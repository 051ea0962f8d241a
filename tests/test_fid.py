"""FID / IS math against closed forms, and the FID Inception network, resize and weights (no torch).

The parity with pytorch-fid itself (network and distance) is in test_fid_torch.py.
"""

import sys

import flax.traverse_util
import jax
import numpy as np
import pytest

from ddpm_jax import fid
from ddpm_jax.models import inception


def _max_relative_error(got, expected):
    """max |got - expected| / max |expected|: float32 noise is relative to the output's scale."""
    expected = np.asarray(expected)
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _spd(rng, d, eigenvalues=None):
    """A random symmetric positive-definite matrix (optionally with the given eigenvalues)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = rng.uniform(0.1, 2.0, d) if eigenvalues is None else eigenvalues
    return (q * lam) @ q.T, q


# ---------------------------------------------------------------- Frechet distance


@pytest.mark.parametrize("rotated", [False, True], ids=["diagonal", "commuting"])
def test_frechet_distance_of_commuting_covariances_is_closed_form(rotated):
    # Commuting covariances share eigenvectors: sqrt(S1 S2) has eigenvalues sqrt(a b), so
    # FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0] if rotated else np.eye(d)
    sigma1, sigma2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_is_zero_on_identical_and_symmetric():
    rng = np.random.default_rng(1)
    sigma1, _ = _spd(rng, 32)
    sigma2, _ = _spd(rng, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    assert abs(fid.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-10
    forward = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(fid.frechet_distance(mu2, sigma2, mu1, sigma1), forward, rtol=1e-10)
    assert forward > 0


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched statistics"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_singular_product_takes_the_eps_path():
    # S1 S2 = [[0, 1], [0, 0]]: sqrtm is infinite, so eps goes on the diagonals; the root of
    # the regularised product is then far from real, which pytorch-fid reports as an error.
    sigma1, sigma2 = np.array([[0.0, 1.0], [1.0, 0.0]]), np.diag([0.0, 1.0])
    with pytest.raises(ValueError, match="Imaginary component"):
        fid.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2)


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((100, inception.NUM_CLASSES)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 7, 100])
def test_inception_score_of_confident_even_classes_is_k(k):
    # Every sample certain of its class, each split spread evenly over k classes: KL = log k.
    labels = np.tile(np.arange(k), 10 * 3)  # 10 splits of 3 k samples
    logits = np.full((labels.size, inception.NUM_CLASSES), -1e3)
    logits[np.arange(labels.size), labels] = 1e3
    mean, std = fid.inception_score(logits, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_splits_are_consecutive():
    # Two splits: the first all class 0 (score 1), the second two classes (score 2).
    logits = np.full((8, 4), -1e3)
    logits[np.arange(8), [0, 0, 0, 0, 1, 2, 1, 2]] = 1e3
    mean, std = fid.inception_score(logits, num_splits=2)
    assert (mean, std) == pytest.approx((1.5, 0.5), rel=1e-9)


# ---------------------------------------------------------------- statistics and their files


def test_statistics_are_float64_mean_and_covariance():
    features = np.random.default_rng(2).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = fid.statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(mu, np.mean(features.astype(np.float64), axis=0))
    np.testing.assert_array_equal(sigma, np.cov(features.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        fid.statistics(features[:1])


def test_stats_file_round_trips_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(3)
    mu, (sigma, _) = rng.standard_normal(8), _spd(rng, 8)
    path = str(tmp_path / "sub" / "stats.npz")
    fid.save_stats(path, mu, sigma)
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    got_mu, got_sigma = fid.load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="no \\['sigma', 'mu'\\]|not an FID statistics"):
        fid.load_stats(str(tmp_path / "bad.npz"))


# ---------------------------------------------------------------- resize


def _torch_bilinear_reference(image, size):
    """torch's upsample_bilinear2d (align_corners=False) written out pixel by pixel, float64."""
    h, w = image.shape[:2]

    def source(i, in_size):
        src = max((i + 0.5) * in_size / size - 0.5, 0.0)
        lo = int(src)
        return lo, min(lo + 1, in_size - 1), src - lo

    out = np.zeros((size, size) + image.shape[2:])
    for i in range(size):
        y0, y1, fy = source(i, h)
        for j in range(size):
            x0, x1, fx = source(j, w)
            top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
            bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize("shape, size", [((32, 32), 299), ((7, 12), 5), ((300, 64), 41)])
def test_resize_matches_torch_bilinear(shape, size):
    image = np.random.default_rng(4).uniform(0, 255, shape + (2,))
    expected = _torch_bilinear_reference(image, size)
    got = np.asarray(inception.resize_bilinear(image[None].astype(np.float32), size))[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=255 * 1e-6)


def test_resize_to_the_same_size_is_the_identity():
    np.testing.assert_array_equal(inception.bilinear_weights(299, 299), np.eye(299))


# ---------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def params():
    return inception.random_params(seed=0)


@pytest.fixture(scope="module")
def feature_fn(params):
    return fid.make_feature_fn(params)


def test_network_output_shapes(params):
    images = np.random.default_rng(5).uniform(0, 255, (2, 17, 23, 3)).astype(np.float32)
    apply = jax.jit(lambda p, x: inception.FIDInceptionV3().apply({"params": p}, x))
    out = apply(params, images)
    assert isinstance(out, inception.InceptionOutput)
    assert out.pool.shape == (2, inception.POOL_FEATURES)
    assert out.logits.shape == out.logits_unbiased.shape == (2, inception.NUM_CLASSES)
    assert np.all(np.asarray(out.pool) >= 0)  # an average of ReLUs
    np.testing.assert_allclose(
        out.logits - out.logits_unbiased,
        np.broadcast_to(params["fc"]["bias"], (2, 1008)),
        atol=1e-5,
    )
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert count == 23_885_392  # torchvision's Inception3(num_classes=1008, aux_logits=False)


def test_sharded_features_match_one_device(params, feature_fn):
    assert jax.local_device_count() == 8
    images = np.random.default_rng(6).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    got = feature_fn(images)  # 5 images over 8 devices: 3 of padding dropped
    assert got.pool.shape == (5, 2048) and got.logits_unbiased.shape == (5, 1008)
    model = inception.FIDInceptionV3()
    expected = jax.jit(lambda p, x: model.apply({"params": p}, x))(
        params, images.astype(np.float32)
    )
    for name, value in got._asdict().items():
        assert isinstance(value, np.ndarray)
        assert _max_relative_error(value, getattr(expected, name)) < 1e-5, name


def test_grayscale_is_repeated_to_rgb_and_batches_concatenate(feature_fn):
    gray = np.random.default_rng(7).integers(0, 256, (3, 24, 24, 1), dtype=np.uint8)
    out = fid.features_from_images(feature_fn, [gray[:2], gray[2:]])
    rgb = feature_fn(np.repeat(gray, 3, axis=-1))
    assert out.pool.shape == (3, 2048) and out.logits.shape == (3, 1008)
    for name, value in out._asdict().items():
        assert _max_relative_error(value, getattr(rgb, name)) < 1e-5, name


def test_feature_fn_takes_only_uint8_images(feature_fn):
    with pytest.raises(ValueError, match="expected uint8"):
        feature_fn(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        feature_fn(np.zeros((2, 8, 8, 4), np.uint8))


# ---------------------------------------------------------------- weights


def _torch_style_state_dict(params):
    """Our params written under pytorch-fid's names and layouts (what the .pth holds)."""
    state = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[inception.torch_key(path)] = np.asarray(value)
    return state


def test_torch_names_convert_back_exactly(params):
    state = _torch_style_state_dict(params)
    assert "Conv2d_1a_3x3.conv.weight" in state and state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)
    state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(0)  # ignored
    converted = inception.params_from_torch_state_dict(state)
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_converter_names_missing_extra_and_misshaped_tensors(params):
    state = _torch_style_state_dict(params)
    del state["Mixed_6e.branch7x7dbl_4.bn.running_mean"]
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    state["fc.bias"] = np.zeros(1000, np.float32)
    with pytest.raises(ValueError) as info:
        inception.params_from_torch_state_dict(state)
    message = str(info.value)
    assert "1 missing: Mixed_6e.branch7x7dbl_4.bn.running_mean (192,)" in message
    assert "1 extra: AuxLogits.fc.weight (1000, 768)" in message
    assert "1 mis-shaped: fc.bias: got (1000,), expected (1008,)" in message


def test_weights_file_round_trips_without_pickle(params, tmp_path):
    path = str(tmp_path / "weights" / "fid_inception.npz")
    inception.save_weights(params, path)
    with np.load(path, allow_pickle=False) as data:
        assert "Mixed_5b/branch1x1/conv/kernel" in data.files
    jax.tree.map(np.testing.assert_array_equal, inception.load_weights(path), params)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    del flat["fc/bias"]
    np.savez(tmp_path / "partial.npz", **flat)
    with pytest.raises(ValueError, match="1 missing: fc/bias"):
        inception.load_weights(str(tmp_path / "partial.npz"))


def test_missing_weights_message_says_where_and_how():
    message = inception.missing_weights_message("/w/inception.npz")
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert "https://github.com/mseitzer/pytorch-fid/releases/" in message
    assert "ddpm-jax fid-weights --from pt_inception-2015-12-05-6726825d.pth" in message
    assert "--out /w/inception.npz" in message


def test_converting_a_pth_without_torch_says_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        inception.convert_weights_file(str(tmp_path / "x.pth"), str(tmp_path / "out.npz"))
