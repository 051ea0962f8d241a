"""The epsilon-network (Ho et al. 2020, App. B): shapes, size, init, dropout, dtypes, errors."""

import functools
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq256, cifar10, default, digits, lsun_church256
from configs import test as test_config
from ddpm_jax.models import layers, unet

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), out_ch=1)


def _x_t(batch=2, size=8, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    t = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(t)


@functools.cache
def _param_shapes(model, size=8, channels=1, with_labels=False):
    """The params tree as ShapeDtypeStructs: no initialiser is compiled (that is slow on CPU)."""
    x, t = _x_t(size=size, channels=channels)
    y = jnp.zeros((2,), jnp.int32) if with_labels else None
    init = lambda rng: model.init(rng, x, t, y, train=False)["params"]
    return jax.eval_shape(init, jax.random.key(0))


@functools.cache
def _paper_init(model):
    """The paper's initialisation (compiling initialisers is slow on CPU: keep the model small)."""
    x, t = _x_t()
    rng = jax.random.key(0, impl="rbg")  # compiles about twice as fast as threefry
    return jax.jit(lambda rng: model.init(rng, x, t, train=False))(rng)["params"]


def _random_params(model, **shape_kwargs):
    return _randomize(_param_shapes(model, **shape_kwargs))


def _randomize(shapes, scale=0.2, seed=1):
    """Every leaf random (GroupNorm scales near 1), so zero-initialised layers hide no bugs."""
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        noise = scale * rng.standard_normal(leaf.shape).astype(leaf.dtype)
        new.append(jnp.asarray(1.0 + noise if path[-1].key == "scale" else noise))
    return jax.tree.unflatten(treedef, new)


@functools.cache
def _jitted_apply(model, train):
    fn = lambda p, x, t, y, rngs: model.apply({"params": p}, x, t, y, train=train, rngs=rngs)
    return jax.jit(fn)


def _apply(model, params, x, t, y=None, *, train=False, rng=None):
    rngs = None if rng is None else {"dropout": rng}
    return _jitted_apply(model, train)(params, x, t, y, rngs)


def _count(model, size, channels):
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def _paper_model(config_module):
    config = config_module.get_config()
    return unet.UNet(**config.model, out_ch=config.data.channels), config


def test_timestep_embedding_is_the_papers_sinusoid():
    t = jnp.array([0, 1, 17, 999])
    emb = np.asarray(layers.timestep_embedding(t, 16))
    freqs = np.exp(-np.log(10_000) * np.arange(8) / 7)
    args = np.array([0, 1, 17, 999])[:, None] * freqs[None, :]
    np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], 1), atol=2e-4)
    odd = layers.timestep_embedding(t, 17)
    assert odd.shape == (4, 17) and np.all(np.asarray(odd[:, -1]) == 0)


@pytest.mark.parametrize(
    "config_module", [digits, test_config, default, cifar10, celebahq256, lsun_church256]
)
def test_output_shape_is_input_shape(config_module):
    config = config_module.get_config()
    c, size = config.data.channels, min(config.data.image_size, 64)
    model = unet.UNet(
        ch=32,
        ch_mult=config.model.ch_mult,
        num_res_blocks=1,
        attn_resolutions=config.model.attn_resolutions,
        dropout=config.model.dropout,
        out_ch=c,
        dtype=config.model.dtype,
    )
    x, t = jax.ShapeDtypeStruct((3, size, size, c), jnp.float32), jnp.zeros((3,), jnp.int32)
    init = lambda x: model.init_with_output(jax.random.key(0), x, t, train=False)[0]
    out = jax.eval_shape(init, x)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_paper_cifar10_model_has_35_7m_parameters():
    model, config = _paper_model(cifar10)
    assert _count(model, config.data.image_size, config.data.channels) == 35_746_307


@pytest.mark.parametrize("config_module", [celebahq256, lsun_church256])
def test_paper_256_models_have_113_7m_parameters(config_module):
    model, config = _paper_model(config_module)
    assert _count(model, config.data.image_size, config.data.channels) == 113_673_219


def test_param_tree_uses_the_papers_names():
    params = _param_shapes(unet.UNet(dropout=0.0, **TINY))
    assert set(params) == {
        "temb", "conv_in", "down_0_block_0", "down_0_downsample", "down_1_block_0",
        "down_1_attn_0", "mid_block_1", "mid_attn_1", "mid_block_2", "up_1_block_0",
        "up_1_attn_0", "up_1_block_1", "up_1_attn_1", "up_1_upsample", "up_0_block_0",
        "up_0_block_1", "norm_out", "conv_out",
    }  # fmt: skip
    assert set(params["temb"]) == {"dense0", "dense1"}
    assert set(params["up_0_block_0"]) == {"norm1", "conv1", "temb_proj", "norm2", "conv2",
                                           "nin_shortcut"}  # fmt: skip
    assert set(params["mid_attn_1"]) == {"norm", "q", "k", "v", "proj_out"}
    assert params["down_0_downsample"]["conv"]["kernel"].shape == (3, 3, 32, 32)


