"""Tests of ddpm_jax.diffusion against independent float64 numpy / scipy computations.

Each test states a property of Ho et al. 2020 (or of DDIM / v-prediction / min-SNR) and computes
the expected value from first principles: a Gaussian chain run step by step, Bayes' rule in
precision form, a regression on Monte-Carlo samples, numerical integration, scipy's normal cdf.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from ddpm_jax import diffusion, schedules

T = 1000
LINEAR = schedules.make_schedule("linear", T)
BETAS = schedules.get_beta_schedule("linear", T)  # float64
MEAN_TYPES = list(diffusion.ModelMeanType)
# The fixed variances; learned_range (2C outputs) has its own tests below and in test_sampling.
VAR_TYPES = [diffusion.ModelVarType.FIXED_SMALL, diffusion.ModelVarType.FIXED_LARGE]
LN2 = math.log(2.0)

fast = settings(max_examples=20, deadline=None, derandomize=True)
slow_mc = settings(max_examples=5, deadline=None, derandomize=True)


# ------------------------------------------------------------ independent float64 references


def ref_alpha_bar(betas, t):
    """alpha_bar at index t (1 at t = -1), as a product of the single-step alphas."""
    return float(np.prod(1.0 - np.asarray(betas)[: t + 1]))


def ref_posterior(betas, t, x0, xt):
    """q(x_{t-1} | x_t, x_0) by Bayes: prior N(sqrt(ab') x0, 1 - ab') times likelihood
    N(x_t; sqrt(1 - b) x_{t-1}, b). Returns (mean, variance); a point mass at x0 for t = 0."""
    if t == 0:
        return np.asarray(x0, np.float64), 0.0
    ab_prev, b = ref_alpha_bar(betas, t - 1), betas[t]
    precision = 1.0 / (1.0 - ab_prev) + (1.0 - b) / b
    mean = (math.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + math.sqrt(1.0 - b) * xt / b) / precision
    return mean, 1.0 / precision


def bcast(values, ndim):
    """[B] -> [B, 1, ..., 1]."""
    return np.asarray(values, np.float64).reshape((-1,) + (1,) * (ndim - 1))


def batch(seed, shape=(4, 3, 3, 2), t=None):
    """A reproducible (x0 in [-1, 1], eps, t) batch as float32 numpy."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    if t is None:
        t = rng.integers(0, T, shape[0])
    return x0, eps, np.asarray(t, np.int32)


def f64(x):
    return np.asarray(x, np.float64)


# ------------------------------------------------------------------------ forward process q


@slow_mc
@given(st.integers(0, T - 1))
def test_q_sample_matches_the_chain_run_step_by_step(t):
    """Eq. (4) in distribution: x_0 -> x_1 -> ... -> x_t one Gaussian step at a time."""
    n = 40_000
    rng = np.random.default_rng(t)
    x0 = rng.uniform(-1, 1, n)
    x = x0.copy()
    for b in BETAS[: t + 1]:  # q(x_s | x_{s-1}) = N(sqrt(1 - b_s) x_{s-1}, b_s), Eq. (2)
        x = math.sqrt(1.0 - b) * x + math.sqrt(b) * rng.standard_normal(n)
    noise = jax.random.normal(jax.random.key(t), (n, 1))
    xt = diffusion.q_sample(LINEAR, jnp.asarray(x0[:, None], jnp.float32), jnp.full(n, t), noise)
    xt = f64(xt)[:, 0]

    ab = ref_alpha_bar(BETAS, t)
    for sample in (x, xt):
        resid = sample - math.sqrt(ab) * x0  # ~ N(0, 1 - ab) given x0
        assert abs(resid.mean()) < 5 * math.sqrt((1 - ab) / n)
        assert resid.var() == pytest.approx(1 - ab, rel=5 * math.sqrt(2 / n))
    assert stats.ks_2samp(x, xt).pvalue > 1e-3


def test_q_sample_and_q_mean_variance_per_example():
    x0, eps, t = batch(0, t=[0, 1, 500, 999])
    ab = bcast([ref_alpha_bar(BETAS, int(s)) for s in t], x0.ndim)
    xt = diffusion.q_sample(LINEAR, x0, t, eps)
    np.testing.assert_allclose(xt, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-6)
    mean, var, log_var = diffusion.q_mean_variance(LINEAR, x0, t)
    assert mean.shape == var.shape == log_var.shape == x0.shape
    np.testing.assert_allclose(mean, np.sqrt(ab) * x0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, np.broadcast_to(1 - ab, x0.shape), rtol=1e-5)
    np.testing.assert_allclose(log_var, np.broadcast_to(np.log(1 - ab), x0.shape), rtol=1e-5)


@fast
@given(
    st.lists(st.floats(1e-4, 0.5), min_size=2, max_size=30).map(np.array),
    st.data(),
)
def test_q_posterior_is_bayes_rule(betas, data):
    """Eqs. (6)-(7): the posterior mean/variance equal the Gaussian product, per example."""
    sched = schedules.DiffusionSchedule.from_betas(betas)
    t = np.array(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=3, max_size=3)))
    x0, xt, _ = batch(int(t.sum()), shape=(3, 5))
    mean, var, log_var = diffusion.q_posterior_mean_variance(sched, x0, xt, t.astype(np.int32))
    for i, s in enumerate(t):
        ref_mean, ref_var = ref_posterior(betas, int(s), f64(x0[i]), f64(xt[i]))
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[i], ref_var, rtol=1e-4, atol=1e-12)
        # log variance is clipped: at t = 0 it is the one of t = 1.
        ref_log = math.log(ref_posterior(betas, max(int(s), 1), 0.0, 0.0)[1])
        np.testing.assert_allclose(log_var[i], ref_log, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 10, 300, 999])
