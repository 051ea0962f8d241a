"""Parity with pytorch-fid: its FID Inception-v3 (random weights, no download) and its distance.

Needs torch, torchvision and pytorch-fid (`pip install -e .[test,torch]`, CPython 3.11). The
network is built by pytorch-fid's own `InceptionV3` (resize, [-1, 1] scaling, FID blocks); only
its weight download is replaced, and every weight and BatchNorm statistic is then randomised.
"""

import copy
import logging
from unittest import mock

import numpy as np
import pytest

from ddpm_jax import fid
from ddpm_jax.models import inception

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pytorch_fid():
    """pytorch_fid's inception and fid_score modules (torchvision made importable by conftest)."""
    inception_module = pytest.importorskip("pytorch_fid.inception")
    return inception_module, pytest.importorskip("pytorch_fid.fid_score")


def _max_relative_error(got, expected):
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def reference(pytorch_fid):
    """(pytorch-fid's InceptionV3 wrapper, the Inception3 inside it), random weights, float64."""
    torch.set_num_threads(2)
    module, built = pytorch_fid[0], []
    build = module.fid_inception_v3

    def recording_build():  # pytorch-fid's InceptionV3 keeps only the blocks; we want fc too
        built.append(build())
        return built[-1]

    # pytorch-fid builds its FID network, then loads downloaded weights into it: skip both.
    inception3 = module.torchvision.models.Inception3
    with (
        mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: None),
        mock.patch.object(inception3, "load_state_dict", lambda self, state_dict: None),
        mock.patch.object(module, "fid_inception_v3", recording_build),
    ):
        wrapper = module.InceptionV3([module.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    net = built[0]
    _randomise(net)
    return wrapper.eval().double(), net.eval().double()


def _randomise(net):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            shape = tensor.shape
            if name.endswith("conv.weight") or name == "fc.weight":
                value = torch.randn(shape, generator=generator) * (2.0 / shape[1:].numel()) ** 0.5
            elif name.endswith(("bn.weight", "running_var")):
                value = 0.5 + torch.rand(shape, generator=generator)
            else:  # bn.bias, running_mean, fc.bias
                value = 0.1 * torch.randn(shape, generator=generator)
            tensor.copy_(value)


@pytest.fixture(scope="module")
def feature_fn(reference):
    _, net = reference
    params = inception.params_from_torch_state_dict(net.state_dict())
    return fid.make_feature_fn(params)


@pytest.mark.parametrize("size", [32, 64, 299])
def test_features_match_pytorch_fid(reference, feature_fn, size):
    wrapper, net = reference
    images = np.random.default_rng(size).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        # pytorch-fid's input: ToTensor's [0, 1] floats, NCHW.
        x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
        pool = wrapper(x)[0].flatten(1)
        logits = net.fc(pool)
        unbiased = pool @ net.fc.weight.T
    got = feature_fn(images)
    errors = {
        "pool": _max_relative_error(got.pool, pool.numpy()),
        "logits": _max_relative_error(got.logits, logits.numpy()),
        "logits_unbiased": _max_relative_error(got.logits_unbiased, unbiased.numpy()),
    }
    print(f"size {size}: max relative errors {errors}")
    assert max(errors.values()) < 1e-4, errors


def test_converted_weights_file_matches(reference, tmp_path):
    _, net = reference
    pth = tmp_path / "pt_inception.pth"
    state = {k: v.float() for k, v in net.state_dict().items()}
    torch.save(state, pth)
    inception.convert_weights_file(str(pth), str(tmp_path / "inception.npz"))
    params = inception.load_weights(str(tmp_path / "inception.npz"))
    expected = inception.params_from_torch_state_dict(state)
    import jax

    jax.tree.map(np.testing.assert_array_equal, params, expected)


def _random_statistics(rng, d, n):
    features = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("n", [500, 20], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_matches_pytorch_fid(pytorch_fid, n):
    fid_score = pytorch_fid[1]
    rng = np.random.default_rng(n)
    mu1, sigma1 = _random_statistics(rng, 64, n)
    mu2, sigma2 = _random_statistics(rng, 64, n)
    expected = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    print(f"n={n}: FID {got}, relative error {abs(got - expected) / abs(expected):.2e}")
    assert got == pytest.approx(expected, rel=1e-6)


def _singular_product_statistics():
    """Covariances whose product has a nilpotent block (sqrtm is infinite) but whose
    eps-regularised product has a real root: both implementations take the eps path."""
    rng = np.random.default_rng(0)
    sigma1, sigma2 = np.zeros((6, 6)), np.zeros((6, 6))
    sigma1[:2, :2] = [[1.0, 1e-4], [1e-4, 0.0]]
    sigma2[:2, :2] = np.diag([0.0, 1.0])  # rank-deficient
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    sigma1[2:, 2:], sigma2[2:, 2:] = a @ a.T, b @ b.T
    return rng.standard_normal(6), sigma1, rng.standard_normal(6), sigma2


def test_frechet_distance_eps_path_matches_pytorch_fid(pytorch_fid, caplog):
    fid_score = pytorch_fid[1]
    mu1, sigma1, mu2, sigma2 = _singular_product_statistics()
    expected = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    with caplog.at_level(logging.WARNING):
        got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert "singular product" in caplog.text
    print(f"eps path: FID {got}, pytorch-fid {expected}")
    assert got == pytest.approx(expected, rel=1e-6)
    # A product whose regularised root is far from real: both refuse.
    bad = (np.zeros(2), np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros(2), np.diag([0.0, 1.0]))
    with pytest.raises(ValueError, match="Imaginary component"):
        fid_score.calculate_frechet_distance(*copy.deepcopy(bad))
    with pytest.raises(ValueError, match="Imaginary component"):
        fid.frechet_distance(*bad)


def test_fid_weights_command_converts_the_pth_without_pickle_at_read_time(reference, tmp_path):
    """README's `ddpm-jax fid-weights --from FILE --out W.npz`, on a .pth of random weights."""
    import os
    import subprocess
    import sys

    net = reference[1]
    pth = tmp_path / inception.WEIGHTS_FILENAME
    torch.save({k: v.float() for k, v in net.state_dict().items()}, pth)
    out = tmp_path / "inception.npz"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = ["fid-weights", "--from", str(pth), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", *command],
        cwd=repo, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = inception.load_weights(str(out))  # allow_pickle=False inside
    state = {k: v.float().numpy() for k, v in net.state_dict().items()}
    expected = inception.params_from_torch_state_dict(state)
    flat_a, flat_b = _flatten(loaded), _flatten(expected)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
