"""The experiment: the one reader of the whole config.

Everything that turns a config (configs/*.py, ml_collections) into objects lives here: validation
(each error names `config.section.field=value`), the model, schedule, optimiser, sampler spec and
model-output parameterisation, the enums read from config strings, the resume-compatibility diff
and the JSON form of a config stored in a checkpoint. The trainer, the samplers, the evaluators,
the converter and the benchmarks receive these objects, never the config.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from ddpm_jax import diffusion, parallel, sampling, schedules
from ddpm_jax.models import unet


class NonFinite(diffusion.Choice):
    """What training does when an update's loss or gradient norm is not finite."""

    STOP = "stop"  # exit (code 3) without checkpointing the bad state
    SKIP = "skip"  # leave the state unchanged, up to config.train.max_skipped_steps times


class ConfigError(ValueError):
    """An invalid config value; the message names `config.section.field=value`."""


def validate_config(config: ml_collections.ConfigDict, *, device_count: int) -> None:
    """Raises ConfigError naming the field and value of the first invalid setting.

    Checks every field the experiment reads, before anything is built or written, so that a
    typo in an 800k-step job fails in seconds rather than after the data, model and compile.
    """
    try:
        _validate(config, device_count=device_count)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e).strip("'\"")) from e


def _validate(config: ml_collections.ConfigDict, *, device_count: int) -> None:
    _check_int(config, "seed", minimum=0)
    _validate_data(config.data)
    _validate_model(config.model, image_size=config.data.image_size)
    _validate_diffusion(config.diffusion)
    _validate_optim(config.optim)
    _validate_train(config.train, device_count=device_count)
    _validate_sample(config.sample, num_timesteps=config.diffusion.num_timesteps)
    _validate_eval(config.eval, device_count=device_count)
    _check_guidance(config)


def _validate_data(data: ml_collections.ConfigDict) -> None:
    for field in ("name", "split"):
        if not isinstance(data[field], str) or not data[field]:
            raise TypeError(f"config.data.{field}={data[field]!r}: expected a non-empty string")
    _check_int(data, "image_size", minimum=1, prefix="config.data")
    _check_int(data, "channels", minimum=1, prefix="config.data")
    _check_bool(data, "random_flip", prefix="config.data")
    _check_bool(data, "class_conditional", prefix="config.data")
    if data.class_conditional:
        _check_int(data, "num_classes", minimum=1, prefix="config.data")


def _validate_model(model: ml_collections.ConfigDict, *, image_size: int) -> None:
    p = "config.model"
    _check_int(model, "ch", minimum=1, prefix=p)
    _check_int(model, "num_res_blocks", minimum=1, prefix=p)
    ch_mult = model.ch_mult
    if (
        not isinstance(ch_mult, (tuple, list))
        or not ch_mult
        or not all(_is_int(m) and m >= 1 for m in ch_mult)
    ):
        raise ValueError(f"{p}.ch_mult={ch_mult!r}: expected a non-empty tuple of ints >= 1")
    if not isinstance(model.attn_resolutions, (tuple, list)) or not all(
        _is_int(r) and r >= 1 for r in model.attn_resolutions
    ):
        raise ValueError(
            f"{p}.attn_resolutions={model.attn_resolutions!r}: expected a tuple of ints >= 1"
        )
    try:
        unet.check_sizes(ch=model.ch, ch_mult=ch_mult, resolution=image_size)
    except ValueError as e:
        raise ValueError(
            f"{p}.ch={model.ch}, {p}.ch_mult={tuple(ch_mult)}, "
            f"config.data.image_size={image_size}: {e}"
        ) from e
    _check_number(model, "dropout", low=0.0, high=1.0, high_open=True, prefix=p)
    _check_bool(model, "resamp_with_conv", prefix=p)
    try:
        dtype = jnp.dtype(model.dtype)
    except TypeError as e:
        raise TypeError(f"{p}.dtype={model.dtype!r}: not a dtype") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{p}.dtype={model.dtype!r}: expected a float type (float32, bfloat16)")


def _validate_diffusion(cfg: ml_collections.ConfigDict) -> None:
    p = "config.diffusion"
    _check_int(cfg, "num_timesteps", minimum=1, prefix=p)
    for field, check in [
        ("beta_schedule", lambda v: schedules.get_beta_schedule(v, cfg.num_timesteps)),
        ("model_mean_type", diffusion.ModelMeanType),
        ("model_var_type", diffusion.ModelVarType),
    ]:
        try:
            check(cfg[field])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{p}.{field}={cfg[field]!r}: {e}") from e
    _check_choice(cfg, "loss_weighting", diffusion.LossWeighting, prefix=p)
    _check_number(cfg, "min_snr_gamma", low=0.0, low_open=True, prefix=p)
    _check_number(cfg, "vlb_weight", low=0.0, prefix=p)


