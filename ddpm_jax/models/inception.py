"""The Inception-v3 of the FID protocol (pytorch-fid's `fid_inception_v3`) in Flax, NHWC.

This is the network of the TensorFlow FID/IS code (the 2015-12-05 Inception graph) as pytorch-fid
rebuilds it on torchvision's Inception3: a 1008-way classifier, and Mixed_5b..5d, 6b..6e, 7b
average-pool their `branch_pool` without counting the padding, while Mixed_7c max-pools it.

Input contract: NHWC float images in [0, 255] (uint8 values), any size and 3 channels. As
pytorch-fid does, they are scaled to [0, 1] (ToTensor's x / 255), resized to 299 x 299 with
torch's bilinear interpolation (align_corners=False, no antialiasing), then mapped to [-1, 1].
BatchNorm runs in inference mode (eps 1e-3) from running statistics stored in the params
(`bn/mean`, `bn/var`), so `apply({"params": params}, x)` is all there is; every contraction runs
at HIGHEST precision (no TF32 / bf16 passes on GPU or TPU).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, converted once with
`ddpm-jax fid-weights --from FILE --out PATH` (`convert_weights_file`) into a flat .npz read
without pickle by `load_weights`.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_jax import files

RESIZE_TO = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
BN_EPS = 1e-3
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
_PRECISION = jax.lax.Precision.HIGHEST
# Our leaf names -> torch's, per module kind.
_TORCH_LEAF = {
    ("conv", "kernel"): "weight",
    ("bn", "scale"): "weight",
    ("bn", "bias"): "bias",
    ("bn", "mean"): "running_mean",
    ("bn", "var"): "running_var",
    ("fc", "kernel"): "weight",
    ("fc", "bias"): "bias",
}
# BatchNorm's step counter: in torch's state dicts, meaningless at inference.
_IGNORED = re.compile(r".*\.bn\.num_batches_tracked")


class InceptionOutput(NamedTuple):
    """What the FID and IS protocols read off the network."""

    pool: jax.Array  # [B, 2048] the final average pool: FID's features
    logits: jax.Array  # [B, 1008] fc(pool) with its bias, as torchvision's Inception3 returns
    logits_unbiased: jax.Array  # [B, 1008] pool @ fc kernel, no bias: the Inception Score's


# ---------------------------------------------------------------- resize (torch's bilinear)


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's bilinear interpolation (align_corners=False, no antialias)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)  # torch clamps at 0
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = RESIZE_TO) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] as torch's F.interpolate(mode='bilinear')."""
    chex.assert_rank(x, 4)
    rows = jnp.asarray(bilinear_weights(x.shape[1], size))
    cols = jnp.asarray(bilinear_weights(x.shape[2], size))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_PRECISION)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=_PRECISION)


# ---------------------------------------------------------------- the network


