"""Device plumbing: the one place that wraps per-device functions and moves trees between the
host, the local devices and the other hosts.

A per-device function (a train step, a sampler, the bits/dim of a batch) is written for one device
and uses collectives over the axis named `AXIS`; `pmap` wraps it once. Replicated trees carry a
leading local-device axis, laid out exactly as a pmap over `AXIS` returns them, so that feeding a
step its own outputs never recompiles it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # the name of the device axis every collective reduces over


def pmap(
    fn: Callable,
    *,
    in_axes=0,
    donate_argnums: Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
) -> Callable:
    """`jax.pmap(fn)` over the local devices, with the device axis named `AXIS`."""
    return jax.pmap(
        fn, axis_name=AXIS, in_axes=in_axes, donate_argnums=tuple(donate_argnums), devices=devices
    )


def replicate(tree, devices: Sequence[jax.Device] | None = None):
    """Copies `tree` onto every local device, laid out exactly as a pmap over `AXIS` returns it.

    `flax.jax_utils.replicate` gives arrays on a differently named mesh, which makes the first
    call of a pmap-ed step with its own outputs compile the whole step a second time; it also
    compiles a `stack` per leaf shape. Here: one identity pmap over host copies.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    copies = jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), tree
    )
    return pmap(lambda x: x, devices=devices)(copies)


def first_replica(tree):
    """Replica 0 of a replicated tree, as numpy copies made on the host.

    No device op (nothing to compile per leaf shape), and it works on the host-local replicas of
    a multi-process job. A copy, because on CPU `np.asarray` may alias the device buffer, which
    the next (donating) step reuses.
    """
    return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data)[0], tree)


def local_device_indices() -> np.ndarray:
    """Global indices of this host's devices: process_index * local_device_count + [0, n)."""
    n = jax.local_device_count()
    return jax.process_index() * n + np.arange(n, dtype=np.int32)


def split_for_devices(x: np.ndarray, num_devices: int | None = None) -> np.ndarray:
    """Host rows [n, ...] -> [devices, n / devices, ...] (device d takes a contiguous block)."""
    num_devices = jax.local_device_count() if num_devices is None else num_devices
    x = np.asarray(x)
    if x.shape[0] % num_devices:
        raise ValueError(f"{x.shape[0]} rows do not split over {num_devices} devices")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])


def put_sharded(tree, devices: Sequence[jax.Device] | None = None):
    """Puts each [D, ...] array on the D local devices, slice i on device i (for a pmap-ed step).

    What the removed `jax.device_put_sharded` did: a NamedSharding over a 1-D mesh of the devices,
    splitting axis 0; pmap takes such arrays with no further copy. Keep int64 arrays out (without
    x64 they would be cast to int32).
    """
    devices = jax.local_devices() if devices is None else list(devices)
    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
    return jax.device_put(tree, sharding)


def gather_hosts(x) -> np.ndarray | None:
    """This host's rows [n, ...] -> all hosts' rows [process_count * n, ...], in process order."""
    if x is None:
        return None
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def from_process_zero(value: int) -> int:
    """Process 0's integer `value` on every process (a no-op on one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def on_all_hosts(ok: bool) -> bool:
    """True only where every process reports ok (a no-op on one process)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))
