"""The `ddpm-jax` command: subcommands, each with its own flags.

    ddpm-jax train  --config configs/digits.py --workdir runs/digits [--config.train.num_steps=2000]
    ddpm-jax sample --workdir runs/digits --num_samples 1000 [--sampler dpm++2m --steps 20]
    ddpm-jax eval   --workdir runs/digits --split test [--num_examples N] [--checkpoint STEP]
    ddpm-jax eval   --workdir runs/digits --samples runs/digits/generated/ddpm-seed0  (digits)
    ddpm-jax eval   --workdir RUN --samples DIR --fid --ref STATS.npz --fid_weights W.npz
    ddpm-jax export --workdir RUN --out DIR          (diffusers UNet2DModel + scheduler)
    ddpm-jax fid-weights --from pt_inception-2015-12-05-6726825d.pth --out W.npz
    ddpm-jax fid-stats --config configs/cifar10.py --split train --fid_weights W.npz --out S.npz
    ddpm-jax compile --config configs/cifar10.py --topology v5e-16 --batch_per_chip 8  (libtpu)

A flag given to a subcommand that does not take it is a usage error naming it; an explicit value
is used or refused, never taken for "not given". Usage errors and invalid values (flags or config
fields) print one line and exit 2 (`--traceback` shows the Python traceback as well). Orbax's INFO
and JAX's INFO records are filtered out unless `--verbosity=1` (or higher) is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
USAGE_EXIT_CODE = 2

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here.")
flags.DEFINE_boolean("traceback", False, "On an error, show the Python traceback too.")
# Multi-host (see ddpm_jax/distributed.py; auto-detected on TPU VMs, SLURM and Open MPI).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process jobs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process jobs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process jobs).")
flags.DEFINE_string("cpu_collectives", None, "'gloo' for multi-process jobs on CPU devices.")
flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "on: always (Cloud TPU VM slices); auto: detect."
)
# sample / eval.
flags.DEFINE_integer("checkpoint", None, "Checkpoint step to use (default: the newest).")
flags.DEFINE_integer("num_samples", 64, "How many images to generate.")
flags.DEFINE_integer("batch_size", 256, "Images per shard / eval batch, over all devices.")
# The values of sampling.Sampler and sampling.Spacing (tests/test_cli.py checks they agree).
SAMPLERS = ("ddpm", "ddim", "respaced", "dpm++2m")
SPACINGS = ("uniform", "quadratic", "logsnr")
flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Default: the checkpoint config's.")
flags.DEFINE_integer(
    "steps", None, "Steps of ddim / respaced / dpm++2m (default: the checkpoint config's)."
)
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1] (default: the checkpoint config's).")
flags.DEFINE_enum(
    "spacing", None, list(SPACINGS), "Few-step timestep spacing (default: the config's)."
)
flags.DEFINE_float(
    "guidance",
    None,
    "Classifier-free guidance weight w >= 0 (needs a model trained with label dropout; "
    "default: the checkpoint config's).",
    lower_bound=0.0,
)
flags.DEFINE_integer("seed", 0, "Sampling / evaluation seed.")
flags.DEFINE_string(
    "out",
    None,
    "sample: the shard directory (default: under the workdir); export: a directory; "
    "fid-weights / fid-stats: the .npz file to write.",
)
flags.DEFINE_string("split", None, "Split to evaluate (default: the config's data.eval_split).")
flags.DEFINE_integer("num_examples", None, "Evaluate the first N examples (default: all).")
flags.DEFINE_string("samples", None, "A `sample` output dir: score it instead of the NLL.")
# FID (eval --fid, fid-stats, fid-weights) and export.
flags.DEFINE_boolean("fid", False, "With --samples: FID against --ref and the Inception Score.")
flags.DEFINE_string("ref", None, "Reference statistics (.npz with mu, sigma) for --fid.")
flags.DEFINE_string("fid_weights", None, "Converted Inception weights (`ddpm-jax fid-weights`).")
flags.DEFINE_string("from", None, "pytorch-fid's pt_inception-2015-12-05-*.pth to convert.")
# compile (ahead of time, for a TPU slice, on a CPU machine with libtpu; see ddpm_jax/aot.py).
flags.DEFINE_string("topology", None, "TPU slice: v4-8, v4-32, v5e-16, v5p-8, v6e-8, or v5e:4x4.")
flags.DEFINE_integer("batch_per_chip", None, "Images per chip (default: the config's batch).")
flags.DEFINE_enum(
    "parallelism", "both", ["pmap", "shard_map", "both"], "Which device wrapper(s) to compile."
)
flags.DEFINE_boolean("max_batch", False, "Find the largest batch per chip that fits.")
flags.DEFINE_enum("what", "train", ["train", "sample", "both"], "The train step, the sampler.")
flags.DEFINE_integer("sample_batch", None, "Sampler images per chip (default: --batch_per_chip).")
flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")
flags.DEFINE_string("cache_dir", None, "Keep reports here, keyed by config, topology, batch.")

DISTRIBUTED_FLAGS = (
    "coordinator_address",
    "num_processes",
    "process_id",
    "cpu_collectives",
    "distributed",
)
COMMON_FLAGS = ("traceback", *DISTRIBUTED_FLAGS)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: what it does, its own flags (beside the common ones) and its body.

    `required` flags must be given (a usage error names the first one missing).
    """

    summary: str
    flags: tuple[str, ...]
    run: Callable[[], None]
    required: tuple[str, ...] = ("workdir",)
    distributed: bool = True  # False: runs on this host alone (no jax.distributed)