def test_init_is_the_papers_and_the_untrained_output_is_near_zero():
    model = unet.UNet(dropout=0.0, **dict(TINY, ch_mult=(1,), attn_resolutions=()))
    params = flax.traverse_util.flatten_dict(_paper_init(model))
    closing = {"conv2", "proj_out", "conv_out"}  # the paper's default_init(0.) -> scale 1e-10
    for path, value in params.items():
        value = np.asarray(value)
        if path[-1] == "bias":
            assert np.all(value == 0), path
        elif path[-1] == "kernel" and closing & set(path):
            assert np.abs(value).max() < 1e-4, path
        elif (
            path[-1] == "kernel"
        ):  # uniform variance scaling, fan_avg: var = 2 / (fan_in + fan_out)
            receptive = math.prod(value.shape[:-2])
            fan_avg = receptive * (value.shape[-2] + value.shape[-1]) / 2
            np.testing.assert_allclose(value.std(), fan_avg**-0.5, rtol=0.15, err_msg=str(path))
            assert np.abs(value).max() <= (3 / fan_avg) ** 0.5, path
    out = _apply(model, _paper_init(model), *_x_t())
    assert np.abs(np.asarray(out)).max() < 1e-3


def test_output_is_deterministic_without_dropout():
    model = unet.UNet(dropout=0.5, **TINY)
    params = _random_params(model)
    x, t = _x_t()
    first = _apply(model, params, x, t)
    np.testing.assert_array_equal(first, _apply(model, params, x, t))
    assert np.abs(np.asarray(first)).max() > 1e-2


def test_dropout_is_active_only_when_training():
    model = unet.UNet(dropout=0.5, **TINY)
    params = _random_params(model)
    x, t = _x_t()
    eval_out = np.asarray(_apply(model, params, x, t))
    a = np.asarray(_apply(model, params, x, t, train=True, rng=jax.random.key(1)))
    a_again = np.asarray(_apply(model, params, x, t, train=True, rng=jax.random.key(1)))
    b = np.asarray(_apply(model, params, x, t, train=True, rng=jax.random.key(2)))
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    with pytest.raises(Exception, match="dropout"):
        # train=True needs a "dropout" rng (traced only: eval_shape computes nothing).
        jax.eval_shape(lambda: model.apply({"params": params}, x, t, train=True))


def test_zero_dropout_training_needs_no_rng():
    model = unet.UNet(dropout=0.0, **TINY)
    params = _random_params(model)
    x, t = _x_t()
    np.testing.assert_array_equal(
        _apply(model, params, x, t, train=True), _apply(model, params, x, t)
    )


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16])
def test_bfloat16_is_finite_float32_out_and_close_to_float32(dtype):
    f32 = unet.UNet(dropout=0.0, **TINY)
    bf16 = unet.UNet(dropout=0.0, dtype=dtype, **TINY)
    params = _random_params(f32)
    bf16_params = _param_shapes(bf16)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    x, t = _x_t()
    ref, out = np.asarray(_apply(f32, params, x, t)), _apply(bf16, params, x, t)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert 0 < err < 5e-2, err  # bf16 really ran (err > 0), and is close to float32


def test_class_labels_change_the_output():
    model = unet.UNet(dropout=0.0, num_classes=10, **TINY)
    params = _random_params(model, with_labels=True)
    assert params["label_emb"]["embedding"].shape == (10, 4 * TINY["ch"])
    x, t = _x_t()
    out_a = _apply(model, params, x, t, jnp.array([0, 1]))
    out_b = _apply(model, params, x, t, jnp.array([2, 1]))
    assert not np.allclose(out_a[0], out_b[0])
    np.testing.assert_allclose(out_a[1], out_b[1], atol=1e-6)


def test_timestep_changes_the_output_and_float_timesteps_work():
    model = unet.UNet(dropout=0.0, **TINY)
    params = _random_params(model)
    x, _ = _x_t()
    out_int = _apply(model, params, x, jnp.array([5, 5]))
    out_float = _apply(model, params, x, jnp.array([5.0, 5.5]))
    np.testing.assert_allclose(out_int[0], out_float[0], atol=1e-5)
    assert not np.allclose(out_int[1], out_float[1])


def test_resampling_without_convs():
    model = unet.UNet(dropout=0.0, resamp_with_conv=False, **TINY)
    params = _param_shapes(model)
    assert "down_0_downsample" not in params and "up_1_upsample" not in params
    x, t = _x_t()
    assert _apply(model, _random_params(model), x, t).shape == x.shape


