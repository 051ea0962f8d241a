"""Tests of ddpm_jax.schedules: published formulas, the forward chain, and pytree behaviour.

Every expected value is computed independently here (python math / float64 numpy recursions),
never by calling the code under test a second way.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_jax import schedules

NAMES = ["linear", "cosine", "quad", "sigmoid", "const", "jsd"]
LENGTHS = [1, 2, 10, 1000]
FIELDS = [
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]

fast = settings(max_examples=25, deadline=None, derandomize=True)

# Random schedules: 1..40 betas anywhere in (0, 1), including very small and very large ones.
random_betas = st.lists(
    st.floats(min_value=1e-5, max_value=0.9, allow_nan=False), min_size=1, max_size=40
).map(np.array)


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------- published beta formulas


def test_linear_is_the_paper_schedule_at_1000_steps():
    betas = schedules.get_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    for i in [0, 1, 250, 500, 998, 999]:
        # Ho et al. 2020, Sec. 4: "increasing linearly from beta_1 = 1e-4 to beta_T = 0.02".
        assert betas[i] == pytest.approx(1e-4 + (0.02 - 1e-4) * i / 999, rel=1e-12)


@fast
@given(st.integers(2, 3000), st.data())
def test_linear_rescales_endpoints_by_1000_over_t(num_timesteps, data):
    betas = schedules.get_beta_schedule("linear", num_timesteps)
    start = 1e-4 * 1000 / num_timesteps
    end = min(0.02 * 1000 / num_timesteps, 0.999)
    i = data.draw(st.integers(0, num_timesteps - 1))
    assert betas[i] == pytest.approx(start + (end - start) * i / (num_timesteps - 1), rel=1e-10)
    assert betas[-1] < 1.0


def test_short_linear_schedules_still_end_near_pure_noise():
    for num_timesteps in [1, 2, 5, 10, 50]:
        betas = schedules.get_beta_schedule("linear", num_timesteps)
        assert math.prod(1.0 - b for b in betas) < 1e-2, num_timesteps


@fast
@given(st.integers(1, 2000), st.data())
def test_cosine_matches_nichol_dhariwal(num_timesteps, data):
    s = 0.008

    def f(step):  # Nichol & Dhariwal 2021, Eq. (17), before normalising by f(0)
        return math.cos((step / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = schedules.get_beta_schedule("cosine", num_timesteps)
    i = data.draw(st.integers(0, num_timesteps - 1))
    assert betas[i] == pytest.approx(min(1 - f(i + 1) / f(i), 0.999), rel=1e-9, abs=1e-15)
    # Before the clip, alpha_bar telescopes to f(t) / f(0).
    if betas[: i + 1].max() < 0.999:
        sched = schedules.DiffusionSchedule.from_betas(betas)
        assert float(sched.alphas_cumprod[i]) == pytest.approx(f(i + 1) / f(0), rel=1e-5)


def test_cosine_clips_the_last_beta():
    betas = schedules.get_beta_schedule("cosine", 1000)
    assert betas[-1] == 0.999 and betas.max() == 0.999


@pytest.mark.parametrize("num_timesteps", [2, 17, 1000])
def test_quad_has_linear_square_roots(num_timesteps):
    betas = schedules.get_beta_schedule("quad", num_timesteps)
    scale = 1000 / num_timesteps
    roots = np.sqrt(betas)
    assert roots[0] == pytest.approx(math.sqrt(1e-4 * scale), rel=1e-12)
    assert roots[-1] == pytest.approx(math.sqrt(min(0.02 * scale, 0.999)), rel=1e-12)
    np.testing.assert_allclose(np.diff(roots, 2), 0.0, atol=1e-12)


@pytest.mark.parametrize("num_timesteps", [2, 17, 1000])
def test_sigmoid_is_a_scaled_logistic_ramp(num_timesteps):
    betas = schedules.get_beta_schedule("sigmoid", num_timesteps)
    scale = 1000 / num_timesteps
    start, end = 1e-4 * scale, min(0.02 * scale, 0.999)
    for i in range(0, num_timesteps, max(1, num_timesteps // 7)):
        u = -6 + 12 * i / (num_timesteps - 1)
        assert betas[i] == pytest.approx(start + (end - start) / (1 + math.exp(-u)), rel=1e-12)
    assert np.all(np.diff(betas) > 0)


def test_const_and_jsd():
    np.testing.assert_array_equal(schedules.get_beta_schedule("const", 1000), 0.02)
    jsd = schedules.get_beta_schedule("jsd", 5, max_beta=1.0)
    np.testing.assert_allclose(jsd, [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1])
    # The default caps the final beta = 1 so that alpha_bar_T > 0.
    np.testing.assert_allclose(
        schedules.get_beta_schedule("jsd", 5), [1 / 5, 1 / 4, 1 / 3, 1 / 2, 0.999]
    )


# ------------------------------------------------------------------- forward chain q


@fast
@given(random_betas)
def test_closed_form_equals_the_iterated_chain(betas):
    """Composing q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t I) gives Eq. (4)."""
    sched = schedules.DiffusionSchedule.from_betas(betas)
    coef, var = 1.0, 0.0  # x_{-1} = x_0 exactly: mean coefficient 1, variance 0
    coefs, variances = [], []
    for b in betas:
        coef, var = math.sqrt(1 - b) * coef, (1 - b) * var + b  # one Gaussian step
        coefs.append(coef)
        variances.append(var)
    np.testing.assert_allclose(f64(sched.sqrt_alphas_cumprod), coefs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f64(sched.alphas_cumprod), np.square(coefs), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        f64(sched.sqrt_one_minus_alphas_cumprod), np.sqrt(variances), rtol=1e-5
    )
    np.testing.assert_allclose(
        f64(sched.log_one_minus_alphas_cumprod), np.log(variances), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(f64(sched.sqrt_recip_alphas_cumprod), 1 / np.array(coefs), rtol=1e-5)
    np.testing.assert_allclose(
        f64(sched.sqrt_recipm1_alphas_cumprod), np.sqrt(variances) / coefs, rtol=1e-5
    )


@fast
@given(random_betas)
def test_posterior_coefficients_are_bayes_rule(betas):
    """q(x_{t-1} | x_t, x_0) is the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0), Eqs. 6-7."""
    sched = schedules.DiffusionSchedule.from_betas(betas)
    coef1, coef2, post_var = [1.0], [0.0], [0.0]  # t = 0: x_{-1} is x_0 itself
    prior_coef, prior_var = 1.0, 0.0  # q(x_{t-1} | x_0) = N(prior_coef x_0, prior_var)
    for t in range(len(betas)):
        b = betas[t]
        if t > 0:
            # Precisions add; the mean is precision-weighted: x_t / sqrt(1-b) has variance
            # b / (1 - b) as a measurement of x_{t-1}.
            precision = 1 / prior_var + (1 - b) / b
            coef1.append(prior_coef / prior_var / precision)
            coef2.append(math.sqrt(1 - b) / b / precision)
            post_var.append(1 / precision)
        prior_coef, prior_var = math.sqrt(1 - b) * prior_coef, (1 - b) * prior_var + b
    np.testing.assert_allclose(f64(sched.posterior_mean_coef1), coef1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f64(sched.posterior_mean_coef2), coef2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f64(sched.posterior_variance), post_var, rtol=1e-5, atol=1e-9)
    clipped = np.log([post_var[1] if len(betas) > 1 else betas[0]] + post_var[1:])
    np.testing.assert_allclose(f64(sched.posterior_log_variance_clipped), clipped, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_alpha_bar_and_snr_strictly_decrease(name):
    for num_timesteps in LENGTHS:
        sched = schedules.make_schedule(name, num_timesteps)
        ab = f64(sched.alphas_cumprod)
        assert np.all((ab > 0) & (ab < 1)), (name, num_timesteps)
        assert np.all(np.diff(ab) < 0), (name, num_timesteps)
        assert sched.alphas_cumprod_prev[0] == 1.0
        np.testing.assert_array_equal(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
        snr = f64(sched.sqrt_alphas_cumprod) ** 2 / f64(sched.sqrt_one_minus_alphas_cumprod) ** 2
        assert np.all(np.diff(snr) < 0), (name, num_timesteps)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_timesteps", LENGTHS)
def test_every_buffer_is_finite_float32(name, num_timesteps):
    sched = schedules.make_schedule(name, num_timesteps)
    assert sched.num_timesteps == num_timesteps
    for field in FIELDS:
        value = getattr(sched, field)
        assert value.dtype == jnp.float32 and value.shape == (num_timesteps,), field
        assert np.all(np.isfinite(value)), (name, num_timesteps, field)


def test_one_step_chain_uses_beta_for_the_clipped_log_variance():
    sched = schedules.DiffusionSchedule.from_betas([0.3])
    assert sched.posterior_variance[0] == 0.0
    assert sched.posterior_log_variance_clipped[0] == pytest.approx(math.log(0.3), rel=1e-6)


def test_fields_are_exactly_the_contract():
    assert [f.name for f in schedules.DiffusionSchedule.__dataclass_fields__.values()] == FIELDS


def test_make_schedule_is_from_betas_of_get_beta_schedule():
    a = schedules.make_schedule("cosine", 50, s=0.02)
    b = schedules.DiffusionSchedule.from_betas(schedules.get_beta_schedule("cosine", 50, s=0.02))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------- as a pytree


def test_schedule_passes_through_jit_pmap_and_scan():
    sched = schedules.make_schedule("linear", 100)
    t = jnp.array([0, 50, 99])

    @jax.jit
    def gather(s, t):
        assert s.num_timesteps == 100  # static under tracing
        return s.sqrt_alphas_cumprod[t] + jnp.zeros(s.num_timesteps)[t]

    np.testing.assert_array_equal(gather(sched, t), sched.sqrt_alphas_cumprod[t])

    n = jax.local_device_count()
    per_device = jax.pmap(lambda s, t: s.betas[t], in_axes=(None, 0))(sched, jnp.arange(n)[:, None])
    np.testing.assert_array_equal(per_device[:, 0], sched.betas[:n])
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), sched)
    total = jax.pmap(lambda s: jnp.sum(s.betas))(replicated)
    np.testing.assert_allclose(total, np.full(n, np.sum(sched.betas)), rtol=1e-6)

    def body(carry, t):
        s, acc = carry
        return (s, acc * s.alphas[t]), s.alphas_cumprod[t]

    (out_sched, prod), cumprods = jax.lax.scan(body, (sched, jnp.float32(1)), jnp.arange(100))
    assert prod == pytest.approx(float(sched.alphas_cumprod[-1]), rel=1e-5)
    np.testing.assert_array_equal(cumprods, sched.alphas_cumprod)
    jax.tree_util.tree_map(np.testing.assert_array_equal, out_sched, sched)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("cosinus", 10), "cosinus"),
        (("linear", 0), "0"),
        (("linear", -3), "-3"),
        (("linear", 2.5), "2.5"),
        (("linear", True), "True"),
        (("const", 1000, {"beta": 0.0}), r"0\.0"),
        (("linear", 10, {"beta_start": -0.1}), r"-0\.1"),
        (("const", 1, {"beta": 0.0015, "max_beta": 1.5}), r"1\.5"),
    ],
)
def test_bad_schedule_arguments_raise_value_error(args, match):
    name, num_timesteps, *kwargs = args
    with pytest.raises(ValueError, match=match):
        schedules.get_beta_schedule(name, num_timesteps, **(kwargs[0] if kwargs else {}))


@pytest.mark.parametrize(
    ("betas", "match"),
    [
        ([0.1, 0.0], r"betas\[1\] = 0\.0"),
        ([0.1, 1.2], r"1\.2"),
        ([float("nan")], "nan"),
        ([], r"\(0,\)"),
        ([[0.1]], r"\(1, 1\)"),
    ],
)
def test_bad_betas_raise_value_error(betas, match):
    with pytest.raises(ValueError, match=match):
        schedules.DiffusionSchedule.from_betas(betas)
