"""diffusers UNet2DModel (the paper's published weights) -> our UNet: configs, params, parity.

The parity tests (marked `torch`) need torch and diffusers (`pip install -e .[torch]`, CPython
3.11); they randomise every diffusers weight, zero-initialised ones included, convert, and require
both networks to agree in float32. The config tests need neither.
"""

import copy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from configs import celebahq256, cifar10, default, digits, lsun_church256
from configs import test as test_config
from ddpm_jax import convert, experiment, train_state
from ddpm_jax.models import unet

# config.json of google/ddpm-cifar10-32 (the paper's CIFAR-10 model), as published.
CIFAR10_JSON = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# google/ddpm-celebahq-256 and google/ddpm-church-256 differ from it in these fields.
HQ256_JSON = dict(
    CIFAR10_JSON,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    sample_size=256,
)
SCHEDULER_JSON = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
MODEL_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")


def _small_config(image_size=16, channels=3, **model):
    config = default.get_config()
    config.data.image_size, config.data.channels = image_size, channels
    small = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0)
    config.model.update({**small, **model})
    return config


def _model_fields(config):
    return {k: tuple(v) if isinstance(v, tuple | list) else v for k, v in config.model.items()}


# ---------------------------------------------------------------- configs (no torch needed)


@pytest.mark.parametrize(
    "published, ours",
    [(CIFAR10_JSON, cifar10), (HQ256_JSON, celebahq256), (HQ256_JSON, lsun_church256)],
)
def test_published_configs_are_the_papers_models(published, ours):
    expected = ours.get_config()
    config = convert.config_from_diffusers(published, base=ours.get_config())
    for field in MODEL_FIELDS:
        assert tuple(np.atleast_1d(config.model[field])) == tuple(
            np.atleast_1d(expected.model[field])
        ), field
    assert config.data.image_size == expected.data.image_size
    assert config.data.channels == 3 and not config.data.class_conditional
    assert config.model.dropout == expected.model.dropout  # config.json has none: base's kept


@pytest.mark.parametrize("config_module", [digits, test_config, cifar10, celebahq256])
def test_diffusers_config_round_trips(config_module):
    config = config_module.get_config()
    size, channels = config.data.image_size, config.data.channels
    published = convert.diffusers_config(config.model, size, channels)
    back = convert.config_from_diffusers(published, base=config_module.get_config())
    assert _model_fields(back) == _model_fields(config)
    assert (back.data.image_size, back.data.channels) == (size, channels)


def test_diffusers_config_of_cifar10_is_the_published_one():
    config = cifar10.get_config()
    published = convert.diffusers_config(config.model, 32, 3)
    for key, value in CIFAR10_JSON.items():
        if not key.startswith("_"):
            assert published[key] == value, key


def test_unsupported_diffusers_options_are_all_named():
    bad = dict(CIFAR10_JSON, flip_sin_to_cos=True, norm_eps=1e-5)
    del bad["freq_shift"]  # diffusers' default is 0, not the paper's 1
    with pytest.raises(ValueError) as info:
        convert.config_from_diffusers(bad)
    for text in ("flip_sin_to_cos=True", "norm_eps=1e-05", "freq_shift=0"):
        assert text in str(info.value)
    with pytest.raises(ValueError, match="attention_head_dim=8 means several heads"):
        convert.config_from_diffusers(dict(CIFAR10_JSON, attention_head_dim=8))
    with pytest.raises(ValueError, match="must mirror down_block_types"):
        convert.config_from_diffusers(dict(CIFAR10_JSON, up_block_types=["UpBlock2D"] * 4))
    with pytest.raises(ValueError, match="in_channels=3 != out_channels=6"):
        convert.config_from_diffusers(dict(CIFAR10_JSON, out_channels=6))
    with pytest.raises(ValueError, match="resamp_with_conv=False"):
        convert.diffusers_config(dict(cifar10.get_config().model, resamp_with_conv=False), 32, 3)


def test_scheduler_config_sets_the_diffusion_section():
    config = convert.apply_scheduler_config(default.get_config(), SCHEDULER_JSON)
    assert config.diffusion.beta_schedule == "linear"
    assert config.diffusion.num_timesteps == 1000
    assert config.diffusion.model_var_type == "fixed_large"
    assert config.diffusion.model_mean_type == "epsilon"
    with pytest.raises(ValueError, match="beta_end=0.012"):
        convert.apply_scheduler_config(default.get_config(), dict(SCHEDULER_JSON, beta_end=0.012))
    with pytest.raises(ValueError, match="beta_schedule='scaled_linear'"):
        bad = dict(SCHEDULER_JSON, beta_schedule="scaled_linear")
        convert.apply_scheduler_config(default.get_config(), bad)


