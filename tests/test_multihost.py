"""Multi-host semantics on one machine: 2 processes x 2 CPU devices behave as 1 process x 4.

Three jobs run once for the whole module (tests/multihost_worker.py, started with subprocess):
  one: 1 process x 4 devices: trains configs/test.py into run1, then samples from run1;
  two: 2 processes x 2 devices (gloo over loopback): trains the same config into run2, restores
       run1's checkpoint (written by one process), and samples from run1 with the same seed;
  shard: 2 processes x 2 devices: trains it into run3 with train.parallelism="shard_map" (global
       arrays over a mesh of both processes' devices instead of a pmap per process).
The single-process job uses the persistent compilation cache; the two-process jobs cannot (see
tests/multihost_worker.py), so their compiles take most of the time.
Each job is killed, and the module fails, when any process fails or the job overruns its time.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ddpm_jax import checkpoint, distributed, train_state
from ddpm_jax.commands import sample as sample_command

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 480
NUM_STEPS = 20
# configs/test.py with one resolution level: the compiles dominate the time of these tests.
MODEL = {"ch_mult": [1], "attn_resolutions": []}
TRAIN = {"num_steps": NUM_STEPS, "log_every": 5, "checkpoint_every": 10, "sample_every": 20}
SAMPLE = {"num_grid": 8}
SHARD_MAP_TRAIN = {**TRAIN, "parallelism": "shard_map"}  # the third job's training run
GENERATE = {"num_samples": 12, "batch_size": 8, "seed": 3}  # a full and a partial shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _run_job(root: Path, name: str, *, num_processes: int, devices: int, tasks) -> list[str]:
    """Runs the worker as `num_processes` processes; returns each one's log."""
    out = root / name
    out.mkdir()
    spec = {
        "num_processes": num_processes,
        "devices": devices,
        "port": _free_port(),
        "cache_dir": jax.config.jax_compilation_cache_dir,
        "out": str(out),
        "tasks": tasks,
    }
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    logs = [out / f"log-p{i}.txt" for i in range(num_processes)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                cmd = [sys.executable, "-u", str(WORKER), str(spec_path), str(i)]
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO))
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                i = failed[0]
                pytest.fail(
                    f"job {name}: process {i} exited {procs[i].returncode}:\n{_tail(logs[i])}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"job {name} ran over {JOB_TIMEOUT_S}s:\n{_tail(logs[0])}")
            time.sleep(0.2)
        for i, p in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"job {name}: process {i} exited {p.returncode}:\n{_tail(logs[i])}")
    finally:
        for p in procs:  # a hung peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    return [log.read_text(errors="replace") for log in logs]


def _result(root: Path, job: str, task: str, process: int = 0) -> dict[str, np.ndarray]:
    with np.load(root / job / f"{task}-p{process}.npz") as f:
        return dict(f)


# One xdist worker runs the module (--dist loadgroup): the jobs fixture launches them once.
pytestmark = pytest.mark.xdist_group("multihost")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    run1, run2 = str(root / "run1"), str(root / "run2")
    overrides = {"model": MODEL, "train": TRAIN, "sample": SAMPLE}
    train = {"kind": "train", "name": "train", **overrides}
    logs_one = _run_job(
        root,
        "one",
        num_processes=1,
        devices=4,
        tasks=[
            {**train, "workdir": run1},
            {
                "kind": "generate",
                "name": "gen",
                "workdir": run1,
                "out_dir": str(root / "gen1"),
                **GENERATE,
            },
        ],
    )
    logs_two = _run_job(
        root,
        "two",
        num_processes=2,
        devices=2,
        tasks=[
            {**train, "workdir": run2},
            {"kind": "restore", "name": "restore1", "workdir": run1, **overrides},
            {
                "kind": "generate",
                "name": "gen",
                "workdir": run1,
                "out_dir": str(root / "gen2"),
                **GENERATE,
            },
        ],
    )
    logs_shard = _run_job(
        root,
        "shard",
        num_processes=2,
        devices=2,
        tasks=[{**train, "train": SHARD_MAP_TRAIN, "workdir": str(root / "run3")}],
    )
    return {"root": root, "logs_one": logs_one, "logs_two": logs_two, "logs_shard": logs_shard}


