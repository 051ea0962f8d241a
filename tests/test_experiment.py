"""The config -> objects mapping of the samplers, guidance and learned variances: validation
(each error names config.section.field=value), the sampler spec and the UNet's kwargs."""

import pytest

from configs import test as test_config
from ddpm_jax import experiment, sampling


def _config(**fields):
    """The test config with "section.field" overrides."""
    config = test_config.get_config()
    for path, value in fields.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"sample.sampler": "dpm++3m"}, "config.sample.sampler='dpm\\+\\+3m'"),
        ({"sample.ddim_spacing": "cubic"}, "config.sample.ddim_spacing='cubic'"),
        (
            {"sample.sampler": "respaced", "sample.ddim_steps": 21},
            "config.sample.ddim_steps=21: more than the 20",
        ),
        ({"sample.guidance": -1.0}, "config.sample.guidance=-1.0"),
        ({"sample.guidance": 2.0}, "config.sample.guidance=2.0: needs a null class"),
        ({"train.label_dropout": 1.0}, "config.train.label_dropout=1.0"),
        ({"train.label_dropout": 0.1}, "config.train.label_dropout=0.1: needs labels"),
    ],
)
def test_invalid_sampler_fields_name_the_field(fields, named):
    with pytest.raises(experiment.ConfigError, match=named):
        experiment.validate_config(_config(**fields), device_count=1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "respaced", "dpm++2m"])
def test_sampler_spec_of_the_config(sampler):
    config = _config(
        **{
            "sample.sampler": sampler,
            "sample.ddim_steps": 10,
            "sample.ddim_spacing": "logsnr",
            "data.class_conditional": True,
            "train.label_dropout": 0.1,
            "sample.guidance": 1.5,
        }
    )
    experiment.validate_config(config, device_count=1)
    spec = experiment.sampler_spec(config)
    assert spec == sampling.SamplerSpec(sampler, 10, 0.0, "logsnr", True, 1.5)
    assert experiment.sampler_spec(config, guidance=0.0).guidance == 0.0


def test_guidance_override_needs_a_null_class():
    with pytest.raises(ValueError, match="guidance=3: the model has no null class"):
        experiment.sampler_spec(_config(), guidance=3.0)


def test_null_class_only_with_label_dropout():
    assert experiment.unet_kwargs(_config())["null_class"] is False
    conditional = _config(**{"data.class_conditional": True})
    assert experiment.unet_kwargs(conditional)["null_class"] is False  # old checkpoints load
    dropout = _config(**{"data.class_conditional": True, "train.label_dropout": 0.1})
    assert experiment.unet_kwargs(dropout)["null_class"] is True


def test_learned_variance_doubles_the_output_channels():
    assert experiment.unet_kwargs(_config())["out_ch"] == 1
    learned = _config(**{"diffusion.model_var_type": "learned_range"})
    experiment.validate_config(learned, device_count=1)
    assert experiment.unet_kwargs(learned)["out_ch"] == 2
    with pytest.raises(experiment.ConfigError, match="config.diffusion.vlb_weight=-1.0"):
        experiment.validate_config(_config(**{"diffusion.vlb_weight": -1.0}), device_count=1)


def test_a_checkpoint_config_older_than_the_new_fields_resumes_without_changes():
    saved = experiment.to_json(_config())
    del saved["train"]["label_dropout"], saved["diffusion"]["vlb_weight"]
    del saved["sample"]["guidance"]
    assert experiment.config_changes(saved, _config()) == []
    changed = experiment.config_changes(saved, _config(**{"diffusion.vlb_weight": 0.01}))
    assert changed == ["diffusion.vlb_weight: 0.001 -> 0.01"]