def _train() -> None:
    from ddpm_jax import loop_utils, train

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except loop_utils.NonFiniteLossError as e:
        logging.error("%s", e)
        sys.exit(loop_utils.NONFINITE_EXIT_CODE)


def _sample() -> None:
    from ddpm_jax.commands import sample

    overrides = {
        field: FLAGS[field].value
        for field in ("sampler", "steps", "eta", "spacing", "guidance")
        if FLAGS[field].present
    }
    sample.generate(
        FLAGS.workdir,
        out_dir=FLAGS.out,
        checkpoint_step=FLAGS.checkpoint,
        num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        **overrides,
    )


def _eval() -> None:
    import jax

    from ddpm_jax.commands import evaluate

    if FLAGS.fid or FLAGS.ref or FLAGS.fid_weights:
        for name in ("fid", "samples", "ref", "fid_weights"):
            if not FLAGS[name].value:
                raise app.UsageError(f"eval --fid needs --{name}")
    if FLAGS.samples:
        for name in ("split", "num_examples", "batch_size", "checkpoint", "seed"):
            if FLAGS[name].present:
                raise app.UsageError(f"--{name} is not used with --samples")
    if FLAGS.fid:
        figures, path = evaluate.evaluate_fid(
            FLAGS.workdir, FLAGS.samples, ref=FLAGS.ref, weights_path=FLAGS.fid_weights
        )
        line = evaluate.describe_fid(figures)
    elif FLAGS.samples:
        figures, path = evaluate.evaluate_samples(FLAGS.workdir, FLAGS.samples)
        line = evaluate.describe_quality(figures)
    else:
        figures, path = evaluate.evaluate_checkpoint(
            FLAGS.workdir,
            split=FLAGS.split,
            num_examples=FLAGS.num_examples,
            batch_size=FLAGS.batch_size,
            checkpoint_step=FLAGS.checkpoint,
            seed=FLAGS.seed,
        )
        line = evaluate.describe_bpd(figures)
    if jax.process_index() == 0:
        print(f"{line}\n  -> {path}")


def _export() -> None:
    from ddpm_jax import convert, train_state

    params, config, step = train_state.restore_ema_params(FLAGS.workdir, step=FLAGS.checkpoint)
    convert.export_diffusers(params, config, FLAGS.out)
    print(f"exported the EMA parameters of step {step} to {FLAGS.out} (diffusers UNet2DModel)")


def _fid_weights() -> None:
    from ddpm_jax.models import inception

    inception.convert_weights_file(FLAGS["from"].value, FLAGS.out)
    print(f"wrote the FID Inception weights to {FLAGS.out}")


def _fid_stats() -> None:
    from ddpm_jax.commands import fid

    summary = fid.reference_stats(
        FLAGS.config.data,
        split=FLAGS.split or FLAGS.config.data.split,
        weights_path=FLAGS.fid_weights,
        out=FLAGS.out,
        num_examples=FLAGS.num_examples,
    )
    print(f"{summary['num_images']} {summary['split']} images -> {summary['out']}")


