"""Multi-host start-up through JAX's own distributed runtime (TPU pods, SLURM/MPI GPU clusters).

A job is multi-process when the coordinator is given explicitly (flags, or the variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or when the environment says so: a
Cloud TPU VM slice with several workers, SLURM with several tasks, or Open MPI with several ranks.
In those cases
`jax.distributed.initialize()` auto-detects the rest.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _detected_multiprocess() -> bool:
    """Whether a cluster environment announces more than one process."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if (_env_int(name) or 1) > 1:
            return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when the job is multi-process; returns whether it did.

    Args:
      coordinator_address: "host:port" of process 0 (else JAX_COORDINATOR_ADDRESS or auto-detect).
      num_processes: total processes (else JAX_NUM_PROCESSES or auto-detect).
      process_id: this process's index (else JAX_PROCESS_ID or auto-detect).
      cpu_collectives: "gloo" (or "mpi") for multi-process jobs on CPU devices.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not (explicit or _detected_multiprocess()):
        return False
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(
            "a multi-process job needs all of coordinator_address, num_processes and process_id "
            f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()
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
