"""The reliability promises of RELIABILITY.md, one or more tests each.

An 800k-step job is killed, preempted, moved to another slice and fed bad input; it must never
lose more than the steps since its last checkpoint, nor come back different. Most tests run the
real `train.train_and_evaluate` in this process (8 fake CPU devices, the tiny test config); the
kill test drives the `ddpm_jax.main train` command in subprocesses. DDPM_JAX_LONG=1 runs the
long variants (50 kills instead of 5).
"""

from __future__ import annotations

import ast
import functools
import glob
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from ddpm_jax import (
    checkpoint,
    diffusion,
    experiment,
    input_pipeline,
    loop_utils,
    train,
    train_state,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = os.environ.get("DDPM_JAX_LONG") == "1"
NUM_KILLS = 50 if LONG else 5
# Long enough for every interruption of the kill test to come before the end (an incarnation
# advances 1 to 3 steps), and past an epoch boundary: with data.split="test" (297 examples)
# and batch 16, the batch of step 18 holds the end of epoch 0 and the start of epoch 1.
REF_STEPS = 4 * NUM_KILLS + 10 if LONG else 24
EPOCH_BOUNDARY_STEP = 18
# The reference run and every in-process run below share these settings, so that all of them
# (and the kill test's subprocesses, which use 8 devices too) run the same compiled step.
REF = {
    "data.split": "test",
    "train.num_steps": REF_STEPS,
    "train.checkpoint_every": 5,
    "train.keep_checkpoints": 3,
    "train.sample_every": 100_000,  # only at the end
    "train.log_every": 2,
}
_FINALIZE = ocp.path.atomicity.AtomicRenameTemporaryPath  # the rename that completes a step

# One xdist worker runs this whole module (pyproject's addopts: --dist loadgroup), so the
# module-scoped reference run is computed once, not once per worker.
pytestmark = pytest.mark.xdist_group("reliability")


def _config(overrides: dict | None = None, **more):
    """configs/test.py with REF's and then the given "section.field" overrides."""
    config = test_config.get_config()
    for dotted, value in {**REF, **(overrides or {}), **more}.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


# --------------------------------------------------------------------------------------------
# Recording what a run does: example ids and metrics per step; injected crashes and signals.
# --------------------------------------------------------------------------------------------


class _SimulatedCrash(RuntimeError):
    pass


class _Recorder:
    """Wraps the trainer's data iterator and metric log for one `train_and_evaluate` call.

    Records, per step, the example indices of the batch the loop took and the metrics it logged;
    at the step given it raises (a crash), sends this process SIGTERM, or poisons the batch.
    """

    def __init__(self, monkeypatch, *, crash_at=None, sigterm_at=None, nan_at=(), on_take=None):
        self.indices: dict[int, np.ndarray] = {}
        self.rows: dict[int, dict[str, float]] = {}
        self.taken: list[int] = []
        real_iterator = input_pipeline.make_train_iterator

        def iterator(*args, start_step, **kwargs):
            inner = real_iterator(*args, start_step=start_step, **kwargs)
            try:
                for step, batch in enumerate(inner, start_step):
                    if step == crash_at:
                        raise _SimulatedCrash(f"simulated crash taking the batch of step {step}")
                    if step == sigterm_at:
                        os.kill(os.getpid(), signal.SIGTERM)
                    if on_take is not None:
                        on_take(step)
                    if step in nan_at:
                        batch = dict(batch, image=batch["image"].copy())
                        batch["image"][0, 0, 0, 0, 0] = np.nan
                    self.taken.append(step)
                    self.indices[step] = batch["index"].reshape(-1).copy()
                    yield batch
            finally:
                inner.close()

        monkeypatch.setattr(input_pipeline, "make_train_iterator", iterator)

    def sink(self, step: int, row: dict[str, float]) -> None:
        self.rows[step] = row


def _run(workdir, config, **recorder_kwargs):
    """(final state or the exception raised, recorder) of one train_and_evaluate call."""
    with pytest.MonkeyPatch.context() as mp:
        recorder = _Recorder(mp, **recorder_kwargs)
        try:
            state = train.train_and_evaluate(config, str(workdir), metrics_sink=recorder.sink)
            return state, recorder
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the caller checks what it got
            return e, recorder


def _flat(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(checkpoint.key_name(k) for k in p): np.asarray(x) for p, x in leaves}


def _assert_states_bitwise_equal(a, b):
    for name in ("params", "ema_params", "opt_state"):
        fa, fb = _flat(getattr(a, name)), _flat(getattr(b, name))
        assert fa.keys() == fb.keys(), name
        for key in fa:
            assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
            assert fa[key].tobytes() == fb[key].tobytes(), f"{name}/{key} differs"
    assert int(a.step) == int(b.step) and int(a.num_skipped) == int(b.num_skipped)


def _assert_same_rows(rows, ref_rows):
    """Every logged metric of every step equals the uninterrupted run's, bit for bit."""
    assert rows
    for step, row in rows.items():
        assert row == ref_rows[step], f"step {step}: {row} != {ref_rows[step]}"


def _with_value(config, field: str, value):
    """`config` with `field` ("section.name" or "name") set to `value`, whatever its type.

    ConfigDict refuses a value of another type than the default's; a config file that builds its
    own ConfigDict, or an older checkpoint's config, is not so protected.
    """
    if "." not in field:
        config[field] = value
        return config
    section, name = field.split(".")
    config[section] = ml_collections.ConfigDict({**config[section].to_dict(), name: value})
    return config


def _copy_checkpoint(src_workdir, dst_workdir, step: int) -> None:
    shutil.copytree(
        os.path.join(str(src_workdir), "checkpoints", str(step)),
        os.path.join(str(dst_workdir), "checkpoints", str(step)),
    )


def _tmp_dirs(workdir) -> list[str]:
    return glob.glob(os.path.join(str(workdir), "checkpoints", "*.orbax-checkpoint-tmp*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (workdir, final state, recorder)."""
    workdir = tmp_path_factory.mktemp("reference")
    state, recorder = _run(workdir, _config({"train.keep_checkpoints": 1000}))  # keep them all
    assert isinstance(state, train_state.TrainState), state
    assert sorted(recorder.taken) == list(range(REF_STEPS))
    return workdir, state, recorder


def _reader(workdir) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(workdir, train_state.LAYOUT, read_only=True)


def _restored(workdir, step: int, like: train_state.TrainState) -> train_state.TrainState:
    """The state saved at `step` in `workdir`, in the structure of `like`."""
    with checkpoint.Checkpointer(workdir, train_state.LAYOUT, read_only=True) as ckpt:
        target = jax.device_get({name: getattr(like, name) for name in train_state.LAYOUT.trees})
        out = ckpt.restore_step(step, target=target, items=(*target, "meta"))
    return like.replace(
        params=out["params"],
        ema_params=out["ema_params"],
        opt_state=out["opt_state"],
        step=out["meta"]["step"],
        num_skipped=out["meta"]["num_skipped"],
    )


def _reference_at(reference, step: int) -> train_state.TrainState:
    """The uninterrupted run's state after `step` steps (a multiple of 5, or the last)."""
    ref_dir, ref_state, _ = reference
    return ref_state if step == REF_STEPS else _restored(ref_dir, step, ref_state)


# --------------------------------------------------------------------------------------------
# 1. Crash-safe resume: SIGKILL at random moments, SIGTERM once, via the command line.
# --------------------------------------------------------------------------------------------


class _CheckpointWatcher(threading.Thread):
    """Lists <workdir>/checkpoints every few ms while the runs go on, and records violations.

    On a local disk orbax renames a finished `<step>.orbax-checkpoint-tmp` to `<step>`, so a
    directory with a plain integer name is complete. Checked at every poll: once one existed,
    one always exists, and the newest step never goes back.
    """

    def __init__(self, workdir):
        super().__init__(daemon=True)
        self.directory = os.path.join(str(workdir), "checkpoints")
        self.newest = -1
        self.appeared: dict[int, float | None] = {}  # step -> when first seen (None: before)
        self.step_seconds: list[float] = []  # between consecutive steps of one incarnation
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def listing(self) -> tuple[list[int], list[str]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return [], []
        return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]

    def run(self):
        while not self._stop_event.is_set():
            try:
                with self._lock:
                    self._poll()
            except Exception as e:  # noqa: BLE001 - reported, not lost with the thread
                self.violations.append(f"watcher failed: {e!r}")
                return
            time.sleep(0.005)

    def _poll(self):
        steps, _ = self.listing()
        now = time.monotonic()
        if steps:
            if steps[-1] < self.newest:
                self.violations.append(f"newest step went back: {self.newest} -> {steps}")
            for s in steps:
                previous = self.appeared.get(s - 1)
                if s not in self.appeared and previous is not None and s > self.newest:
                    self.step_seconds.append(now - previous)
                self.appeared.setdefault(s, now)
            self.newest = max(self.newest, steps[-1])
        elif self.newest >= 0:
            self.violations.append(f"no complete checkpoint at t={now:.3f}")

    def new_incarnation(self):
        """Forgets when the steps so far appeared: a restart's first step is no measure."""
        with self._lock:
            self.appeared = dict.fromkeys(self.listing()[0])

    def seconds_per_step(self) -> float:
        """Median time between consecutive steps of one incarnation (1.5 s until measured)."""
        return float(np.median(self.step_seconds)) if self.step_seconds else 1.5

    def stop(self):
        self._stop_event.set()
        self.join()


def _train_command(workdir) -> list[str]:
    flags = {
        **REF,
        "train.checkpoint_every": 1,  # a write in flight nearly all the time
        "train.keep_checkpoints": 2,
        "train.log_every": 1,
    }
    return [
        sys.executable,
        "-m",
        "ddpm_jax.main",
        "train",
        "--config",
        os.path.join(REPO, "configs", "test.py"),
        "--workdir",
        str(workdir),
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]


def _child_env(devices: int | None = None) -> dict[str, str]:
    """This process's environment (8 fake devices) and compilation cache, for a child."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _wait_for(condition, *, timeout: float, proc=None, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.002)
    return True


def _incarnation(workdir, log_path, watcher, *, how: str, rng) -> dict:
    """Starts `train`, lets it write one new checkpoint, then interrupts it as `how` says.

    how: "mid-write" (SIGKILL just after the next checkpoint's tmp directory appears),
    "random" (SIGKILL a uniform random 0-1 steps later), "sigterm" (SIGTERM, same timing).
    """
    steps_before, _ = watcher.listing()
    start = steps_before[-1] if steps_before else -1
    watcher.new_incarnation()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _train_command(workdir), cwd=REPO, env=_child_env(), stdout=log, stderr=log
        )
        try:
            progressed = _wait_for(
                lambda: watcher.newest > start, timeout=600, proc=proc, what="a new checkpoint"
            )
            assert progressed, f"train exited early, rc={proc.returncode}; see {log_path}"
            if how == "mid-write":
                _wait_for(lambda: _tmp_dirs(workdir), timeout=120, proc=proc, what="a write")
                time.sleep(rng.uniform(0.0, 0.2))
            else:
                time.sleep(rng.uniform(0.0, watcher.seconds_per_step()))
            sent_at_step = watcher.newest
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        "how": how,
        "rc": rc,
        "resumed_from": start,
        "newest_at_signal": sent_at_step,
        "mid_write": bool(_tmp_dirs(workdir)),
        "log": open(log_path).read(),
    }


def _resumed_step(log_text: str) -> int | None:
    found = re.findall(r"Resumed from the checkpoint of step (\d+)\.", log_text)
    assert len(found) <= 1
    return int(found[0]) if found else None


def _assert_resumed_from_newest(record):
    """The incarnation resumed from the newest complete checkpoint, with no fallback."""
    expected = record["resumed_from"]
    assert _resumed_step(record["log"]) == (expected if expected >= 0 else None), record["how"]
    assert "cannot be restored" not in record["log"]


def test_sigkill_at_random_moments_and_sigterm_resume_bitwise(tmp_path, reference):
    """N SIGKILLs (one just as a write starts) and one SIGTERM, then a run to the end.

    Each restart must resume from the newest complete checkpoint; a checkpoint must exist at
    every moment after the first; SIGTERM must exit 75 with its step written; and the final
    params, EMA, optimiser state and step must equal the uninterrupted run's bit for bit.
    """
    workdir = tmp_path / "run"
    rng = np.random.default_rng(2020)
    watcher = _CheckpointWatcher(workdir)
    watcher.start()
    plan = ["mid-write", "random", "sigterm"] + ["random"] * (NUM_KILLS - 2)
    records = []
    try:
        for i, how in enumerate(plan):
            record = _incarnation(workdir, tmp_path / f"log{i}.txt", watcher, how=how, rng=rng)
            records.append(record)
            _assert_resumed_from_newest(record)
            if how == "sigterm":
                assert record["rc"] == loop_utils.PREEMPTED_EXIT_CODE, record["log"][-3000:]
                stopped = re.findall(r"Preempted at step (\d+):", record["log"])
                assert stopped, record["log"][-3000:]
                steps, tmp = watcher.listing()
                assert steps[-1] == int(stopped[0]) and not tmp  # written and waited for
            else:
                assert record["rc"] == -signal.SIGKILL, record["log"][-3000:]
            complete = checkpoint.Checkpointer(
                workdir, train_state.LAYOUT, read_only=True
            ).latest_step()
            assert complete == watcher.listing()[0][-1]
            assert complete < REF_STEPS, "the run finished before all interruptions happened"
        final = _incarnation_to_the_end(workdir, tmp_path / "final.txt", watcher)
        records.append(final)
        _assert_resumed_from_newest(final)
    finally:
        watcher.stop()
    assert not watcher.violations, watcher.violations[:5]
    kills = [r for r in records if r["how"] in ("mid-write", "random")]
    assert len(kills) == NUM_KILLS
    assert sum(r["mid_write"] for r in kills) >= 1  # at least one kill hit a write in flight
    _, ref_state, _ = reference
    assert _reader(workdir).latest_step() == REF_STEPS
    _assert_states_bitwise_equal(_restored(workdir, REF_STEPS, ref_state), ref_state)
    summary = [(r["how"], r["resumed_from"], r["newest_at_signal"], r["mid_write"]) for r in kills]
    print(f"\n{len(kills)} kills (how, resumed from, newest at signal, mid-write): {summary}")


def _incarnation_to_the_end(workdir, log_path, watcher) -> dict:
    start = watcher.listing()[0][-1]
    with open(log_path, "w") as log:
        proc = subprocess.run(
            _train_command(workdir),
            cwd=REPO,
            env=_child_env(),
            stdout=log,
            stderr=log,
            timeout=1200,
        )
    text = open(log_path).read()
    assert proc.returncode == 0, text[-3000:]
    return {"how": "to the end", "rc": 0, "resumed_from": start, "log": text}


# --------------------------------------------------------------------------------------------
# 2. The same batches, timesteps and noise after a resume, across an epoch boundary.
# --------------------------------------------------------------------------------------------


def test_crash_then_resume_takes_the_same_batches_and_noise(tmp_path, reference):
    """Resumed at 10, a crash at step 19 (last checkpoint 15) and a resume replay steps 15-18,
    across the epoch boundary.

    Each step's example ids equal the uninterrupted run's (and the pure function of (seed, step)
    that defines them); each step's loss and gradient norm, which depend on the t and noise that
    `fold_in(rng, step, device)` draws, equal it bit for bit; and so does the final state.
    """
    ref_dir, _, ref = reference
    _copy_checkpoint(ref_dir, tmp_path, 10)
    config = _config({"train.num_steps": 20})
    crashed, first = _run(tmp_path, config, crash_at=EPOCH_BOUNDARY_STEP + 1)
    assert isinstance(crashed, _SimulatedCrash), crashed
    assert first.taken == list(range(10, 19))
    assert _reader(tmp_path).latest_step() == 15
    state, second = _run(tmp_path, config)
    assert isinstance(state, train_state.TrainState), state
    assert second.taken[0] == 15  # resumed from the newest checkpoint, replaying 15..18
    config = _config()
    num_examples = input_pipeline.get_dataset_info(config.data).num_examples
    for run in (first, second):
        for step, indices in run.indices.items():
            np.testing.assert_array_equal(indices, ref.indices[step])
            expected = input_pipeline.global_batch_indices(
                step, num_examples=num_examples, global_batch_size=16, seed=config.seed
            )
            np.testing.assert_array_equal(indices, expected)
        _assert_same_rows(run.rows, ref.rows)
    positions = EPOCH_BOUNDARY_STEP * 16 + np.arange(16)
    assert len(np.unique(positions // num_examples)) == 2  # that batch spans two epochs
    assert EPOCH_BOUNDARY_STEP in first.indices and EPOCH_BOUNDARY_STEP in second.indices
    _assert_states_bitwise_equal(state, _reference_at(reference, 20))


# --------------------------------------------------------------------------------------------
# 3. Preemption: SIGTERM ends the step, writes and waits for its checkpoint, exits 75.
# --------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_the_current_step_then_resumes_bitwise(tmp_path, reference):
    ref_dir, _, ref = reference
    _copy_checkpoint(ref_dir, tmp_path, 5)
    handler_before = signal.getsignal(signal.SIGTERM)
    preempted, first = _run(tmp_path, _config(), sigterm_at=7)
    assert isinstance(preempted, loop_utils.Preempted), preempted
    assert (
        isinstance(preempted, SystemExit) and preempted.code == loop_utils.PREEMPTED_EXIT_CODE == 75
    )
    assert preempted.step == 8  # the step whose batch was being taken ran to the end
    assert first.taken == [5, 6, 7]
    assert _reader(tmp_path).latest_step() == 8
    assert not _tmp_dirs(tmp_path)  # written and waited for, not in flight
    assert signal.getsignal(signal.SIGTERM) == handler_before
    state, second = _run(tmp_path, _config({"train.num_steps": 10}))
    assert second.taken == [8, 9]
    _assert_same_rows(second.rows, ref.rows)
    _assert_states_bitwise_equal(state, _reference_at(reference, 10))


def test_sigterm_during_start_up_exits_75_before_the_first_step(tmp_path, monkeypatch):
    real = train.make_p_train_step

    def notice_while_compiling(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "make_p_train_step", notice_while_compiling)
    preempted, recorder = _run(tmp_path, _config({"train.num_steps": 4}))
    assert isinstance(preempted, loop_utils.Preempted) and preempted.code == 75
    assert preempted.step == 0 and recorder.taken == []
    assert _reader(tmp_path).latest_step() is None


# --------------------------------------------------------------------------------------------
# 4. Non-finite updates: skip mode stops after config.train.max_skipped_steps.
# --------------------------------------------------------------------------------------------


def test_skip_mode_stops_once_more_than_max_skipped_steps_were_skipped(tmp_path, caplog):
    config = _config(
        {"train.num_steps": 8, "train.checkpoint_every": 2, "train.log_every": 1},
        **{"train.nonfinite": "skip", "train.max_skipped_steps": 2},
    )
    with caplog.at_level(logging.WARNING):
        error, _ = _run(tmp_path, config, nan_at=(2, 3, 4))  # the updates to 3, 4, 5
    assert isinstance(error, loop_utils.NonFiniteLossError), error
    assert "max_skipped_steps=2" in str(error) and "at step 4" in str(error)
    assert any("Skipped 1 non-finite" in r.getMessage() for r in caplog.records)
    with checkpoint.Checkpointer(tmp_path, train_state.LAYOUT, read_only=True) as ckpt:
        assert ckpt.latest_step() == 4  # step 4 (2 skipped, params intact); never step 5 or 6
        _, out = checkpoint.restore(ckpt, items=("params", "meta"))
    assert out["meta"]["num_skipped"] == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(out["params"]))
    # The budget is for the whole run: resumed with 2 already skipped, one more is too many.
    error, _ = _run(tmp_path, config, nan_at=(6,))
    assert isinstance(error, loop_utils.NonFiniteLossError) and "3 non-finite" in str(error)


# --------------------------------------------------------------------------------------------
# 5. Another topology; another model.
# --------------------------------------------------------------------------------------------


def test_checkpoint_of_8_devices_resumes_on_1_2_and_4(tmp_path, reference):
    """Subprocesses with 1, 2 and 4 fake devices restore the reference's final checkpoint."""
    ref_dir, ref_state, _ = reference
    procs = {}
    for n in (1, 2, 4):
        workdir = tmp_path / f"on{n}"
        _copy_checkpoint(ref_dir, workdir, REF_STEPS)
        spec = {"devices": n, "workdir": str(workdir), "overrides": REF, "out": f"{workdir}.npz"}
        (tmp_path / f"spec{n}.json").write_text(json.dumps(spec))
        procs[n] = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "reliability_worker.py"),
             str(tmp_path / f"spec{n}.json")],
            cwd=REPO, env=_child_env(n), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    expected = {}
    for name in train_state.LAYOUT.trees:
        expected.update({f"{name}/{k}": v for k, v in _flat(getattr(ref_state, name)).items()})
    for n, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        with np.load(tmp_path / f"on{n}.npz", allow_pickle=False) as f:
            got = {k: f[k] for k in f.files}
        assert int(got.pop("device_count")) == n
        assert (int(got.pop("step")), int(got.pop("num_skipped"))) == (REF_STEPS, 0)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert np.asarray(value).tobytes() == got[key].tobytes(), (n, key)


def test_checkpoint_of_another_model_is_refused_naming_the_parameter(tmp_path, reference):
    ref_dir, _, _ = reference
    _copy_checkpoint(ref_dir, tmp_path, REF_STEPS)
    config = _config()
    config.model.ch = 64  # the test model has ch=32
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert "first mismatched parameter params/" in message
    assert re.search(r"saved shape \([\d, ]+\), expected shape \([\d, ]+\)", message), message
    assert _reader(tmp_path).all_steps() == [REF_STEPS]


# --------------------------------------------------------------------------------------------
# 6. A failed checkpoint write fails the job, soon.
# --------------------------------------------------------------------------------------------


def test_failed_background_write_stops_the_job_within_a_log_interval(tmp_path, monkeypatch):
    failed = threading.Event()

    async def disk_full(self):
        failed.set()
        raise OSError(28, "No space left on device (simulated)")

    def after_the_failure(step):
        if step == 4:  # let the background write of step 3 fail and its thread end
            assert failed.wait(120)
            _wait_for(
                lambda: not any(t.name == "save_finalize" for t in threading.enumerate()),
                timeout=120,
                what="orbax's finalize thread to end",
            )

    monkeypatch.setattr(_FINALIZE, "finalize", disk_full)
    config = _config({"train.num_steps": 12, "train.checkpoint_every": 3, "train.log_every": 1})
    error, recorder = _run(tmp_path, config, on_take=after_the_failure)
    assert isinstance(error, OSError) and "No space left" in str(error), error
    # Raised by the log step after update 5, not only by the save of step 6.
    assert max(recorder.taken) == 4
    assert _reader(tmp_path).latest_step() is None


def test_unusable_workdir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError):
        train.train_and_evaluate(_config({"train.num_steps": 2}), str(tmp_path / "file"))


# --------------------------------------------------------------------------------------------
# 7. Bad input: config values, a corrupt checkpoint, output paths.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", -1),
        ("data.name", "cifar1O"),
        ("data.image_size", 0),
        ("data.channels", 3),
        ("data.random_flip", "yes"),
        ("model.ch", 48),
        ("model.ch_mult", ()),
        ("model.num_res_blocks", 0),
        ("model.attn_resolutions", (-4,)),
        ("model.dropout", 1.0),
        ("model.dtype", "bfloat17"),
        ("model.dtype", "int8"),
        ("diffusion.beta_schedule", "linaer"),
        ("diffusion.num_timesteps", 0),
        ("diffusion.num_timesteps", 10.0),
        ("diffusion.model_mean_type", "score"),
        ("diffusion.model_var_type", "learned"),
        ("diffusion.loss_weighting", "snr"),
        ("diffusion.min_snr_gamma", 0.0),
        ("optim.learning_rate", -1e-4),
        ("optim.learning_rate", float("nan")),
        ("optim.warmup_steps", -1),
        ("optim.grad_clip_norm", 0.0),
        ("optim.beta2", 1.0),
        ("optim.eps", -1e-8),
        ("train.batch_size", 12),
        ("train.num_steps", -1),
        ("train.ema_decay", 1.0),
        ("train.checkpoint_every", 0),
        ("train.keep_checkpoints", 0),
        ("train.nonfinite", "ignore"),
        ("train.max_skipped_steps", -1),
        ("sample.sampler", "euler"),
        ("sample.num_grid", 0),
        ("sample.ddim_eta", 2.0),
    ],
)
def test_invalid_config_value_is_named_before_any_work(tmp_path, field, value):
    config = _with_value(_config({"train.num_steps": 2}), field, value)
    with pytest.raises((ValueError, TypeError)) as info:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    if field in ("data.name", "data.channels"):  # found by opening the dataset
        name = field.split(".")[1]
        assert "config.data" in message and f"{name}={value!r}" in message, message
    else:
        assert f"config.{field}={value!r}" in message, message
    assert os.listdir(tmp_path) == []  # nothing written


