"""Multi-host start-up through JAX's distributed runtime (TPU pods, SLURM/MPI, Kubernetes).

`maybe_initialize` calls `jax.distributed.initialize` once, before anything touches a device:

* explicitly, when the coordinator is given (flags, or JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID): e.g. `launch/local_multiprocess.sh`;
* by auto-detection, when the environment announces several processes: a SLURM job step
  (`srun`) with several tasks, Open MPI (`mpirun`) with several ranks, or a GKE TPU slice with
  several workers (TPU_WORKER_HOSTNAMES). JAX then reads the rest from the same environment;
* from a Kubernetes indexed Job or JobSet pod's environment (`kubernetes_settings`): the process
  index is JOB_COMPLETION_INDEX (set by Kubernetes), the process count JAX_NUM_PROCESSES (set in
  the pod spec) and the coordinator JAX_COORDINATOR_ADDRESS, or, in a JobSet, the first pod's
  hostname built from JOBSET_NAME and REPLICATED_JOB_NAME (the pod spec maps them from the
  pod's labels). No Kubernetes API access is needed, unlike JAX's own K8sCluster (which needs
  the `kubernetes` package and pod-reading permissions, and is tried with `distributed="on"`);
* always, with `distributed="on"`: for Cloud TPU VM slices, whose worker list JAX reads from the
  GCE metadata server rather than the environment (`launch/tpu_pod.sh` passes it).

Every process then runs the same program: the pmap-ed steps span all devices of all processes,
and each process feeds its own local devices.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
from absl import logging

MODES = ("auto", "on", "off")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


class ClusterSettings(NamedTuple):
    """What `jax.distributed.initialize` needs; None where the environment does not say."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


# The port JAX's own K8sCluster uses, so that both kinds of detection agree on one pod spec.
KUBERNETES_COORDINATOR_PORT = 55527


def kubernetes_settings() -> ClusterSettings | None:
    """A Kubernetes indexed Job's (or JobSet's) settings from the pod's environment.

    Returns None outside an indexed Job (no JOB_COMPLETION_INDEX). The coordinator is
    JAX_COORDINATOR_ADDRESS, else in a JobSet the first pod of the first Job behind the JobSet's
    headless service: `<JOBSET_NAME>-<REPLICATED_JOB_NAME>-0-0.<subdomain>:<port>`, the subdomain
    being JOBSET_SUBDOMAIN (spec.network.subdomain) or the JobSet's name, the port
    JAX_COORDINATOR_PORT or 55527. One Job's pods are the processes: with several Jobs (JobSet
    replicas > 1), the index within a Job is not global, so set JAX_PROCESS_ID yourself.
    """
    process_id = _env_int("JOB_COMPLETION_INDEX")
    if process_id is None:
        return None
    coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    jobset, replicated_job = os.environ.get("JOBSET_NAME"), os.environ.get("REPLICATED_JOB_NAME")
    if coordinator_address is None and jobset and replicated_job:
        subdomain = os.environ.get("JOBSET_SUBDOMAIN") or jobset
        port = os.environ.get("JAX_COORDINATOR_PORT") or KUBERNETES_COORDINATOR_PORT
        coordinator_address = f"{jobset}-{replicated_job}-0-0.{subdomain}:{port}"
    return ClusterSettings(coordinator_address, _env_int("JAX_NUM_PROCESSES"), process_id)


def detected_multiprocess() -> bool:
    """Whether a cluster environment announces more than one process of this job."""
    # SLURM_STEP_NUM_TASKS is set inside `srun` only: a batch script itself (SLURM_NTASKS may be
    # > 1 there) is a single process, which would wait forever for its peers.
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        if (_env_int(name) or 1) > 1:
            return True
    kubernetes = kubernetes_settings()
    if kubernetes is not None and (kubernetes.num_processes or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def _is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)  # jax >= 0.4.36
    return bool(is_initialized and is_initialized())


def maybe_initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = None,
    distributed: str = "auto",
) -> bool:
    """Calls `jax.distributed.initialize` when the job is multi-process; returns whether it did.

    Must run before any jax computation (and before `jax.devices()`). A second call is a no-op.

    Args:
      coordinator_address: "host:port" of process 0 (else JAX_COORDINATOR_ADDRESS or auto-detect).
      num_processes: total processes (else JAX_NUM_PROCESSES or auto-detect).
      process_id: this process's index (else JAX_PROCESS_ID or auto-detect).
      cpu_collectives: "gloo" or "mpi": how processes with CPU devices exchange data. Default:
        keep JAX's setting (JAX_CPU_COLLECTIVES_IMPLEMENTATION), or "gloo" where it has none.
      distributed: "auto" (explicit settings or the environment decide), "on" (always; JAX
        detects what is not given, e.g. on a Cloud TPU VM slice) or "off" (never).

    Raises:
      ValueError: an unknown mode, or a partial explicit setting that JAX cannot complete.
    """
    if distributed not in MODES:
        raise ValueError(f"distributed={distributed!r}: expected one of {MODES}")
    if distributed == "off":
        return False
    if _is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None or num_processes is not None
    detected = detected_multiprocess()
    # JAX's cluster detection does not read a pod's environment: fill in what it says here.
    kubernetes = kubernetes_settings()
    if kubernetes is not None:
        coordinator_address = coordinator_address or kubernetes.coordinator_address
        process_id = process_id if process_id is not None else kubernetes.process_id
        if distributed == "auto" and detected and coordinator_address is None:
            raise ValueError(
                "a Kubernetes indexed Job of several pods needs JAX_COORDINATOR_ADDRESS, or in a "
                "JobSet JOBSET_NAME and REPLICATED_JOB_NAME, in the pod spec's env (or "
                "--distributed=on for JAX's own detection through the Kubernetes API)"
            )
    if distributed == "auto" and not (explicit or detected):
        return False
    given = (coordinator_address, num_processes, process_id)
    if explicit and not detected and None in given:
        raise ValueError(
            "a multi-process job needs all of coordinator_address, num_processes and process_id "
            f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
        )
    if num_processes is not None and process_id is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is not in [0, {num_processes})")
    # The CPU client reads this when it is created, which initialize() triggers: set it first.
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    elif jax.config.jax_cpu_collectives_implementation is None:  # older jax: no default
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # None values are filled in by JAX's cluster detection (TPU, SLURM, Open MPI, K8sCluster).
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def log_topology() -> None:
    """One log line per host: process index, local and global device counts."""
    logging.info(
        "process %d/%d: %d local devices, %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
