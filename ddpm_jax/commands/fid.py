"""The FID commands: Inception weights in, reference statistics out, FID and IS of samples.

    ddpm-jax fid-weights --from pt_inception-2015-12-05-6726825d.pth --out inception.npz
    ddpm-jax fid-stats --config configs/cifar10.py --split train --fid_weights inception.npz \
        --out cifar10_train_stats.npz
    ddpm-jax eval --workdir RUN --samples RUN/generated/ddpm-seed0 --fid --ref STATS.npz \
        --fid_weights inception.npz

Statistics files hold `mu` [2048] and `sigma` [2048, 2048] (float64), pytorch-fid's layout, so
statistics written by other tools load too. Features are the 2,048-d pool features of the FID
Inception-v3 (models/inception.py) on all local devices; IS uses its 1,008-way logits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax import fid, input_pipeline, loop_utils
from ddpm_jax.models import inception

FEATURE_BATCH = 200  # images per feature-function call (over all local devices)


def check_weights(weights_path: str) -> None:
    """Raises FileNotFoundError saying where to get the weights and how to convert them."""
    if not weights_path or not epath.Path(weights_path).exists():
        raise FileNotFoundError(inception.missing_weights_message(weights_path or "<unset>"))


def load_feature_fn(weights_path: str) -> fid.FeatureFn:
    """The device-parallel feature function of the converted weights at `weights_path`."""
    check_weights(weights_path)
    return fid.make_feature_fn(inception.load_weights(weights_path))


def features(feature_fn: fid.FeatureFn, batches: Iterable[np.ndarray], *, total: int):
    """InceptionOutput of all batches, with a progress bar on process 0's terminal."""
    progress = loop_utils.progress_bar(0, total, enabled=jax.process_index() == 0, unit="image")

    def counted():
        for batch in batches:
            yield batch  # feature_fn runs on it before the generator resumes
            progress.update(len(batch))

    try:
        return fid.features_from_images(feature_fn, counted())
    finally:
        progress.close()


def reference_stats(
    config_data, *, split: str, weights_path: str, out: str, num_examples: int | None = None
) -> dict[str, Any]:
    """Writes the FID statistics of a dataset split to `out`; returns a summary."""
    feature_fn = load_feature_fn(weights_path)
    source = input_pipeline.load_source(config_data, split)
    total = len(source) if num_examples is None else min(num_examples, len(source))
    batches = input_pipeline.iterate_images(
        source, batch_size=FEATURE_BATCH, num_examples=num_examples
    )
    out_features = features(feature_fn, batches, total=total)
    mu, sigma = fid.statistics(out_features.pool)
    if jax.process_index() == 0:
        fid.save_stats(out, mu, sigma)
        logging.info("Wrote the statistics of %d %s images to %s", total, split, out)
    return {"dataset": config_data.name, "split": split, "num_images": total, "out": out}


def sample_scores(
    images: np.ndarray, *, ref: str, weights_path: str, num_splits: int = 10
) -> dict[str, Any]:
    """FID against the statistics in `ref`, and the Inception Score, of uint8 images [N,H,W,C]."""
    mu_ref, sigma_ref = fid.load_stats(ref)
    feature_fn = load_feature_fn(weights_path)
    batches = (images[i : i + FEATURE_BATCH] for i in range(0, len(images), FEATURE_BATCH))
    out = features(feature_fn, batches, total=len(images))
    mu, sigma = fid.statistics(out.pool)
    is_mean, is_std = fid.inception_score(out.logits_unbiased, num_splits=num_splits)
    return {
        "num_samples": int(len(images)),
        "fid": fid.frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "ref": ref,
    }


def describe(figures: dict[str, Any]) -> str:
    """One line for the terminal."""
    return (
        f"{figures['num_samples']} samples: FID {figures['fid']:.3f} against "
        f"{os.path.basename(figures['ref'])}, IS {figures['inception_score']:.3f} "
        f"+- {figures['inception_score_std']:.3f}"
    )
