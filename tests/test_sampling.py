"""Tests for ddpm_jax.sampling: the samplers run against analytic denoisers, no training.

For Gaussian data x_0 ~ N(mu, s^2 I) the optimal noise prediction is linear in x_t,
    eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t),   ab = alpha_bar,
so every sampler is a linear-Gaussian chain whose output moments follow from a float64
recursion written here from the papers' equations (Eq. (11) of Ho et al. 2020, Eq. (12) of Song
et al. 2021). The samples must match those moments to Monte-Carlo error; the recursion in turn
says how far each sampler's law is from the data's (its discretisation bias).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, parallel, sampling, schedules

EPS = diffusion.ModelMeanType.EPSILON
SMALL = diffusion.ModelVarType.FIXED_SMALL
LARGE = diffusion.ModelVarType.FIXED_LARGE

T = 1000  # the paper's chain length; the [10000, 2] data keep each run well under a second
N = 10_000
MU = np.array([0.3, -0.5])
STD = np.array([0.5, 0.2])
Z = 4.0  # Monte-Carlo tolerance in standard errors (two-sided p = 6e-5 per check)


# --------------------------------------------------------------------------------------------
# Analytic denoisers.
# --------------------------------------------------------------------------------------------


def _coefs(schedule, t):
    """(alpha_bar_t, 1 - alpha_bar_t) as [B, 1], the latter from the float64-precomputed root."""
    return schedule.alphas_cumprod[t][:, None], schedule.sqrt_one_minus_alphas_cumprod[t][:, None]


def gaussian_eps(schedule, mu, std):
    """eps*(x_t, t) = E[eps | x_t] for x_0 ~ N(mu, diag(std^2)), x [B, D]."""
    mu, var0 = jnp.asarray(mu, jnp.float32), jnp.asarray(std, jnp.float32) ** 2

    def denoise_fn(x_t, t):
        ab, sqrt_1m_ab = _coefs(schedule, t)
        return sqrt_1m_ab * (x_t - jnp.sqrt(ab) * mu) / (ab * var0 + sqrt_1m_ab**2)

    return denoise_fn


def mixture_eps(schedule, weight, mean, std):
    """E[eps | x_t] for x_0 ~ weight N(+mean, std^2) + (1 - weight) N(-mean, std^2), x [B, 1].

    Given the component k, eps* is the Gaussian formula with mu_k; averaged over the
    responsibilities r_k(x_t) it is that formula at the posterior mean of mu, sum_k r_k mu_k.
    """
    means = jnp.array([mean, -mean])
    log_w = jnp.log(jnp.array([weight, 1.0 - weight]))

    def denoise_fn(x_t, t):
        ab, sqrt_1m_ab = _coefs(schedule, t)
        var_t = ab * std**2 + sqrt_1m_ab**2  # the marginal variance of each component at t
        logits = log_w - 0.5 * (x_t - jnp.sqrt(ab) * means) ** 2 / var_t  # [B, 2]
        mu_post = jnp.sum(jax.nn.softmax(logits, axis=-1) * means, axis=-1, keepdims=True)
        return sqrt_1m_ab * (x_t - jnp.sqrt(ab) * mu_post) / var_t

    return denoise_fn


# --------------------------------------------------------------------------------------------
# Exact output moments of the linear-Gaussian chains (float64, per dimension).
# --------------------------------------------------------------------------------------------


def _eps_coefs(ab, mu, var0):
    """eps* = c x + d for Gaussian data."""
    c = np.sqrt(1.0 - ab) / (ab * var0 + 1.0 - ab)
    return c, -c * np.sqrt(ab) * mu


def ancestral_moments(betas, mu, var0, var_type):
    """Mean and variance of x_0 from Algorithm 2 with eps*, starting at x_T ~ N(0, 1)."""
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for t in range(len(betas) - 1, -1, -1):
        c, d = _eps_coefs(ab[t], mu, var0)
        # Eq. (11): mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t).
        k = betas[t] / np.sqrt(1.0 - ab[t])
        gain, shift = (1.0 - k * c) / np.sqrt(alphas[t]), -k * d / np.sqrt(alphas[t])
        if t == 0:
            sigma2 = 0.0
        elif var_type is SMALL:
            sigma2 = betas[t] * (1.0 - ab_prev[t]) / (1.0 - ab[t])  # beta-tilde, Eq. (7)
        else:
            sigma2 = betas[t]
        m, v = gain * m + shift, gain**2 * v + sigma2
    return m, v


def ddim_moments(betas, mu, var0, timesteps, eta):
    """Mean and variance of x_0 from DDIM (Song et al. 2021, Eq. (12)) with eps*."""
    ab = np.cumprod(1.0 - betas)
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i in range(len(timesteps) - 1, -1, -1):
        ab_t = ab[timesteps[i]]
        ab_prev = ab[timesteps[i - 1]] if i > 0 else 1.0
        c, d = _eps_coefs(ab_t, mu, var0)
        # x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) = cx x_t + dx.
        cx, dx = (
            (1.0 - np.sqrt(1.0 - ab_t) * c) / np.sqrt(ab_t),
            -np.sqrt(1 - ab_t) * d / np.sqrt(ab_t),
        )
        sigma2 = eta**2 * (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)  # Eq. (16)
        direction = np.sqrt(1.0 - ab_prev - sigma2)
        gain = np.sqrt(ab_prev) * cx + direction * c
        shift = np.sqrt(ab_prev) * dx + direction * d
        m, v = gain * m + shift, gain**2 * v + sigma2
    return m, v


# --------------------------------------------------------------------------------------------
# Gaussian data: the moments of every sampler.
# --------------------------------------------------------------------------------------------

# (sampler, bound on |Var[x_0] / s^2 - 1| of the exact chain at T = 1000 / S = 50). Ancestral
# sampling with the optimal mean is biased by O(1/T): fixed_small (beta-tilde) leaves out
# Var(x_0 | x_t) and shrinks the variance (-1.6% / -3.7% for std 0.5 / 0.2, linear), fixed_large
# (beta) overshoots (+0.3% / +0.9%). DDIM's 50 first-order steps shrink it by O(1/S): eta=0
# -11% / -25% (linear), eta=1 (beta-tilde over 20-step jumps) -21% / -37%; cosine about half.
SAMPLERS = {
    "ddpm_fixed_small": 0.05,
    "ddpm_fixed_large": 0.05,
    "ddim_eta0": 0.30,
    "ddim_eta1": 0.40,
}


@functools.cache
def _gaussian_sampler(name):
    """Jitted (rng, schedule) -> [N, 2] samples with eps*; one compile serves both schedules."""

    def draw(rng, schedule):
        denoise_fn = gaussian_eps(schedule, MU, STD)
        kwargs = dict(model_mean_type=EPS, clip_denoised=False)
        if name.startswith("ddpm"):
            var_type = diffusion.ModelVarType(name.removeprefix("ddpm_"))
            return sampling.sample(
                rng, denoise_fn, schedule, (N, 2), model_var_type=var_type, **kwargs
            )
        eta = float(name[-1])
        return sampling.ddim_sample(
            rng, denoise_fn, schedule, (N, 2), num_steps=50, eta=eta, **kwargs
        )

    return jax.jit(draw)


def _exact_gaussian_moments(name, betas):
    if name.startswith("ddpm"):
        var_type = diffusion.ModelVarType(name.removeprefix("ddpm_"))
        return ancestral_moments(betas, MU, STD**2, var_type)
    timesteps = sampling.ddim_timesteps(len(betas), 50)
    return ddim_moments(betas, MU, STD**2, timesteps, float(name[-1]))


def gaussian_errors(name, schedule_name, seed=0):
    """Standardised errors of the sample moments vs. the exact chain's, and the chain's bias."""
    betas = schedules.get_beta_schedule(schedule_name, T)
    schedule = schedules.DiffusionSchedule.from_betas(betas)
    x = np.asarray(_gaussian_sampler(name)(jax.random.key(seed), schedule), np.float64)
    mean_exact, var_exact = _exact_gaussian_moments(name, betas)
    se_mean = np.sqrt(var_exact / N)
    se_var = var_exact * np.sqrt(2.0 / (N - 1))  # Gaussian samples
    return dict(
        z_mean=(x.mean(0) - mean_exact) / se_mean,
        z_var=(x.var(0, ddof=1) - var_exact) / se_var,
        z_mean_vs_data=(np.abs(x.mean(0) - MU) - np.abs(mean_exact - MU)) / se_mean,
        z_var_vs_data=(np.abs(x.var(0, ddof=1) - STD**2) - np.abs(var_exact - STD**2)) / se_var,
        mean_bias=mean_exact - MU,
        var_bias=var_exact / STD**2 - 1.0,
    )


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_gaussian_data_moments(name, schedule_name):
    err = gaussian_errors(name, schedule_name)
    # The sampler is the chain: its moments match the exact recursion to MC error ...
    np.testing.assert_array_less(np.abs(err["z_mean"]), Z)
    np.testing.assert_array_less(np.abs(err["z_var"]), Z)
    # ... hence match (mu, s^2) to MC error plus the chain's own, computed, bias ...
    np.testing.assert_array_less(err["z_mean_vs_data"], Z)
    np.testing.assert_array_less(err["z_var_vs_data"], Z)
    # ... which is small: the optimal mean is unbiased, the variance off by O(1/T) or O(1/S).
    np.testing.assert_array_less(np.abs(err["mean_bias"]), 2e-3)
    np.testing.assert_array_less(np.abs(err["var_bias"]), SAMPLERS[name])


# --------------------------------------------------------------------------------------------
# A two-mode mixture: both modes, in the right proportion.
# --------------------------------------------------------------------------------------------

W, M, S_MIX = 0.3, 0.6, 0.15  # weight of the +M mode; |mode mean|; mode std (modes 8 std apart)


def _draw_mixture(sampler_name, schedule_name, rng):
    schedule = schedules.make_schedule(schedule_name, T)
    denoise_fn = mixture_eps(schedule, W, M, S_MIX)
    kwargs = dict(model_mean_type=EPS, clip_denoised=False)
    if sampler_name == "ddpm":
        draw = lambda r: sampling.sample(
            r, denoise_fn, schedule, (N, 1), model_var_type=LARGE, **kwargs
        )
    else:
        draw = lambda r: sampling.ddim_sample(
            r, denoise_fn, schedule, (N, 1), num_steps=50, **kwargs
        )
    return np.asarray(jax.jit(draw)(rng), np.float64)[:, 0]


# (sampler, schedule, allowed bias of the mode means and stds). The ancestral chain (T = 1000,
# fixed_large) is unbiased to MC error here (2e5 samples: +-0.0015 on means, +0.001 on stds);
# 50 deterministic DDIM steps shrink each mode (2e5 samples: means -0.010 / -0.005, stds -0.006
# / -0.009), the O(1/S) bias seen exactly for Gaussian data above. The weights are unbiased.
MIXTURE_CASES = [("ddpm", "linear", 0.0), ("ddim", "cosine", 0.015)]


@pytest.mark.parametrize(("sampler_name", "schedule_name", "bias"), MIXTURE_CASES)
def test_mixture_modes(sampler_name, schedule_name, bias):
    x = _draw_mixture(sampler_name, schedule_name, jax.random.key(1))
    positive = x > 0
    frac = positive.mean()
    assert abs(frac - W) < Z * np.sqrt(W * (1 - W) / N), frac
    for mode, mean in ((x[positive], M), (x[~positive], -M)):
        se = S_MIX / np.sqrt(len(mode))
        assert abs(mode.mean() - mean) < Z * se + bias, (mode.mean(), mean)
        assert abs(mode.std(ddof=1) - S_MIX) < Z * se / np.sqrt(2) + bias, mode.std()


# --------------------------------------------------------------------------------------------
# Exact identities of the chain.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_eta1_on_all_steps_is_ancestral_fixed_small(clip_denoised):
    """Song et al. 2021: eta = 1, S = T is DDPM with sigma^2 = beta-tilde; same keys, same draw."""
    schedule = schedules.make_schedule("linear", 100)
    # Modes at +-0.9: the early x_0 predictions leave [-1, 1], so clipping matters.
    denoise_fn = mixture_eps(schedule, 0.5, 0.9, 0.1)
    kwargs = dict(model_mean_type=EPS, clip_denoised=clip_denoised)
    rng = jax.random.key(3)
    ddpm = jax.jit(
        lambda r: sampling.sample(r, denoise_fn, schedule, (256, 1), model_var_type=SMALL, **kwargs)
    )(rng)
    ddim = jax.jit(
        lambda r: sampling.ddim_sample(
            r, denoise_fn, schedule, (256, 1), num_steps=100, eta=1.0, **kwargs
        )
    )(rng)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-5)
    assert np.abs(np.asarray(ddpm)).max() > 0.5  # a real sample, not a collapsed chain


@pytest.mark.parametrize("mean_type", [diffusion.ModelMeanType.START_X, diffusion.ModelMeanType.V])
def test_other_parameterisations_give_the_same_draw(mean_type):
    """A network predicting x_0 or v equivalent to eps* samples exactly what eps* samples."""
    schedule = schedules.make_schedule("cosine", 50)
    eps_fn = gaussian_eps(schedule, MU, STD)

    def converted_fn(x_t, t):
        eps = eps_fn(x_t, t)
        x0 = diffusion.predict_start_from_noise(schedule, x_t, t, eps)
        if mean_type is diffusion.ModelMeanType.START_X:
            return x0
        return diffusion.predict_v(schedule, x0, t, eps)

    rng = jax.random.key(4)

    def draws(fn, mean_type):
        kwargs = dict(model_mean_type=mean_type, clip_denoised=False)
        ddpm = sampling.sample(rng, fn, schedule, (64, 2), model_var_type=LARGE, **kwargs)
        ddim = sampling.ddim_sample(rng, fn, schedule, (64, 2), num_steps=10, **kwargs)
        return ddpm, ddim

    draws = jax.jit(draws, static_argnums=(0, 1))
    for got, expected in zip(draws(converted_fn, mean_type), draws(eps_fn, EPS), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Keys, timesteps and the traced program.
# --------------------------------------------------------------------------------------------


def _small_setup(num_timesteps=10):
    schedule = schedules.make_schedule("linear", num_timesteps)
    return schedule, gaussian_eps(schedule, MU, STD)


def _ancestral(rng, num_timesteps=10, **kwargs):
    schedule, denoise_fn = _small_setup(num_timesteps)
    kwargs = dict(model_mean_type=EPS, model_var_type=LARGE) | kwargs
    return sampling.sample(rng, denoise_fn, schedule, (8, 2), **kwargs)


def test_keys_determine_the_samples():
    draw = jax.jit(_ancestral)
    a, b, c = draw(jax.random.key(0)), draw(jax.random.key(0)), draw(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).min() > 0


def _replace_key(keys, index, seed):
    """keys with keys[index] replaced by a fresh key (through the raw key data)."""
    data = np.array(jax.random.key_data(keys))
    data[index] = np.asarray(jax.random.key_data(jax.random.key(seed)))
    return jax.random.wrap_key_data(jnp.asarray(data))


def test_last_step_adds_no_noise():
    """Algorithm 2, line 4: z = 0 at t = 1 (index 0), so the last key changes nothing."""
    schedule, denoise_fn = _small_setup()
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    keys = jax.random.split(jax.random.key(1), 10)  # keys[i] is for timestep 9 - i
    loop = jax.jit(
        lambda keys: sampling.p_sample_loop(
            keys, denoise_fn, schedule, x_T, model_mean_type=EPS, model_var_type=LARGE
        )
    )
    base = loop(keys)
    np.testing.assert_array_equal(loop(_replace_key(keys, 9, 7)), base)  # t = 0's key
    assert np.abs(np.asarray(loop(_replace_key(keys, 8, 7)) - base)).min() > 0  # t = 1's key


def _seen_timesteps(run):
    """Runs run(denoise_fn) under jit; returns the t vectors the network was called with."""
    seen = []
    schedule, eps_fn = _small_setup(12)

    def denoise_fn(x_t, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
        return eps_fn(x_t, t)

    jax.block_until_ready(jax.jit(lambda: run(denoise_fn, schedule))())
    jax.effects_barrier()
    for t in seen:
        assert t.dtype == np.int32 and t.shape == (4,) and (t == t[0]).all()
    return [int(t[0]) for t in seen]


def test_network_sees_reversed_timesteps():
    kwargs = dict(model_mean_type=EPS, clip_denoised=False)
    ancestral = lambda fn, sched: sampling.sample(
        jax.random.key(0), fn, sched, (4, 2), model_var_type=SMALL, **kwargs
    )
    assert _seen_timesteps(ancestral) == list(range(11, -1, -1))
    ddim = lambda fn, sched: sampling.ddim_sample(
        jax.random.key(0), fn, sched, (4, 2), num_steps=4, **kwargs
    )
    assert _seen_timesteps(ddim) == [11, 8, 5, 2]


def _eqn_counts(fn):
    """(equations of the whole program, equations of its one scan's body)."""
    jaxpr = jax.make_jaxpr(fn)(jax.random.key(0)).jaxpr
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1, [eqn.primitive.name for eqn in jaxpr.eqns]
    return len(jaxpr.eqns), len(scans[0].params["jaxpr"].jaxpr.eqns)


@pytest.mark.parametrize("return_trajectory", [False, True])
def test_program_size_does_not_grow_with_T(return_trajectory):
    def ancestral(num_timesteps):
        return lambda rng: _ancestral(rng, num_timesteps, return_trajectory=return_trajectory)

    def ddim(num_timesteps):
        schedule, denoise_fn = _small_setup(num_timesteps)
        return lambda rng: sampling.ddim_sample(
            rng,
            denoise_fn,
            schedule,
            (8, 2),
            num_steps=num_timesteps // 2,
            eta=0.5,
            model_mean_type=EPS,
            return_trajectory=return_trajectory,
        )

    assert _eqn_counts(ancestral(10)) == _eqn_counts(ancestral(1000))
    assert _eqn_counts(ddim(10)) == _eqn_counts(ddim(1000))


# --------------------------------------------------------------------------------------------
# Shapes, trajectories and errors.
# --------------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    schedule = schedules.make_schedule("linear", 6)
    denoise_fn = lambda x_t, t: 0.1 * x_t
    shape = (2, 4, 4, 3)
    kwargs = dict(model_mean_type=EPS)

    def draws(rng):
        x = sampling.sample(rng, denoise_fn, schedule, shape, model_var_type=LARGE, **kwargs)
        y = sampling.ddim_sample(rng, denoise_fn, schedule, shape, num_steps=3, **kwargs)
        return x, y

    for out in jax.jit(draws)(jax.random.key(0)):
        assert out.shape == shape and out.dtype == jnp.float32
        assert np.isfinite(np.asarray(out)).all() and np.abs(np.asarray(out)).max() <= 1.0 + 1e-6


def test_ancestral_trajectory():
    rng = jax.random.key(5)
    x_0, traj = jax.jit(lambda r: _ancestral(r, return_trajectory=True))(rng)  # all 10 steps
    assert traj.t.tolist() == list(range(9, -1, -1))
    assert traj.x_t.shape == traj.pred_xstart.shape == (10, 8, 2)
    x_T = jax.random.normal(jax.random.split(rng)[0], (8, 2))  # the documented key split
    np.testing.assert_array_equal(traj.x_t[0], x_T)
    # At index 0 the posterior mean is x0_hat itself (coef2 = 0) and no noise is added.
    np.testing.assert_allclose(traj.pred_xstart[-1], x_0, atol=1e-6)

    record = jax.jit(lambda r: _ancestral(r, return_trajectory=True, trajectory_steps=(0, 4, 9, 4)))
    x_0b, few = record(rng)
    np.testing.assert_array_equal(x_0b, x_0)
    assert few.t.tolist() == [9, 4, 0] and few.x_t.shape == (3, 8, 2)
    np.testing.assert_array_equal(few.x_t, traj.x_t[np.array([0, 5, 9])])
    np.testing.assert_array_equal(few.pred_xstart, traj.pred_xstart[np.array([0, 5, 9])])


def test_ddim_trajectory():
    schedule, denoise_fn = _small_setup(12)
    x_0, traj = sampling.ddim_sample(
        jax.random.key(0),
        denoise_fn,
        schedule,
        (8, 2),
        num_steps=4,
        model_mean_type=EPS,
        return_trajectory=True,
    )
    assert traj.t.tolist() == [11, 8, 5, 2]
    assert traj.x_t.shape == traj.pred_xstart.shape == (4, 8, 2)
    np.testing.assert_allclose(traj.pred_xstart[-1], x_0, atol=1e-6)  # t_prev = -1 -> x0_hat


@pytest.mark.parametrize(
    "kwargs",
    [dict(trajectory_steps=(10,)), dict(trajectory_steps=(-1,)), dict(trajectory_steps=())],
)
def test_trajectory_steps_errors(kwargs):
    with pytest.raises(ValueError, match="trajectory_steps"):
        _ancestral(jax.random.key(0), return_trajectory=True, **kwargs)


def test_trajectory_steps_need_return_trajectory():
    with pytest.raises(ValueError, match="return_trajectory"):
        _ancestral(jax.random.key(0), trajectory_steps=(0,))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(num_steps=0), "0"),
        (dict(num_steps=11), "11"),
        (dict(num_steps=2.5), "2.5"),
        (dict(num_steps=5, eta=-0.1), "-0.1"),
        (dict(num_steps=5, eta=1.5), "1.5"),
        (dict(num_steps=5, spacing="cubic"), "'cubic'"),
    ],
)
def test_ddim_errors(kwargs, named):
    schedule, denoise_fn = _small_setup(10)
    with pytest.raises(ValueError, match=named):
        sampling.ddim_sample(
            jax.random.key(0), denoise_fn, schedule, (2, 2), model_mean_type=EPS, **kwargs
        )


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize(("num_timesteps", "num_steps"), [(1000, 50), (1000, 999), (7, 3), (5, 1)])
def test_ddim_timesteps(spacing, num_timesteps, num_steps):
    ts = sampling.ddim_timesteps(num_timesteps, num_steps, spacing)
    assert len(ts) == num_steps and ts[0] >= 0 and ts[-1] == num_timesteps - 1
    assert (np.diff(ts) > 0).all()