def test_q_posterior_recovered_by_regression(t):
    """Regress Monte-Carlo x_{t-1} on (x_0, x_t): slopes = Eq. (7) coefficients, residual
    variance = beta-tilde_t."""
    n = 100_000
    rng = np.random.default_rng(t)
    x0 = rng.uniform(-1, 1, n)
    ab_prev = ref_alpha_bar(BETAS, t - 1)
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * rng.standard_normal(n)
    x_t = math.sqrt(1 - BETAS[t]) * x_prev + math.sqrt(BETAS[t]) * rng.standard_normal(n)
    design = np.stack([x0, x_t], axis=1)
    slopes, _, _, _ = np.linalg.lstsq(design, x_prev, rcond=None)
    resid_var = np.mean((x_prev - design @ slopes) ** 2)
    stderr = np.sqrt(resid_var * np.diag(np.linalg.inv(design.T @ design)))

    # The code's coefficients, read off by feeding unit x_0 and unit x_t.
    unit = np.eye(2, dtype=np.float32)
    mean, var, _ = diffusion.q_posterior_mean_variance(
        LINEAR, unit[:, :1], unit[:, 1:], jnp.full(2, t, jnp.int32)
    )
    coef1, coef2 = f64(mean)[:, 0]
    np.testing.assert_array_less(np.abs(slopes - [coef1, coef2]), 5 * stderr + 1e-7)
    assert float(var[0, 0]) == pytest.approx(resid_var, rel=5 * math.sqrt(2 / n))


# ------------------------------------------------------------ parameterisation conversions


@fast
@given(st.integers(0, 2**16))
def test_conversions_invert_q_sample(seed):
    x0, eps, t = batch(seed)
    xt = diffusion.q_sample(LINEAR, x0, t, eps)
    np.testing.assert_allclose(
        diffusion.predict_start_from_noise(LINEAR, xt, t, eps), x0, atol=2e-4
    )
    np.testing.assert_allclose(
        diffusion.predict_noise_from_start(LINEAR, xt, t, x0), eps, atol=2e-3
    )
    # v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022), written out here.
    ab = bcast([ref_alpha_bar(BETAS, int(s)) for s in t], x0.ndim)
    v = diffusion.predict_v(LINEAR, x0, t, eps)
    np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_start_from_v(LINEAR, xt, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_noise_from_v(LINEAR, xt, t, v), eps, atol=1e-5)


def test_training_targets():
    x0, eps, t = batch(1)
    ab = bcast([ref_alpha_bar(BETAS, int(s)) for s in t], x0.ndim)
    expected = {"epsilon": eps, "x_start": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}
    for name, want in expected.items():
        got = diffusion.training_target(LINEAR, x0, t, eps, model_mean_type=name)
        np.testing.assert_allclose(got, want, atol=1e-6)