def test_image_size_incompatible_with_the_unet_is_refused(tmp_path):
    config = _config()
    config.model.ch_mult = (1, 2, 2, 2)  # needs a multiple of 8; the digits are 8x8: fine ...
    config.data.image_size = 12  # ... but 12 is not
    with pytest.raises(
        ValueError, match=r"config.data.image_size=12: resolution 12 is not divisible by .*8"
    ):
        train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_and_is_rewritten(tmp_path, reference, caplog):
    """Truncated files in the newest checkpoint: resume from the one before, with a warning,
    write the broken step anew on the way, and end bitwise equal to the uninterrupted run."""
    ref_dir, _, ref = reference
    run = tmp_path / "run"
    for step in (5, 10):
        _copy_checkpoint(ref_dir, run, step)
    data_files = glob.glob(
        str(run / "checkpoints" / "10" / "params" / "**" / "d" / "*"), recursive=True
    )
    assert data_files
    for name in data_files:
        os.truncate(name, os.path.getsize(name) // 2)
    with caplog.at_level(logging.WARNING):
        state, second = _run(run, _config({"train.num_steps": 15}))
    assert isinstance(state, train_state.TrainState), state
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("step 10" in m and "cannot be restored" in m for m in warnings), warnings
    assert any("Replacing the unreadable checkpoint" in m for m in warnings), warnings
    assert second.taken[0] == 5
    _assert_same_rows(second.rows, ref.rows)
    _assert_states_bitwise_equal(state, _reference_at(reference, 15))
    _assert_states_bitwise_equal(_restored(run, 10, state), _reference_at(reference, 10))
    # Everything the run wrote is inside its workdir.
    assert os.listdir(tmp_path) == ["run"]
    assert {"checkpoints", "samples", "tensorboard"} <= set(os.listdir(run))


def test_resuming_with_a_config_that_trains_differently_warns(tmp_path, reference, caplog):
    ref_dir, _, _ = reference
    _copy_checkpoint(ref_dir, tmp_path, REF_STEPS)
    config = _config({"train.log_every": 7, "train.keep_checkpoints": 2})  # harmless changes
    config.seed = 1
    config.optim.learning_rate = 1e-3
    with caplog.at_level(logging.WARNING):
        state = train.train_and_evaluate(config, str(tmp_path))  # nothing left to train
    assert int(state.step) == REF_STEPS
    warnings = [
        r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "seed: 0 -> 1" in warnings[0] and "optim.learning_rate: 0.0002 -> 0.001" in warnings[0]
    assert "log_every" not in warnings[0] and "keep_checkpoints" not in warnings[0]


# --------------------------------------------------------------------------------------------
# 8. Numerics under bf16 compute.
# --------------------------------------------------------------------------------------------


def test_bf16_compute_keeps_the_schedule_and_the_loss_in_float32():
    config = test_config.get_config()
    config.model.dtype = "bfloat16"
    schedule = experiment.create_schedule(config)
    assert {leaf.dtype for leaf in jax.tree.leaves(schedule)} == {jnp.dtype(jnp.float32)}
    model = experiment.create_model(config)
    state = jax.eval_shape(lambda: train_state.create(jax.random.key(0), config, model))
    seen = {}

    def spy_apply(variables, x, t, y, **kwargs):
        seen["x_t"] = x.dtype
        out = model.apply(variables, x, t, y, **kwargs)
        seen["output"] = out.dtype
        return out

    step = functools.partial(
        train.train_step,
        schedule=schedule,
        model_mean_type=diffusion.ModelMeanType.EPSILON,
        loss_weighting=diffusion.LossWeighting.MIN_SNR,
        min_snr_gamma=5.0,
        ema_decay=0.9,
        ema_warmup=False,
        learning_rate_fn=experiment.create_learning_rate_fn(config.optim),
        class_conditional=False,
    )
    batch = {
        "image": jax.ShapeDtypeStruct((1, 4, 8, 8, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, 4), jnp.int32),
    }
    new_state, metrics = jax.eval_shape(
        jax.vmap(step, axis_name="batch", in_axes=(None, 0, None)),
        state.replace(apply_fn=spy_apply),
        batch,
        jax.random.key(0),
    )
    forward = functools.partial(model.apply, train=False)
    x, t = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32)
    jaxpr = jax.make_jaxpr(forward)({"params": state.params}, x, t)
    assert "bf16" in str(jaxpr)  # the network really computes in bfloat16 ...
    assert seen["x_t"] == jnp.float32 and seen["output"] == jnp.float32  # ... between f32 ends
    assert metrics["loss"].dtype == jnp.float32 and metrics["grad_norm"].dtype == jnp.float32
    trees = (new_state.params, new_state.ema_params, new_state.opt_state)
    floats = [x.dtype for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert set(floats) == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# 9. No pickle.
# --------------------------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _source_files() -> list[str]:
    files = glob.glob(os.path.join(REPO, "ddpm_jax", "**", "*.py"), recursive=True)
    return files + glob.glob(os.path.join(REPO, "configs", "*.py"))


def _pickle_uses(path: str, source: str | None = None) -> list[str]:
    """Lines that import a pickle module, allow pickle in np.load, or torch.load unsafely."""
    tree = ast.parse(open(path).read() if source is None else source, filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        if _PICKLE_MODULES & set(names):
            found.append(f"{path}:{node.lineno}: imports {names}")
        if not isinstance(node, ast.Call):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        callee = ast.unparse(node.func)
        if "allow_pickle" in kwargs and not _is_false(kwargs["allow_pickle"]):
            found.append(f"{path}:{node.lineno}: {callee}(allow_pickle=...) not False")
        if callee.endswith("np.load") and "allow_pickle" not in kwargs:
            found.append(f"{path}:{node.lineno}: np.load without allow_pickle=False")
        if callee.endswith("torch.load") and not _is_true(kwargs.get("weights_only")):
            found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if callee.endswith(("read_pickle", "to_pickle")):
            found.append(f"{path}:{node.lineno}: {callee}")
    return found


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_package_source_never_uses_pickle():
    files = _source_files()
    assert any(f.endswith("checkpoint.py") for f in files)
    assert [use for path in files for use in _pickle_uses(path)] == []
    # The scanner itself finds what it should.
    bad = "import pickle\nnp.load(f)\nnp.load(f, allow_pickle=True)\ntorch.load(p)\n"
    assert len(_pickle_uses("probe.py", bad)) == 4


def test_checkpoints_restore_without_unpickling(reference, monkeypatch):
    ref_dir, ref_state, _ = reference

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    with checkpoint.Checkpointer(ref_dir, train_state.LAYOUT, read_only=True) as ckpt:
        _, out = checkpoint.restore(ckpt, items=train_state.LAYOUT.names)
    assert out["meta"]["step"] == REF_STEPS
    np.testing.assert_array_equal(
        _flat(out["params"])["conv_in/kernel"], _flat(ref_state.params)["conv_in/kernel"]
    )
