"""FID and Inception Score: features from the FID Inception-v3, then float64 numpy math.

The protocol is pytorch-fid's (Heusel et al. 2017, as in the TF reference code): pool features
[N, 2048] of `models.inception.FIDInceptionV3` on uint8 images, their mean and covariance
(`statistics`), and the Frechet distance between two such Gaussians (`frechet_distance`,
computed as pytorch-fid's `calculate_frechet_distance`). Statistics files are pytorch-fid's
.npz (keys `mu`, `sigma`), so precomputed reference statistics load as they are.

The Inception Score (Salimans et al. 2016) is the original code's: softmax over all 1008 logits
of `pool @ fc kernel` *without* the fc bias (the TF graph's `softmax/logits/MatMul`, which is
also torch-fidelity's default `logits_unbiased`), ten consecutive splits, exp(mean KL) per split.
(torch-fidelity additionally shuffles the samples with seed 2020 before splitting; we don't.)
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from scipy import linalg

from ddpm_jax import files, parallel
from ddpm_jax.models import inception

FeatureFn = Callable[[np.ndarray], inception.InceptionOutput]


# ---------------------------------------------------------------- the metrics (numpy float64)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mu [D], sigma [D, D]) in float64 (sigma: np.cov, rowvar=False)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need [N >= 2, D] features; got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid computes it.

    sqrt is scipy.linalg.sqrtm of the product; if that is not finite (a singular product), eps
    is added to both diagonals and it is taken again. An imaginary part of the root's diagonal
    above 1e-3 is an error; below it, the real part is kept.

    Raises:
      ValueError: mismatched shapes, or a significantly complex matrix square root.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logging.warning("singular product in the FID; adding %g to the covariances' diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

    Args:
      logits: [N, 1008] `InceptionOutput.logits_unbiased` (the reference protocol's logits).
      num_splits: consecutive splits [i N // s, (i + 1) N // s), as the original code takes.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < num_splits:
        raise ValueError(f"need [N >= num_splits={num_splits}, K] logits; got {logits.shape}")
    log_p = logits - _logsumexp(logits, axis=1)
    n, scores = logits.shape[0], []
    for i in range(num_splits):
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        log_marginal = _logsumexp(part, axis=0) - np.log(part.shape[0])  # log mean_x p(y|x)
        p = np.exp(part)
        kl = np.sum(np.where(p > 0, p * (part - log_marginal), 0.0), axis=1)  # 0 log 0 = 0
        scores.append(math.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes pytorch-fid's statistics file (.npz with `mu`, `sigma`), atomically, gs:// too."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, mu=np.asarray(mu), sigma=np.asarray(sigma))
    files.write_bytes_atomically(str(path), buffer.getvalue())


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid statistics .npz (no pickle)."""
    with epath.Path(path).open("rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not an FID statistics file (no {sorted(missing)})")
            return np.asarray(data["mu"]), np.asarray(data["sigma"])


# ---------------------------------------------------------------- features on devices


def make_feature_fn(
    params: Mapping[str, Any], devices: list[jax.Device] | None = None
) -> FeatureFn:
    """Builds (once) a function: uint8 [B, H, W, C in {1, 3}] -> InceptionOutput of numpy arrays.

    The batch is padded to a multiple of the device count, split over the devices (pmap over
    axis 'batch'), and the padding dropped. Grayscale images are repeated to 3 channels. Each
    new (per-device batch, H, W, C) compiles once.
    """
    devices = list(devices or jax.local_devices())
    model = inception.FIDInceptionV3()

    def apply(params, images):  # on one device: [b, H, W, C] uint8
        images = images.astype(jnp.float32)
        if images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        return model.apply({"params": params}, images)

    sharded = parallel.pmap(apply, devices=devices)
    replicated = parallel.replicate(params, devices)  # once: ~95 MB per device

    def feature_fn(images: np.ndarray) -> inception.InceptionOutput:
        images = _check_images(images)
        count, num_devices = images.shape[0], len(devices)
        per_device = -(-count // num_devices)
        padding = per_device * num_devices - count
        images = np.pad(images, [(0, padding)] + [(0, 0)] * 3)
        out = sharded(replicated, images.reshape(num_devices, per_device, *images.shape[1:]))
        out = jax.device_get(out)
        return inception.InceptionOutput(*(o.reshape(-1, o.shape[-1])[:count] for o in out))

    return feature_fn


def features_from_images(
    feature_fn: FeatureFn, images_iter: Iterable[np.ndarray]
) -> inception.InceptionOutput:
    """Runs feature_fn over batches of uint8 images; concatenates: pool [N, 2048], logits [N, 1008].

    Returns:
      InceptionOutput(pool, logits, logits_unbiased) of numpy float32 arrays: `pool` feeds
      `statistics` (FID), `logits_unbiased` feeds `inception_score`.
    """
    outputs = [feature_fn(batch) for batch in images_iter]
    if not outputs:
        raise ValueError("features_from_images: the image iterator was empty")
    return inception.InceptionOutput(*(np.concatenate(parts) for parts in zip(*outputs)))


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 [B, H, W, 1 or 3] images; got {images.dtype} {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("expected a non-empty batch of images")
    return images


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's sqrtm without its singular-matrix warning (non-finite results are handled)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))


def make_sample_fid(
    sample_fn: Callable,
    feature_fn: FeatureFn,
    ref: tuple[np.ndarray, np.ndarray],
    *,
    num_samples: int,
    to_uint8: Callable,
) -> Callable:
    """fid(rng, params) -> {"fid", "inception_score"} of `num_samples` fresh samples.

    Built once (the sampler and the feature network compile once); call i of the sampler uses
    fold_in(rng, i). `sample_fn(rng, params)` returns Samples of this host's devices.
    """
    mu_ref, sigma_ref = ref

    def evaluate(rng, params) -> dict[str, float]:
        pools, logits, count, i = [], [], 0, 0
        while count < num_samples:
            images = np.asarray(to_uint8(sample_fn(jax.random.fold_in(rng, i), params).images))
            out = feature_fn(images[: num_samples - count])
            pools.append(out.pool)
            logits.append(out.logits_unbiased)
            count, i = count + len(out.pool), i + 1
        mu, sigma = statistics(np.concatenate(pools))
        return {
            "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
            "inception_score": inception_score(np.concatenate(logits))[0],
        }

    return evaluate
