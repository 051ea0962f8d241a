"""The variational bound in bits/dim (Ho et al. 2020, Eq. 5), per example and over a split.

For each example, every term of the bound

    L = L_T + sum_{t>1} L_{t-1} + L_0        (Eq. 5; L_0 the discretised decoder, Eq. 13)

is evaluated as one `lax.scan` over the T timestep indices; each term draws its own x_t ~
q(x_t | x_0). Noise: the term at index t uses eps = normal(fold_in(key, t)); `key` is one key for
the batch, or one key per example (then an example's bound does not depend on the batch it is
in). The eval loop gives example i of the split the key fold_in(rng, i), so its numbers do not
depend on the batch size, nor on the number of devices or hosts. Bits/dim: nats / (D ln 2),
D = H * W * C.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import diffusion, input_pipeline, loop_utils, parallel, sampling
from ddpm_jax.schedules import DiffusionSchedule


class BpdTerms(NamedTuple):
    """The bound of each example, term by term, in bits/dim (B examples, T timesteps)."""

    total_bpd: jax.Array  # [B]: prior_bpd + sum of terms_bpd
    terms_bpd: jax.Array  # [B, T]: index t holds L_t (index 0: the decoder L_0, Eq. 13)
    prior_bpd: jax.Array  # [B]: L_T = KL(q(x_T | x_0) || N(0, I))
    mse: jax.Array  # [B, T]: mean squared error of the x_0 predicted from x_t


# --------------------------------------------------------------------------------------------
# The bound of one batch.
# --------------------------------------------------------------------------------------------


def _check_key(rng: jax.Array) -> None:
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        raise TypeError(f"rng must be a typed key (jax.random.key), got {rng.dtype} {rng.shape}")


def timestep_noise(rng: jax.Array, t, shape, dtype=jnp.float32) -> jax.Array:
    """The eps [shape] that makes x_t for the term at timestep index t.

    Args:
      rng: one key (eps = normal(fold_in(rng, t), shape)), or keys [B] with B = shape[0], one per
        example (example i's eps = normal(fold_in(rng[i], t), shape[1:])).
      t: int timestep index (a scalar, possibly traced).
      shape: [B, ...] of x_start.
    """
    _check_key(rng)
    if rng.ndim == 0:
        return jax.random.normal(jax.random.fold_in(rng, t), tuple(shape), dtype)
    if rng.shape != tuple(shape[:1]):
        raise ValueError(f"need one key per example: keys {rng.shape} for x of shape {shape}")
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, t)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(keys)


def calc_bpd_loop(
    rng: jax.Array,
    denoise_fn: sampling.DenoiseFn,
    schedule: DiffusionSchedule,
    x_start: jax.Array,
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool = True,
) -> BpdTerms:
    """Every term of the variational bound of each example, in bits/dim (Eq. 5).

    One `lax.scan` over t = 0 .. T-1: x_t = q_sample(x_0, t, eps_t) with eps_t from
    `timestep_noise(rng, t)` (a fresh key per t, never reused), then `diffusion.vb_terms_bpd`
    (L_{t-1} as a KL between Gaussians, L_0 as the discretised decoder) and the MSE of the
    predicted x_0; L_T comes from `diffusion.prior_bpd`. Wrap in jax.jit (the keyword
    arguments are static).

    Args:
      rng: a key, or keys [B] (one per example); see `timestep_noise`.
      denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...] (eps, x_0 or v), with C
        more channels (the variance values) for model_var_type "learned_range".
      schedule: the forward process (T = schedule.num_timesteps terms).
      x_start: [B, ...] data in [-1, 1] on the 8-bit grid (for L_0 to be a likelihood).
      model_mean_type / model_var_type: diffusion.ModelMeanType / ModelVarType (or values).
      clip_denoised: clip the predicted x_0 to [-1, 1] (as the paper's evaluation did).

    Returns:
      BpdTerms(total_bpd [B], terms_bpd [B, T], prior_bpd [B], mse [B, T]).
    """
    mean_type = diffusion.ModelMeanType(model_mean_type)
    var_type = diffusion.ModelVarType(model_var_type)
    learned = diffusion.learns_variance(var_type)  # the output has 2C channels: mean, then v
    if x_start.ndim < 2:
        raise ValueError(f"x_start must be [B, ...] with B examples, got shape {x_start.shape}")
    batch = x_start.shape[0]

    def term(carry, t):
        t_vec = jnp.full((batch,), t, jnp.int32)
        noise = timestep_noise(rng, t, x_start.shape, x_start.dtype)
        x_t = diffusion.q_sample(schedule, x_start, t_vec, noise)
        model_output = denoise_fn(x_t, t_vec)
        expected = (*x_t.shape[:-1], x_t.shape[-1] * (2 if learned else 1))
        if model_output.shape != expected:
            raise ValueError(f"denoise_fn returned {model_output.shape}; expected {expected}")
        bpd, pred_xstart = diffusion.vb_terms_bpd(
            schedule,
            model_output.astype(x_t.dtype),
            x_start,
            x_t,
            t_vec,
            model_mean_type=mean_type,
            model_var_type=var_type,
            clip_denoised=clip_denoised,
        )
        mse = jnp.mean(jnp.square(pred_xstart - x_start), axis=tuple(range(1, x_start.ndim)))
        return carry, (bpd, mse)

    ts = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    _, (terms_tb, mse_tb) = jax.lax.scan(term, None, ts)
    terms_bpd, mse = terms_tb.T, mse_tb.T
    prior_bpd = diffusion.prior_bpd(schedule, x_start)
    total_bpd = prior_bpd + jnp.sum(terms_bpd, axis=1)
    return BpdTerms(total_bpd, terms_bpd, prior_bpd, mse)


# --------------------------------------------------------------------------------------------
# On every local device, and over a split.
# --------------------------------------------------------------------------------------------


def _device_bpd(
    params, rng, batch, *, apply_fn, schedule, output, clip_denoised, class_conditional, axis_name
):
    """One device's batch: per-example keys fold_in(rng, index); masked sums psum-ed."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, batch["index"])
    labels = batch["label"] if class_conditional else None
    denoise_fn = sampling.make_denoise_fn(apply_fn, params, labels=labels)
    out = calc_bpd_loop(
        keys,
        denoise_fn,
        schedule,
        batch["image"],
        model_mean_type=output.mean_type,
        model_var_type=output.var_type,
        clip_denoised=clip_denoised,
    )
    mask = batch["mask"]

    def masked_sum(values):  # where, not a product: a padded example never adds a NaN
        keep = mask.reshape(mask.shape + (1,) * (values.ndim - 1))
        return jnp.sum(jnp.where(keep, values, 0.0), axis=0)

    sums = {
        "count": jnp.sum(mask.astype(jnp.float32)),
        "total_bpd": masked_sum(out.total_bpd),
        "prior_bpd": masked_sum(out.prior_bpd),
        "terms_bpd": masked_sum(out.terms_bpd),
        "mse": masked_sum(out.mse),
    }
    return jax.lax.psum(sums, axis_name), out.total_bpd


def make_p_calc_bpd(
    apply_fn: Callable,
    schedule: DiffusionSchedule,
    output: diffusion.ModelOutput,
    *,
    clip_denoised: bool = True,
    class_conditional: bool = False,
    parallelism: parallel.Parallelism = parallel.Parallelism.PMAP,
) -> Callable:
    """The bound of a batch on every device: `calc_bpd_loop` wrapped over the device axis.

    Returns:
      p_bpd(params_replicated, rng, batch) -> (sums, total_bpd [D, b]). batch: {"image" [D, b,
      H, W, C], "label" int32 [D, b], "index" int32 [D, b], "mask" bool [D, b]}; example k uses
      the key fold_in(rng, index_k). sums (replicated, over the masked examples of all
      devices of all hosts): {"count", "total_bpd", "prior_bpd", "terms_bpd" [T], "mse" [T]}.
      The arguments as `parallel.Wrapper(parallelism)` lays them out (params REPLICATED, rng
      SAME, batch PER_DEVICE); read sums with `parallel.first_replica`.
    """
    device_fn = functools.partial(
        _device_bpd,
        apply_fn=apply_fn,
        schedule=schedule,
        output=output,
        clip_denoised=clip_denoised,
        class_conditional=class_conditional,
        axis_name=parallel.AXIS,
    )
    place = parallel.Place
    return parallel.Wrapper(parallelism).wrap(
        device_fn,
        in_places=(place.REPLICATED, place.SAME, place.PER_DEVICE),
        out_places=(place.REPLICATED, place.PER_DEVICE),
    )


@dataclasses.dataclass(frozen=True)
class BpdSummary:
    """Means over the evaluated examples of a split, in bits/dim."""

    num_examples: int
    bpd: float  # the bound, the mean of total_bpd: an upper bound on the NLL
    prior_bpd: float  # L_T
    terms_bpd: np.ndarray  # float64 [T]: L_t per index t (index 0: the decoder L_0)
    mse: np.ndarray  # float64 [T]: x_0 MSE per t
    example_index: np.ndarray  # int64 [n]: this host's examples (indices into the split)
    example_bpd: np.ndarray  # float32 [n]: their total_bpd

    @property
    def decoder_bpd(self) -> float:
        """L_0, the discretised decoder (Eq. 13)."""
        return float(self.terms_bpd[0])

    @property
    def diffusion_bpd(self) -> float:
        """The sum of the KL terms L_1 .. L_{T-1}."""
        return float(np.sum(self.terms_bpd[1:]))

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-able values (no per-example arrays)."""
        return {
            "num_examples": self.num_examples,
            "bpd": self.bpd,
            "prior_bpd": self.prior_bpd,
            "decoder_bpd": self.decoder_bpd,
            "diffusion_bpd": self.diffusion_bpd,
            "terms_bpd": [float(v) for v in self.terms_bpd],
            "mse": [float(v) for v in self.mse],
        }


def _device_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays the pmap-ed step takes; the int64 index as int32 (padding: index 0)."""
    return {
        "image": batch["image"],
        "label": batch["label"],
        "index": np.maximum(batch["index"], 0).astype(np.int32),
        "mask": batch["mask"],
    }


def evaluate_bpd(
    rng: jax.Array,
    apply_fn: Callable,
    params,
    schedule: DiffusionSchedule,
    output: diffusion.ModelOutput,
    config_data: ml_collections.ConfigDict,
    *,
    batch_size: int,
    split: str | None = None,
    num_examples: int | None = None,
    clip_denoised: bool = True,
    class_conditional: bool = False,
    parallelism: parallel.Parallelism = parallel.Parallelism.PMAP,
) -> BpdSummary:
    """The mean bound in bits/dim over the first `num_examples` of `split` (all by default).

    Every host must call this (the pmap spans all devices); padded examples of the last batch
    are masked out. Example i of the split uses the key fold_in(rng, i).

    Args:
      rng: a key.
      apply_fn, params: the flax apply and (unreplicated) parameters, e.g. the EMA ones.
      schedule: the forward process the model was trained with.
      config_data: the config's data section (see input_pipeline.make_eval_iterator).
      batch_size: global batch, a multiple of the number of devices.
      split: default config_data.eval_split.
      num_examples: evaluate the first this many; None: the whole split.
      output: the model-output parameterisation (mean and variance types).
      clip_denoised: as for `calc_bpd_loop`.
      class_conditional: pass the examples' labels to the model.
      parallelism: the device wrapper (pmap, or jit(shard_map) over all devices).
    """
    _check_key(rng)
    p_bpd = make_p_calc_bpd(
        apply_fn,
        schedule,
        output,
        clip_denoised=clip_denoised,
        class_conditional=class_conditional,
        parallelism=parallelism,
    )
    wrapper = parallel.Wrapper(parallelism)
    params = wrapper.replicate(params)
    rng = wrapper.put(rng, parallel.Place.SAME)
    info = input_pipeline.get_dataset_info(config_data, split or config_data.eval_split)
    total = info.num_examples if num_examples is None else min(num_examples, info.num_examples)
    batches = input_pipeline.make_eval_iterator(
        config_data, batch_size=batch_size, split=split, num_examples=num_examples
    )
    sums: dict[str, np.ndarray] | None = None
    indices, totals = [], []
    progress = loop_utils.progress_bar(
        0, -(-total // batch_size), enabled=jax.process_index() == 0, unit="batch"
    )
    try:
        for batch in batches:
            device_batch = wrapper.put(_device_batch(batch), parallel.Place.PER_DEVICE)
            batch_sums, total_bpd = p_bpd(params, rng, device_batch)
            batch_sums = parallel.first_replica(batch_sums)
            batch_sums = {k: np.asarray(v, np.float64) for k, v in batch_sums.items()}
            sums = batch_sums if sums is None else {k: sums[k] + batch_sums[k] for k in sums}
            keep = batch["mask"]
            indices.append(batch["index"][keep])
            totals.append(np.asarray(wrapper.local_rows(total_bpd))[keep])
            progress.update(1)
    finally:
        progress.close()
        batches.close()
    if sums is None or sums["count"] < 1:
        raise ValueError(f"no examples to evaluate (num_examples={num_examples})")
    n = float(sums["count"])
    return BpdSummary(
        num_examples=int(round(n)),
        bpd=float(sums["total_bpd"] / n),
        prior_bpd=float(sums["prior_bpd"] / n),
        terms_bpd=sums["terms_bpd"] / n,
        mse=sums["mse"] / n,
        example_index=np.concatenate(indices).astype(np.int64),
        example_bpd=np.concatenate(totals),
    )
