"""The DDPM epsilon-network: a PixelCNN++-style UNet (Ho et al. 2020, App. B), NHWC.

Param tree (the paper's names, flattened one level; `i` is the resolution level, 0 = full size,
on the way down and on the way up alike; `j` the block within the level):

  temb/{dense0,dense1}        label_emb (only with num_classes)          conv_in
  down_{i}_block_{j}  down_{i}_attn_{j}  down_{i}_downsample          (j < num_res_blocks)
  mid_block_1  mid_attn_1  mid_block_2
  up_{i}_block_{j}  up_{i}_attn_{j}  up_{i}_upsample                  (j < num_res_blocks + 1)
  norm_out  conv_out

Usage:
  model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.1, out_ch=3)
  variables = model.init({"params": rng}, x, t, train=False)
  eps = model.apply(variables, x, t, train=True, rngs={"dropout": dropout_rng})
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers


def check_sizes(*, ch: int, ch_mult: Sequence[int], resolution: int) -> None:
    """The UNet's size rules: every width a multiple of the GroupNorm groups, and the resolution
    divisible by the total downsampling factor. Raises a ValueError naming the values."""
    widths = [ch * m for m in ch_mult]
    if any(w % layers.NUM_GROUPS for w in widths):
        raise ValueError(
            f"channel widths ch * ch_mult = {widths} (ch={ch}, ch_mult={tuple(ch_mult)}) must be "
            f"multiples of {layers.NUM_GROUPS} (GroupNorm groups)"
        )
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by 2**(len(ch_mult)-1) = {factor} "
            f"(ch_mult={tuple(ch_mult)})"
        )


class UNet(nn.Module):
    """The paper's UNet; `__call__(x, t, y=None, *, train)` predicts a [B, H, W, out_ch] float32.

    Attributes:
      ch: base width; level i has ch * ch_mult[i] channels (multiples of 32, for GroupNorm).
      ch_mult: width multipliers, one per resolution level (len L: L - 1 downsamplings).
      num_res_blocks: ResnetBlocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes at which a self-attention block follows each ResnetBlock.
      dropout: dropout rate inside ResnetBlocks, active only with train=True ("dropout" rng).
      out_ch: output channels.
      num_classes: if set, a learned label embedding is added to the timestep embedding and
        `y` is required.
      null_class: the embedding has one more row, label num_classes, "no class" (for
        classifier-free guidance: trained with label dropout). Off by default, so models without
        it keep their parameter shapes.
      resamp_with_conv: resample with convs (else average pooling / plain nearest upsampling).
      dtype: compute dtype of convs/dense layers, e.g. "bfloat16"; norms, softmax and the output
        stay float32.
      param_dtype: parameter dtype.

    The input channel count is fixed by `conv_in` at init; at apply time a mismatch with the
    params raises a ValueError naming both counts.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float
    out_ch: int
    num_classes: int | None = None
    null_class: bool = False
    resamp_with_conv: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """Predict the network output (eps, x0 or v) for x_t.

        Args:
          x: [B, H, W, C] float, H == W divisible by 2 ** (len(ch_mult) - 1).
          t: [B] int or float timesteps.
          y: [B] int labels in [0, num_classes) (num_classes too: the null class, if it has
            one), required iff num_classes is set.
          train: enables dropout (needs a "dropout" rng when dropout > 0).

        Returns:
          [B, H, W, out_ch] float32.
        """
        t = jnp.asarray(t)
        self._check_inputs(x, t, y)
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        attn = tuple(self.attn_resolutions)
        num_levels = len(self.ch_mult)

        temb = layers.TimestepEmbedding(self.ch, 4 * self.ch, name="temb", **kw)(t)
        if self.num_classes is not None:
            label_emb = nn.Embed(
                self.num_classes + int(self.null_class),
                4 * self.ch,
                param_dtype=param_dtype,
                name="label_emb",
            )
            temb = temb + label_emb(y).astype(temb.dtype)

        def resnet(name: str, out_ch: int) -> layers.ResnetBlock:
            return layers.ResnetBlock(out_ch, self.dropout, name=name, **kw)

        # Down: keep every intermediate output for the skip connections.
        hs = [layers.conv(self.ch, "conv_in", **kw)(x.astype(dtype))]
        for i in range(num_levels):
            for j in range(self.num_res_blocks):
                h = resnet(f"down_{i}_block_{j}", self.ch * self.ch_mult[i])(
                    hs[-1], temb, train=train
                )
                if h.shape[1] in attn:
                    h = layers.AttnBlock(name=f"down_{i}_attn_{j}", **kw)(h)
                hs.append(h)
            if i != num_levels - 1:
                down = layers.Downsample(self.resamp_with_conv, name=f"down_{i}_downsample", **kw)
                hs.append(down(hs[-1]))

        # Middle: always attention, whatever attn_resolutions says.
        h = hs[-1]
        h = resnet("mid_block_1", h.shape[-1])(h, temb, train=train)
        h = layers.AttnBlock(name="mid_attn_1", **kw)(h)
        h = resnet("mid_block_2", h.shape[-1])(h, temb, train=train)

        # Up: each block eats one skip, concatenated after h on the channel axis.
        for i in reversed(range(num_levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resnet(f"up_{i}_block_{j}", self.ch * self.ch_mult[i])(h, temb, train=train)
                if h.shape[1] in attn:
                    h = layers.AttnBlock(name=f"up_{i}_attn_{j}", **kw)(h)
            if i != 0:
                h = layers.Upsample(self.resamp_with_conv, name=f"up_{i}_upsample", **kw)(h)
        assert not hs, f"{len(hs)} skip connections left unused"

        h = layers.swish(layers.group_norm("norm_out", param_dtype)(h))
        # The output conv runs in float32: it is one layer, and eps is what the loss sees.
        out = layers.conv(
            self.out_ch, "conv_out", init_scale=0.0, dtype=jnp.float32, param_dtype=param_dtype
        )(h)
        return out.astype(jnp.float32)

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
        """Raise a ValueError naming the offending values for inputs the network can't take."""
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C]; got shape {x.shape}")
        b, height, width, channels = x.shape
        if height != width:
            raise ValueError(f"x must be square; got H={height}, W={width} (shape {x.shape})")
        check_sizes(ch=self.ch, ch_mult=self.ch_mult, resolution=height)
        if jnp.shape(t) != (b,):
            raise ValueError(f"t must have shape [B] = ({b},); got shape {jnp.shape(t)}")
        if self.num_classes is None and y is not None:
            raise ValueError("y was given but the model has num_classes=None")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(f"y is required: the model has num_classes={self.num_classes}")
            if jnp.shape(y) != (b,):
                raise ValueError(f"y must have shape [B] = ({b},); got shape {jnp.shape(y)}")
        conv_in = self.variables.get("params", {}).get("conv_in")
        if conv_in is not None and conv_in["kernel"].shape[2] != channels:
            raise ValueError(
                f"x has {channels} channels but the params expect "
                f"{conv_in['kernel'].shape[2]} (conv_in kernel {conv_in['kernel'].shape})"
            )