def _state(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in result.items() if k != "index"}


def _assert_trees_close(actual: dict, expected: dict, **tolerance) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], err_msg=key, **tolerance)


def _logged_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)  loss ([0-9.]+)", log)}


@pytest.mark.multiprocess
def test_two_processes_train_like_one_process_with_four_devices(jobs):
    root = jobs["root"]
    one = _state(_result(root, "one", "train"))
    two = [_state(_result(root, "two", "train", p)) for p in (0, 1)]
    assert int(one["step"]) == int(two[0]["step"]) == NUM_STEPS
    _assert_trees_close(two[1], two[0], rtol=0, atol=0)  # the hosts hold the same replica
    # The same global batches and per-device keys; only the all-reduce's summation order differs
    # (gloo vs in-process). Biases that a following GroupNorm cancels have gradients of pure
    # rounding noise, which Adam scales up to a few 1e-6: hence atol 2e-5 (0.1 lr); a wrong batch,
    # key or mean would move the parameters by about 1e-3 in 20 steps.
    _assert_trees_close(two[0], one, rtol=1e-4, atol=2e-5)


@pytest.mark.multiprocess
def test_hosts_feed_disjoint_halves_of_the_same_global_batches(jobs):
    root = jobs["root"]
    one = _result(root, "one", "train")["index"]  # [steps, 4 devices, b]
    host0, host1 = (_result(root, "two", "train", p)["index"] for p in (0, 1))
    assert one.shape[0] == host0.shape[0] == host1.shape[0] == NUM_STEPS
    assert host0.shape[1] == host1.shape[1] == 2
    for step in range(NUM_STEPS):
        assert not set(host0[step].ravel()) & set(host1[step].ravel()), step
        # Devices 0, 1 of host 0 and 0, 1 of host 1 are global devices 0..3.
        np.testing.assert_array_equal(np.concatenate([host0[step], host1[step]]), one[step])


@pytest.mark.multiprocess
def test_metrics_are_global_and_only_process_zero_logs_and_writes(jobs):
    one, (two0, two1) = _logged_losses(jobs["logs_one"][0]), jobs["logs_two"]
    two = _logged_losses(two0)
    assert sorted(one) == sorted(two) == [5, 10, 15, 20]
    for step in one:  # a host-local mean would differ from the 4-device mean
        np.testing.assert_allclose(two[step], one[step], rtol=1e-4, err_msg=str(step))
    assert _logged_losses(two1) == {}
    assert "Wrote 8 samples" in two0 and "Wrote 8 samples" not in two1
    run2 = jobs["root"] / "run2"
    assert (run2 / "samples" / f"step_{NUM_STEPS:08d}.png").is_file()
    assert len(list((run2 / "tensorboard").iterdir())) == 1  # one events file: process 0's


@pytest.mark.multiprocess
def test_two_processes_under_shard_map_train_like_one_process_under_pmap(jobs):
    """The third job: the same 2 x 2 run as the second, with the jit(shard_map) wrapper."""
    root = jobs["root"]
    one = _result(root, "one", "train")
    shard = [_result(root, "shard", "train", p) for p in (0, 1)]
    for step in range(NUM_STEPS):  # the global batch is the same 4 device rows
        np.testing.assert_array_equal(
            np.concatenate([shard[0]["index"][step], shard[1]["index"][step]]),
            one["index"][step],
        )
    one, shard = _state(one), [_state(r) for r in shard]
    assert int(one["step"]) == int(shard[0]["step"]) == NUM_STEPS
    _assert_trees_close(shard[1], shard[0], rtol=0, atol=0)  # one global replicated state
    # Tolerance and reason as in test_two_processes_train_like_one_process_with_four_devices.
    _assert_trees_close(shard[0], one, rtol=1e-4, atol=2e-5)
    losses = _logged_losses(jobs["logs_shard"][0])  # pmean over all 4 devices, process 0 logs
    expected = _logged_losses(jobs["logs_one"][0])
    assert sorted(losses) == sorted(expected) == [5, 10, 15, 20]
    for step in expected:
        np.testing.assert_allclose(losses[step], expected[step], rtol=1e-4, err_msg=str(step))
    assert _logged_losses(jobs["logs_shard"][1]) == {}
    run3 = root / "run3"  # the grid sampler ran under shard_map too; process 0 wrote it
    assert (run3 / "samples" / f"step_{NUM_STEPS:08d}.png").is_file()
    assert len(list((run3 / "tensorboard").iterdir())) == 1


