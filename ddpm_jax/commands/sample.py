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
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax import experiment, files, image_grid, loop_utils, parallel, sampling, train_state


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


def generate(
    workdir: str,
    *,
    out_dir: str | None = None,
    checkpoint_step: int | None = None,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    **spec_overrides,
) -> str:
    """Samples `num_samples` images from the EMA params of a checkpoint in `workdir`.

    The sampler is the checkpoint config's `sample` section with `spec_overrides` applied
    (`sampling.SamplerSpec` fields: sampler, steps, eta, spacing, clip_denoised). Returns the
    output directory. Every host must call this (the sampler spans all devices).

    Raises:
      ValueError: a bad argument, naming it as its command-line flag.
    """
    if num_samples <= 0:
        raise ValueError(f"--num_samples={num_samples}: must be > 0")
    if batch_size <= 0 or batch_size % jax.device_count():
        raise ValueError(
            f"--batch_size={batch_size}: must be a positive multiple of the "
            f"{jax.device_count()} devices"
        )
    ema_params, config, _ = train_state.restore_ema_params(workdir, step=checkpoint_step)
    spec = experiment.sampler_spec(config, **spec_overrides)
    schedule = experiment.create_schedule(config)
    try:
        spec.validate(schedule.num_timesteps)
    except sampling.SpecError as e:
        raise ValueError(f"--{e.field}={getattr(spec, e.field)}: {e}") from None
    default_dir = os.path.join(workdir, "generated", f"{spec.tag}-seed{seed}")
    out_dir = check_output_dir(out_dir or default_dir)
    is_main = jax.process_index() == 0
    if is_main:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)

    sample_fn = sampling.make_pmapped_sampler(
        experiment.create_model(config).apply,
        schedule,
        spec,
        experiment.model_output(config),
        per_device_batch=batch_size // jax.device_count(),
        image_shape=experiment.image_shape(config),
        num_classes=experiment.num_classes(config),
    )
    params = parallel.replicate(ema_params)
    rng = jax.random.key(seed)
    num_shards = math.ceil(num_samples / batch_size)
    progress = loop_utils.progress_bar(0, num_shards, enabled=is_main, unit="shard")
    for i in range(num_shards):
        path = os.path.join(out_dir, shard_name(i))
        if parallel.from_process_zero(is_main and epath.Path(path).exists()):
            progress.update(1)
            continue
        samples = sample_fn(jax.random.fold_in(rng, i), params)  # this host's devices' rows
        images = parallel.gather_hosts(sampling.to_uint8(samples.images))  # [batch_size, H, W, C]
        labels = parallel.gather_hosts(samples.labels)
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
