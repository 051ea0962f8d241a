"""Digits sample quality: a classifier of scikit-learn's real 8x8 digits scores samples.

A kernel logistic regression trained on the real digits "train" split scores samples: the share
classified with confidence above a threshold, the per-class counts, and their evenness
(normalised entropy, 1 = every class equally often), beside the same figures for the 297
held-out real "test" digits. Used by `ddpm-jax eval --samples` and benchmarks/digits_quality.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ddpm_jax import input_pipeline

DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10

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


def digits_split(split: str) -> input_pipeline.ArraySource:
    """The built-in digits "train" or "test" split (uint8 images [N, 8, 8, 1], labels [N])."""
    return input_pipeline.digits_source(split)


@functools.cache
def digits_classifier():
    """A classifier of the real digits "train" split (fitted once per process; do not refit).

    sklearn Pipeline: RBF kernel features against the training images, then a multinomial
    logistic regression; deterministic (no random state involved). About 99% accurate on the
    held-out "test" split. predict_proba takes float [N, 64] = images / 255.
    """
    import threadpoolctl
    from sklearn import linear_model, metrics, pipeline, preprocessing

    source = digits_split("train")
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
    source = digits_split("test")
    probs = digits_classifier().predict_proba(_digits_features(source.images))
    accuracy = float(np.mean(probs.argmax(axis=1) == source.labels))
    return {**_quality(probs, threshold), "accuracy": accuracy}


def predict_proba(images: np.ndarray) -> np.ndarray:
    """Class probabilities [N, 10] of uint8 digits [N, 8, 8, 1] (the digits classifier)."""
    return digits_classifier().predict_proba(_digits_features(images))


def sample_quality(images: np.ndarray, *, threshold: float = 0.9) -> dict[str, Any]:
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