@pytest.mark.multiprocess
@pytest.mark.parametrize("job, workdir", [("two", "run2"), ("shard", "run3")])
def test_checkpoint_of_two_processes_restores_in_one_process(jobs, job, workdir):
    root = jobs["root"]
    two = _result(root, job, "train")
    with checkpoint.Checkpointer(root / workdir, train_state.LAYOUT, read_only=True) as ckpt:
        assert ckpt.all_steps() == [10, 20]
        _, restored = checkpoint.restore(ckpt, items=("params", "ema_params", "opt_state", "meta"))
    assert restored["meta"]["step"] == NUM_STEPS
    for name in ("params", "ema_params"):
        leaves, _ = jax.tree_util.tree_flatten_with_path(restored[name])
        flat = {name + jax.tree_util.keystr(path): leaf for path, leaf in leaves}
        _assert_trees_close(
            flat, {k: v for k, v in two.items() if k.startswith(name)}, rtol=0, atol=0
        )
    saved_opt = [v for k, v in two.items() if k.startswith("opt_state")]
    restored_opt = jax.tree_util.tree_leaves(restored["opt_state"])
    assert len(restored_opt) == len(saved_opt)
    for a, b in zip(sorted(restored_opt, key=_fingerprint), sorted(saved_opt, key=_fingerprint)):
        np.testing.assert_array_equal(a, b)


def _fingerprint(x: np.ndarray) -> tuple:
    x = np.asarray(x)
    return (x.shape, str(x.dtype), float(np.sum(x, dtype=np.float64)))


@pytest.mark.multiprocess
def test_checkpoint_of_one_process_restores_in_two_processes(jobs):
    root = jobs["root"]
    one = _state(_result(root, "one", "train"))
    for p in (0, 1):
        _assert_trees_close(_result(root, "two", "restore1", p), one, rtol=0, atol=0)


@pytest.mark.multiprocess
def test_sampling_across_two_processes_matches_one_process(jobs):
    root = jobs["root"]
    names = sorted(n for n in os.listdir(root / "gen1") if n.endswith(".npz"))
    assert names == [sample_command.shard_name(0), sample_command.shard_name(1)]
    assert sorted(n for n in os.listdir(root / "gen2") if n.endswith(".npz")) == names
    for name in names:  # process 0 gathered each shard and wrote the same file
        with np.load(root / "gen1" / name) as one, np.load(root / "gen2" / name) as two:
            assert one["arr_0"].dtype == np.uint8
            np.testing.assert_array_equal(two["arr_0"], one["arr_0"], err_msg=name)
    assert sample_command.read_shards(str(root / "gen2")).shape == (
        GENERATE["num_samples"],
        8,
        8,
        1,
    )
    assert (root / "gen2" / "grid.png").is_file()


# ----------------------------------------------------------------------------------------------
# maybe_initialize's decisions (no process group is started).

_CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


@pytest.fixture
def bare_environment(monkeypatch):
    for name in _CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_cluster_environment_is_left_alone(bare_environment):
    assert not distributed.detected_multiprocess()
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(distributed="off", num_processes=2) is False


def test_cluster_environments_are_detected(bare_environment):
    bare_environment.setenv("SLURM_NTASKS", "4")  # a batch script alone is one process
    assert not distributed.detected_multiprocess()
    bare_environment.setenv("SLURM_STEP_NUM_TASKS", "4")  # inside srun
    assert distributed.detected_multiprocess()
    bare_environment.delenv("SLURM_STEP_NUM_TASKS")
    bare_environment.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert distributed.detected_multiprocess()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"coordinator_address": "127.0.0.1:1234"},
        {"num_processes": 2, "process_id": 0},
        {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
        {"distributed": "maybe"},
    ],
)
def test_incomplete_or_invalid_settings_raise_before_initializing(bare_environment, kwargs):
    with pytest.raises(ValueError):
        distributed.maybe_initialize(**kwargs)