# ------------------------------------------------------------------------ reverse process p


def true_output(mean_type, x0, eps, t):
    """What a perfect network outputs, computed in numpy."""
    ab = bcast([ref_alpha_bar(BETAS, int(s)) for s in t], x0.ndim)
    return {
        diffusion.ModelMeanType.EPSILON: eps,
        diffusion.ModelMeanType.START_X: x0,
        diffusion.ModelMeanType.V: (np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0).astype(np.float32),
    }[mean_type]


def ref_sigma2(var_type, t):
    """sigma_t^2 (Sec. 3.2): beta-tilde or beta, both with beta-tilde_1 at index 0."""
    if t == 0:
        return ref_posterior(BETAS, 1, 0.0, 0.0)[1]
    if var_type is diffusion.ModelVarType.FIXED_SMALL:
        return ref_posterior(BETAS, t, 0.0, 0.0)[1]
    return BETAS[t]


def noisy(x0, eps, t):
    """x_t of Eq. (4) in float64 numpy, returned as float32."""
    ab = bcast([ref_alpha_bar(BETAS, int(s)) for s in t], x0.ndim)
    return (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps).astype(np.float32)


@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_p_mean_variance_of_a_perfect_model_is_the_posterior(mean_type, var_type):
    x0, eps, t = batch(2, t=[0, 1, 37, 700])
    xt = noisy(x0, eps, t)
    out = diffusion.p_mean_variance(
        LINEAR,
        true_output(mean_type, x0, eps, t),
        xt,
        t,
        model_mean_type=mean_type,
        model_var_type=var_type.value,  # the string form is accepted too
        clip_denoised=False,
    )
    np.testing.assert_allclose(out.pred_xstart, x0, atol=1e-3)
    for i, s in enumerate(t):
        ref_mean, _ = ref_posterior(BETAS, int(s), f64(x0[i]), f64(xt[i]))
        np.testing.assert_allclose(out.mean[i], ref_mean, atol=1e-4)
        # The paper's code: fixed_small's variance is beta-tilde_t itself (0 at t = 0, where no
        # noise is added); the log variance is the clipped one that the decoder uses.
        small_t0 = s == 0 and var_type is diffusion.ModelVarType.FIXED_SMALL
        want = 0.0 if small_t0 else ref_sigma2(var_type, int(s))
        np.testing.assert_allclose(out.variance[i], want, rtol=1e-4)
        np.testing.assert_allclose(
            out.log_variance[i], math.log(ref_sigma2(var_type, int(s))), rtol=1e-5
        )


def test_clip_denoised_clips_the_predicted_start():
    x0, eps, t = batch(3, t=[3, 3, 3, 3])
    wild = 3.0 * x0  # mostly outside [-1, 1]
    xt = noisy(x0, eps, t)
    out = diffusion.p_mean_variance(
        LINEAR,
        wild,
        xt,
        t,
        model_mean_type="x_start",
        model_var_type="fixed_small",
        clip_denoised=True,
    )
    clipped = np.clip(f64(wild), -1, 1)
    np.testing.assert_array_equal(out.pred_xstart, clipped.astype(np.float32))
    ref_mean, _ = ref_posterior(BETAS, 3, clipped, f64(xt))
    np.testing.assert_allclose(out.mean, ref_mean, atol=1e-5)


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_p_sample_step_adds_sigma_z_except_at_t0(var_type):
    """Algorithm 2: x_{t-1} = mu + sigma_t z for t > 1 (index > 0), and mu alone at the end."""
    x0, eps, t = batch(4, t=[0, 0, 5, 999])
    xt = noisy(x0, eps, t)
    z1, z2 = (np.random.default_rng(k).standard_normal(x0.shape).astype(np.float32) for k in (1, 2))
    step = functools.partial(
        diffusion.p_sample_step,
        LINEAR,
        eps,
        xt,
        t,
        model_mean_type="epsilon",
        model_var_type=var_type,
        clip_denoised=False,
    )
    (a, pred_a), (b, _) = step(z1), step(z2)
    np.testing.assert_allclose(pred_a, x0, atol=1e-3)
    for i, s in enumerate(t):
        mean, _ = ref_posterior(BETAS, int(s), f64(x0[i]), f64(xt[i]))
        sigma = 0.0 if s == 0 else math.sqrt(ref_sigma2(var_type, int(s)))
        np.testing.assert_allclose(a[i], mean + sigma * z1[i], atol=1e-4)
        np.testing.assert_allclose(b[i], mean + sigma * z2[i], atol=1e-4)
    np.testing.assert_array_equal(a[:2], b[:2])  # no noise at all at t == 0


