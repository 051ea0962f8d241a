"""The `sample` command: EMA params from a checkpoint -> uint8 NHWC `.npz` shards and a PNG grid.

Shard i holds global samples [i * batch_size, (i + 1) * batch_size) drawn with
`fold_in(key(seed), i)`, so shards are independent of each other and of how many were already
written: a rerun skips every finished shard and continues with the first missing one. Each
shard is written to a temporary name and renamed, so a file under its final name is complete.
Images are stored under the key "arr_0" (what FID tools read), labels under "labels".

Multi-host. Every process calls `generate` with the same arguments: the sampler spans all devices
of all hosts (device g of the job draws with `fold_in(shard key, g)`, whatever host it is on),
each shard is gathered onto process 0, and process 0 alone writes it. So the files are the same,
byte for byte, as those of a single-host run with as many devices, and a rerun on a different
number of hosts resumes them. `out_dir` only needs to exist on process 0; it may be a gs:// path
(through etils.epath: install gcsfs).
"""

from __future__ import annotations

import io
import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import jax_utils

from ddpm_jax import checkpoint, diffusion, files, image_grid, sampling, train


def shard_name(index: int) -> str:
    """The file name of shard `index`."""
    return f"samples_{index:05d}.npz"


def check_output_dir(out_dir: str) -> str:
    """Refuses an output path with `..` components; returns it normalised."""
    if ".." in out_dir.replace("\\", "/").split("/"):
        raise ValueError(f"--out={out_dir!r}: '..' components are not allowed")
    return out_dir.rstrip("/") if files.is_remote(out_dir) else os.path.normpath(out_dir)


def write_npz_atomically(path: str, **arrays: np.ndarray) -> None:
    """np.savez of `arrays`, written so that the shard appears complete or not at all."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_bytes_atomically(path, buffer.getvalue())


def read_shards(out_dir: str) -> np.ndarray:
    """All finished shards of `out_dir`, concatenated in order (uint8 [N, H, W, C])."""
    directory = epath.Path(out_dir)
    names = sorted(
        p.name
        for p in directory.iterdir()
        if p.name.startswith("samples_") and p.name.endswith(".npz")
    )
    parts = []
    for name in names:
        with (directory / name).open("rb") as f, np.load(f, allow_pickle=False) as shard:
            parts.append(shard["arr_0"])
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def _from_process_zero(flag: bool) -> bool:
    """Process 0's `flag` on every host (process 0 alone reads and writes the shards)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def _gather_hosts(x: jax.Array | None) -> np.ndarray | None:
    """This host's rows [n, ...] -> all hosts' rows [process_count * n, ...], in process order."""
    if x is None:
        return None
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
    is_main = jax.process_index() == 0
    if is_main:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)

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
    num_shards = math.ceil(num_samples / batch_size)
    progress = train.progress_bar(0, num_shards, enabled=is_main, unit="shard")
    for i in range(num_shards):
        path = os.path.join(out_dir, shard_name(i))
        if _from_process_zero(is_main and epath.Path(path).exists()):
            progress.update(1)
            continue
        samples = sample_fn(jax.random.fold_in(rng, i), params)  # this host's devices' rows
        images = _gather_hosts(sampling.to_uint8(samples.images))  # [batch_size, H, W, C]
        labels = _gather_hosts(samples.labels)
        if is_main:
            keep = min(batch_size, num_samples - i * batch_size)
            arrays = {"arr_0": images[:keep]}
            if labels is not None:
                arrays["labels"] = labels[:keep]
            write_npz_atomically(path, **arrays)
            if i == 0:
                image_grid.save_png(arrays["arr_0"][:64], os.path.join(out_dir, "grid.png"))
        progress.update(1)
    progress.close()
    if is_main:
        logging.info("%d samples in %d shard(s) under %s", num_samples, num_shards, out_dir)
    return out_dir
