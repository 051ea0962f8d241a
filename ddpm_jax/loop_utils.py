"""The training loop's helpers: SIGTERM flag, metric log, non-finite guard, writers, progress.

Each is small and observable through a public door: the metric rows reach any `sink` given to the
writer (tests and benchmarks read them there), and the guard's decision is a return value or an
exception.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable

import numpy as np
from absl import logging

from ddpm_jax import experiment, files, image_grid, parallel

# Exit code of a job stopped by SIGTERM after writing its checkpoint (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75
# Exit code of a job stopped by non-finite updates (RELIABILITY.md).
NONFINITE_EXIT_CODE = 3

# sink(step, row): one call per training step, row = {"loss", "grad_norm", "learning_rate", ...}.
MetricSink = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf (the job stops, no checkpoint is written)."""


class Preempted(SystemExit):
    """Raised after a SIGTERM once the checkpoint of the current step is safely written."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class SigtermFlag:
    """Records SIGTERM (a TPU-VM / SLURM preemption notice) so the loop can checkpoint and exit.

    Only for single-process jobs: on a multi-process job JAX's preemption sync manager owns
    SIGTERM (it agrees on a common step across hosts, read with `ckpt.reached_preemption`), and
    replacing its handler would leave the hosts stopping at different steps.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received = False
        self._previous = None

    def __enter__(self):
        if self.enabled:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True  # only a flag: the loop logs and acts between steps

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class MetricLog:
    """Collects per-step device metrics without a host sync; fetches them on demand."""

    def __init__(self):
        self._pending: list[tuple[int, dict]] = []

    def add(self, first_step: int, metrics: dict) -> None:
        """Metrics of one dispatch: replicated [devices, steps] arrays, steps from first_step."""
        self._pending.append((first_step, metrics))

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Fetches pending metrics: one (step, {name: value}) per step, in order."""
        rows = []
        for first_step, metrics in self._pending:
            host = parallel.first_replica(metrics)  # the replicas agree (pmean)
            for i in range(np.shape(host["loss"])[0]):
                rows.append((first_step + i, {k: float(v[i]) for k, v in host.items()}))
        self._pending = []
        return rows


class NonFiniteGuard:
    """Stops on a non-finite update ("stop"), or skips them up to a budget ("skip").

    The train step itself never applies a non-finite update; this decides whether the job goes
    on. It runs on every metric flush, and a flush always precedes a checkpoint, so a job that
    stops here has not checkpointed the steps that made it stop.
    """

    def __init__(self, mode: experiment.NonFinite, *, max_skipped: int, num_skipped: int):
        self.mode = experiment.NonFinite(mode)
        self.max_skipped = max_skipped
        self.num_skipped = num_skipped  # over the whole run, resumed runs included

    def check(self, rows: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict]]:
        """Returns `rows`, or raises NonFiniteLossError when the job must stop."""
        bad = [(step, _what_is_nonfinite(row)) for step, row in rows if row["finite"] < 1.0]
        if not bad:
            return rows
        step, what = bad[0]
        if self.mode is experiment.NonFinite.STOP:
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}; stopping without checkpointing this state "
                "(set config.train.nonfinite='skip' to skip such updates)"
            )
        self.num_skipped += len(bad)
        if self.num_skipped > self.max_skipped:
            raise NonFiniteLossError(
                f"{self.num_skipped} non-finite updates skipped in this run, more than "
                f"config.train.max_skipped_steps={self.max_skipped} (the last at step "
                f"{bad[-1][0]}: {bad[-1][1]}); stopping without checkpointing"
            )
        logging.warning(
            "Skipped %d non-finite update(s), first at step %d (%s); %d of at most %d so far.",
            len(bad),
            step,
            what,
            self.num_skipped,
            self.max_skipped,
        )
        return rows


def _what_is_nonfinite(row: dict[str, float]) -> str:
    bad = "loss" if not np.isfinite(row["loss"]) else "grad_norm"
    return f"{bad}={row[bad]}"


def crossed(step: int, n: int, every: int) -> bool:
    """Whether the last dispatch (steps step-n+1 .. step) reached a multiple of `every`."""
    return step // every > (step - n) // every


def progress_bar(start: int, total: int, *, enabled: bool, unit: str = "step"):
    """A tqdm bar on an interactive terminal of process 0; silent otherwise."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        unit=unit,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )


class Writer:
    """Process 0's outputs: TensorBoard events, metrics.jsonl, log lines, PNG grids, a sink.

    metrics.jsonl and the PNGs go through the path layer (`files`); TensorBoard events through
    tensorboardX's own writer, which on gs:// uploads the event file whole at every flush with
    google-cloud-storage (the `gcs` extra). So a gs:// workdir works like a local one.
    """

    def __init__(self, workdir: str, *, sink: MetricSink | None = None, log_lines: bool = True):
        from tensorboardX import SummaryWriter

        self._workdir = workdir
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
        self._sink = sink
        self._log_lines = log_lines

    def rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Every step's row, to the sink (if any)."""
        if self._sink is not None:
            for step, row in rows:
                self._sink(step, row)

    def scalars(self, step: int, row: dict[str, float], steps_per_sec: float, batch: int):
        """One logged row: TensorBoard, a metrics.jsonl line and (without a bar) a log line."""
        values = dict(row, steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * batch)
        values.pop("finite", None)
        for name, value in values.items():
            self._tb.add_scalar(f"train/{name}", value, step)
        # The same figures as JSON lines, readable without TensorBoard (benchmarks, scripts).
        line = json.dumps({"step": step, **values}) + "\n"
        files.append_text(os.path.join(self._workdir, "metrics.jsonl"), line)
        if self._log_lines:
            logging.info(
                "step %d  loss %.5f  grad_norm %.3f  lr %.2e  %.2f steps/s  %.0f images/s",
                step,
                values["loss"],
                values["grad_norm"],
                values["learning_rate"],
                steps_per_sec,
                values["images_per_sec"],
            )

    def eval_scalars(self, step: int, values: dict[str, float]):
        """Evaluation figures (FID, IS): TensorBoard "eval/*", a metrics.jsonl line, a log line."""
        for name, value in values.items():
            self._tb.add_scalar(f"eval/{name}", value, step)
        line = json.dumps({"step": step, **{f"eval/{k}": v for k, v in values.items()}}) + "\n"
        files.append_text(os.path.join(self._workdir, "metrics.jsonl"), line)
        logging.info(
            "step %d  %s", step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
        )

    def images(self, step: int, images: np.ndarray):
        path = os.path.join(self._workdir, "samples", f"step_{step:08d}.png")
        image_grid.save_png(images, path)
        self._tb.add_image("samples", image_grid.make_grid(images), step, dataformats="HWC")
        logging.info("Wrote %d samples to %s", len(images), path)

    def close(self):
        self._tb.close()