def _validate_optim(optim: ml_collections.ConfigDict) -> None:
    p = "config.optim"
    _check_number(optim, "learning_rate", low=0.0, low_open=True, prefix=p)
    _check_int(optim, "warmup_steps", minimum=0, prefix=p)
    _check_number(optim, "grad_clip_norm", low=0.0, low_open=True, prefix=p)
    for field in ("beta1", "beta2"):
        _check_number(optim, field, low=0.0, high=1.0, high_open=True, prefix=p)
    _check_number(optim, "eps", low=0.0, low_open=True, prefix=p)


def _validate_train(train: ml_collections.ConfigDict, *, device_count: int) -> None:
    p = "config.train"
    _check_int(train, "num_steps", minimum=0, prefix=p)
    _check_int(train, "max_skipped_steps", minimum=0, prefix=p)
    for field in (
        "batch_size",
        "steps_per_dispatch",
        "log_every",
        "checkpoint_every",
        "sample_every",
        "keep_checkpoints",
    ):
        _check_int(train, field, minimum=1, prefix=p)
    if train.batch_size % device_count:
        raise ValueError(
            f"{p}.batch_size={train.batch_size} is not divisible by the "
            f"{device_count} devices of this job"
        )
    _check_number(train, "ema_decay", low=0.0, high=1.0, high_open=True, prefix=p)
    _check_bool(train, "ema_warmup", prefix=p)
    _check_choice(train, "nonfinite", NonFinite, prefix=p)
    _check_choice(train, "parallelism", parallel.Parallelism, prefix=p)
    _check_number(train, "label_dropout", low=0.0, high=1.0, high_open=True, prefix=p)


def _validate_sample(sample: ml_collections.ConfigDict, *, num_timesteps: int) -> None:
    p = "config.sample"
    _check_int(sample, "num_grid", minimum=1, prefix=p)
    _check_choice(sample, "sampler", sampling.Sampler, prefix=p)
    _check_int(sample, "ddim_steps", minimum=1, prefix=p)
    _check_choice(sample, "ddim_spacing", sampling.Spacing, prefix=p)
    _check_number(sample, "ddim_eta", low=0.0, high=1.0, prefix=p)
    _check_bool(sample, "clip_denoised", prefix=p)
    if sample.sampler != "ddpm" and sample.ddim_steps > num_timesteps:
        raise ValueError(
            f"{p}.ddim_steps={sample.ddim_steps}: more than the {num_timesteps} diffusion steps"
        )
    _check_number(sample, "guidance", low=0.0, prefix=p)


def _check_guidance(config: ml_collections.ConfigDict) -> None:
    """config.sample.guidance > 0 needs a null class: class-conditional, with label dropout."""
    if config.train.label_dropout > 0 and not config.data.class_conditional:
        raise ValueError(
            f"config.train.label_dropout={config.train.label_dropout!r}: needs labels "
            "(config.data.class_conditional=True)"
        )
    if config.sample.guidance > 0 and not has_null_class(config):
        raise ValueError(
            f"config.sample.guidance={config.sample.guidance!r}: needs a null class "
            f"(config.data.class_conditional={config.data.class_conditional!r}, "
            f"config.train.label_dropout={config.train.label_dropout!r}; both must be on)"
        )


def _validate_eval(cfg: ml_collections.ConfigDict, *, device_count: int) -> None:
    p = "config.eval"
    _check_int(cfg, "fid_every", minimum=0, prefix=p)
    if cfg.fid_every == 0:
        return
    _check_int(cfg, "fid_num_samples", minimum=2, prefix=p)
    _check_int(cfg, "fid_batch", minimum=1, prefix=p)
    if cfg.fid_batch % device_count:
        raise ValueError(
            f"{p}.fid_batch={cfg.fid_batch} is not divisible by the {device_count} devices"
        )
    for field in ("fid_ref", "fid_weights"):
        if not isinstance(cfg[field], str) or not epath.Path(cfg[field] or ".none").exists():
            raise ValueError(f"{p}.{field}={cfg[field]!r}: no such file (needed by fid_every)")


def _check_choice(section, field: str, choice: type[enum.Enum], *, prefix: str) -> None:
    try:
        choice(section[field])
    except ValueError as e:
        raise ValueError(f"{prefix}.{field}={section[field]!r}: {e}") from None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(section, field: str, *, minimum: int, prefix: str = "config") -> None:
    value = section[field]
    if not _is_int(value):
        raise TypeError(f"{prefix}.{field}={value!r}: expected an int")
    if value < minimum:
        raise ValueError(f"{prefix}.{field}={value!r}: must be >= {minimum}")


def _check_bool(section, field: str, *, prefix: str) -> None:
    if not isinstance(section[field], (bool, np.bool_)):
        raise TypeError(f"{prefix}.{field}={section[field]!r}: expected True or False")