def test_converted_params_of_published_cifar10_have_the_papers_count():
    config = convert.config_from_diffusers(CIFAR10_JSON, base=cifar10.get_config())
    shapes = convert.param_shapes(config)
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)) == 35_746_307


# ---------------------------------------------------------------- parity with diffusers (torch)


@pytest.fixture(scope="module")
def diffusers():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return pytest.importorskip("diffusers")


def _torch_model(diffusers, config, seed=0):
    """A diffusers UNet2DModel for our config with every weight random (none zero-initialised)."""
    import torch

    num_classes = config.data.num_classes if config.data.class_conditional else None
    published = convert.diffusers_config(
        config.model, config.data.image_size, config.data.channels, num_classes=num_classes
    )
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**published).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name.split(".")[0]:  # fan-in scaled weights
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _compare(torch_model, params, config, batch=4, seed=0, x_scale=1.0):
    """Max |ours - diffusers| / max |diffusers| on random x_t, t (and labels).

    The reference runs in float64: diffusers' float32 is itself off by ~4e-3 on faint inputs
    (x_scale=1e-3), where ours (float32, two-pass GroupNorm variance) stays within ~1e-5.
    """
    import torch

    size, channels = config.data.image_size, config.data.channels
    rng = np.random.default_rng(seed)
    x = (x_scale * rng.standard_normal((batch, size, size, channels))).astype(np.float32)
    t = np.array([0, 17, 500, 999, 250, 3][:batch], np.int32)
    y = rng.integers(0, 10, batch).astype(np.int32) if config.data.class_conditional else None
    reference = copy.deepcopy(torch_model).double()
    with torch.no_grad():
        labels = None if y is None else torch.from_numpy(y).long()
        x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
        ref = reference(x_nchw, torch.from_numpy(t), labels).sample.numpy().transpose(0, 2, 3, 1)
    model = unet.UNet(**experiment.unet_kwargs(config))
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False))
    out = np.asarray(apply(params, x, t, y))
    assert out.shape == ref.shape and out.dtype == np.float32
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.torch
@pytest.mark.parametrize(
    "config",
    [
        _small_config(),
        _small_config(channels=1, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16, 4)),
    ],
    ids=["rgb-attn8", "gray-3levels-attn16+4"],
)
def test_converted_model_matches_diffusers(diffusers, config):
    torch_model = _torch_model(diffusers, config)
    params = convert.from_diffusers(torch_model.state_dict(), config)
    assert _compare(torch_model, params, config) < 1e-4
    # A faint input leaves the first GroupNorm little variance: its eps (1e-6) shows, and so
    # would a one-pass variance (E[x^2] - mean^2: ~1e-3 error here).
    assert _compare(torch_model, params, config, x_scale=1e-3) < 1e-4


@pytest.mark.torch
def test_class_conditional_model_matches_diffusers(diffusers):
    config = _small_config(num_res_blocks=1)
    config.data.class_conditional, config.data.num_classes = True, 10
    torch_model = _torch_model(diffusers, config)
    params = convert.from_diffusers(torch_model.state_dict(), config)
    assert params["label_emb"]["embedding"].shape == (10, 128)
    assert _compare(torch_model, params, config) < 1e-4


@pytest.mark.torch
@pytest.mark.slow
def test_paper_cifar10_model_matches_diffusers(diffusers):
    config = convert.config_from_diffusers(CIFAR10_JSON, base=cifar10.get_config())
    torch_model = _torch_model(diffusers, config)
    assert sum(p.numel() for p in torch_model.parameters()) == 35_746_307
    params = convert.from_diffusers(torch_model.state_dict(), config)
    assert _compare(torch_model, params, config, batch=2) < 1e-4


@pytest.mark.torch
def test_paper_256_model_has_diffusers_parameter_count(diffusers):
    import torch

    config = convert.config_from_diffusers(HQ256_JSON, base=celebahq256.get_config())
    with torch.device("meta"):  # shapes only, nothing allocated
        torch_model = diffusers.UNet2DModel(**HQ256_JSON)
    shapes = convert.param_shapes(config)
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert ours == sum(p.numel() for p in torch_model.parameters()) == 113_673_219


@pytest.mark.torch
def test_legacy_attention_names_convert(diffusers):
    # The hub files predate diffusers' to_q/to_k/to_v/to_out.0 names.
    config = _small_config(num_res_blocks=1)
    state_dict = _torch_model(diffusers, config).state_dict()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state_dict.items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    expected = convert.from_diffusers(state_dict, config)
    got = convert.from_diffusers(renamed, config)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.torch