def test_ddim_timestep_spacings():
    for spacing in ("uniform", "quadratic"):  # S = T: every timestep
        np.testing.assert_array_equal(sampling.ddim_timesteps(9, 9, spacing), np.arange(9))
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 50), np.arange(19, 1000, 20))
    quadratic = sampling.ddim_timesteps(1000, 50, "quadratic")
    assert quadratic[:3].tolist() == [0, 1, 2] and np.diff(quadratic)[-1] > 20


# --------------------------------------------------------------------------------------------
# Models, labels and devices.
# --------------------------------------------------------------------------------------------


class TinyDenoiser(nn.Module):
    """A stand-in for the UNet: (x, t, y=None, *, train) -> [B, H, W, C]."""

    num_classes: int | None = None

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        del train
        out = 0.1 * nn.Dense(x.shape[-1])(x) + 1e-3 * t.astype(x.dtype)[:, None, None, None]
        if y is not None:
            out = out + nn.Embed(self.num_classes, x.shape[-1])(y)[:, None, None, :]
        return out


IMAGE_SHAPE = (4, 4, 1)


def _tiny_model(num_classes=3):
    model = TinyDenoiser(num_classes)
    x, t, y = jnp.zeros((1, *IMAGE_SHAPE)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    init = jax.jit(functools.partial(model.init, train=False))
    return model, init(jax.random.key(0), x, t, y)["params"]


def test_make_denoise_fn_closes_over_labels():
    model, params = _tiny_model()
    x, t = jax.random.normal(jax.random.key(1), (3, *IMAGE_SHAPE)), jnp.array([5, 5, 5])
    labels = jnp.array([0, 1, 2])
    out = jax.jit(sampling.make_denoise_fn(model.apply, params, labels=labels))(x, t)
    expected = jax.jit(functools.partial(model.apply, train=False))(
        {"params": params}, x, t, labels
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)
    unconditional = jax.jit(sampling.make_denoise_fn(model.apply, params))(x, t)
    assert not np.allclose(out, unconditional)
    drawn = sampling.sample_labels(jax.random.key(2), 1000, 3)
    assert drawn.dtype == jnp.int32 and set(np.unique(drawn).tolist()) == {0, 1, 2}


def test_pmapped_sampler_one_key_per_device():
    num_devices = jax.local_device_count()
    assert num_devices == 8  # tests/conftest.py
    model, params = _tiny_model()
    schedule = schedules.make_schedule("linear", 8)
    kwargs = dict(model_mean_type=EPS, model_var_type=LARGE)
    sample_fn = sampling.make_pmapped_sampler(
        model.apply,
        schedule,
        sampling.SamplerSpec(),
        diffusion.ModelOutput(EPS, LARGE),
        per_device_batch=2,
        image_shape=IMAGE_SHAPE,
        num_classes=3,
    )
    rng = jax.random.key(9)
    images, labels = sample_fn(rng, parallel.replicate(params))
    assert images.shape == (16, *IMAGE_SHAPE) and labels.shape == (16,)
    blocks = np.asarray(images).reshape(num_devices, -1)
    assert len({block.tobytes() for block in blocks}) == num_devices  # every device differs
    np.testing.assert_array_equal(parallel.local_device_indices(), np.arange(num_devices))

    # Device 3 samples with fold_in(rng, 3) -> (labels key, sampling key), as documented.
    rng_labels, rng_sample = jax.random.split(jax.random.fold_in(rng, 3))
    labels3 = sampling.sample_labels(rng_labels, 2, 3)
    denoise_fn = sampling.make_denoise_fn(model.apply, params, labels=labels3)
    expected = jax.jit(
        lambda: sampling.sample(rng_sample, denoise_fn, schedule, (2, *IMAGE_SHAPE), **kwargs)
    )()
    np.testing.assert_array_equal(labels[6:8], labels3)
    np.testing.assert_allclose(images[6:8], expected, atol=1e-5)

    given = jnp.arange(16, dtype=jnp.int32) % 3
    np.testing.assert_array_equal(sample_fn(rng, parallel.replicate(params), given).labels, given)


def test_pmapped_ddim_sampler_draws_what_ddim_sample_draws():
    model, params = _tiny_model()
    schedule = schedules.make_schedule("cosine", 6)
    spec = sampling.SamplerSpec("ddim", steps=3, eta=0.5, spacing="quadratic")
    sample_fn = sampling.make_pmapped_sampler(
        model.apply,
        schedule,
        spec,
        diffusion.ModelOutput(EPS, LARGE),
        per_device_batch=1,
        image_shape=IMAGE_SHAPE,
        num_classes=3,
    )
    rng = jax.random.key(4)
    samples = sample_fn(rng, parallel.replicate(params))
    uint8 = np.asarray(sampling.to_uint8(samples.images))
    assert uint8.shape == (8, *IMAGE_SHAPE) and uint8.dtype == np.uint8
    _, rng_sample = jax.random.split(jax.random.fold_in(rng, 5))
    denoise_fn = sampling.make_denoise_fn(model.apply, params, labels=samples.labels[5:6])
    expected = jax.jit(
        lambda: sampling.ddim_sample(
            rng_sample,
            denoise_fn,
            schedule,
            (1, *IMAGE_SHAPE),
            num_steps=3,
            eta=0.5,
            spacing="quadratic",
            model_mean_type=EPS,
        )
    )()
    np.testing.assert_allclose(samples.images[5:6], expected, atol=1e-5)


def test_sampler_spec_refuses_what_the_schedule_cannot_run():
    with pytest.raises(ValueError, match="'ancestral'"):
        sampling.SamplerSpec(sampler="ancestral")
    with pytest.raises(ValueError, match="num_steps must be an int in \\[1, 6\\], got 0"):
        sampling.SamplerSpec("ddim", steps=0).validate(6)
    with pytest.raises(ValueError, match="eta must be in"):
        sampling.SamplerSpec("ddim", steps=3, eta=1.5).validate(6)
    assert sampling.SamplerSpec("ddpm", steps=0).validate(6).tag == "ddpm"
    assert sampling.SamplerSpec("ddim", steps=3, eta=0.0).tag == "ddim3-eta0"


def test_to_uint8():
    x = jnp.array([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    expected = [0, 0, 0, 128, 191, 255, 255]  # round((x + 1) * 127.5), clipped
    out = sampling.to_uint8(x)
    assert out.dtype == jnp.uint8 and out.tolist() == expected


# --------------------------------------------------------------------------------------------
# Respaced ancestral sampling (Nichol & Dhariwal 2021, Sec. 4).
# --------------------------------------------------------------------------------------------


def respaced_betas(betas, timesteps):
    """beta'_i = 1 - ab_{t_i} / ab_{t_{i-1}} in float64, straight from the definition."""
    ab = np.cumprod(1.0 - np.asarray(betas, np.float64))[timesteps]
    return 1.0 - ab / np.append(1.0, ab[:-1])


# (var type, spacing) -> bound on |Var[x_0] / s^2 - 1| of the exact 50-step chain (linear):
# beta-tilde' shrinks the variance (-21% / -37% for std 0.5 / 0.2, as DDIM eta=1 on the same
# timesteps, which it equals), beta' overshoots (+5% / +12%); logsnr spacing: -17% / -18%.
RESPACED_CASES = {(SMALL, "uniform"): 0.40, (LARGE, "uniform"): 0.15, (SMALL, "logsnr"): 0.20}


@pytest.mark.parametrize(("var_type", "spacing"), list(RESPACED_CASES))
def test_respaced_chain_moments(var_type, spacing):
    """50 of 1000 steps with the betas recomputed from alpha_bar: the sample is that chain's."""
    betas = schedules.get_beta_schedule("linear", T)
    schedule = schedules.DiffusionSchedule.from_betas(betas)
    denoise_fn = gaussian_eps(schedule, MU, STD)  # called with the original timesteps
    spec = sampling.SamplerSpec("respaced", steps=50, spacing=spacing, clip_denoised=False)
    draw = jax.jit(
        lambda rng: sampling.draw(
            rng,
            denoise_fn,
            schedule,
            (N, 2),
            spec=spec,
            output=diffusion.ModelOutput(EPS, var_type),
        )
    )
    x = np.asarray(draw(jax.random.key(0)), np.float64)
    ts = sampling.sampler_timesteps(schedule, 50, spacing)
    mean_exact, var_exact = ancestral_moments(respaced_betas(betas, ts), MU, STD**2, var_type)
    z_mean = (x.mean(0) - mean_exact) / np.sqrt(var_exact / N)
    z_var = (x.var(0, ddof=1) - var_exact) / (var_exact * np.sqrt(2.0 / (N - 1)))
    np.testing.assert_array_less(np.abs(z_mean), Z)
    np.testing.assert_array_less(np.abs(z_var), Z)
    np.testing.assert_array_less(np.abs(mean_exact - MU), 2e-3)
    np.testing.assert_array_less(
        np.abs(var_exact / STD**2 - 1.0), RESPACED_CASES[var_type, spacing]
    )


def test_respaced_schedule_is_the_sub_chain():
    betas = schedules.get_beta_schedule("cosine", 200)
    schedule = schedules.DiffusionSchedule.from_betas(betas)
    ts = np.array([0, 3, 50, 120, 199])
    sub = sampling.respaced_schedule(schedule, ts)
    np.testing.assert_allclose(sub.betas, respaced_betas(betas, ts), rtol=1e-5)
    np.testing.assert_allclose(sub.alphas_cumprod, schedule.alphas_cumprod[ts], rtol=1e-6)
    full = sampling.respaced_schedule(schedule, np.arange(200))
    for name in ("betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(full, name), getattr(schedule, name), rtol=2e-5)


@pytest.mark.parametrize("var_type", [SMALL, LARGE])
def test_respaced_on_all_steps_is_ancestral(var_type):
    schedule = schedules.make_schedule("linear", 100)
    denoise_fn = mixture_eps(schedule, 0.5, 0.9, 0.1)
    kwargs = dict(model_mean_type=EPS, model_var_type=var_type, clip_denoised=True)
    rng = jax.random.key(3)
    ddpm = jax.jit(lambda r: sampling.sample(r, denoise_fn, schedule, (256, 1), **kwargs))(rng)
    respaced = jax.jit(
        lambda r: sampling.respaced_sample(
            r, denoise_fn, schedule, (256, 1), num_steps=100, **kwargs
        )
    )(rng)
    np.testing.assert_allclose(respaced, ddpm, atol=1e-4)


def test_respaced_network_sees_original_timesteps():
    respaced = lambda fn, sched: sampling.respaced_sample(
        jax.random.key(0),
        fn,
        sched,
        (4, 2),
        num_steps=4,
        model_mean_type=EPS,
        model_var_type=SMALL,
    )
    assert _seen_timesteps(respaced) == [11, 8, 5, 2]


def test_logsnr_timesteps():
    schedule = schedules.make_schedule("linear", 1000)
    for num_steps in (1, 2, 5, 50, 999, 1000):
        ts = sampling.sampler_timesteps(schedule, num_steps, "logsnr")
        assert len(ts) == num_steps and ts[-1] == 999 and (np.diff(ts) > 0).all()
        assert num_steps == 1 or ts[0] == 0
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    lam = 0.5 * np.log(ab / (1.0 - ab))[sampling.sampler_timesteps(schedule, 20, "logsnr")]
    steps = -np.diff(lam)
    assert steps.max() / steps.min() < 1.5, steps  # about uniform in lambda
    with pytest.raises(ValueError, match="close the schedule over"):
        jax.jit(lambda s: sampling.sampler_timesteps(s, 5, "logsnr"))(schedule)


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022): the probability-flow ODE, solved to second order.
# --------------------------------------------------------------------------------------------
#
# For Gaussian data the probability-flow ODE of the VP process is linear and keeps the
# standardised coordinate z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed, so
# it maps x_T at index T-1 to x = alpha_0 mu + sqrt(alpha_0^2 s^2 + sigma_0^2) z at index 0,
# and the last (first-order) step returns x0_hat there. With logsnr spacing every step count
# visits both ends, so the solvers' errors against this exact map show their order.

CONVERGENCE_STEPS = (5, 10, 20, 40, 80)


def _x0_hat(ab, x, mu, var0):
    """E[x_0 | x_t = x] for Gaussian data, float64."""
    return mu + np.sqrt(ab) * var0 / (ab * var0 + 1.0 - ab) * (x - np.sqrt(ab) * mu)


def exact_flow(ab, x_T, mu, var0):
    """x0_hat at index 0 of the exact probability-flow ODE solution from x_T at index T-1."""
    marginal_std = lambda a: np.sqrt(a * var0 + 1.0 - a)
    z = (x_T - np.sqrt(ab[-1]) * mu) / marginal_std(ab[-1])
    x_first = np.sqrt(ab[0]) * mu + marginal_std(ab[0]) * z
    return _x0_hat(ab[0], x_first, mu, var0)


def dpm_solver_pp_reference(ab, timesteps, x_T, mu, var0):
    """Algorithm 2 of Lu et al. 2022 in float64, step by step, the last step to sigma = 0."""
    alpha, sigma = np.sqrt(ab[timesteps[::-1]]), np.sqrt(1.0 - ab[timesteps[::-1]])
    lam = np.log(alpha / sigma)
    x, x0_last, h_last = x_T, None, None
    for i in range(len(timesteps)):
        x0 = _x0_hat(alpha[i] ** 2, x, mu, var0)
        if i == len(timesteps) - 1:
            return x0  # sigma = 0: the first-order step is x0_hat
        h = lam[i + 1] - lam[i]
        d = x0 if x0_last is None else x0 + h / (2.0 * h_last) * (x0 - x0_last)
        x = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * -np.expm1(-h) * d
        x0_last, h_last = x0, h


def _lambda_uniform_betas(num_timesteps, lam_max=5.0, lam_min=-5.0):
    """A schedule whose lambda is linear in t: logsnr spacing is then uniform index spacing."""
    ab = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(lam_max, lam_min, num_timesteps)))
    return 1.0 - ab / np.append(1.0, ab[:-1])


def _ode_errors(betas, sampler, steps=CONVERGENCE_STEPS):
    """Max |x_0 - exact flow| over 256 starting points, for each step count."""
    schedule = schedules.DiffusionSchedule.from_betas(betas)
    ab = np.cumprod(1.0 - betas)
    denoise_fn = gaussian_eps(schedule, MU, STD)
    rng = jax.random.key(0)
    x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], (256, 2)), np.float64)
    exact = exact_flow(ab, x_T, MU, STD**2)
    errors = []
    for num_steps in steps:
        spec = sampling.SamplerSpec(sampler, num_steps, spacing="logsnr", clip_denoised=False)
        draw = lambda r, spec=spec: sampling.draw(
            r, denoise_fn, schedule, (256, 2), spec=spec, output=diffusion.ModelOutput()
        )
        x = np.asarray(jax.jit(draw)(rng), np.float64)
        errors.append(np.abs(x - exact).max())
    return np.array(errors)


