"""The paper's published weights: a diffusers `UNet2DModel` state dict -> our UNet params.

The Hugging Face checkpoints google/ddpm-cifar10-32, google/ddpm-celebahq-256 and
google/ddpm-church-256 are the paper's TensorFlow weights in diffusers' layout: UNet2DModel with
DownBlock2D/AttnDownBlock2D, layers_per_block 2, single-head attention (attention_head_dim null),
sin-then-cos timestep embedding (flip_sin_to_cos false, freq_shift 1), downsample_padding 0 (TF's
SAME padding for a stride-2 conv) and GroupNorm eps 1e-6: exactly our UNet.

Run (a directory holding config.json and diffusion_pytorch_model.safetensors or .bin, or a
pipeline directory with unet/ and scheduler/ in it):
  python -m ddpm_jax.convert --from ~/ddpm-cifar10-32 --out runs/ddpm-cifar10-32 --base cifar10

It writes step 0 of an orbax checkpoint (params = ema_params) with the matching config.
"""

import argparse
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import celebahq256, cifar10, default, digits, lsun_church256
from ddpm_jax import experiment
from ddpm_jax.models import layers

# diffusers UNet2DModel options our UNet reproduces: key -> (the value we need, diffusers'
# default when config.json omits the key).
_REQUIRED = {
    "time_embedding_type": ("positional", "positional"),
    "freq_shift": (1, 0),
    "flip_sin_to_cos": (False, True),
    "center_input_sample": (False, False),
    "act_fn": ("silu", "silu"),
    "norm_num_groups": (layers.NUM_GROUPS, 32),
    "norm_eps": (layers.NORM_EPS, 1e-5),
    "downsample_padding": (0, 1),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "time_embedding_dim": (None, None),
    "class_embed_type": (None, None),
    "attn_norm_num_groups": (None, None),
}

_BASE_CONFIGS = {
    "default": default,
    "digits": digits,
    "cifar10": cifar10,
    "celebahq256": celebahq256,
    "lsun_church256": lsun_church256,
}

