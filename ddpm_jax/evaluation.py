"""Metrics: the variational bound in bits/dim (Ho et al. 2020, Eq. 5) and digits sample quality.

Likelihood. `calc_bpd_loop` evaluates, for each example, every term of the bound

    L = L_T + sum_{t>1} L_{t-1} + L_0        (Eq. 5; L_0 the discretised decoder, Eq. 13)

as one `lax.scan` over the T timestep indices; each term draws its own x_t ~ q(x_t | x_0).
Noise: the term at index t uses eps = normal(fold_in(key, t)); `key` is one key for the batch, or
one key per example (then an example's bound does not depend on the batch it is in). The eval
loop gives example i of the split the key fold_in(rng, i), so its numbers do not depend on the
batch size, nor on the number of devices or hosts. Bits/dim: nats / (D ln 2), D = H * W * C.

Sample quality (digits). A kernel logistic regression trained on the real digits "train" split
scores samples: the share classified with confidence above a threshold, the per-class counts,
and their evenness (normalised entropy, 1 = every class equally often), beside the same figures
for the 297 held-out real "test" digits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import jax_utils

from ddpm_jax import checkpoint, diffusion, files, generate, input_pipeline, sampling, train
from ddpm_jax.schedules import DiffusionSchedule

EVAL_DIR = "eval"
DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10


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
      denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...] (eps, x_0 or v).
      schedule: the forward process (T = schedule.num_timesteps terms).
      x_start: [B, ...] data in [-1, 1] on the 8-bit grid (for L_0 to be a likelihood).
      model_mean_type / model_var_type: diffusion.ModelMeanType / ModelVarType (or values).
      clip_denoised: clip the predicted x_0 to [-1, 1] (as the paper's evaluation did).

    Returns:
      BpdTerms(total_bpd [B], terms_bpd [B, T], prior_bpd [B], mse [B, T]).
    """
    mean_type = diffusion.ModelMeanType(model_mean_type)
    var_type = diffusion.ModelVarType(model_var_type)
    if x_start.ndim < 2:
        raise ValueError(f"x_start must be [B, ...] with B examples, got shape {x_start.shape}")
    batch = x_start.shape[0]

    def term(carry, t):
        t_vec = jnp.full((batch,), t, jnp.int32)
        noise = timestep_noise(rng, t, x_start.shape, x_start.dtype)
        x_t = diffusion.q_sample(schedule, x_start, t_vec, noise)
        model_output = denoise_fn(x_t, t_vec)
        if model_output.shape != x_t.shape:
            raise ValueError(f"denoise_fn returned {model_output.shape}; expected {x_t.shape}")
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
    params, rng, batch, *, apply_fn, schedule, calc_kwargs, class_conditional, axis_name
):
    """One device's batch: per-example keys fold_in(rng, index); masked sums psum-ed."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, batch["index"])
    labels = batch["label"] if class_conditional else None
    denoise_fn = sampling.make_denoise_fn(apply_fn, params, labels=labels)
    out = calc_bpd_loop(keys, denoise_fn, schedule, batch["image"], **calc_kwargs)
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
    *,
    model_mean_type,
    model_var_type,
    clip_denoised: bool = True,
    class_conditional: bool = False,
) -> Callable:
    """The bound of a batch on every local device: `calc_bpd_loop` pmap-ed over axis 'batch'.

    Returns:
      p_bpd(params_replicated, rng, batch) -> (sums, total_bpd [D, b]). batch: {"image" [D, b,
      H, W, C], "label" int32 [D, b], "index" int32 [D, b], "mask" bool [D, b]}; example k uses
      the key fold_in(rng, index_k). sums (replicated, over the masked examples of all
      devices of all hosts): {"count", "total_bpd", "prior_bpd", "terms_bpd" [T], "mse" [T]}.
    """
    device_fn = functools.partial(
        _device_bpd,
        apply_fn=apply_fn,
        schedule=schedule,
        calc_kwargs={
            "model_mean_type": diffusion.ModelMeanType(model_mean_type),
            "model_var_type": diffusion.ModelVarType(model_var_type),
            "clip_denoised": clip_denoised,
        },
        class_conditional=class_conditional,
        axis_name="batch",
    )
    return jax.pmap(device_fn, axis_name="batch", in_axes=(0, None, 0))


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
    config_data: ml_collections.ConfigDict,
    *,
    batch_size: int,
    split: str | None = None,
    num_examples: int | None = None,
    model_mean_type,
    model_var_type,
    clip_denoised: bool = True,
    class_conditional: bool = False,
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
      model_mean_type, model_var_type, clip_denoised: as for `calc_bpd_loop`.
      class_conditional: pass the examples' labels to the model.
    """
    _check_key(rng)
    p_bpd = make_p_calc_bpd(
        apply_fn,
        schedule,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
        class_conditional=class_conditional,
    )
    params = jax_utils.replicate(params)
    info = input_pipeline.get_dataset_info(config_data, split or config_data.eval_split)
    total = info.num_examples if num_examples is None else min(num_examples, info.num_examples)
    batches = input_pipeline.make_eval_iterator(
        config_data, batch_size=batch_size, split=split, num_examples=num_examples
    )
    sums: dict[str, np.ndarray] | None = None
    indices, totals = [], []
    progress = train.progress_bar(
        0, -(-total // batch_size), enabled=jax.process_index() == 0, unit="batch"
    )
    try:
        for batch in batches:
            batch_sums, total_bpd = p_bpd(params, rng, _device_batch(batch))
            batch_sums = jax.device_get(jax.tree.map(lambda s: s[0], batch_sums))
            batch_sums = {k: np.asarray(v, np.float64) for k, v in batch_sums.items()}
            sums = batch_sums if sums is None else {k: sums[k] + batch_sums[k] for k in sums}
            keep = batch["mask"]
            indices.append(batch["index"][keep])
            totals.append(np.asarray(total_bpd)[keep])
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


# --------------------------------------------------------------------------------------------
# The `eval` command: a checkpoint's EMA params -> JSON under <workdir>/eval.
# --------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    """A file-name fragment: runs of anything but letters, digits, '_' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"


def result_path(workdir: str, *parts) -> str:
    """<workdir>/eval/<part>-<part>-....json, each part made safe for a file name."""
    return os.path.join(workdir, EVAL_DIR, "-".join(_safe_name(str(p)) for p in parts) + ".json")


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes `payload` as JSON so that the file appears complete or not at all (gs:// too)."""
    files.write_bytes_atomically(path, (json.dumps(payload, indent=1) + "\n").encode())


def _resolve_step(workdir: str, step: int | None) -> int:
    """The checkpoint step to evaluate: `step`, or the newest complete one."""
    if step is not None:
        return int(step)
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        latest = ckpt.latest_step()
    if latest is None:
        raise FileNotFoundError(f"No complete checkpoint in {os.path.join(workdir, 'checkpoints')}")
    return latest


def evaluate_checkpoint(
    workdir: str,
    *,
    split: str | None = None,
    num_examples: int | None = None,
    batch_size: int = 256,
    checkpoint_step: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], str]:
    """The bound (bits/dim) of a checkpoint's EMA params on a split, written as JSON.

    Every host must call this; process 0 writes
    <workdir>/eval/bpd-<split>-step<step>-n<examples>-seed<seed>.json. Uses the checkpoint's
    own config (model, schedule, data, mean / variance types, sample.clip_denoised).

    Returns:
      (the figures as a dict, the JSON path).
    """
    step = _resolve_step(workdir, checkpoint_step)
    ema_params, config_dict = checkpoint.restore_ema_params(workdir, step=step)
    config = ml_collections.ConfigDict(config_dict)
    split = split or config.data.eval_split
    summary = evaluate_bpd(
        jax.random.key(seed),
        train.create_model(config).apply,
        ema_params,
        train.create_schedule(config),
        config.data,
        batch_size=batch_size,
        split=split,
        num_examples=num_examples,
        model_mean_type=config.diffusion.model_mean_type,
        model_var_type=config.diffusion.model_var_type,
        clip_denoised=config.sample.clip_denoised,
        class_conditional=config.data.class_conditional,
    )
    figures = {
        "dataset": config.data.name,
        "split": split,
        "checkpoint_step": step,
        "seed": seed,
        "num_timesteps": config.diffusion.num_timesteps,
        "model_mean_type": config.diffusion.model_mean_type,
        "model_var_type": config.diffusion.model_var_type,
        "clip_denoised": bool(config.sample.clip_denoised),
        **summary.to_dict(),
    }
    path = result_path(
        workdir, "bpd", split, f"step{step}", f"n{summary.num_examples}", f"seed{seed}"
    )
    if jax.process_index() == 0:
        write_json(path, figures)
        logging.info("Wrote %s", path)
    return figures, path


# --------------------------------------------------------------------------------------------
# Digits sample quality.
# --------------------------------------------------------------------------------------------

# Kernel logistic regression: RBF similarities to the 1,500 training digits (pixels / 255) as
# features. Far from every real digit (noise, smudges) all features vanish and the prediction
# falls back to the near-uniform intercepts: low confidence, unlike an MLP or a linear model,
# which grow more confident the further an input lies from the data.
_KERNEL_GAMMA = 0.2
_LOGISTIC_C = 100.0


def _digits_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8, 1] (or [N, 8, 8]) -> float64 [N, 64] in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] not in (DIGITS_IMAGE_SHAPE, (8, 8)):
        raise ValueError(
            f"digits quality wants uint8 images [N, 8, 8, 1]; got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ValueError("no images to score")
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def _digits_split(split: str) -> input_pipeline.ArraySource:
    """The built-in digits "train" or "test" split (uint8 images [N, 8, 8, 1], labels [N])."""
    data = ml_collections.ConfigDict(
        {"name": "digits", "data_dir": None, "split": split, "image_size": 8, "channels": 1}
    )
    return input_pipeline.load_source(data)


@functools.cache
def digits_classifier():
    """A classifier of the real digits "train" split (fitted once per process; do not refit).

    sklearn Pipeline: RBF kernel features against the training images, then a multinomial
    logistic regression; deterministic (no random state involved). About 99% accurate on the
    held-out "test" split. predict_proba takes float [N, 64] = images / 255.
    """
    import threadpoolctl
    from sklearn import linear_model, metrics, pipeline, preprocessing

    source = _digits_split("train")
    features = _digits_features(source.images)
    kernel = preprocessing.FunctionTransformer(
        metrics.pairwise.rbf_kernel, kw_args={"Y": features, "gamma": _KERNEL_GAMMA}
    )
    logistic = linear_model.LogisticRegression(C=_LOGISTIC_C, max_iter=2000)
    # One BLAS thread: at this size threads gain little, and on a busy machine they spin (5x
    # slower on 2 shared cores).
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        return pipeline.make_pipeline(kernel, logistic).fit(features, source.labels)


def _quality(probs: np.ndarray, threshold: float) -> dict[str, Any]:
    confidence = probs.max(axis=1)
    counts = np.bincount(probs.argmax(axis=1), minlength=DIGITS_NUM_CLASSES)
    share = counts / counts.sum()
    nonzero = share[share > 0]
    evenness = float(-np.sum(nonzero * np.log(nonzero)) / math.log(DIGITS_NUM_CLASSES))
    return {
        "num_samples": int(len(probs)),
        "threshold": float(threshold),
        "confident_share": float(np.mean(confidence > threshold)),
        "mean_confidence": float(np.mean(confidence)),
        "class_counts": [int(c) for c in counts],
        "evenness": max(evenness, 0.0),
    }


@functools.cache
def _reference_quality(threshold: float) -> dict[str, Any]:
    """The figures of the 297 real held-out test digits, and the classifier's accuracy there."""
    source = _digits_split("test")
    probs = digits_classifier().predict_proba(_digits_features(source.images))
    accuracy = float(np.mean(probs.argmax(axis=1) == source.labels))
    return {**_quality(probs, threshold), "accuracy": accuracy}


def digits_sample_quality(images: np.ndarray, *, threshold: float = 0.9) -> dict[str, Any]:
    """How digit-like and how evenly spread over the classes a set of 8x8 samples is.

    Args:
      images: uint8 [N, 8, 8, 1] (the digits scale: round(v * 255 / 16)).
      threshold: a sample counts as recognised when its top class probability exceeds this.

    Returns:
      {"num_samples", "threshold", "confident_share" (share with confidence > threshold),
      "mean_confidence", "class_counts" [10] (argmax classes of all samples), "evenness"
      (entropy of class_counts / ln 10: 1 = uniform, 0 = one class), "reference": the same
      figures (and "accuracy") for the real held-out test digits}.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    probs = digits_classifier().predict_proba(_digits_features(images))
    return {**_quality(probs, threshold), "reference": _reference_quality(float(threshold))}


def sample_dir_quality(samples_dir: str, *, threshold: float = 0.9) -> dict[str, Any]:
    """`digits_sample_quality` of the shards in a `sample` output directory."""
    images = generate.read_shards(samples_dir)
    if images.size == 0:
        raise FileNotFoundError(f"No samples_*.npz shards in {samples_dir}")
    return {"samples_dir": samples_dir, **digits_sample_quality(images, threshold=threshold)}


def evaluate_samples(
    workdir: str, samples_dir: str, *, threshold: float = 0.9
) -> tuple[dict[str, Any], str]:
    """`sample_dir_quality`, written by process 0 to <workdir>/eval/quality-<dir name>.json."""
    figures = sample_dir_quality(samples_dir, threshold=threshold)
    name = os.path.basename(os.path.normpath(samples_dir))
    path = result_path(workdir, "quality", name, f"threshold{threshold:g}")
    if jax.process_index() == 0:
        write_json(path, figures)
    return figures, path


def describe_bpd(figures: dict[str, Any]) -> str:
    """One line for the log / terminal from `evaluate_checkpoint`'s figures."""
    return (
        f"{figures['dataset']} {figures['split']}, {figures['num_examples']} examples, "
        f"checkpoint {figures['checkpoint_step']}: NLL <= {figures['bpd']:.4f} bits/dim "
        f"(L_T {figures['prior_bpd']:.4f} + L_1..L_T-1 {figures['diffusion_bpd']:.4f} "
        f"+ L_0 {figures['decoder_bpd']:.4f})"
    )


def describe_quality(figures: dict[str, Any]) -> str:
    """One line from `digits_sample_quality`'s figures, with the real test digits beside."""
    ref = figures["reference"]
    return (
        f"{figures['num_samples']} samples: {100 * figures['confident_share']:.1f}% recognised "
        f"(confidence > {figures['threshold']:g}), evenness {figures['evenness']:.3f}, "
        f"classes {figures['class_counts']}; real test digits: "
        f"{100 * ref['confident_share']:.1f}%, evenness {ref['evenness']:.3f}"
    )