def _compile() -> None:
    import os

    import jax

    if not os.environ.get("JAX_PLATFORMS"):  # compile for TPU, never run on one
        jax.config.update("jax_platforms", "cpu")
    from etils import epath

    from ddpm_jax import aot, parallel

    if not aot.libtpu_available():
        raise app.UsageError("compile needs the TPU compiler: pip install 'ddpm-jax[tpu]'")
    config = FLAGS.config
    chips = len(aot.tpu_devices(FLAGS.topology))
    batch = FLAGS.batch_per_chip or config.train.batch_size // chips
    if batch < 1:
        raise app.UsageError(f"--batch_per_chip: {config.train.batch_size} over {chips} chips")
    kinds = ["pmap", "shard_map"] if FLAGS.parallelism == "both" else [FLAGS.parallelism]
    whats = ["train", "sample"] if FLAGS.what == "both" else [FLAGS.what]
    reports = []
    for what in whats:
        b = FLAGS.sample_batch if what == "sample" and FLAGS.sample_batch else batch
        for kind in kinds:
            kwargs = dict(parallelism=parallel.Parallelism(kind), what=aot.What(what))
            kwargs["cache_dir"] = FLAGS.cache_dir
            if FLAGS.max_batch:
                report = aot.max_batch_per_chip(config, FLAGS.topology, **kwargs)
                if report is None:
                    print(f"{what} ({kind}) on {FLAGS.topology}: not even 1 image per chip fits")
                    sys.exit(aot.NOT_FITTING_EXIT_CODE)
                print(f"Largest batch per chip that fits: {report.batch_per_chip}")
            else:
                try:
                    report = aot.compile_step(config, FLAGS.topology, batch_per_chip=b, **kwargs)
                except Exception as e:  # noqa: BLE001 - the TPU compiler's own OOM
                    if not aot.is_out_of_memory(e):
                        raise
                    print(f"{what} ({kind}), {b} per chip: DOES NOT FIT: {str(e)[:2000]}")
                    sys.exit(aot.NOT_FITTING_EXIT_CODE)
            print(report.describe(), flush=True)
            reports.append(report)
    if FLAGS.json:
        out = {"argv": sys.argv[1:], "reports": [r.to_dict() for r in reports]}
        epath.Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(FLAGS.json).write_text(json.dumps(out, indent=1) + "\n")
    if not all(r.fits for r in reports):
        sys.exit(aot.NOT_FITTING_EXIT_CODE)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train (or resume) the model of a config",
        ("workdir", "config"),
        _train,
        required=("workdir", "config"),
    ),
    "sample": Command(
        "draw samples from a checkpoint's EMA parameters into .npz shards",
        (
            "workdir",
            "checkpoint",
            "num_samples",
            "batch_size",
            "sampler",
            "steps",
            "eta",
            "spacing",
            "guidance",
            "seed",
            "out",
        ),
        _sample,
    ),
    "eval": Command(
        "bits/dim of a checkpoint on a split, or (--samples) the digits quality of samples",
        (
            "workdir",
            "checkpoint",
            "batch_size",
            "seed",
            "split",
            "num_examples",
            "samples",
            "fid",
            "ref",
            "fid_weights",
        ),
        _eval,
    ),
    "export": Command(
        "write a checkpoint's EMA parameters as a diffusers UNet2DModel directory",
        ("workdir", "checkpoint", "out"),
        _export,
        required=("workdir", "out"),
    ),
    "fid-weights": Command(
        "convert pytorch-fid's Inception weights (.pth) into ours (.npz, no pickle)",
        ("from", "out"),
        _fid_weights,
        required=("from", "out"),
        distributed=False,
    ),
    "fid-stats": Command(
        "FID reference statistics (mu, sigma) of a config's dataset split",
        ("config", "split", "num_examples", "fid_weights", "out"),
        _fid_stats,
        required=("config", "fid_weights", "out"),
    ),
    "compile": Command(
        "compile the train step / sampler ahead of time for a TPU slice (HBM, FLOPs, roofline)",
        (
            "config",
            "topology",
            "batch_per_chip",
            "parallelism",
            "max_batch",
            "what",
            "sample_batch",
            "json",
            "cache_dir",
        ),
        _compile,
        required=("config", "topology"),
        distributed=False,
    ),
}
# Where a flag given to the wrong subcommand belongs instead.
_INSTEAD = {
    ("train", "batch_size"): "the training batch is --config.train.batch_size",
    ("train", "seed"): "the training seed is --config.seed",
    ("train", "sampler"): "the training-time grids use --config.sample.sampler",
    ("train", "guidance"): "the training-time grids use --config.sample.guidance",
    ("train", "steps"): "training runs --config.train.num_steps",
    ("train", "num_samples"): "the training-time grids hold --config.sample.num_grid",
}