def test_p_sample_step_under_jit_matches_eager():
    x0, eps, t = batch(5)
    kwargs = dict(model_mean_type="v", model_var_type="fixed_large", clip_denoised=True)
    eager = diffusion.p_sample_step(LINEAR, eps, x0, t, eps, **kwargs)
    jitted = jax.jit(functools.partial(diffusion.p_sample_step, **kwargs))(LINEAR, eps, x0, t, eps)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-5), eager, jitted)


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_ddim_eta0_with_true_eps_lands_exactly_on_q_sample(mean_type):
    """Song et al. 2021, Eq. (12) with sigma = 0: x_{t_prev} = sqrt(ab') x0 + sqrt(1 - ab') eps."""
    x0, eps, t = batch(6, t=[1, 10, 500, 999])
    t_prev = np.array([-1, 9, 250, 0], np.int32)  # -1: alpha_bar = 1, returns x_0
    xt = noisy(x0, eps, t)
    out = true_output(mean_type, x0, eps, t)
    z = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    step = functools.partial(
        diffusion.ddim_step,
        LINEAR,
        out,
        xt,
        t,
        t_prev,
        eta=0.0,
        model_mean_type=mean_type,
        clip_denoised=False,
    )
    x_prev, pred = step(z)
    np.testing.assert_array_equal(x_prev, step(-z)[0])  # eta = 0: the noise is ignored
    ab_prev = bcast([ref_alpha_bar(BETAS, int(s)) for s in t_prev], x0.ndim)
    np.testing.assert_allclose(
        x_prev, np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * eps, atol=2e-4
    )
    np.testing.assert_allclose(x_prev[0], x0[0], atol=1e-4)
    np.testing.assert_allclose(pred, x0, atol=2e-3)


def test_ddim_eta1_one_step_is_the_ddpm_posterior():
    """With eta = 1 and t_prev = t - 1, DDIM's sigma^2 is beta-tilde_t and its mean mu-tilde."""
    x0, eps, t = batch(7, t=[1, 2, 100, 999])
    xt = noisy(x0, eps, t)
    z = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
    x_prev, _ = diffusion.ddim_step(
        LINEAR, eps, xt, t, t - 1, z, eta=1.0, model_mean_type="epsilon", clip_denoised=False
    )
    for i, s in enumerate(t):
        mean, var = ref_posterior(BETAS, int(s), f64(x0[i]), f64(xt[i]))
        np.testing.assert_allclose(x_prev[i], mean + math.sqrt(var) * z[i], atol=2e-4)


# ------------------------------------------------------------------------------------ losses


