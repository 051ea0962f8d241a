"""Building blocks of the DDPM epsilon-network (Ho et al. 2020, App. B), NHWC throughout.

Each block follows the paper's TensorFlow code (`diffusion_tf/models/unet.py`): the layer names are
the paper's (`norm1`, `conv1`, `temb_proj`, `nin_shortcut`, `q`/`k`/`v`/`proj_out`, ...), and so
is the initialisation: uniform variance scaling (fan_avg) of scale 1, or 1e-10 for the layers that
close a residual branch (and the network's output conv), so that every block starts as the identity.

Mixed precision: `dtype` is the compute dtype of convs and dense layers (bfloat16 or float32);
parameters are `param_dtype` (float32); GroupNorm and the attention softmax always run in float32.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NUM_GROUPS = 32  # GroupNorm groups, as in the paper's code.
NORM_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon.


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """The paper's `default_init`: uniform variance scaling over fan_avg; scale 0 means 1e-10."""
    return nn.initializers.variance_scaling(scale or 1e-10, "fan_avg", "uniform")


def swish(x: jax.Array) -> jax.Array:
    return nn.swish(x)


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the paper's code.

    Args:
      t: [B] timesteps (int or float).
      dim: embedding width; the first half is sin, the second cos (zero-padded if odd).
      max_period: the longest period, 10_000 as in Vaswani et al. 2017.

    Returns:
      [B, dim] float32; frequency i of half is exp(-log(max_period) * i / (half - 1)).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B]; got shape {t.shape}")
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep embedding dim must be >= 4; got {dim}")
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(name: str, param_dtype: Dtype) -> nn.GroupNorm:
    """GroupNorm(32) computed (and returned) in float32 whatever the compute dtype.

    The variance is E[(x - mean)^2], not E[x^2] - mean^2: the latter cancels catastrophically when
    a group's mean dwarfs its spread (as after a conv with a large bias).
    """
    return nn.GroupNorm(
        num_groups=NUM_GROUPS,
        epsilon=NORM_EPS,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        name=name,
    )


def conv(
    features: int,
    name: str,
    *,
    kernel: int = 3,
    stride: int = 1,
    padding: Any = "SAME",
    init_scale: float = 1.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
    """A square conv with the paper's initialisation (zero bias)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def dense(
    features: int,
    name: str,
    *,
    init_scale: float = 1.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Dense:
    """A dense layer (the paper's `nin` / 1x1 conv) with the paper's initialisation."""
    return nn.Dense(
        features,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of width `ch`, then Dense(features) -> swish -> Dense(features)."""

    ch: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """[B] timesteps -> [B, features] in `dtype`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        temb = timestep_embedding(t, self.ch)
        temb = dense(self.features, "dense0", **kw)(temb)
        return dense(self.features, "dense1", **kw)(swish(temb))


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> +Dense(swish(temb)) -> GN -> swish -> dropout -> conv3x3, + skip.

    The skip is a 1x1 conv (`nin_shortcut`) when the channel count changes.
    """

    out_ch: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        """x [B, H, W, C_in], temb [B, T] -> [B, H, W, out_ch]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = swish(group_norm("norm1", self.param_dtype)(x))
        h = conv(self.out_ch, "conv1", **kw)(h)
        h = h + dense(self.out_ch, "temb_proj", **kw)(swish(temb))[:, None, None, :]
        h = swish(group_norm("norm2", self.param_dtype)(h))
        h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=not train)
        h = conv(self.out_ch, "conv2", init_scale=0.0, **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, "nin_shortcut", kernel=1, **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        b, height, width, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm("norm", self.param_dtype)(x)
        q = dense(c, "q", **kw)(h).reshape(b, height * width, c)
        k = dense(c, "k", **kw)(h).reshape(b, height * width, c)
        v = dense(c, "v", **kw)(h).reshape(b, height * width, c)
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c**-0.5), axis=-1)  # float32
        h = jnp.einsum("bij,bjc->bic", weights.astype(v.dtype), v).reshape(b, height, width, c)
        return x + dense(c, "proj_out", init_scale=0.0, **kw)(h)


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv, or 2x2 average pooling without conv.

    The conv pads (0, 1) on each spatial axis, which is what TensorFlow's SAME padding does for a
    stride-2 3x3 conv on an even size (and what diffusers' `downsample_padding=0` reproduces).
    """

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H/2, W/2, C]."""
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return conv(x.shape[-1], "conv", stride=2, padding=((0, 1), (0, 1)), **kw)(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then (optionally) a 3x3 conv."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, 2H, 2W, C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if not self.with_conv:
            return x
        return conv(x.shape[-1], "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
