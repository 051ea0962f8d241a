"""Tests of ddpm_jax.evaluation: the bound in bits/dim, the eval loop and command, digits quality.

The bound is checked against a case with a known answer: Gaussian data x_0 ~ N(mu, s^2) (per
dimension, on the 8-bit grid) and the exact denoiser for it. There the exact negative
log-likelihood of each example is the probability of its 8-bit bin under N(mu, s^2), and the
expected bound has a closed form: each L_{t-1} is a KL between Gaussians whose mean gap is
coef1_t^2 Var(x_0 | x_t), and L_0 is a Gaussian density times the bin width 2/255.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from scipy import stats

from configs import test as test_config
from ddpm_jax import cli, diffusion, digits, likelihood, schedules
from ddpm_jax.commands import evaluate
from ddpm_jax.commands import sample as sample_command

T = 50
SCHEDULE = schedules.make_schedule("linear", T)
BETAS = schedules.get_beta_schedule("linear", T)  # float64
LN2 = math.log(2.0)
BIN = 2.0 / 255.0  # the width of an 8-bit bin on [-1, 1]

# The Gaussian data: small and far from the edges (|mu| + 4 s <= 1), so the two open-ended edge
# bins hold no mass to speak of and the continuous closed form applies.
DIM = 32
MU = np.linspace(-0.2, 0.2, DIM)
S = 0.2


# ------------------------------------------------------------------------ the Gaussian case


def gaussian_eps(mu, s, schedule=SCHEDULE):
    """The optimal eps-denoiser for x_0 ~ N(mu, s^2): E[eps | x_t], linear in x_t."""

    def denoise_fn(x_t, t):
        ab = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1.0 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * s * s + 1.0 - ab)

    return denoise_fn


def gaussian_data(seed: int, n: int):
    """x_0 [n, DIM] on the 8-bit grid and its exact NLL in bits/dim [n] (float64, scipy)."""
    rng = np.random.default_rng(seed)
    k = np.clip(np.rint((MU + S * rng.standard_normal((n, DIM)) + 1.0) * 127.5), 0, 255)
    lo = np.where(k == 0, -np.inf, (k - 0.5) / 127.5 - 1.0)
    hi = np.where(k == 255, np.inf, (k + 0.5) / 127.5 - 1.0)
    prob = stats.norm.cdf(hi, MU, S) - stats.norm.cdf(lo, MU, S)
    nll_bpd = -np.log(prob).sum(axis=1) / (DIM * LN2)
    return (k / 127.5 - 1.0).astype(np.float32), nll_bpd


def expected_bound_bpd(var_type: str, frac: float = 0.0) -> float:
    """E[bound] in bits/dim for the Gaussian data and exact denoiser (float64, closed form);
    "learned_range": log sigma^2 = frac log beta + (1 - frac) log beta-tilde (t > 0)."""
    betas = BETAS
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)  # beta-tilde
    coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
    v = S * S
    var_x0 = v * (1.0 - ab) / (ab * v + 1.0 - ab)  # Var(x_0 | x_t), per index
    sigma2 = betas if var_type == "fixed_large" else post_var
    if var_type == "learned_range":
        sigma2 = np.exp(frac * np.log(betas) + (1.0 - frac) * np.log(np.maximum(post_var, 1e-300)))
    # L_T: E KL(N(sqrt(ab) x_0, 1 - ab) || N(0, 1)).
    prior = 0.5 * ((1 - ab[-1]) + ab[-1] * (MU**2 + v) - 1 - np.log(1 - ab[-1]))
    # L_{t-1}, t > 1: KL of the posterior (variance beta-tilde) against N(mu_theta, sigma^2).
    r = post_var[1:] / sigma2[1:]
    kls = 0.5 * (r - 1 - np.log(r) + coef1[1:] ** 2 * var_x0[1:] / sigma2[1:])
    # L_0: the decoder N(E[x_0 | x_1], beta-tilde at index 1) times the bin width.
    s0 = post_var[1]
    decoder = 0.5 * np.log(2 * np.pi * s0) + var_x0[0] / (2 * s0) - np.log(BIN)
    return float(np.mean(prior + kls.sum() + decoder) / LN2)


def run_bound(x0, var_type, rng=None, clip_denoised=False):
    fn = jax.jit(
        lambda key, x: likelihood.calc_bpd_loop(
            key,
            gaussian_eps(MU, S),
            SCHEDULE,
            x,
            model_mean_type="epsilon",
            model_var_type=var_type,
            clip_denoised=clip_denoised,
        )
    )
    out = fn(jax.random.key(1) if rng is None else rng, jnp.asarray(x0))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_bound_is_above_the_exact_nll_and_close_to_its_closed_form(var_type):
    """E[bound] = NLL + KL(q(x_1:T | x_0) || p(x_1:T | x_0)) >= NLL, and here the gap is known.

    The bound and the exact NLL are averaged over the same 2,048 examples; the gap is what the
    fixed reverse variances cost (sigma_t^2 = beta_t or beta-tilde_t instead of the true
    Var(x_{t-1} | x_t)) plus the decoder's beta-tilde_1 variance: 0.21 bits/dim (fixed_large)
    and 1.9 bits/dim (fixed_small) at T = 50. The Monte-Carlo gap must match the closed form
    within 4 standard errors (about 0.02 / 0.06 bits) plus 0.01 bits for the continuous
    approximation of the decoder's 8-bit bins (its error is ~(bin / sigma_0)^2 / 24 ~ 0.001).
    """
    x0, exact = gaussian_data(seed=0, n=2048)
    out = run_bound(x0, var_type)
    gap = out.total_bpd - exact
    se = gap.std() / math.sqrt(len(gap))
    entropy = (0.5 * np.log(2 * np.pi * np.e * S * S) - np.log(BIN)) / LN2
    expected_gap = expected_bound_bpd(var_type) - entropy

    assert gap.mean() > 10 * se  # above the exact NLL, far beyond the noise
    assert abs(gap.mean() - expected_gap) < 4 * se + 0.01, (gap.mean(), expected_gap, se)
    # The exact NLL itself is the entropy of the discretised N(mu, s^2).
    assert abs(exact.mean() - entropy) < 4 * exact.std() / math.sqrt(len(exact)) + 1e-3


def learned_range_eps(v: float):
    """The exact eps-denoiser with C more channels holding the variance value v everywhere."""
    eps_fn = gaussian_eps(MU, S)
    return lambda x_t, t: jnp.concatenate([eps_fn(x_t, t), jnp.full_like(x_t, v)], axis=-1)


def test_learned_range_bound_is_the_fixed_bounds_at_the_ends_and_closed_form_between():
    """v = -1 is fixed_small's bound and v = +1 fixed_large's, term by term (same keys); an
    intermediate v, log sigma^2 = frac log beta + (1 - frac) log beta-tilde, has the closed form
    of the bound with that sigma^2 (measured at T = 50, v = 0.3: gap over the exact NLL
    within 4 standard errors of the closed form)."""
    x0, exact = gaussian_data(seed=0, n=2048)
    bound = jax.jit(
        lambda key, x, v: likelihood.calc_bpd_loop(
            key,
            learned_range_eps(v),
            SCHEDULE,
            x,
            model_mean_type="epsilon",
            model_var_type="learned_range",
            clip_denoised=False,
        )
    )
    rng = jax.random.key(1)
    learned = lambda v: jax.tree.map(
        lambda a: np.asarray(a, np.float64), bound(rng, jnp.asarray(x0), jnp.float32(v))
    )
    for v, var_type in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        np.testing.assert_allclose(
            learned(v).terms_bpd, run_bound(x0, var_type, rng).terms_bpd, rtol=1e-5, atol=1e-7
        )
    v = 0.3
    out = learned(v)
    gap = out.total_bpd - exact
    se = gap.std() / math.sqrt(len(gap))
    entropy = (0.5 * np.log(2 * np.pi * np.e * S * S) - np.log(BIN)) / LN2
    expected_gap = expected_bound_bpd("learned_range", frac=(v + 1.0) / 2.0) - entropy
    assert abs(gap.mean() - expected_gap) < 4 * se + 0.01, (gap.mean(), expected_gap, se)
    # Each KL term is convex in log sigma^2, so the bound at frac is below the worse end.
    ends = [expected_bound_bpd(t) for t in ("fixed_small", "fixed_large")]
    assert expected_bound_bpd("learned_range", (v + 1.0) / 2.0) < max(ends)


def test_terms_sum_to_the_total_and_shapes():
    x0, _ = gaussian_data(seed=1, n=64)
    out = run_bound(x0, "fixed_large")
    assert out.total_bpd.shape == (64,) and out.prior_bpd.shape == (64,)
    assert out.terms_bpd.shape == (64, T) and out.mse.shape == (64, T)
    np.testing.assert_allclose(
        out.total_bpd, out.prior_bpd + out.terms_bpd.sum(axis=1), rtol=1e-6, atol=1e-6
    )
    assert np.all(out.terms_bpd > 0)
    # The MSE of the exact x_0 prediction is Var(x_0 | x_t) = s^2 (1 - ab) / (ab s^2 + 1 - ab)
    # (2,048 values per t: a relative standard error of 3%).
    ab = np.cumprod(1.0 - BETAS)
    var_x0 = S * S * (1.0 - ab) / (ab * S * S + 1.0 - ab)
    np.testing.assert_allclose(out.mse.mean(axis=0), var_x0, rtol=0.15)


def test_terms_are_nats_over_d_ln2():
    """Prior, one KL term and the decoder, recomputed in float64 nats from the same noise."""
    x0, _ = gaussian_data(seed=2, n=3)
    rng = jax.random.key(7)
    out = run_bound(x0, "fixed_large", rng=rng)
    x = x0.astype(np.float64)
    ab = np.cumprod(1.0 - BETAS)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = BETAS * (1.0 - ab_prev) / (1.0 - ab)

    def x_t_and_x0_hat(t):
        eps = np.asarray(likelihood.timestep_noise(rng, t, x0.shape), np.float64)
        x_t = np.sqrt(ab[t]) * x + np.sqrt(1 - ab[t]) * eps
        eps_hat = np.sqrt(1 - ab[t]) * (x_t - np.sqrt(ab[t]) * MU) / (ab[t] * S * S + 1 - ab[t])
        return x_t, (x_t - np.sqrt(1 - ab[t]) * eps_hat) / np.sqrt(ab[t])

    def bpd(nats):  # [n, DIM] nats -> [n] bits/dim
        return nats.sum(axis=1) / (DIM * LN2)

    prior = 0.5 * ((1 - ab[-1]) + ab[-1] * x**2 - 1 - np.log(1 - ab[-1]))
    np.testing.assert_allclose(out.prior_bpd, bpd(prior), rtol=1e-3, atol=1e-8)

    t = 17
    x_t, x0_hat = x_t_and_x0_hat(t)
    coef1 = BETAS[t] * np.sqrt(ab_prev[t]) / (1 - ab[t])
    coef2 = (1 - ab_prev[t]) * np.sqrt(1 - BETAS[t]) / (1 - ab[t])
    mean_q, mean_p = coef1 * x + coef2 * x_t, coef1 * x0_hat + coef2 * x_t
    kl = stats_normal_kl(mean_q, post_var[t], mean_p, BETAS[t])
    np.testing.assert_allclose(out.terms_bpd[:, t], bpd(kl), rtol=1e-3)

    _, x0_hat = x_t_and_x0_hat(0)
    scale = math.sqrt(post_var[1])
    cdf = lambda z: stats.norm.cdf(z, x0_hat, scale)
    nll = -np.log(cdf(x + BIN / 2) - cdf(x - BIN / 2))  # no example sits in an edge bin
    np.testing.assert_allclose(out.terms_bpd[:, 0], bpd(nll), rtol=1e-3)


def stats_normal_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) in nats, float64."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


# ----------------------------------------------------------------------------------- keys


def test_every_timestep_draws_its_own_noise():
    rng = jax.random.key(3)
    shape = (2, 4)
    noise = np.stack([np.asarray(likelihood.timestep_noise(rng, t, shape)) for t in range(T)])
    flat = noise.reshape(T, -1)
    same = np.all(
        np.isclose(flat[:, None], flat[None]) | np.isclose(flat[:, None], -flat[None]), -1
    )
    assert np.array_equal(same, np.eye(T, dtype=bool))  # no two timesteps share (or mirror) eps
    # The scan uses exactly these draws: one term recomputed from them matches (see above) and a
    # different key changes every term.
    x0, _ = gaussian_data(seed=3, n=4)
    a = run_bound(x0, "fixed_large", rng=jax.random.key(0)).terms_bpd
    b = run_bound(x0, "fixed_large", rng=jax.random.key(1)).terms_bpd
    assert np.all(a[:, 1:] != b[:, 1:])


def test_per_example_keys_make_an_example_independent_of_its_batch():
    x0, _ = gaussian_data(seed=4, n=5)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(5), jnp.arange(5))
    whole = run_bound(x0, "fixed_large", rng=keys)
    part = run_bound(x0[2:4], "fixed_large", rng=keys[2:4])
    np.testing.assert_allclose(part.total_bpd, whole.total_bpd[2:4], rtol=1e-6)
    np.testing.assert_allclose(part.terms_bpd, whole.terms_bpd[2:4], rtol=1e-5, atol=1e-7)


def test_key_errors():
    with pytest.raises(TypeError, match="typed key"):
        likelihood.timestep_noise(jax.random.key_data(jax.random.key(0)), 0, (2, 3))
    with pytest.raises(ValueError, match="one key per example"):
        likelihood.timestep_noise(jax.random.split(jax.random.key(0), 3), 0, (2, 3))


# ---------------------------------------------------------------------------- the eval loop


def _gaussian_apply(variables, x_t, t, train=False):
    """A stand-in for a flax apply: the exact eps for N(mu, s^2) data, params {"mu", "s"}."""
    del train
    p = variables["params"]
    return gaussian_eps(p["mu"], p["s"], schedule=_LOOP_SCHEDULE)(x_t, t)


_LOOP_SCHEDULE = schedules.make_schedule("linear", 20)


def _evaluate(batch_size, num_examples):
    return likelihood.evaluate_bpd(
        jax.random.key(0),
        _gaussian_apply,
        {"mu": jnp.float32(-0.5), "s": jnp.float32(0.5)},
        _LOOP_SCHEDULE,
        diffusion.ModelOutput("epsilon", "fixed_large"),
        test_config.get_config().data,
        batch_size=batch_size,
        split="test",
        num_examples=num_examples,
    )


def test_eval_loop_masks_padding_and_does_not_depend_on_the_batch_size():
    """10 examples in 2 batches of 8 (6 padded) or 1 of 16 (6 padded): the same figures."""
    two = _evaluate(batch_size=8, num_examples=10)
    one = _evaluate(batch_size=16, num_examples=10)
    for s in (two, one):
        assert s.num_examples == 10
        np.testing.assert_array_equal(s.example_index, np.arange(10))
        assert s.terms_bpd.shape == (20,) and s.mse.shape == (20,)
        # Padded examples (blank images) would pull the mean: it is the mean of the 10 only.
        np.testing.assert_allclose(s.bpd, s.example_bpd.mean(), rtol=1e-6)
        np.testing.assert_allclose(s.bpd, s.prior_bpd + s.decoder_bpd + s.diffusion_bpd, rtol=1e-6)
    np.testing.assert_allclose(two.example_bpd, one.example_bpd, rtol=1e-5)
    np.testing.assert_allclose(two.terms_bpd, one.terms_bpd, rtol=1e-5)
    assert two.to_dict()["num_examples"] == 10 and len(two.to_dict()["terms_bpd"]) == 20


def test_result_paths_stay_inside_the_workdir(tmp_path):
    path = evaluate.result_path(str(tmp_path), "bpd", "../../etc/x[:90%]", "step3")
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "eval")
    assert os.path.basename(path) == "bpd-etc_x_90-step3.json"


def test_eval_command_prints_and_writes_the_nll(workdir, capsys):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(workdir=workdir, num_examples=12, batch_size=8, split="test"):
        cli.main(["ddpm-jax", "eval"])
    path = os.path.join(workdir, "eval", "bpd-test-step0-n12-seed0.json")
    assert path in capsys.readouterr().out
    with open(path) as f:
        figures = json.load(f)
    assert figures["num_examples"] == 12 and figures["checkpoint_step"] == 0
    assert len(figures["terms_bpd"]) == 20 and np.isfinite(figures["bpd"])
    parts = figures["prior_bpd"] + figures["decoder_bpd"] + figures["diffusion_bpd"]
    assert figures["bpd"] == pytest.approx(parts, rel=1e-6)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        evaluate.evaluate_checkpoint(str(tmp_path), num_examples=8, batch_size=8)


# ------------------------------------------------------------------------ digits quality


def _digits(split):
    return digits.digits_split(split)


def test_real_test_digits_score_high_and_even():
    q = digits.sample_quality(_digits("test").images)
    assert q["num_samples"] == 297 and sum(q["class_counts"]) == 297
    assert q["confident_share"] > 0.9 and q["evenness"] > 0.95
    assert q["reference"]["accuracy"] > 0.97
    assert q["reference"]["confident_share"] == q["confident_share"]


def test_uniform_noise_scores_low():
    noise = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1)).astype(np.uint8)
    q = digits.sample_quality(noise)
    assert q["confident_share"] < 0.05 and q["mean_confidence"] < 0.6


def test_one_repeated_digit_is_not_even():
    source = _digits("test")
    three = source.images[np.flatnonzero(source.labels == 3)[0]]
    q = digits.sample_quality(np.repeat(three[None], 100, axis=0))
    assert q["class_counts"][3] == 100 and q["evenness"] == 0.0
    assert q["confident_share"] == 1.0


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((4, 8, 8, 1), np.float32),
        np.zeros((4, 16, 16, 1), np.uint8),
        np.zeros((0, 8, 8, 1), np.uint8),
    ],
)
def test_quality_refuses_other_images(images):
    with pytest.raises(ValueError):
        digits.sample_quality(images)


def test_quality_of_a_sample_directory(tmp_path):
    samples = str(tmp_path / "generated")
    os.makedirs(samples)
    images = _digits("test").images
    sample_command.write_npz_atomically(
        os.path.join(samples, "samples_00000.npz"), arr_0=images[:40]
    )
    sample_command.write_npz_atomically(
        os.path.join(samples, "samples_00001.npz"), arr_0=images[40:60]
    )
    figures, path = evaluate.evaluate_samples(str(tmp_path), samples)
    expected = digits.sample_quality(images[:60])
    assert figures["num_samples"] == 60 and figures["class_counts"] == expected["class_counts"]
    assert path.startswith(os.path.join(str(tmp_path), "eval"))
    with open(path) as f:
        assert json.load(f)["confident_share"] == expected["confident_share"]
    with pytest.raises(FileNotFoundError):
        evaluate.sample_dir_quality(str(tmp_path))


def test_ddpm_mean_types_share_the_bound():
    """The same exact model written as x_0- or v-prediction gives the same bound."""
    x0, _ = gaussian_data(seed=5, n=4)
    eps_fn = gaussian_eps(MU, S)
    as_x0 = lambda x_t, t: diffusion.predict_start_from_noise(SCHEDULE, x_t, t, eps_fn(x_t, t))

    def bound(fn, mean_type):
        return likelihood.calc_bpd_loop(
            jax.random.key(2),
            fn,
            SCHEDULE,
            jnp.asarray(x0),
            model_mean_type=mean_type,
            model_var_type="fixed_large",
            clip_denoised=False,
        ).total_bpd

    np.testing.assert_allclose(bound(as_x0, "x_start"), bound(eps_fn, "epsilon"), rtol=1e-4)