def test_missing_extra_and_misshaped_tensors_are_all_listed(diffusers):
    config = _small_config(num_res_blocks=1)
    state_dict = dict(_torch_model(diffusers, config).state_dict())
    numpy_dict = {k: v.numpy() for k, v in state_dict.items()}
    convert.from_diffusers(numpy_dict, config)  # numpy arrays convert too
    del numpy_dict["mid_block.attentions.0.to_k.bias"]
    numpy_dict["mid_block.attentions.0.spare.weight"] = np.zeros((2, 2), np.float32)
    numpy_dict["conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)
    with pytest.raises(ValueError) as info:
        convert.from_diffusers(numpy_dict, config)
    message = str(info.value)
    assert "1 missing: mid_block.attentions.0.to_k.bias (64,)" in message
    assert "1 extra: mid_block.attentions.0.spare.weight (2, 2)" in message
    assert "1 mis-shaped: conv_in.weight: got (32, 4, 3, 3), expected (32, 3, 3, 3)" in message
    # A state dict for another architecture: the error names the model it was checked against.
    with pytest.raises(ValueError, match=r"UNet\(ch=32, ch_mult=\(1, 2, 2\)"):
        convert.from_diffusers(state_dict, _small_config(ch_mult=(1, 2, 2)))


@pytest.mark.torch
def test_safetensors_and_bin_files_load(diffusers, tmp_path):
    import torch

    config = _small_config(num_res_blocks=1)
    torch_model = _torch_model(diffusers, config)
    torch_model.save_pretrained(tmp_path / "st", safe_serialization=True)
    torch_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for directory in ("st", "bin"):
        loaded = convert.load_state_dict(str(tmp_path / directory))
        assert set(loaded) == set(expected)
        for key, value in loaded.items():
            value = value.numpy() if isinstance(value, torch.Tensor) else value
            np.testing.assert_array_equal(value, expected[key], err_msg=key)
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        convert.load_state_dict(str(tmp_path))


def _write_pretrained(diffusers, directory, config):
    torch_model = _torch_model(diffusers, config)
    torch_model.save_pretrained(directory, safe_serialization=True)
    diffusers.DDPMScheduler.from_config(SCHEDULER_JSON).save_config(directory)
    return torch_model


@pytest.mark.torch
def test_cli_converts_a_pretrained_directory(diffusers, tmp_path, monkeypatch):
    # train_state.save_pretrained is replaced by a recorder: this tests the CLI, not orbax.
    saved = {}

    class FakeTrainState:
        @staticmethod
        def save_pretrained(workdir, params, config):
            saved.update(workdir=workdir, params=params, config=config)

    monkeypatch.setattr(ddpm_jax, "train_state", FakeTrainState, raising=False)
    monkeypatch.setitem(sys.modules, "ddpm_jax.train_state", FakeTrainState)
    config = _small_config(num_res_blocks=1)
    torch_model = _write_pretrained(diffusers, tmp_path / "hub", config)
    convert.main(["--from", str(tmp_path / "hub"), "--out", str(tmp_path / "run")])
    assert saved["workdir"] == str(tmp_path / "run")
    assert _model_fields(saved["config"]) == _model_fields(config)
    assert saved["config"].diffusion.model_var_type == "fixed_large"
    assert _compare(torch_model, saved["params"], saved["config"]) < 1e-4


@pytest.mark.torch
def test_cli_writes_an_orbax_checkpoint(diffusers, tmp_path):
    config = _small_config(num_res_blocks=1)
    torch_model = _write_pretrained(diffusers, tmp_path / "hub", config)
    convert.main(["--from", str(tmp_path / "hub"), "--out", str(tmp_path / "run")])
    params, saved_config, step = train_state.restore_ema_params(str(tmp_path / "run"))
    expected = convert.from_diffusers(torch_model.state_dict(), config)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert step == 0
    assert tuple(saved_config.model.ch_mult) == (1, 2)
    assert saved_config.diffusion.model_var_type == "fixed_large"


def test_params_are_float32_numpy():
    # from_diffusers' leaves follow the model's param dtype; the config here has none of torch.
    config = _small_config(num_res_blocks=1)
    shapes = convert.param_shapes(config)
    state = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(p.key for p in path)
        key = convert.torch_key(names, len(config.model.ch_mult))
        state[key] = np.ones(convert.torch_shape(names[-1], spec.shape), np.float64)
    params = convert.from_diffusers(state, config)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(p, np.ndarray) and p.dtype == jnp.float32 for p in leaves)