def _usage() -> str:
    lines = ["usage: ddpm-jax {" + "|".join(COMMANDS) + "} [flags]", ""]
    lines += [f"  {name:<12}{cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "ddpm-jax COMMAND --help lists the flags of COMMAND."]
    return "\n".join(lines)


def _command_help(name: str) -> str:
    """The flags `name` takes, with their help strings and defaults."""
    command = COMMANDS[name]
    lines = [f"ddpm-jax {name}: {command.summary}", ""]
    for flag in (*command.flags, *COMMON_FLAGS):
        f = FLAGS[flag]
        default = "" if f.default is None else f" (default: {f.default!r})"
        lines.append(f"  --{flag}: {f.help}{default}")
    if "config" in command.flags:
        lines.append("  --config.SECTION.FIELD=VALUE: override one field of the config")
    return "\n".join(lines)


def _command_of(argv: list[str]) -> str | None:
    positional = [a for a in argv[1:] if not a.startswith("-")]
    return positional[0] if positional else None


def _check_flags(command: str) -> None:
    """Refuses a flag the command does not take, naming it and what to use instead."""
    allowed = set(COMMANDS[command].flags) | set(COMMON_FLAGS)
    ours = set(COMMON_FLAGS) | {f for cmd in COMMANDS.values() for f in cmd.flags}
    for name in sorted(ours - allowed):
        if FLAGS[name].present:
            owners = [c for c, cmd in COMMANDS.items() if name in cmd.flags]
            hint = _INSTEAD.get((command, name), f"it is a flag of {' / '.join(owners)}")
            raise app.UsageError(f"--{name} is not a flag of `{command}`: {hint}")
    if "config" not in COMMANDS[command].flags:
        for name in FLAGS:
            if (name == "config" or name.startswith("config.")) and FLAGS[name].present:
                raise app.UsageError(
                    f"--{name} is not a flag of `{command}`: it uses the checkpoint's own config"
                )
    for name in COMMANDS[command].required:
        if FLAGS[name].value in (None, ""):
            raise app.UsageError(f"{command} needs --{name}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser, with per-command help and one-line errors (exit 2)."""
    command = _command_of(argv)
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
        print(_command_help(command) if command in COMMANDS else _usage())
        sys.exit(0)
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # config_flags reports an unknown --config.a.b as an AttributeError with a suggestion.
        text = " ".join(str(e).replace("\\n", " ").replace("\n", " ").split()).strip("'\"")
        _fail(f"error: {text}")


def _fail(message: str) -> None:
    print(message.splitlines()[0] if message else "error", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's INFO records (about 90 lines per checkpoint) and JAX's own (backend probing)
    unless --verbosity >= 1; warnings and errors always pass."""

    _QUIET = ("/orbax/", "/jax/_src/")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING or FLAGS.verbosity >= 1:
            return True
        path = record.pathname.replace("\\", "/")
        return not any(part in path for part in self._QUIET)


def main(argv: list[str]) -> None:
    command = _command_of(argv)
    if len([a for a in argv[1:] if not a.startswith("-")]) != 1 or command not in COMMANDS:
        raise app.UsageError(_usage().splitlines()[0])
    _check_flags(command)
    from ddpm_jax import distributed

    if not COMMANDS[command].distributed:
        return _run_command(command)
    distributed.maybe_initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        cpu_collectives=FLAGS.cpu_collectives,
        distributed=FLAGS.distributed,
    )
    distributed.log_topology()
    _run_command(command)


def _run_command(command: str) -> None:
    try:
        COMMANDS[command].run()
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        if FLAGS.traceback:
            raise
        _fail(f"error: {e}")


def _run_main(argv: list[str]) -> None:
    try:
        main(argv)
    except app.UsageError as e:
        if FLAGS.traceback:
            raise
        _fail(f"usage error: {e}")


def run() -> None:
    """Console-script entry point (`ddpm-jax`)."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(_run_main, flags_parser=parse_flags)
