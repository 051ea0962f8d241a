"""Our UNet -> diffusers (the inverse of convert.from_diffusers): params, configs, the directory.

The round trips need neither torch nor diffusers; the tests marked `torch` load the exported
directory with diffusers' own `from_pretrained` and compare outputs (CPython 3.11, `.[torch]`).
"""

import copy
import json

import flax.traverse_util
import jax
import numpy as np
import pytest

from configs import default
from configs import test as test_config
from ddpm_jax import convert, experiment, schedules
from ddpm_jax.models import unet


def _small_config(image_size=16, channels=3, class_conditional=False, **model):
    config = default.get_config()
    config.data.image_size, config.data.channels = image_size, channels
    config.data.class_conditional, config.data.num_classes = class_conditional, 10
    small = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    config.model.update({**small, **model})
    return config


def _random_params(config, seed=0):
    """Params of the config's UNet, every leaf random (fan-in scaled kernels), from numpy."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, spec in flax.traverse_util.flatten_dict(convert.param_shapes(config)).items():
        value = rng.standard_normal(spec.shape)
        if path[-1] == "kernel":
            value /= np.sqrt(np.prod(spec.shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.1 * value
        else:
            value *= 0.1
        flat[path] = value.astype(np.float32)
    return flax.traverse_util.unflatten_dict(flat)


CONFIGS = {
    "rgb-attn8": _small_config(),
    "gray-3levels": _small_config(channels=1, ch_mult=(1, 2, 2), attn_resolutions=(16, 4)),
    "class-conditional": _small_config(class_conditional=True),
    "test-config": test_config.get_config(),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_to_diffusers_round_trips_bit_for_bit(name):
    config = CONFIGS[name]
    params = _random_params(config)
    state_dict = convert.to_diffusers(params, config)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state_dict.values())
    assert state_dict["conv_in.weight"].shape == (32, config.data.channels, 3, 3)
    back = convert.from_diffusers(state_dict, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_to_diffusers_names_what_does_not_fit():
    config = CONFIGS["rgb-attn8"]
    params = _random_params(config)
    del params["conv_in"]["bias"]
    params["conv_out"]["kernel"] = np.zeros((3, 3, 32, 4), np.float32)
    params["spare"] = {"kernel": np.zeros(2, np.float32)}
    with pytest.raises(ValueError) as info:
        convert.to_diffusers(params, config)
    message = str(info.value)
    assert "1 missing: conv_in/bias (32,)" in message
    assert "1 extra: spare/kernel (2,)" in message
    assert "1 mis-shaped: conv_out/kernel: got (3, 3, 32, 4), expected (3, 3, 32, 3)" in message


@pytest.mark.parametrize(
    "var_type, mean_type, clip", [("fixed_large", "epsilon", True), ("fixed_small", "v", False)]
)
def test_linear_scheduler_config_round_trips(var_type, mean_type, clip):
    config = default.get_config()
    config.diffusion.model_var_type, config.diffusion.model_mean_type = var_type, mean_type
    config.sample.clip_denoised = clip
    published = convert.scheduler_config(config)
    assert published["beta_start"] == pytest.approx(1e-4)
    assert published["beta_end"] == pytest.approx(0.02)
    assert published["trained_betas"] is None
    back = convert.apply_scheduler_config(default.get_config(), published)
    assert back.diffusion.to_dict() == config.diffusion.to_dict()
    assert back.sample.clip_denoised == clip


def test_other_schedules_export_their_exact_betas():
    config = default.get_config()
    config.diffusion.beta_schedule, config.diffusion.num_timesteps = "cosine", 50
    published = convert.scheduler_config(config)
    np.testing.assert_array_equal(
        published["trained_betas"], schedules.get_beta_schedule("cosine", 50)
    )
    config.diffusion.model_var_type = "learned_range"
    with pytest.raises(ValueError, match="model_var_type='learned_range'"):
        convert.scheduler_config(config)


def test_export_writes_a_directory_the_importer_reads(tmp_path):
    config = CONFIGS["class-conditional"]
    params = _random_params(config)
    out = tmp_path / "export"
    convert.export_diffusers(params, config, str(out))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ]
    unet_cfg = json.loads((out / "config.json").read_text())
    assert unet_cfg["_class_name"] == "UNet2DModel" and unet_cfg["num_class_embeds"] == 10
    back_config = convert.config_from_diffusers(unet_cfg, base=default.get_config())
    assert back_config.data.image_size == 16 and back_config.data.class_conditional
    back = convert.from_diffusers(convert.load_state_dict(str(out)), back_config)
    jax.tree.map(np.testing.assert_array_equal, back, params)


# ---------------------------------------------------------------- diffusers loads it (torch)


@pytest.fixture(scope="module")
def diffusers():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return pytest.importorskip("diffusers")


def _max_relative_error_vs_diffusers(torch_model, params, config, batch=3, seed=0):
    """Max |ours - diffusers| / max |diffusers|, diffusers run in float64."""
    import torch

    size, channels = config.data.image_size, config.data.channels
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    t = np.array([0, 17, 999][:batch], np.int32)
    y = rng.integers(0, 10, batch).astype(np.int32) if config.data.class_conditional else None
    reference = copy.deepcopy(torch_model).double().eval()
    with torch.no_grad():
        labels = None if y is None else torch.from_numpy(y).long()
        x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
        ref = reference(x_nchw, torch.from_numpy(t), labels).sample.numpy().transpose(0, 2, 3, 1)
    model = unet.UNet(**experiment.unet_kwargs(config))
    out = np.asarray(
        jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False))(
            params, x, t, y
        )
    )
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.torch
@pytest.mark.parametrize("name", ["rgb-attn8", "gray-3levels", "class-conditional"])
def test_diffusers_loads_the_exported_directory(diffusers, tmp_path, name):
    config = CONFIGS[name]
    params = _random_params(config)
    convert.export_diffusers(params, config, str(tmp_path))
    torch_model = diffusers.UNet2DModel.from_pretrained(str(tmp_path))
    error = _max_relative_error_vs_diffusers(torch_model, params, config)
    print(f"{name}: max relative error vs diffusers {error:.2e}")
    assert error < 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("schedule, steps", [("linear", 1000), ("cosine", 50), ("linear", 20)])
def test_diffusers_scheduler_has_our_betas(diffusers, tmp_path, schedule, steps):
    config = CONFIGS["rgb-attn8"].copy_and_resolve_references()
    config.diffusion.beta_schedule, config.diffusion.num_timesteps = schedule, steps
    convert.export_diffusers(_random_params(config), config, str(tmp_path))
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    expected = schedules.get_beta_schedule(schedule, steps)
    np.testing.assert_allclose(scheduler.betas.numpy(), expected, rtol=1e-6)
    assert scheduler.config.variance_type == config.diffusion.model_var_type
    assert scheduler.config.prediction_type == "epsilon"
