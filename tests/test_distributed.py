"""Cluster detection in ddpm_jax.distributed: Kubernetes indexed Jobs and JobSets.

The unit tests set a pod's environment with monkeypatch and record what `maybe_initialize` would
pass to `jax.distributed.initialize` (no process group is started). The end-to-end test starts
two training processes on this machine with only a pod's variables to find each other.
(maybe_initialize's other decisions are tested in tests/test_multihost.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from ddpm_jax import distributed

REPO = Path(__file__).resolve().parents[1]

_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_PORT",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "JOB_COMPLETION_INDEX",
    "JOBSET_NAME",
    "REPLICATED_JOB_NAME",
    "JOBSET_SUBDOMAIN",
)


@pytest.fixture
def pod(monkeypatch):
    """A bare environment; the test sets the variables a pod spec would."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def initialize_calls(monkeypatch):
    """Records jax.distributed.initialize's arguments instead of starting a process group."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False, raising=False)
    return calls


def test_outside_an_indexed_job_nothing_is_detected(pod, initialize_calls):
    assert distributed.kubernetes_settings() is None
    pod.setenv("JAX_NUM_PROCESSES", "4")  # without a pod index, not a Kubernetes job
    assert distributed.kubernetes_settings() is None
    assert not distributed.detected_multiprocess()


def test_single_pod_job_stays_single_process(pod, initialize_calls):
    pod.setenv("JOB_COMPLETION_INDEX", "0")
    assert distributed.kubernetes_settings() == (None, None, 0)
    assert not distributed.detected_multiprocess()
    assert distributed.maybe_initialize() is False
    assert initialize_calls == []


def test_indexed_job_with_coordinator_from_the_pod_spec(pod, initialize_calls):
    pod.setenv("JOB_COMPLETION_INDEX", "3")
    pod.setenv("JAX_NUM_PROCESSES", "4")
    pod.setenv("JAX_COORDINATOR_ADDRESS", "train-0.train-svc:1234")
    assert distributed.detected_multiprocess()
    assert distributed.kubernetes_settings() == ("train-0.train-svc:1234", 4, 3)
    assert distributed.maybe_initialize() is True
    assert initialize_calls == [
        {"coordinator_address": "train-0.train-svc:1234", "num_processes": 4, "process_id": 3}
    ]


def test_jobset_coordinator_is_the_first_pod_behind_the_headless_service(pod, initialize_calls):
    pod.setenv("JOB_COMPLETION_INDEX", "1")
    pod.setenv("JAX_NUM_PROCESSES", "2")
    pod.setenv("JOBSET_NAME", "ddpm")
    pod.setenv("REPLICATED_JOB_NAME", "workers")
    expected = ("ddpm-workers-0-0.ddpm:55527", 2, 1)
    assert distributed.kubernetes_settings() == expected
    pod.setenv("JOBSET_SUBDOMAIN", "net")
    pod.setenv("JAX_COORDINATOR_PORT", "8476")
    expected = ("ddpm-workers-0-0.net:8476", 2, 1)
    assert distributed.kubernetes_settings() == expected
    assert distributed.maybe_initialize() is True
    assert initialize_calls == [dict(zip(distributed.ClusterSettings._fields, expected))]


def test_explicit_settings_win_over_the_pod_environment(pod, initialize_calls):
    pod.setenv("JOB_COMPLETION_INDEX", "1")
    pod.setenv("JAX_NUM_PROCESSES", "2")
    pod.setenv("JOBSET_NAME", "ddpm")
    pod.setenv("REPLICATED_JOB_NAME", "workers")
    pod.setenv("JAX_PROCESS_ID", "0")  # e.g. a JobSet of several Jobs: the user numbers them
    distributed.maybe_initialize(coordinator_address="10.0.0.1:99")
    assert initialize_calls == [
        {"coordinator_address": "10.0.0.1:99", "num_processes": 2, "process_id": 0}
    ]


def test_indexed_job_without_a_coordinator_says_what_is_missing(pod, initialize_calls):
    pod.setenv("JOB_COMPLETION_INDEX", "0")
    pod.setenv("JAX_NUM_PROCESSES", "2")
    assert distributed.detected_multiprocess()
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS.*JOBSET_NAME"):
        distributed.maybe_initialize()
    # distributed="on" leaves the coordinator to JAX's K8sCluster (kubernetes package + API).
    assert distributed.maybe_initialize(distributed="on") is True
    assert initialize_calls == [{"coordinator_address": None, "num_processes": 2, "process_id": 0}]


# ----------------------------------------------------------------------------------------------
# End to end: two processes that know only a pod's variables train together.

JOB_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pod_environment(index: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _VARIABLES}
    env |= {
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JOB_COMPLETION_INDEX": str(index),
        "JAX_NUM_PROCESSES": "2",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # see launch/local_multiprocess.sh
    return env


@pytest.mark.multiprocess
@pytest.mark.xdist_group("launch")
def test_two_pods_of_an_indexed_job_train_together(tmp_path):
    workdir, port = tmp_path / "run", _free_port()
    command = [
        sys.executable,
        "-m",
        "ddpm_jax.main",
        "train",
        "--config",
        "configs/test.py",
        "--workdir",
        str(workdir),
        "--config.train.num_steps=2",
        "--config.model.ch_mult=(1,)",
        "--config.model.attn_resolutions=()",
    ]
    logs = [tmp_path / f"pod{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=_pod_environment(i, port),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
    assert codes == [0, 0], tails
    text = [log.read_text(errors="replace") for log in logs]
    for i in range(2):  # each process got its index from JOB_COMPLETION_INDEX
        assert f"process {i}/2: 2 local devices, 4 global devices" in text[i], tails
    assert (workdir / "checkpoints" / "2").is_dir()