def _check_number(
    section,
    field: str,
    *,
    prefix: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite real number in [low, high], with either end open if asked."""
    value = section[field]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{prefix}.{field}={value!r}: expected a number")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        bounds = f"{'>' if low_open else '>='} {low:g}"
        if math.isfinite(high):
            bounds += f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{prefix}.{field}={value!r}: must be a finite number {bounds}")


# --------------------------------------------------------------------------------------------
# Objects from the config.
# --------------------------------------------------------------------------------------------


def num_classes(config: ml_collections.ConfigDict) -> int | None:
    """The number of class labels the model takes, or None for an unconditional model."""
    return config.data.num_classes if config.data.class_conditional else None


def has_null_class(config: ml_collections.ConfigDict) -> bool:
    """Whether the model has the null class of classifier-free guidance (label num_classes)."""
    return bool(config.data.class_conditional and config.train.label_dropout > 0)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the data and the samples."""
    return (config.data.image_size, config.data.image_size, config.data.channels)


def unet_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """UNet(**kwargs) of config.model, with out_ch from the data and labels if conditional."""
    return dict(
        config.model.to_dict(),
        # A learned variance doubles the output: C mean channels, then C variance values.
        out_ch=config.data.channels
        * (2 if diffusion.learns_variance(model_output(config).var_type) else 1),
        num_classes=num_classes(config),
        null_class=has_null_class(config),
    )


def create_model(config: ml_collections.ConfigDict) -> unet.UNet:
    """The UNet of the config."""
    return unet.UNet(**unet_kwargs(config))


def create_schedule(config: ml_collections.ConfigDict) -> schedules.DiffusionSchedule:
    """The forward process of config.diffusion."""
    return schedules.make_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps)


def model_output(config: ml_collections.ConfigDict) -> diffusion.ModelOutput:
    """What the network predicts and the reverse variance (config.diffusion)."""
    return diffusion.ModelOutput(config.diffusion.model_mean_type, config.diffusion.model_var_type)


def sampler_spec(config: ml_collections.ConfigDict, **overrides) -> sampling.SamplerSpec:
    """The sampler of config.sample, with fields replaced by `overrides` (e.g. steps=20)."""
    sample = config.sample
    spec = sampling.SamplerSpec(
        sampler=sample.sampler,
        steps=sample.ddim_steps,
        eta=sample.ddim_eta,
        spacing=sample.ddim_spacing,
        clip_denoised=sample.clip_denoised,
        guidance=sample.guidance,
    )
    spec = dataclasses.replace(spec, **overrides) if overrides else spec
    if spec.guidance and not has_null_class(config):
        raise ValueError(
            f"guidance={spec.guidance:g}: the model has no null class (it needs "
            "config.data.class_conditional and config.train.label_dropout > 0 in training)"
        )
    return spec


def parallelism(config: ml_collections.ConfigDict) -> parallel.Parallelism:
    """How the train step, the sampler and the evaluator are spread over the devices."""
    return parallel.Parallelism(config.train.get("parallelism", "pmap"))


def create_learning_rate_fn(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to the learning rate, then constant (Ho et al. 2020, App. B)."""
    if optim.warmup_steps == 0:
        return optax.constant_schedule(optim.learning_rate)
    return optax.linear_schedule(0.0, optim.learning_rate, transition_steps=optim.warmup_steps)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam with the warm-up schedule."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adam(create_learning_rate_fn(optim), b1=optim.beta1, b2=optim.beta2, eps=optim.eps),
    )


# --------------------------------------------------------------------------------------------
# Configs stored in checkpoints: JSON form, old configs, resume compatibility.
# --------------------------------------------------------------------------------------------

# Fields that may change between a run and its resumption without changing what it computes.
RESUME_FREE_FIELDS = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.keep_checkpoints",
    "train.parallelism",  # how the same step is spread over the devices, not what it computes
    "data.data_dir",
    "sample.",
    "eval.",
)


def to_json(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The config as plain JSON data, as a checkpoint stores it (numpy, enums, dtypes converted)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(tree, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    with contextlib.suppress(TypeError):
        return np.dtype(x).name  # dtypes and scalar types such as jnp.bfloat16
    raise TypeError(f"{x!r} ({type(x).__name__}) cannot be stored in a checkpoint's JSON.")


def from_checkpoint(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config stored in a checkpoint, with fields added since it was written at their defaults.

    Lists stored by JSON come back as tuples where the default holds a tuple.
    """
    from configs import default

    config = default.get_config()
    _merge(config, saved)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _merge(config[key], value)
            continue
        if isinstance(value, list) and isinstance(config.get(key), tuple):
            value = tuple(value)
        with config.ignore_type():
            config[key] = copy.deepcopy(value)


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """'section.field: saved -> now' for each field that changes what a resumed run computes.

    A field the saved config predates counts as its default (what `from_checkpoint` reads).
    """
    saved_flat = _flatten(to_json(from_checkpoint(to_json(saved))))
    now_flat = _flatten(to_json(config))
    keys = sorted(set(saved_flat) | set(now_flat))
    return [
        f"{key}: {saved_flat.get(key, '<absent>')!r} -> {now_flat.get(key, '<absent>')!r}"
        for key in keys
        if not key.startswith(RESUME_FREE_FIELDS)
        and saved_flat.get(key, "<absent>") != now_flat.get(key, "<absent>")
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