def test_dpm_solver_pp_is_algorithm_2():
    """The scan (x0_hat and h of the previous step in its carry) is the paper's recursion."""
    betas = schedules.get_beta_schedule("linear", T)
    schedule = schedules.DiffusionSchedule.from_betas(betas)
    rng = jax.random.key(1)
    for num_steps, spacing in ((1, "uniform"), (2, "uniform"), (7, "logsnr"), (10, "quadratic")):
        spec = sampling.SamplerSpec("dpm++2m", num_steps, spacing=spacing, clip_denoised=False)
        x = jax.jit(
            lambda r, spec=spec: sampling.draw(
                r,
                gaussian_eps(schedule, MU, STD),
                schedule,
                (64, 2),
                spec=spec,
                output=diffusion.ModelOutput(),
            )
        )(rng)
        x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], (64, 2)), np.float64)
        ts = sampling.sampler_timesteps(schedule, num_steps, spacing)
        ab = np.cumprod(1.0 - betas)
        expected = dpm_solver_pp_reference(ab, ts, x_T, MU, STD**2)
        np.testing.assert_allclose(x, expected, atol=2e-4, err_msg=f"{num_steps} {spacing}")


@pytest.mark.parametrize("schedule_name", ["linear", "lambda_uniform"])
def test_dpm_solver_pp_is_second_order_and_ddim_first(schedule_name):
    """Error per doubling of the steps: about 4 for DPM-Solver++(2M), about 2 for DDIM.

    Measured (max error, 5/10/20/40/80 steps): linear T=1000: dpm++2m 0.077 0.012 0.0057
    0.0014 0.00035 (ratios 6.6 2.1 3.9 4.1), ddim ratios 2.0 2.0 2.0 2.0; lambda-uniform
    T=1000: dpm++2m ratios 4.7 2.3 3.9 4.0. The 10 -> 20 doubling is not yet asymptotic.
    """
    if schedule_name == "linear":
        betas = schedules.get_beta_schedule("linear", T)
    else:
        betas = _lambda_uniform_betas(T)
    dpm = _ode_errors(betas, "dpm++2m")
    ddim = _ode_errors(betas, "ddim")
    dpm_ratios, ddim_ratios = dpm[:-1] / dpm[1:], ddim[:-1] / ddim[1:]
    assert (dpm_ratios[-2:] >= 3.0).all() and (dpm_ratios[-2:] <= 5.0).all(), dpm_ratios
    assert (np.abs(ddim_ratios[1:] - 2.0) < 0.2).all(), ddim_ratios
    assert (dpm < ddim).all(), (dpm, ddim)
    assert dpm[-1] < 2e-3 and dpm[-1] > 1e-5  # far above float32 round-off


