"""The `ddpm-jax` command: `train | sample | eval` subcommands.

ddpm-jax train --config configs/digits.py --workdir runs/digits [--config.train.num_steps=2000]
ddpm-jax sample --workdir runs/digits --num_samples 1000 --out runs/digits/generated
ddpm-jax eval --workdir runs/digits --split test [--num_examples N] [--checkpoint STEP]
ddpm-jax eval --workdir runs/digits --samples runs/digits/generated/ddpm-seed0   (digits only)
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
COMMANDS = ("train", "sample", "eval")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here.")
# Multi-host (see ddpm_jax/distributed.py; auto-detected on TPU VMs, SLURM and Open MPI).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process jobs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process jobs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process jobs).")
flags.DEFINE_string("cpu_collectives", None, "'gloo' for multi-process jobs on CPU devices.")
flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "on: always (Cloud TPU VM slices); auto: detect."
)
# `sample`.
flags.DEFINE_integer("checkpoint", None, "Checkpoint step to use (default: newest).")
flags.DEFINE_integer("num_samples", 64, "How many images to generate.")
flags.DEFINE_integer(
    "batch_size", 256, "Images per shard / eval batch, over all devices of all hosts."
)
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Default: the checkpoint config's.")
flags.DEFINE_integer("steps", None, "DDIM steps (default: the checkpoint config's).")
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1] (default: the checkpoint config's).")
flags.DEFINE_integer("seed", 0, "Sampling / evaluation seed.")
flags.DEFINE_string("out", None, "Output directory for .npz shards (default: workdir/samples_*).")
# `eval`: the variational bound in bits/dim, or (--samples) digits sample quality.
flags.DEFINE_string("split", None, "Split to evaluate (default: the config's data.eval_split).")
flags.DEFINE_integer("num_examples", None, "Evaluate the first N examples (default: all).")
flags.DEFINE_string("samples", None, "A `sample` output dir: score its digits instead of the NLL.")


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
        distributed=FLAGS.distributed,
    )
    distributed.log_topology()
    if argv[1] == "train":
        _train()
    elif argv[1] == "sample":
        _sample()
    else:
        _eval()


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


def _eval() -> None:
    import jax

    from ddpm_jax import evaluation

    if FLAGS.samples:
        figures, path = evaluation.evaluate_samples(FLAGS.workdir, FLAGS.samples)
        line = evaluation.describe_quality(figures)
    else:
        figures, path = evaluation.evaluate_checkpoint(
            FLAGS.workdir,
            split=FLAGS.split,
            num_examples=FLAGS.num_examples,
            batch_size=FLAGS.batch_size,
            checkpoint_step=FLAGS.checkpoint,
            seed=FLAGS.seed,
        )
        line = evaluation.describe_bpd(figures)
    if jax.process_index() == 0:
        print(f"{line}\n  -> {path}")


def run() -> None:
    """Console-script entry point (`ddpm-jax`)."""
    logging.set_verbosity(logging.INFO)
    app.run(main)


if __name__ == "__main__":
    run()