def test_loss_simple_is_a_per_example_mean():
    rng = np.random.default_rng(0)
    out, target = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    weights = np.array([0.5, 2.0, 0.0], np.float32)
    ref = ((f64(out) - target) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(diffusion.loss_simple(out, target), ref, rtol=1e-5)
    np.testing.assert_allclose(
        diffusion.loss_simple(out, target, weights=weights), ref * weights, rtol=1e-5
    )


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_closed_form(gamma):
    t = np.array([0, 100, 200, 400, 999], np.int32)
    ab = np.array([ref_alpha_bar(BETAS, int(s)) for s in t])
    snr = ab / (1 - ab)
    np.testing.assert_allclose(diffusion.snr(LINEAR, t), snr, rtol=1e-4)
    expected = {
        "epsilon": np.minimum(snr, gamma) / snr,
        "x_start": np.minimum(snr, gamma),
        "v": np.minimum(snr, gamma) / (snr + 1),
    }
    for name, want in expected.items():
        got = diffusion.loss_weights(
            LINEAR, t, weighting="min_snr", model_mean_type=name, gamma=gamma
        )
        np.testing.assert_allclose(got, want, rtol=1e-4)
        none = diffusion.loss_weights(LINEAR, t, weighting="none", model_mean_type=name)
        np.testing.assert_array_equal(none, np.ones(5))


@fast
@given(st.integers(0, 2**16))
def test_min_snr_weighted_losses_agree_across_parameterisations(seed):
    """min-SNR weights make the eps-, x_0- and v-losses of one prediction the same number:
    |x0 - x0^|^2 = |eps - eps^|^2 / SNR = |v - v^|^2 / (SNR + 1) at fixed x_t."""
    x0, eps, t = batch(seed)
    guess = np.random.default_rng(seed + 1).standard_normal(x0.shape).astype(np.float32)
    xt = diffusion.q_sample(LINEAR, x0, t, eps)
    pred_x0 = diffusion.predict_start_from_noise(LINEAR, xt, t, guess)
    pred_v = np.sqrt(bcast([ref_alpha_bar(BETAS, int(s)) for s in t], 4)) * f64(xt) - pred_x0
    pred_v /= np.sqrt(1 - bcast([ref_alpha_bar(BETAS, int(s)) for s in t], 4))
    losses = []
    for name, pred in [("epsilon", guess), ("x_start", pred_x0), ("v", pred_v)]:
        target = diffusion.training_target(LINEAR, x0, t, eps, model_mean_type=name)
        w = diffusion.loss_weights(LINEAR, t, weighting="min_snr", model_mean_type=name)
        losses.append(f64(diffusion.loss_simple(jnp.asarray(pred, jnp.float32), target, weights=w)))
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-2, atol=1e-6)
    np.testing.assert_allclose(losses[0], losses[2], rtol=2e-2, atol=1e-6)


# ------------------------------------------------------------- variational bound (bits/dim)


@fast
@given(st.floats(-3, 3), st.floats(-3, 1), st.floats(-3, 3), st.floats(-3, 1))
def test_normal_kl_matches_numerical_integration(m1, lv1, m2, lv2):
    p, q = stats.norm(m1, math.exp(lv1 / 2)), stats.norm(m2, math.exp(lv2 / 2))
    lo, hi = m1 - 12 * p.std(), m1 + 12 * p.std()
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)
    got = float(
        diffusion.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2))
    )
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert float(diffusion.normal_kl(m1, lv1, m1, lv1)) == 0.0


BINS = (2 * np.arange(256) / 255 - 1).astype(np.float32)  # the 256 8-bit values in [-1, 1]


@pytest.mark.parametrize(
    ("mean", "scale"), [(0.1, 0.05), (-0.99, 0.003), (0.0, 1.0), (1.7, 0.3), (0.3, 1e-4)]
)
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, scale):
    """Eq. (13): the bins [x - 1/255, x + 1/255], with +-inf at the edges, tile the real line."""
    x = BINS[None, :]
    log_p = diffusion.discretized_gaussian_log_likelihood(
        x, means=jnp.full_like(x, mean), log_scales=jnp.full_like(x, math.log(scale))
    )
    assert float(jnp.sum(jnp.exp(log_p))) == pytest.approx(1.0, abs=1e-5)
    dist = stats.norm(mean, scale)
    interior = dist.cdf(f64(BINS[1:-1]) + 1 / 255) - dist.cdf(f64(BINS[1:-1]) - 1 / 255)
    with np.errstate(divide="ignore"):  # bins with no float64 mass: log(0) = -inf
        interior = np.log(interior)
    ref = np.concatenate(
        [[dist.logcdf(BINS[0] + 1 / 255)], interior, [dist.logsf(BINS[-1] - 1 / 255)]]
    )
    big = ref > math.log(1e-6)
    np.testing.assert_allclose(f64(log_p)[0, big], ref[big], rtol=2e-3, atol=1e-5)


def test_discretized_likelihood_is_finite_in_the_far_tails():
    x = jnp.array([[-1.0, 1.0, 0.0, 2 / 255 - 1]])
    means = jnp.array([[1.0, -1.0, 0.9, 1.0]])

    def total(means):
        return jnp.sum(
            diffusion.discretized_gaussian_log_likelihood(
                x, means=means, log_scales=jnp.full_like(x, -7.0)
            )
        )

    assert np.isfinite(total(means)) and np.all(np.isfinite(jax.grad(total)(means)))