@pytest.mark.parametrize("sampler", ["respaced", "dpm++2m"])
def test_few_step_samplers_are_one_scan(sampler):
    def program(num_timesteps):
        schedule, denoise_fn = _small_setup(num_timesteps)
        spec = sampling.SamplerSpec(sampler, num_timesteps // 2, spacing="logsnr")
        output = diffusion.ModelOutput(EPS, SMALL)
        return lambda rng: sampling.draw(
            rng, denoise_fn, schedule, (8, 2), spec=spec, output=output
        )

    assert _eqn_counts(program(10)) == _eqn_counts(program(1000))


# --------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2021).
# --------------------------------------------------------------------------------------------


def class_gaussian_apply(schedule, means, std, null_mean, null_std, calls=None):
    """A stand-in for a class-conditional network with a null class, exact for Gaussian data:
    label k < K predicts E[eps | x_t] for x_0 ~ N(means[k], std^2), label K (null) for
    x_0 ~ N(null_mean, null_std^2). x [B, ..., D]; records each call's batch in `calls`."""
    means = jnp.asarray(means, jnp.float32)  # [K, D]
    num_classes = means.shape[0]

    def apply_fn(variables, x, t, y, train):
        del variables, train
        if calls is not None:
            calls.append(x.shape[0])
        expand = lambda a: a.reshape(a.shape[:1] + (1,) * (x.ndim - 1))
        ab, sqrt_1m_ab = (expand(a[t]) for a in _coefs(schedule, t))
        null = y == num_classes
        mu = jnp.where(
            null[:, None], jnp.asarray(null_mean), means[jnp.minimum(y, num_classes - 1)]
        )
        mu = mu.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,))  # [B, 1, .., D]
        var0 = jnp.where(null[:, None], null_std**2, jnp.asarray(std, jnp.float32) ** 2)
        var0 = jnp.broadcast_to(var0, (x.shape[0], x.shape[-1])).reshape(mu.shape)
        return sqrt_1m_ab * (x - jnp.sqrt(ab) * mu) / (ab * var0 + sqrt_1m_ab**2)

    return apply_fn


