"""The `eval` command: a checkpoint's bound in bits/dim, or a sample directory's digits quality,
written as JSON under <workdir>/eval."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
from absl import logging

from ddpm_jax import checkpoint, experiment, files, likelihood, train_state
from ddpm_jax.commands import sample as sample_command

EVAL_DIR = "eval"


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
    with checkpoint.Checkpointer(workdir, train_state.LAYOUT, read_only=True) as ckpt:
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
    ema_params, config, step = train_state.restore_ema_params(workdir, step=step)
    split = split or config.data.eval_split
    summary = likelihood.evaluate_bpd(
        jax.random.key(seed),
        experiment.create_model(config).apply,
        ema_params,
        experiment.create_schedule(config),
        experiment.model_output(config),
        config.data,
        batch_size=batch_size,
        split=split,
        num_examples=num_examples,
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


def _read_samples(samples_dir: str):
    """uint8 [N, H, W, C] of a `sample` output directory; FileNotFoundError if it holds none."""
    images = sample_command.read_shards(samples_dir)
    if images.size == 0:
        raise FileNotFoundError(f"No samples_*.npz shards in {samples_dir}")
    return images


def _write_for(workdir: str, samples_dir: str, kind: str, tag: str, figures: dict) -> str:
    """Process 0 writes `figures` to <workdir>/eval/<kind>-<dir name>-<tag>.json; the path."""
    name = os.path.basename(os.path.normpath(samples_dir))
    path = result_path(workdir, kind, name, tag)
    if jax.process_index() == 0:
        write_json(path, {"samples_dir": samples_dir, **figures})
    return path


def sample_dir_quality(samples_dir: str, *, threshold: float = 0.9) -> dict[str, Any]:
    """`digits.sample_quality` of the shards in a `sample` output directory."""
    from ddpm_jax import digits

    images = _read_samples(samples_dir)
    return {"samples_dir": samples_dir, **digits.sample_quality(images, threshold=threshold)}


def evaluate_samples(
    workdir: str, samples_dir: str, *, threshold: float = 0.9
) -> tuple[dict[str, Any], str]:
    """`sample_dir_quality`, written by process 0 to <workdir>/eval/quality-<dir name>.json."""
    figures = sample_dir_quality(samples_dir, threshold=threshold)
    return figures, _write_for(workdir, samples_dir, "quality", f"threshold{threshold:g}", figures)


def describe_bpd(figures: dict[str, Any]) -> str:
    """One line for the log / terminal from `evaluate_checkpoint`'s figures."""
    return (
        f"{figures['dataset']} {figures['split']}, {figures['num_examples']} examples, "
        f"checkpoint {figures['checkpoint_step']}: NLL <= {figures['bpd']:.4f} bits/dim "
        f"(L_T {figures['prior_bpd']:.4f} + L_1..L_T-1 {figures['diffusion_bpd']:.4f} "
        f"+ L_0 {figures['decoder_bpd']:.4f})"
    )


def describe_quality(figures: dict[str, Any]) -> str:
    """One line from `digits.sample_quality`'s figures, with the real test digits beside."""
    ref = figures["reference"]
    return (
        f"{figures['num_samples']} samples: {100 * figures['confident_share']:.1f}% recognised "
        f"(confidence > {figures['threshold']:g}), evenness {figures['evenness']:.3f}, "
        f"classes {figures['class_counts']}; real test digits: "
        f"{100 * ref['confident_share']:.1f}%, evenness {ref['evenness']:.3f}"
    )


def evaluate_fid(
    workdir: str, samples_dir: str, *, ref: str, weights_path: str
) -> tuple[dict[str, Any], str]:
    """FID and IS of the shards in `samples_dir`, written to <workdir>/eval/fid-<dir name>.json."""
    from ddpm_jax.commands import fid

    fid.check_weights(weights_path)  # before any work
    images = _read_samples(samples_dir)
    figures = fid.sample_scores(images, ref=ref, weights_path=weights_path)
    path = _write_for(workdir, samples_dir, "fid", f"n{figures['num_samples']}", figures)
    return {"samples_dir": samples_dir, **figures}, path


def describe_fid(figures: dict[str, Any]) -> str:
    """One line from `evaluate_fid`'s figures."""
    from ddpm_jax.commands import fid

    return fid.describe(figures)