def test_prior_term_is_about_1e5_bits_per_dim():
    """L_T for the paper's schedule is negligible: ~1e-5 bits/dim on data in [-1, 1]."""
    x0 = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)) * 2 / 255 - 1
    bpd = f64(diffusion.prior_bpd(LINEAR, jnp.asarray(x0, jnp.float32)))
    ab = ref_alpha_bar(BETAS, T - 1)
    # KL(N(sqrt(ab) x, 1 - ab) || N(0, 1)) = (ab x^2 + (1 - ab) - 1 - log(1 - ab)) / 2 per dim.
    ref = 0.5 * (ab * x0**2 - ab - math.log1p(-ab)).reshape(8, -1).mean(axis=1) / LN2
    np.testing.assert_allclose(bpd, ref, rtol=1e-2)
    assert np.all(bpd > 0) and np.all((bpd > 2e-6) & (bpd < 5e-5))


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_vb_terms_of_a_perfect_eps_model(var_type):
    """L_{t-1} is KL(N(mu, beta-tilde) || N(mu, sigma^2)) (0 for fixed_small), and L_0 the
    discretised decoder of Eq. (13), per example by t."""
    x0 = (np.random.default_rng(8).integers(0, 256, (4, 3, 3, 2)) * 2 / 255 - 1).astype(np.float32)
    _, eps, t = batch(8, t=[0, 3, 500, 0])
    xt = noisy(x0, eps, t)
    bpd, pred = diffusion.vb_terms_bpd(
        LINEAR,
        eps,
        x0,
        xt,
        t,
        model_mean_type="epsilon",
        model_var_type=var_type,
        clip_denoised=False,
    )
    for i, s in enumerate(t):
        s = int(s)
        if s == 0:  # decoder: Gaussian at x_0 (coef1 = 1, coef2 = 0), sd sqrt(beta-tilde_1)
            dist = stats.norm(f64(x0[i]), math.sqrt(ref_sigma2(var_type, 0)))
            edges = (
                np.where(x0[i] > 0.999, np.inf, f64(x0[i]) + 1 / 255),
                np.where(x0[i] < -0.999, -np.inf, f64(x0[i]) - 1 / 255),
            )
            ref = -np.mean(np.log(dist.cdf(edges[0]) - dist.cdf(edges[1]))) / LN2
            assert float(bpd[i]) == pytest.approx(ref, rel=1e-3)
        else:
            post_var, sigma2 = ref_posterior(BETAS, s, 0.0, 0.0)[1], ref_sigma2(var_type, s)
            ref = 0.5 * (math.log(sigma2 / post_var) + post_var / sigma2 - 1) / LN2
            assert float(bpd[i]) == pytest.approx(ref, rel=1e-2, abs=1e-5)
    np.testing.assert_allclose(pred, x0, atol=1e-3)