def test_one_guided_step_follows_the_guided_score():
    """Two classes N(+-M, S^2) with the mixture as the unconditional model: the guided eps is
    eps(x, y) - w sigma grad log p(y | x_t), grad log p(y | x_t) = alpha (m_y - m_bar(x)) / v."""
    schedule = schedules.make_schedule("linear", T)
    w, t_index, batch = 3.0, 400, 64
    mixture = mixture_eps(schedule, 0.5, M, S_MIX)
    conditional = class_gaussian_apply(schedule, [[M], [-M]], S_MIX, 0.0, 1.0)
    calls = []

    def apply_fn(variables, x, t, y, train):  # labels 0, 1 exact Gaussians; label 2 the mixture
        calls.append(x.shape[0])
        return jnp.where((y == 2)[:, None], mixture(x, t), conditional(variables, x, t, y, train))

    labels = jnp.arange(batch, dtype=jnp.int32) % 2
    denoise_fn = sampling.make_denoise_fn(apply_fn, {}, labels=labels, guidance=w, null_label=2)
    x_t = jnp.linspace(-1.5, 1.5, batch, dtype=jnp.float32)[:, None]
    t = jnp.full((batch,), t_index, jnp.int32)
    t_prev = jnp.full((batch,), t_index - 40, jnp.int32)
    noise = jnp.zeros_like(x_t)
    step = lambda eps: diffusion.ddim_step(
        schedule, eps, x_t, t, t_prev, noise, eta=0.0, model_mean_type=EPS, clip_denoised=False
    )
    guided, _ = step(denoise_fn(x_t, t))
    assert calls == [2 * batch]  # one network call on the doubled batch

    ab = float(np.asarray(schedule.alphas_cumprod, np.float64)[t_index])
    alpha, sigma, v = np.sqrt(ab), np.sqrt(1.0 - ab), ab * S_MIX**2 + 1.0 - ab
    x = np.asarray(x_t, np.float64)[:, 0]
    logits = -0.5 * (x[:, None] - alpha * np.array([M, -M])) ** 2 / v
    resp = np.exp(logits - logits.max(1, keepdims=True))
    m_bar = (resp / resp.sum(1, keepdims=True)) @ np.array([M, -M])
    m_y = np.where(np.asarray(labels) == 0, M, -M)
    eps_y = sigma * (x - alpha * m_y) / v
    eps_guided = eps_y - w * sigma * alpha * (m_y - m_bar) / v
    expected, _ = step(jnp.asarray(eps_guided, jnp.float32)[:, None])
    np.testing.assert_allclose(guided, expected, atol=2e-5)
    unguided, _ = step(jnp.asarray(eps_y, jnp.float32)[:, None])
    assert np.abs(np.asarray(guided - unguided)).max() > 0.05  # guidance moved the samples