class BatchNormInference(nn.Module):
    """BatchNorm from stored running statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        mean = self.param("mean", nn.initializers.zeros, (features,))
        var = self.param("var", nn.initializers.ones, (features,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias), BatchNorm (eps 1e-3), ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw), s = self.padding, self.stride
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(s, s),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x)
        return nn.relu(BatchNormInference(name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """avg_pool2d(3, stride 1, padding 1, count_include_pad=False): the FID blocks' quirk."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """Mixed_5b..5d (FIDInceptionA): 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: stride-2 reduction to 17 x 17."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (FIDInceptionC): factorised 7x7 branches and an average-pool branch."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c7, name="branch7x7_1")(x)
        b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: stride-2 reduction to 8 x 8."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3_2a")(b3),
                BasicConv(384, **col, name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                BasicConv(384, **col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool_3x3(x, stride=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 1008-way fc: (pool @ kernel + bias, pool @ kernel)."""

    @nn.compact
    def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        init = nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (pool.shape[-1], NUM_CLASSES))
        bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        unbiased = jnp.dot(pool, kernel, precision=_PRECISION)
        return unbiased + bias, unbiased


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: [B, H, W, 3] floats in [0, 255] -> InceptionOutput."""

    @nn.compact
    def __call__(self, images: jax.Array) -> InceptionOutput:
        chex.assert_rank(images, 4)
        chex.assert_axis_dimension(images, 3, 3)
        x = resize_bilinear(images.astype(jnp.float32) / 255.0)
        x = 2.0 * x - 1.0
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits, unbiased = Classifier(name="fc")(pool)
        chex.assert_shape(pool, (images.shape[0], POOL_FEATURES))
        chex.assert_shape([logits, unbiased], (images.shape[0], NUM_CLASSES))
        return InceptionOutput(pool=pool, logits=logits, logits_unbiased=unbiased)


def random_params(seed: int = 0) -> dict[str, Any]:
    """Random params for tests and benchmarks (He-normal kernels, jittered BatchNorm), via numpy.

    Drawn on the host from `param_shapes()`: no compiled init (which takes ~20 s on 2 CPU cores).
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, spec in flax.traverse_util.flatten_dict(param_shapes()).items():
        shape, leaf = spec.shape, path[-1]
        if leaf == "kernel":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(shape)
        flat[path] = value.astype(np.float32)
    return flax.traverse_util.unflatten_dict(flat)


@functools.cache
def param_shapes() -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"]


# ---------------------------------------------------------------- weights: torch -> ours -> npz


def torch_key(path: tuple[str, ...]) -> str:
    """('Mixed_5b', 'branch1x1', 'bn', 'mean') -> 'Mixed_5b.branch1x1.bn.running_mean'."""
    *modules, kind, leaf = path
    return ".".join([*modules, kind, _TORCH_LEAF[(kind, leaf)]])


def params_from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid's FID Inception state dict (torchvision names) -> our params.

    Args:
      state_dict: name -> numpy array or torch.Tensor, as in pt_inception-2015-12-05-*.pth
        (`*.bn.num_batches_tracked` entries are ignored).

    Returns:
      The params tree (no "params" wrapper) of numpy float32 arrays.

    Raises:
      ValueError listing every missing, extra and mis-shaped tensor.
    """
    params, missing, misshaped = {}, [], []
    expected = flax.traverse_util.flatten_dict(param_shapes())
    for path, spec in expected.items():
        key, shape = torch_key(path), _torch_shape(path, spec.shape)
        if key not in state_dict:
            missing.append(f"{key} {shape}")
            continue
        value = _to_numpy(state_dict[key])
        if value.shape != shape:
            misshaped.append(f"{key}: got {value.shape}, expected {shape}")
            continue
        if path[-1] == "kernel":  # torch (out, in[, kh, kw]) -> flax ([kh, kw,] in, out)
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        params[path] = np.ascontiguousarray(value, dtype=np.float32)
    used = {torch_key(path) for path in expected}
    extra = sorted(
        f"{k} {tuple(np.shape(v))}"
        for k, v in state_dict.items()
        if k not in used and not _IGNORED.fullmatch(k)
    )
    if missing or extra or misshaped:
        raise ValueError(_mismatch_message(missing, extra, misshaped))
    return flax.traverse_util.unflatten_dict(params)


def save_weights(params: Mapping[str, Any], path: str) -> None:
    """Writes params as a flat .npz ('Mixed_5b/branch1x1/conv/kernel' -> array), atomically."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    files.write_bytes_atomically(str(path), buffer.getvalue())


def load_weights(path: str) -> dict[str, Any]:
    """Reads save_weights' .npz (local or gs://; no pickle) and checks it against the network."""
    with epath.Path(path).open("rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
            flat = {k: np.asarray(data[k]) for k in data.files}
    shapes = flax.traverse_util.flatten_dict(param_shapes(), sep="/")
    expected = {k: s.shape for k, s in shapes.items()}
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    misshaped = [
        f"{k}: got {flat[k].shape}, expected {shape}"
        for k, shape in expected.items()
        if k in flat and flat[k].shape != shape
    ]
    if missing or extra or misshaped:
        raise ValueError(f"{path}: " + _mismatch_message(missing, extra, misshaped))
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def convert_weights_file(src_pth: str, out_path: str) -> None:
    """pytorch-fid's .pth (read with torch, weights only) -> our .npz at out_path."""
    try:
        import torch  # noqa: PLC0415 - optional dependency, needed only to read the .pth
    except ImportError:
        raise ImportError(
            "reading a .pth needs torch: pip install torch (or ddpm-jax[torch])"
        ) from None
    with epath.Path(src_pth).open("rb") as f:
        state_dict = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    save_weights(params_from_torch_state_dict(state_dict), out_path)


def missing_weights_message(path: str) -> str:
    """What to tell a user whose FID Inception weights are not at `path`."""
    return (
        f"no FID Inception weights at {path}. Download pytorch-fid's {WEIGHTS_FILENAME} "
        f"({WEIGHTS_URL}) and convert it once (needs torch): "
        f"ddpm-jax fid-weights --from {WEIGHTS_FILENAME} --out {path}"
    )


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return tuple(shape)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, recognised without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _mismatch_message(missing: list[str], extra: list[str], misshaped: list[str]) -> str:
    lines = ["the weights do not match the FID Inception-v3:"]
    for what, items in (("missing", missing), ("extra", extra), ("mis-shaped", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {len(items)} {what}: " + ", ".join(shown))
    return "\n".join(lines)