# ------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["linear", "cosine", "quad", "sigmoid", "const", "jsd"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 10, 1000])
def test_one_step_of_everything_is_finite(name, num_timesteps):
    sched = schedules.make_schedule(name, num_timesteps)
    rng = np.random.default_rng(num_timesteps)
    x0 = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    xt, out, z = rng.standard_normal((3, 3, 4, 4, 1)).astype(np.float32)
    t = np.array([0, num_timesteps // 2, num_timesteps - 1], np.int32)
    for var_type in VAR_TYPES:
        for mean_type in MEAN_TYPES:
            kw = dict(
                model_mean_type=mean_type, clip_denoised=mean_type is not diffusion.ModelMeanType.V
            )
            results = [
                diffusion.p_sample_step(sched, out, xt, t, z, model_var_type=var_type, **kw),
                diffusion.vb_terms_bpd(sched, out, x0, xt, t, model_var_type=var_type, **kw),
                diffusion.ddim_step(sched, out, xt, t, t - 1, z, eta=1.0, **kw),
                diffusion.loss_weights(sched, t, weighting="min_snr", model_mean_type=mean_type),
                diffusion.prior_bpd(sched, x0),
            ]
            for leaf in jax.tree_util.tree_leaves(results):
                assert np.all(np.isfinite(leaf)), (name, num_timesteps, var_type, mean_type)


# ----------------------------------------------------------------------------- bad inputs


def test_enums_accept_their_values_and_name_bad_ones():
    assert diffusion.ModelMeanType("epsilon") is diffusion.ModelMeanType.EPSILON
    assert diffusion.ModelVarType("fixed_large") is diffusion.ModelVarType.FIXED_LARGE
    with pytest.raises(ValueError, match=r"'eps'.*'epsilon', 'x_start', 'v'"):
        diffusion.ModelMeanType("eps")
    with pytest.raises(ValueError, match=r"'learned'.*'fixed_small', 'fixed_large'"):
        diffusion.ModelVarType("learned")
    x0, eps, t = batch(9)
    with pytest.raises(ValueError, match="'eps'"):
        diffusion.training_target(LINEAR, x0, t, eps, model_mean_type="eps")
    with pytest.raises(ValueError, match="'snr'"):
        diffusion.loss_weights(LINEAR, t, weighting="snr", model_mean_type="epsilon")


def test_bad_shapes_raise_with_the_shapes_named():
    x0, eps, t = batch(10, shape=(2, 4, 4, 3))
    with pytest.raises(AssertionError, match=r"rank 2"):
        diffusion.q_sample(LINEAR, x0, t[:, None], eps)
    with pytest.raises(AssertionError, match=r"float32"):
        diffusion.q_sample(LINEAR, x0, t.astype(np.float32), eps)
    with pytest.raises(AssertionError, match=r"\(2, 4, 4, 3\).*\(2, 4, 4, 1\)"):
        diffusion.q_sample(LINEAR, x0, t, eps[..., :1])
    with pytest.raises(AssertionError, match=r"\(2, 4, 4, 3\).*\(3,\)"):
        diffusion.q_sample(LINEAR, x0, np.zeros(3, np.int32), eps)
    with pytest.raises(AssertionError, match=r"\(2, 4, 4, 3\).*\(2, 4, 4, 1\)"):
        diffusion.loss_simple(x0, eps[..., :1])
    with pytest.raises(AssertionError, match="weights"):
        diffusion.loss_simple(x0, eps, weights=np.ones(3, np.float32))
    with pytest.raises(AssertionError, match="t_prev"):
        diffusion.ddim_step(
            LINEAR, eps, x0, t, t[:1], eps, eta=0.0, model_mean_type="epsilon", clip_denoised=True
        )


def test_hybrid_loss_trains_the_mean_by_l_simple_and_the_variance_by_the_bound():
    """L_hybrid = L_simple + lambda T L_t (Nichol & Dhariwal 2021): the bound's gradient reaches
    the variance channels only (stop_gradient on the mean), and its value is vb_terms_bpd's."""
    x0, eps, t = batch(11, t=[3, 500, 999, 0])
    xt = noisy(x0, eps, t)
    rng = np.random.default_rng(12)
    output = jnp.asarray(
        np.concatenate(
            [eps + 0.1 * rng.standard_normal(eps.shape), rng.uniform(-1, 1, eps.shape)], -1
        ),
        jnp.float32,
    )
    kw = dict(model_mean_type="epsilon", vlb_weight=0.001)
    hybrid = lambda out: jnp.sum(diffusion.loss_hybrid(LINEAR, out, x0, xt, t, eps, **kw))
    simple = lambda out: jnp.sum(diffusion.loss_simple(out[..., :2], eps))
    g_hybrid, g_simple = jax.grad(hybrid)(output), jax.grad(simple)(output)
    np.testing.assert_allclose(g_hybrid[..., :2], g_simple[..., :2], rtol=1e-6, atol=1e-9)
    g_v = np.abs(np.asarray(g_hybrid[..., 2:]))
    assert g_v[t > 0].min() > 0  # the bound trains v ...
    assert g_v[t == 0].max() == 0  # ... except at index 0, where both ends are beta-tilde_1
    vb, _ = diffusion.vb_terms_bpd(
        LINEAR,
        output,
        x0,
        xt,
        t,
        model_mean_type="epsilon",
        model_var_type="learned_range",
        clip_denoised=False,
    )
    expected = diffusion.loss_simple(output[..., :2], eps) + 0.001 * T * vb
    np.testing.assert_allclose(
        diffusion.loss_hybrid(LINEAR, output, x0, xt, t, eps, **kw), expected, rtol=1e-6
    )
