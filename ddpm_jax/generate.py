"""The `sample` command: EMA params from a checkpoint -> uint8 NHWC `.npz` shards and a PNG grid.

Shard i holds global samples [i * batch_size, (i + 1) * batch_size) drawn with
`fold_in(key(seed), i)`, so shards are independent of each other and of how many were already
written: a rerun skips every finished shard and continues with the first missing one. Each
shard is written to a temporary name and renamed, so a file under its final name is complete.
Images are stored under the key "arr_0" (what FID tools read), labels under "labels".
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import jax_utils

from ddpm_jax import checkpoint, diffusion, image_grid, sampling, train


def shard_name(index: int, *, process_index: int = 0, process_count: int = 1) -> str:
    """The file name of shard `index` (one file per host on multi-host jobs)."""
    suffix = f"-host{process_index:03d}of{process_count:03d}" if process_count > 1 else ""
    return f"samples_{index:05d}{suffix}.npz"


def check_output_dir(out_dir: str) -> str:
    """Refuses an output path with `..` components; returns it normalised."""
    if ".." in out_dir.replace("\\", "/").split("/"):
        raise ValueError(f"--out={out_dir!r}: '..' components are not allowed")
    return os.path.normpath(out_dir)


def write_npz_atomically(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a temporary file in the same directory, then an atomic rename."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_shards(out_dir: str) -> np.ndarray:
    """All finished shards of `out_dir`, concatenated in order (uint8 [N, H, W, C])."""
    names = sorted(
        n for n in os.listdir(out_dir) if n.startswith("samples_") and n.endswith(".npz")
    )
    parts = []
    for name in names:
        with np.load(os.path.join(out_dir, name), allow_pickle=False) as f:
            parts.append(f["arr_0"])
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def _all_hosts_agree(flag: bool) -> bool:
    """True when `flag` holds on every host (a shard is skipped only if every host has it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.all(flags))


def generate(
    workdir: str,
    *,
    out_dir: str | None = None,
    checkpoint_step: int | None = None,
    num_samples: int,
    batch_size: int,
    sampler: str | None = None,
    ddim_steps: int | None = None,
    ddim_eta: float | None = None,
    seed: int = 0,
) -> str:
    """Samples `num_samples` images from the EMA params of a checkpoint in `workdir`.

    Returns the output directory. Every host must call this (the sampler spans all devices).
    """
    if num_samples <= 0:
        raise ValueError(f"--num_samples={num_samples}: must be > 0")
    if batch_size <= 0 or batch_size % jax.device_count():
        raise ValueError(
            f"--batch_size={batch_size}: must be a positive multiple of the "
            f"{jax.device_count()} devices"
        )
    ema_params, config_dict = checkpoint.restore_ema_params(workdir, step=checkpoint_step)
    config = ml_collections.ConfigDict(config_dict)
    sampler = sampler or config.sample.sampler
    ddim_steps = ddim_steps or config.sample.ddim_steps
    ddim_eta = config.sample.ddim_eta if ddim_eta is None else ddim_eta
    tag = "ddpm" if sampler == "ddpm" else f"ddim{ddim_steps}-eta{ddim_eta:g}"
    out_dir = check_output_dir(out_dir or os.path.join(workdir, "generated", f"{tag}-seed{seed}"))
    os.makedirs(out_dir, exist_ok=True)

    size, channels = config.data.image_size, config.data.channels
    sample_fn = sampling.make_pmapped_sampler(
        train.create_model(config).apply,
        train.create_schedule(config),
        per_device_batch=batch_size // jax.device_count(),
        image_shape=(size, size, channels),
        model_mean_type=diffusion.ModelMeanType(config.diffusion.model_mean_type),
        model_var_type=diffusion.ModelVarType(config.diffusion.model_var_type),
        clip_denoised=config.sample.clip_denoised,
        sampler=sampler,
        ddim_steps=ddim_steps,
        ddim_eta=ddim_eta,
        num_classes=config.data.num_classes if config.data.class_conditional else None,
    )
    params = jax_utils.replicate(ema_params)
    rng = jax.random.key(seed)
    host, hosts = jax.process_index(), jax.process_count()
    local = batch_size // hosts
    num_shards = math.ceil(num_samples / batch_size)
    progress = train.progress_bar(0, num_shards, enabled=host == 0, unit="shard")
    for i in range(num_shards):
        path = os.path.join(out_dir, shard_name(i, process_index=host, process_count=hosts))
        if _all_hosts_agree(os.path.exists(path)):
            progress.update(1)
            continue
        samples = sample_fn(jax.random.fold_in(rng, i), params)
        # This host holds global positions i*batch_size + host*local + [0, local).
        keep = max(0, min(local, num_samples - i * batch_size - host * local))
        arrays = {"arr_0": np.asarray(sampling.to_uint8(samples.images))[:keep]}
        if samples.labels is not None:
            arrays["labels"] = np.asarray(samples.labels)[:keep]
        write_npz_atomically(path, **arrays)
        if i == 0 and host == 0:
            image_grid.save_png(arrays["arr_0"][:64], os.path.join(out_dir, "grid.png"))
        progress.update(1)
    progress.close()
    logging.info("%d samples in %d shard(s) under %s", num_samples, num_shards, out_dir)
    return out_dir
