"""The `ddpm-jax` command: `train | sample` subcommands.

ddpm-jax train --config configs/digits.py --workdir runs/digits [--config.train.num_steps=2000]
ddpm-jax sample --workdir runs/digits --num_samples 1000 --out runs/digits/generated
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
COMMANDS = ("train", "sample")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here.")
# Multi-host (see ddpm_jax/distributed.py; auto-detected on TPU VMs, SLURM and Open MPI).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process jobs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process jobs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process jobs).")
flags.DEFINE_string("cpu_collectives", None, "'gloo' for multi-process jobs on CPU devices.")
# `sample`.
flags.DEFINE_integer("checkpoint", None, "Checkpoint step to sample from (default: newest).")
flags.DEFINE_integer("num_samples", 64, "How many images to generate.")
flags.DEFINE_integer("batch_size", 256, "Images per shard, over all devices of all hosts.")
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Default: the checkpoint config's.")
flags.DEFINE_integer("steps", None, "DDIM steps (default: the checkpoint config's).")
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1] (default: the checkpoint config's).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Output directory for .npz shards (default: workdir/samples_*).")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: ddpm-jax {{{'|'.join(COMMANDS)}}} --workdir DIR [flags]")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    from ddpm_jax import distributed

    distributed.maybe_initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        cpu_collectives=FLAGS.cpu_collectives,
    )
    distributed.log_topology()
    if argv[1] == "train":
        _train()
    else:
        _sample()


def _train() -> None:
    from ddpm_jax import train

    if FLAGS.config is None:
        raise app.UsageError("train needs --config (e.g. configs/digits.py)")
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.NonFiniteLossError as e:
        logging.error("%s", e)
        sys.exit(3)


def _sample() -> None:
    from ddpm_jax import generate

    generate.generate(
        FLAGS.workdir,
        out_dir=FLAGS.out,
        checkpoint_step=FLAGS.checkpoint,
        num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size,
        sampler=FLAGS.sampler,
        ddim_steps=FLAGS.steps,
        ddim_eta=FLAGS.eta,
        seed=FLAGS.seed,
    )


def run() -> None:
    """Console-script entry point (`ddpm-jax`)."""
    logging.set_verbosity(logging.INFO)
    app.run(main)


if __name__ == "__main__":
    run()