# Our module names -> diffusers' (the paper's names on the left).
_TOP = {
    "temb": "time_embedding",
    "label_emb": "class_embedding",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
    "mid_block_1": "mid_block.resnets.0",
    "mid_attn_1": "mid_block.attentions.0",
    "mid_block_2": "mid_block.resnets.1",
}
_SUB = {
    "dense0": "linear_1",
    "dense1": "linear_2",
    "temb_proj": "time_emb_proj",
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_RESAMPLERS = {"downsample": "downsamplers", "upsample": "upsamplers"}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_BLOCK = re.compile(r"(down|up)_(\d+)_(block|attn)_(\d+)")
_RESAMPLE = re.compile(r"(down|up)_(\d+)_(downsample|upsample)")
# diffusers < 0.14 named the attention layers query/key/value/proj_attn; the hub files still do.
_LEGACY_ATTN = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_config(
    model_config: Mapping[str, Any],
    image_size: int,
    in_channels: int,
    *,
    out_channels: int | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """The diffusers UNet2DModel config (as in config.json) of the same network as our UNet.

    Args:
      model_config: our model section (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
        resamp_with_conv).
      image_size: the square input resolution (decides which levels have attention).
      in_channels: input channels.
      out_channels: output channels (default: in_channels).
      num_classes: label classes of a class-conditional model (diffusers' num_class_embeds).

    Returns:
      A dict for `UNet2DModel(**d)` / `UNet2DModel.from_config(d)`.
    """
    model = _as_dict(model_config)
    if not model.get("resamp_with_conv", True):
        raise ValueError(
            "resamp_with_conv=False: diffusers' UNet2DModel always resamples with convs"
        )
    num_levels = len(model["ch_mult"])
    attn = tuple(model["attn_resolutions"])
    has_attn = [image_size // 2**i in attn for i in range(num_levels)]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
    cfg = {name: value for name, (value, _) in _REQUIRED.items()}
    cfg.update(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=[model["ch"] * m for m in model["ch_mult"]],
        layers_per_block=model["num_res_blocks"],
        down_block_types=down,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
        attention_head_dim=None,
        dropout=float(model.get("dropout", 0.0)),
    )
    if num_classes is not None:
        cfg["num_class_embeds"] = num_classes
    return cfg


def config_from_diffusers(
    diffusers_cfg: Mapping[str, Any], base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """Our experiment config for a diffusers UNet2DModel config; ValueError on what we can't run.

    Args:
      diffusers_cfg: the contents of the checkpoint's config.json.
      base: the experiment config to start from (default: configs/default.py); its data size,
        channels and model section are replaced, its dropout kept if config.json has none.
    """
    _check_supported(diffusers_cfg)
    size, channels = _sizes(diffusers_cfg)
    widths = list(diffusers_cfg.get("block_out_channels", (224, 448, 672, 896)))
    down = list(diffusers_cfg.get("down_block_types", ()))
    _check_blocks(diffusers_cfg, widths, down)
    config = (base if base is not None else default.get_config()).copy_and_resolve_references()
    config.data.image_size = size
    config.data.channels = channels
    model = config.model
    model.ch = widths[0]
    model.ch_mult = tuple(w // widths[0] for w in widths)
    model.num_res_blocks = int(diffusers_cfg.get("layers_per_block", 2))
    model.attn_resolutions = tuple(
        size // 2**i for i, t in enumerate(down) if t == "AttnDownBlock2D"
    )
    model.resamp_with_conv = True
    if "dropout" in diffusers_cfg:
        model.dropout = float(diffusers_cfg["dropout"])
    num_classes = diffusers_cfg.get("num_class_embeds")
    config.data.class_conditional = num_classes is not None
    if num_classes is not None:
        config.data.num_classes = int(num_classes)
    return config


def apply_scheduler_config(
    config: ml_collections.ConfigDict, scheduler_cfg: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Copy a diffusers DDPMScheduler config (scheduler_config.json) into our diffusion section."""
    config = config.copy_and_resolve_references()
    num_timesteps = int(scheduler_cfg.get("num_train_timesteps", 1000))
    name = scheduler_cfg.get("beta_schedule", "linear")
    start = scheduler_cfg.get("beta_start", 1e-4)
    end = scheduler_cfg.get("beta_end", 0.02)
    scale = 1000 / num_timesteps  # our "linear" scales the T=1000 endpoints by 1000/T.
    if scheduler_cfg.get("trained_betas") is not None or name != "linear":
        raise ValueError(f"only a linear beta schedule converts; got beta_schedule={name!r}")
    if not (math.isclose(start, 1e-4 * scale) and math.isclose(end, 0.02 * scale)):
        raise ValueError(
            f"beta_start={start}, beta_end={end} at T={num_timesteps} differ from our 'linear' "
            f"schedule ({1e-4 * scale:g}, {0.02 * scale:g})"
        )
    variance = scheduler_cfg.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type={variance!r}: only fixed_small / fixed_large convert")
    prediction = scheduler_cfg.get("prediction_type", "epsilon")
    mean_types = {"epsilon": "epsilon", "sample": "x_start", "v_prediction": "v"}
    if prediction not in mean_types:
        raise ValueError(f"prediction_type={prediction!r}: expected one of {sorted(mean_types)}")
    config.diffusion.beta_schedule = "linear"
    config.diffusion.num_timesteps = num_timesteps
    config.diffusion.model_var_type = variance
    config.diffusion.model_mean_type = mean_types[prediction]
    config.sample.clip_denoised = bool(scheduler_cfg.get("clip_sample", True))
    return config


def from_diffusers(
    state_dict: Mapping[str, Any], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Map a diffusers UNet2DModel state dict onto the params of `experiment.create_model(config)`.

    Args:
      state_dict: name -> numpy array or torch.Tensor (any float dtype), as from
        `UNet2DModel.state_dict()`, safetensors or torch.load; legacy attention names
        (query/key/value/proj_attn) are accepted.
      config: our experiment config (model section, data.image_size, data.channels).

    Returns:
      The params tree (no "params" wrapper): `model.apply({"params": params}, x, t, train=False)`.
      Leaves are numpy arrays in the model's param_dtype.

    Raises:
      ValueError listing every missing, extra or mis-shaped tensor.
    """
    state_dict = _rename_legacy(state_dict)
    expected = flax.traverse_util.flatten_dict(param_shapes(config))
    num_levels = len(config.model.ch_mult)
    params, missing, misshaped = {}, [], []
    for path, spec in expected.items():
        key, want = torch_key(path, num_levels), torch_shape(path[-1], spec.shape)
        if key not in state_dict:
            missing.append(f"{key} {want}")
            continue
        value = _to_numpy(state_dict[key])
        if value.shape != want:
            misshaped.append(f"{key}: got {value.shape}, expected {want}")
            continue
        if path[-1] == "kernel":  # torch (out, in[, kh, kw]) -> flax ([kh, kw,] in, out)
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        params[path] = np.ascontiguousarray(value, dtype=spec.dtype)
    used = {torch_key(path, num_levels) for path in expected}
    extra = sorted(f"{k} {tuple(np.shape(v))}" for k, v in state_dict.items() if k not in used)
    if missing or extra or misshaped:
        raise ValueError(_mismatch_message(config, missing, extra, misshaped))
    return flax.traverse_util.unflatten_dict(params)


def load_state_dict(directory: str) -> dict[str, Any]:
    """Read diffusion_pytorch_model.safetensors (numpy, no torch) or .bin (torch.load)."""
    path = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    if os.path.exists(path):
        import safetensors.numpy  # noqa: PLC0415 - optional dependency

        return dict(safetensors.numpy.load_file(path))
    path = os.path.join(directory, "diffusion_pytorch_model.bin")
    if os.path.exists(path):
        import torch  # noqa: PLC0415 - optional dependency

        return dict(torch.load(path, map_location="cpu", weights_only=True))
    raise FileNotFoundError(
        f"no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin in {directory}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: convert a diffusers UNet2DModel directory into an orbax checkpoint in --out."""
    args = _parse_args(argv)
    unet_dir = _find_unet_dir(args.src)
    with open(os.path.join(unet_dir, "config.json")) as f:
        config = config_from_diffusers(json.load(f), _BASE_CONFIGS[args.base].get_config())
    scheduler_path = _find_file(
        "scheduler_config.json", [unet_dir, args.src, os.path.join(args.src, "scheduler")]
    )
    if scheduler_path is not None:
        with open(scheduler_path) as f:
            config = apply_scheduler_config(config, json.load(f))
    params = from_diffusers(load_state_dict(unet_dir), config)

    from ddpm_jax import train_state  # noqa: PLC0415 - orbax is only needed here

    train_state.save_pretrained(args.out, params, config)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(f"wrote {count:,} parameters from {unet_dir} to {args.out}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--from",
        dest="src",
        required=True,
        help="directory with config.json and diffusion_pytorch_model.{safetensors,bin} "
        "(or a pipeline directory with unet/ in it)",
    )
    parser.add_argument("--out", required=True, help="workdir for the orbax checkpoint")
    parser.add_argument(
        "--base",
        default="default",
        choices=sorted(_BASE_CONFIGS),
        help="experiment config (configs/<name>.py) whose other sections the checkpoint keeps",
    )
    return parser.parse_args(argv)


def _find_unet_dir(src: str) -> str:
    for directory in (src, os.path.join(src, "unet")):
        if os.path.exists(os.path.join(directory, "config.json")):
            with open(os.path.join(directory, "config.json")) as f:
                if json.load(f).get("_class_name", "UNet2DModel") == "UNet2DModel":
                    return directory
    raise FileNotFoundError(f"no UNet2DModel config.json in {src} or {src}/unet")


def _find_file(name: str, directories: Sequence[str]) -> str | None:
    for directory in directories:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _as_dict(section: Any) -> dict[str, Any]:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _check_supported(diffusers_cfg: Mapping[str, Any]) -> None:
    """ValueError naming every option of the diffusers config that our UNet doesn't reproduce."""
    bad = []
    name = diffusers_cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        bad.append(f"_class_name={name!r} (expected 'UNet2DModel')")
    for key, (want, fallback) in _REQUIRED.items():
        got = diffusers_cfg.get(key, fallback)
        numeric = isinstance(want, float) and isinstance(got, int | float)
        same = math.isclose(got, want) if numeric else got == want
        if not same:
            bad.append(f"{key}={got!r} (expected {want!r})")
    if bad:
        raise ValueError("unsupported diffusers UNet2DModel config: " + "; ".join(bad))


def _sizes(diffusers_cfg: Mapping[str, Any]) -> tuple[int, int]:
    size = diffusers_cfg.get("sample_size")
    if isinstance(size, Sequence):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size={size} is not square")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"config.json needs an int sample_size; got {size!r}")
    in_ch, out_ch = diffusers_cfg.get("in_channels", 3), diffusers_cfg.get("out_channels", 3)
    if in_ch != out_ch:
        raise ValueError(
            f"in_channels={in_ch} != out_channels={out_ch}: our eps-network maps C to C"
        )
    return size, in_ch


def _check_blocks(diffusers_cfg: Mapping[str, Any], widths: list[int], down: list[str]) -> None:
    """The block layout must be a paper UNet: Down/AttnDown blocks mirrored by Up/AttnUp."""
    up = list(diffusers_cfg.get("up_block_types", ()))
    if any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down) or len(down) != len(widths):
        raise ValueError(
            f"down_block_types={down} must be DownBlock2D/AttnDownBlock2D, one per "
            f"block_out_channels={widths}"
        )
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        raise ValueError(f"up_block_types={up} must mirror down_block_types ({mirrored})")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels={widths} must be multiples of the first")
    head_dim = diffusers_cfg.get("attention_head_dim", 8)
    attn_widths = {w for w, t in zip(widths, down, strict=True) if t == "AttnDownBlock2D"}
    attn_widths.add(widths[-1])  # the middle block's attention
    if head_dim is not None and attn_widths != {head_dim}:
        raise ValueError(
            f"attention_head_dim={head_dim} means several heads; ours is single-head "
            f"(attention widths {sorted(attn_widths)})"
        )


def param_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The params tree of our UNet as ShapeDtypeStructs (nothing is materialised)."""
    model = experiment.create_model(config)
    x = jax.ShapeDtypeStruct((1, *experiment.image_shape(config)), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    init = lambda rng, x, t, y: model.init(rng, x, t, y, train=False)
    return jax.eval_shape(init, jax.random.key(0), x, t, y)["params"]


def torch_key(path: tuple[str, ...], num_levels: int) -> str:
    """('up_3_block_0', 'temb_proj', 'kernel') -> 'up_blocks.0.resnets.0.time_emb_proj.weight'."""
    top, *subs, leaf = path
    parts = [_torch_module(top, num_levels)] + [_SUB.get(s, s) for s in subs]
    return ".".join(parts + [_LEAF[leaf]])


def _torch_module(name: str, num_levels: int) -> str:
    if name in _TOP:
        return _TOP[name]
    if m := _BLOCK.fullmatch(name):
        side, level, kind, j = m.groups()
        index = int(level) if side == "down" else num_levels - 1 - int(level)
        return f"{side}_blocks.{index}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
    if m := _RESAMPLE.fullmatch(name):
        side, level, kind = m.groups()
        index = int(level) if side == "down" else num_levels - 1 - int(level)
        return f"{side}_blocks.{index}.{_RESAMPLERS[kind]}.0"
    raise ValueError(f"no diffusers name for our module {name!r}")


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return tuple(shape)


def _rename_legacy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {}
    for key, value in state_dict.items():
        if m := _LEGACY_ATTN.fullmatch(key):
            key = f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}"
        renamed[key] = value
    return renamed


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, recognised without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _mismatch_message(config, missing: list[str], extra: list[str], misshaped: list[str]) -> str:
    model, data = config.model, config.data
    lines = [
        f"the diffusers state dict does not match UNet(ch={model.ch}, "
        f"ch_mult={tuple(model.ch_mult)}, num_res_blocks={model.num_res_blocks}, "
        f"attn_resolutions={tuple(model.attn_resolutions)}) at image_size={data.image_size}, "
        f"channels={data.channels}:"
    ]
    for what, items in (("missing", missing), ("extra", extra), ("mis-shaped", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {len(items)} {what}: " + ", ".join(shown))
    return "\n".join(lines)


# ---------------------------------------------------------------- export: ours -> diffusers

_PREDICTION_TYPES = {"epsilon": "epsilon", "x_start": "sample", "v": "v_prediction"}


def to_diffusers(
    params: Mapping[str, Any], config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Our UNet params -> a diffusers UNet2DModel state dict (the inverse of `from_diffusers`).

    Args:
      params: the params tree of `experiment.create_model(config)` (no "params" wrapper), numpy or
        jax arrays.
      config: our experiment config (model section, data.image_size, data.channels).

    Returns:
      diffusers name -> float32 numpy array in torch's layout (conv (out, in, kh, kw), linear
      (out, in)), ready for safetensors or `UNet2DModel.load_state_dict`.

    Raises:
      ValueError listing every missing, extra or mis-shaped parameter.
    """
    expected = flax.traverse_util.flatten_dict(param_shapes(config))
    given = flax.traverse_util.flatten_dict(jax.device_get(dict(params)))
    missing = [f"{'/'.join(p)} {s.shape}" for p, s in expected.items() if p not in given]
    extra = sorted(f"{'/'.join(p)} {np.shape(v)}" for p, v in given.items() if p not in expected)
    misshaped = [
        f"{'/'.join(p)}: got {np.shape(given[p])}, expected {s.shape}"
        for p, s in expected.items()
        if p in given and np.shape(given[p]) != s.shape
    ]
    if missing or extra or misshaped:
        raise ValueError(
            _mismatch_message(config, missing, extra, misshaped).replace(
                "the diffusers state dict", "the params"
            )
        )
    num_levels = len(config.model.ch_mult)
    state_dict = {}
    for path, value in given.items():
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":  # flax ([kh, kw,] in, out) -> torch (out, in[, kh, kw])
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state_dict[torch_key(path, num_levels)] = np.ascontiguousarray(value)
    return state_dict


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The diffusers DDPMScheduler config (scheduler_config.json) of our diffusion section.

    A linear schedule is written as beta_start/beta_end (the inverse of
    `apply_scheduler_config`); any other (or a capped linear one) as its exact trained_betas.
    """
    from ddpm_jax import schedules  # noqa: PLC0415 - kept local: appended export section

    diffusion = config.diffusion
    variance = diffusion.model_var_type
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"model_var_type={variance!r}: diffusers' DDPMScheduler has no match")
    if diffusion.model_mean_type not in _PREDICTION_TYPES:
        raise ValueError(f"model_mean_type={diffusion.model_mean_type!r} has no prediction_type")
    num_timesteps = int(diffusion.num_timesteps)
    betas = schedules.get_beta_schedule(diffusion.beta_schedule, num_timesteps)
    scale = 1000 / num_timesteps
    start, end = schedules.BETA_START * scale, schedules.BETA_END * scale
    cfg = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_timesteps,
        "variance_type": variance,
        "clip_sample": bool(config.sample.clip_denoised),
        "prediction_type": _PREDICTION_TYPES[diffusion.model_mean_type],
    }
    if diffusion.beta_schedule == "linear" and np.allclose(
        betas, np.linspace(start, end, num_timesteps), rtol=1e-12, atol=0
    ):
        cfg.update(beta_schedule="linear", beta_start=start, beta_end=end, trained_betas=None)
    else:
        cfg.update(beta_schedule="linear", trained_betas=[float(b) for b in betas])
    return cfg


def export_diffusers(
    params: Mapping[str, Any], config: ml_collections.ConfigDict, out_dir: str
) -> None:
    """Writes a diffusers model directory: config.json, diffusion_pytorch_model.safetensors and
    scheduler/scheduler_config.json (local or gs://; each file written whole).

    `UNet2DModel.from_pretrained(out_dir)` and
    `DDPMScheduler.from_pretrained(out_dir, subfolder="scheduler")` load it; so does
    `python -m ddpm_jax.convert --from out_dir`.
    """
    import safetensors.numpy  # noqa: PLC0415 - kept local: appended export section

    from ddpm_jax import files  # noqa: PLC0415

    state_dict = to_diffusers(params, config)
    unet_cfg = diffusers_config(
        config.model,
        config.data.image_size,
        config.data.channels,
        num_classes=experiment.num_classes(config),
    )
    unet_cfg = {"_class_name": "UNet2DModel", **unet_cfg}
    out_dir = str(out_dir).rstrip("/")
    weights = safetensors.numpy.save(state_dict, metadata={"format": "pt"})
    files.write_bytes_atomically(f"{out_dir}/diffusion_pytorch_model.safetensors", weights)
    files.write_bytes_atomically(f"{out_dir}/config.json", _json_bytes(unet_cfg))
    scheduler_path = f"{out_dir}/scheduler/scheduler_config.json"
    files.write_bytes_atomically(scheduler_path, _json_bytes(scheduler_config(config)))


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


if __name__ == "__main__":
    main()