def guided_ddim_moments(betas, timesteps, eta, w, mu_c, var_c, mu_u, var_u):
    """x_0 moments of DDIM with the guided eps (1+w) eps_c - w eps_u, linear in x_t."""
    ab = np.cumprod(1.0 - betas)
    m, v = np.zeros_like(mu_c), np.ones_like(mu_c)
    for i in range(len(timesteps) - 1, -1, -1):
        ab_t = ab[timesteps[i]]
        ab_prev = ab[timesteps[i - 1]] if i > 0 else 1.0
        (cc, dc), (cu, du) = _eps_coefs(ab_t, mu_c, var_c), _eps_coefs(ab_t, mu_u, var_u)
        c, d = (1.0 + w) * cc - w * cu, (1.0 + w) * dc - w * du
        # x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t); Eq. (12) of Song et al. 2021.
        cx, dx = (
            (1.0 - np.sqrt(1.0 - ab_t) * c) / np.sqrt(ab_t),
            -np.sqrt(1 - ab_t) * d / np.sqrt(ab_t),
        )
        sigma2 = eta**2 * (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
        direction = np.sqrt(1.0 - ab_prev - sigma2)
        gain, shift = np.sqrt(ab_prev) * cx + direction * c, np.sqrt(ab_prev) * dx + direction * d
        m, v = gain * m + shift, gain**2 * v + sigma2
    return m, v


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guided_ddim_on_every_device_matches_the_guided_chain(eta):
    """Class k: N(MU_k, STD^2), null: N(0, 0.7^2); the guided DDIM chain (w = 2) is
    linear-Gaussian, its x_0 moments known in closed form, per class, through the pmapped
    sampler (labels given, one key per device)."""
    betas = schedules.get_beta_schedule("linear", T)
    schedule = schedules.DiffusionSchedule.from_betas(betas)
    means = np.array([MU, -MU])
    null_mean, null_std, w, steps = np.zeros(2), 0.7, 2.0, 20
    apply_fn = class_gaussian_apply(schedule, means, STD, null_mean, null_std)
    spec = sampling.SamplerSpec("ddim", steps, eta=eta, clip_denoised=False, guidance=w)
    per_device = N // jax.local_device_count()
    sample_fn = sampling.make_pmapped_sampler(
        apply_fn,
        schedule,
        spec,
        diffusion.ModelOutput(EPS, SMALL),
        per_device_batch=per_device,
        image_shape=(1, 1, 2),
        num_classes=2,
    )
    n = per_device * jax.local_device_count()
    labels = np.arange(n, dtype=np.int32) % 2
    params = parallel.replicate({"unused": jnp.zeros(())})
    x = np.asarray(sample_fn(jax.random.key(0), params, labels).images, np.float64)[:, 0, 0]
    ts = sampling.ddim_timesteps(T, steps)
    for k in (0, 1):
        xk = x[labels == k]
        m, v = guided_ddim_moments(betas, ts, eta, w, means[k], STD**2, null_mean, null_std**2)
        z_mean = (xk.mean(0) - m) / np.sqrt(v / len(xk))
        z_var = (xk.var(0, ddof=1) - v) / (v * np.sqrt(2.0 / (len(xk) - 1)))
        np.testing.assert_array_less(np.abs(z_mean), Z)
        np.testing.assert_array_less(np.abs(z_var), Z)
        # Guidance pushes each class away from the null model's mean 0, past its own mean.
        assert (np.abs(m) > np.abs(means[k]) + 0.02).all(), m


def test_guidance_needs_labels_and_a_null_class():
    with pytest.raises(ValueError, match="guidance=2 needs class labels"):
        sampling.make_denoise_fn(lambda *a, **k: None, {}, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        sampling.SamplerSpec("ddim", guidance=-1.0)
    schedule = schedules.make_schedule("linear", 8)
    with pytest.raises(ValueError, match="class-conditional"):
        sampling.make_pmapped_sampler(
            lambda *a, **k: None,
            schedule,
            sampling.SamplerSpec(guidance=1.0),
            diffusion.ModelOutput(),
            per_device_batch=1,
            image_shape=IMAGE_SHAPE,
        )
    assert sampling.SamplerSpec("dpm++2m", 20, guidance=3.0).tag == "dpm++2m20-g3"
    assert sampling.SamplerSpec("respaced", 50).tag == "respaced50"


# --------------------------------------------------------------------------------------------
# Learned variances (Nichol & Dhariwal 2021): v = -1 / +1 are the fixed types, in every chain.
# --------------------------------------------------------------------------------------------

LEARNED = diffusion.ModelVarType.LEARNED_RANGE


def with_variance_channels(denoise_fn, v):
    """denoise_fn with C more output channels holding the variance value v (a [B] or scalar)."""

    def fn(x_t, t):
        eps = denoise_fn(x_t, t)
        values = jnp.broadcast_to(jnp.reshape(v, (-1,) + (1,) * (x_t.ndim - 1)), x_t.shape)
        return jnp.concatenate([eps, values.astype(eps.dtype)], axis=-1)

    return fn


@pytest.mark.parametrize("sampler", ["ddpm", "respaced"])
def test_learned_range_ends_are_the_fixed_variances(sampler):
    """Same keys, same draw: v = -1 is fixed_small, v = +1 fixed_large, for the respaced chain
    with its own beta' and beta-tilde'; v = 0 lies strictly between."""
    schedule = schedules.make_schedule("linear", 100)
    eps_fn = mixture_eps(schedule, 0.5, 0.9, 0.1)
    spec = sampling.SamplerSpec(sampler, steps=20, clip_denoised=False)
    run = lambda fn, var_type: jax.jit(
        lambda r: sampling.draw(
            r, fn, schedule, (256, 1), spec=spec, output=diffusion.ModelOutput(EPS, var_type)
        )
    )(jax.random.key(5))
    for v, var_type in ((-1.0, SMALL), (1.0, LARGE)):
        learned = run(with_variance_channels(eps_fn, v), LEARNED)
        np.testing.assert_allclose(learned, run(eps_fn, var_type), atol=1e-5)
    middle = np.asarray(run(with_variance_channels(eps_fn, 0.0), LEARNED))
    small, large = np.asarray(run(eps_fn, SMALL)), np.asarray(run(eps_fn, LARGE))
    assert not np.allclose(middle, small) and not np.allclose(middle, large)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_deterministic_samplers_ignore_the_variance_channels(sampler):
    schedule, eps_fn = _small_setup(20)
    spec = sampling.SamplerSpec(sampler, steps=5, clip_denoised=False)
    run = lambda fn, var_type: jax.jit(
        lambda r: sampling.draw(
            r, fn, schedule, (8, 2), spec=spec, output=diffusion.ModelOutput(EPS, var_type)
        )
    )(jax.random.key(2))
    learned = run(with_variance_channels(eps_fn, 0.5), LEARNED)
    np.testing.assert_array_equal(learned, run(eps_fn, SMALL))
    with pytest.raises(ValueError, match=r"expected \(8, 4\)"):
        run(eps_fn, LEARNED)


@pytest.mark.parametrize("sampler", ["respaced", "dpm++2m"])
def test_pmapped_guided_sampler_draws_what_the_sampler_draws(sampler):
    """The spec reaches every device: device 5's guided draw is the sampler's own."""
    model, params = _tiny_model(num_classes=4)  # labels 0..2, and 3 the null class
    schedule = schedules.make_schedule("cosine", 12)
    spec = sampling.SamplerSpec(sampler, steps=4, spacing="logsnr", guidance=2.0)
    output = diffusion.ModelOutput(EPS, SMALL)
    sample_fn = sampling.make_pmapped_sampler(
        model.apply, schedule, spec, output, per_device_batch=2, image_shape=IMAGE_SHAPE,
        num_classes=3,
    )  # fmt: skip
    rng = jax.random.key(6)
    samples = sample_fn(rng, parallel.replicate(params))
    assert int(samples.labels.max()) < 3
    _, rng_sample = jax.random.split(jax.random.fold_in(rng, 5))
    denoise_fn = sampling.make_denoise_fn(
        model.apply, params, labels=samples.labels[10:12], guidance=2.0, null_label=3
    )
    expected = jax.jit(
        lambda: sampling.draw(
            rng_sample, denoise_fn, schedule, (2, *IMAGE_SHAPE), spec=spec, output=output
        )
    )()
    np.testing.assert_allclose(samples.images[10:12], expected, atol=1e-5)
    unguided = sampling.make_denoise_fn(model.apply, params, labels=samples.labels[10:12])
    plain = jax.jit(
        lambda: sampling.draw(
            rng_sample, unguided, schedule, (2, *IMAGE_SHAPE), spec=spec, output=output
        )
    )()
    assert not np.allclose(plain, expected, atol=1e-3)


def test_section_counts():
    """Improved-DDPM's "10,10,5" respacing: each third of T gets its own evenly spaced steps."""
    np.testing.assert_array_equal(sampling.section_timesteps(1000, (10,)), np.arange(0, 1000, 111))
    ts = sampling.section_timesteps(300, (10, 10, 5))
    np.testing.assert_array_equal(ts[:10], np.arange(0, 100, 11))
    np.testing.assert_array_equal(ts[10:20], np.arange(100, 200, 11))
    np.testing.assert_array_equal(ts[20:], [200, 225, 250, 274, 299])  # stride 24.75, rounded
    assert sampling.section_timesteps(7, (1, 2)).tolist() == [0, 4, 6]  # sections 4 and 3
    spec = sampling.SamplerSpec("respaced", steps="10,10,5")
    assert spec.steps == (10, 10, 5) and spec.tag == "respaced10-10-5"
    assert spec.validate(300) is spec
    with pytest.raises(ValueError, match="section 2 has 100 timesteps: cannot take 101"):
        sampling.SamplerSpec("respaced", steps=(10, 10, 101)).validate(300)
    with pytest.raises(ValueError, match="expected an int or counts"):
        sampling.SamplerSpec("respaced", steps="10,x")
    schedule, denoise_fn = _small_setup(12)
    x = sampling.respaced_sample(
        jax.random.key(0), denoise_fn, schedule, (4, 2), num_steps=(2, 3),
        model_mean_type=EPS, model_var_type=SMALL,
    )  # fmt: skip
    assert x.shape == (4, 2) and np.isfinite(np.asarray(x)).all()
    seen = _seen_timesteps(
        lambda fn, sched: sampling.respaced_sample(
            jax.random.key(0), fn, sched, (4, 2), num_steps=(2, 3), model_mean_type=EPS,
            model_var_type=SMALL,
        )
    )  # fmt: skip
    assert seen == [11, 8, 6, 5, 0]  # sections 0-5: 0, 5; 6-11: 6, 8 (2.5 rounds to even), 11