def test_group_norm_is_accurate_when_the_mean_dwarfs_the_spread():
    # After a conv with a large bias: E[x^2] - mean^2 in float32 would lose most digits here.
    x = (1.0 + 1e-3 * np.random.default_rng(0).standard_normal((2, 4, 4, 64))).astype(np.float32)
    norm = layers.group_norm("norm", jnp.float32)
    out = norm.apply(norm.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64))), x)
    groups = x.astype(np.float64).reshape(2, 16, 32, 2)
    mean, var = groups.mean((1, 3), keepdims=True), groups.var((1, 3), keepdims=True)
    ref = ((groups - mean) / np.sqrt(var + layers.NORM_EPS)).reshape(x.shape)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_attention_is_permutation_equivariant():
    # No positional information inside attention: permuting positions permutes the output.
    block = layers.AttnBlock()
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 32))
    variables = _randomize(jax.eval_shape(block.init, jax.random.key(1), x)["params"])
    perm = np.random.default_rng(0).permutation(16)
    shuffle = lambda a: a.reshape(1, 16, 32)[:, perm].reshape(1, 4, 4, 32)
    out = block.apply({"params": variables}, x)
    np.testing.assert_allclose(
        block.apply({"params": variables}, shuffle(x)), shuffle(out), atol=1e-5
    )


def test_downsample_pads_like_tensorflow_same():
    # TF's SAME for a stride-2 3x3 conv on an even size pads (0, 1): output pixel (0, 0) sees
    # input rows/cols 0..2 and nothing before them.
    block = layers.Downsample()
    x = jnp.zeros((1, 8, 8, 32)).at[0, 0, 0, 0].set(1.0)
    params = block.init(jax.random.key(0), x)["params"]
    out = block.apply({"params": params}, x)
    kernel = params["conv"]["kernel"]
    assert out.shape == (1, 4, 4, 32)
    np.testing.assert_allclose(out[0, 0, 0], kernel[0, 0, 0] + params["conv"]["bias"], atol=1e-6)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 8, 4, 1), "square"),
        ((2, 7, 7, 1), "7 is not divisible by"),
        ((2, 8, 8, 3), "3 channels but the params expect 1"),
        ((8, 8, 1), r"\[B, H, W, C\]"),
    ],
)
def test_bad_image_shapes_raise_clear_errors(shape, match):
    model = unet.UNet(dropout=0.0, **TINY)
    params = _random_params(model)
    with pytest.raises(ValueError, match=match):
        model.apply({"params": params}, jnp.zeros(shape), jnp.zeros((2,), jnp.int32), train=False)


@pytest.mark.parametrize("t_shape", [(), (2, 1), (3,)])
def test_bad_timestep_shapes_raise_clear_errors(t_shape):
    model = unet.UNet(dropout=0.0, **TINY)
    x, _ = _x_t()
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \(2,\)"):
        model.apply(
            {"params": _random_params(model)}, x, jnp.zeros(t_shape, jnp.int32), train=False
        )


def test_label_errors():
    x, t = _x_t()
    conditional = unet.UNet(dropout=0.0, num_classes=10, **TINY)
    with pytest.raises(ValueError, match="y is required: the model has num_classes=10"):
        conditional.init(jax.random.key(0), x, t, train=False)
    with pytest.raises(ValueError, match="y must have shape"):
        conditional.init(jax.random.key(0), x, t, jnp.zeros((3,), jnp.int32), train=False)
    unconditional = unet.UNet(dropout=0.0, **TINY)
    with pytest.raises(ValueError, match="num_classes=None"):
        unconditional.init(jax.random.key(0), x, t, jnp.zeros((2,), jnp.int32), train=False)


def test_widths_must_suit_group_norm():
    model = unet.UNet(dropout=0.0, **dict(TINY, ch=48))
    x, t = _x_t()
    with pytest.raises(
        ValueError, match=r"\[48, 96\] \(ch=48, ch_mult=\(1, 2\)\) must be multiples of 32"
    ):
        model.init(jax.random.key(0), x, t, train=False)


def test_null_class_adds_one_embedding_row_only_when_asked():
    plain = unet.UNet(dropout=0.0, num_classes=10, **TINY)
    assert _param_shapes(plain, with_labels=True)["label_emb"]["embedding"].shape[0] == 10
    model = unet.UNet(dropout=0.0, num_classes=10, null_class=True, **TINY)
    params = _random_params(model, with_labels=True)
    assert params["label_emb"]["embedding"].shape == (11, 4 * TINY["ch"])
    x, t = _x_t()
    out_null = _apply(model, params, x, t, jnp.array([10, 1]))  # label 10: the null class
    out_class = _apply(model, params, x, t, jnp.array([0, 1]))
    assert np.all(np.isfinite(out_null)) and not np.allclose(out_null[0], out_class[0])
