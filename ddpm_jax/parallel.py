"""Device plumbing: the one place that wraps per-device functions and moves trees between the
host, the local devices and the other hosts. No other module calls jax.pmap or builds a Mesh.

A per-device function (a train step, a sampler, the bits/dim of a batch) is written for one device
and uses collectives over the axis named `AXIS`. A `Wrapper` wraps it once, in one of two ways
(`Parallelism`), with the same per-device semantics:

  pmap       `jax.pmap` over the local devices (the default). Replicated trees carry a leading
             local-device axis, laid out exactly as a pmap over `AXIS` returns them, so that
             feeding a step its own outputs never recompiles it.
  shard_map  `jax.jit` of `jax.shard_map` over a 1-D mesh named `AXIS` of all devices of all
             processes (grouped by process). Replicated trees are global arrays with no device
             axis (`P()`); per-device inputs are global arrays [devices, ...] sharded on their
             leading axis, made from each host's rows by `jax.make_array_from_process_local_data`.

Each argument and output of a wrapped function has a `Place`: REPLICATED (a train state: the same
value on every device, which the function keeps so), PER_DEVICE (a leading device axis; device d
takes row d) or SAME (one value handed to every device as is, e.g. a key). `Wrapper.put` lays a
host tree out for its place, `first_replica` reads a replicated tree back whichever way it was
made, and `Wrapper.local_rows` gives this host's rows of a per-device output.

Both run the body with the same collectives; the shard_map wrapper, like jax's own pmap (which is
itself a jit of shard_map since JAX 0.8), turns off shard_map's replication-type check
(`check_vma=False`): under that check the gradient of a P() parameter is summed over devices
implicitly, so a step written for pmap (`pmean` of per-device gradients) would be off by the
device count.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # the name of the device axis every collective reduces over


class Parallelism(enum.Enum):
    """How a per-device function is spread over the devices (config.train.parallelism)."""

    PMAP = "pmap"  # jax.pmap over the local devices
    SHARD_MAP = "shard_map"  # jax.jit(jax.shard_map) over a 1-D mesh of all devices

    @classmethod
    def _missing_(cls, value):
        allowed = [m.value for m in cls]
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; expected one of {allowed}")


class Place(enum.Enum):
    """Where an argument or output of a wrapped per-device function lives."""

    REPLICATED = "replicated"  # the same value on every device (state, params); see `replicate`
    PER_DEVICE = "per_device"  # a leading device axis [devices, ...]; device d sees row d
    SAME = "same"  # one host value given to every device as is (a key); inputs only


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

    Either layout: a pmap's (a leading device axis: row 0 is taken) or a shard_map wrapper's
    (global arrays with a `P()` sharding: the whole value). No device op (nothing to compile per
    leaf shape), and it works on the host-local replicas of a multi-process job. A copy, because
    on CPU `np.asarray` may alias the device buffer, which the next (donating) step reuses.
    """
    return jax.tree.map(_first_replica, tree)


def _first_replica(x) -> np.ndarray:
    data = np.array(x.addressable_shards[0].data)
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and not any(sharding.spec):
        return data  # a global replicated value (P()): no device axis
    return data[0]


def local_device_indices() -> np.ndarray:
    """Global indices of this host's devices: process_index * local_device_count + [0, n)."""
    n = jax.local_device_count()
    return jax.process_index() * n + np.arange(n, dtype=np.int32)


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


# --------------------------------------------------------------------------------------------
# One interface, two wrappers.
# --------------------------------------------------------------------------------------------


def mesh_devices(devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """The shard_map mesh's devices: those given, or all of all processes grouped by process.

    Grouped by process (process 0's first, each in local order), so that global device index
    process_index * local_device_count + d is local device d, as for pmap and
    `local_device_indices`.
    """
    if devices is not None:
        return np.array(list(devices))
    return np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))


@dataclasses.dataclass(frozen=True)
class Wrapper:
    """Wraps per-device functions one way (`kind`) and lays out their inputs and outputs.

    devices: pmap: the local devices to map over (default: all local devices); shard_map: the
    mesh's devices (default: all devices of all processes). Abstract TPU devices (from
    `jax.experimental.topologies`) work for ahead-of-time lowering.
    """

    kind: Parallelism = Parallelism.PMAP
    devices: tuple[jax.Device, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", Parallelism(self.kind))
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def mesh(self) -> Mesh:
        """The 1-D mesh named `AXIS` of the shard_map wrapper."""
        return Mesh(mesh_devices(self.devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        """How many devices a wrapped function runs on (over all processes for shard_map)."""
        if self.kind is Parallelism.PMAP:
            return len(self.devices) if self.devices else jax.local_device_count()
        return self.mesh.size

    def wrap(
        self,
        fn: Callable,
        *,
        in_places: Sequence[Place],
        out_places: Place | Sequence[Place],
        donate_argnums: Sequence[int] = (),
    ) -> Callable:
        """fn (one device's view, collectives over `AXIS`) -> its wrapped form over all devices.

        Args:
          fn: called with one positional argument per entry of `in_places`; a PER_DEVICE
            argument arrives without its device axis (device d's row).
          in_places: the Place of each argument.
          out_places: the Place of each output (a tuple), or of the single output. Under pmap
            every output has a leading device axis; under shard_map a REPLICATED output is one
            global value (fn must compute the same on every device, e.g. after a pmean: not
            checked) and a PER_DEVICE one gets its device axis back.
          donate_argnums: arguments whose buffers the call may reuse (a train state).
        """
        if self.kind is Parallelism.PMAP:
            in_axes = tuple(None if p is Place.SAME else 0 for p in in_places)
            return pmap(fn, in_axes=in_axes, donate_argnums=donate_argnums, devices=self.devices)
        return _jit_shard_map(fn, self.mesh, tuple(in_places), out_places, donate_argnums)

    def put(self, tree, place: Place):
        """A host (or device) tree laid out as a wrapped function takes it at `place`.

        REPLICATED: pmap: a copy per local device (`replicate`); shard_map: a global P() array.
        SAME: pmap: as is; shard_map: a global P() array. PER_DEVICE: this host's rows
        [local devices, ...]: pmap: as is; shard_map: the global [devices, ...] array they are
        part of (`jax.make_array_from_process_local_data`, no cross-host transfer).
        """
        if tree is None:
            return None
        if self.kind is Parallelism.PMAP:
            return replicate(tree, self.devices) if place is Place.REPLICATED else tree
        spec = PartitionSpec(AXIS) if place is Place.PER_DEVICE else PartitionSpec()
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda x: _make_global(x, sharding), tree)

    def replicate(self, tree):
        """`put(tree, Place.REPLICATED)`: a train state or parameters on every device."""
        return self.put(tree, Place.REPLICATED)

    def local_rows(self, tree):
        """This host's rows [local devices, ...] of a PER_DEVICE output (numpy if gathered)."""
        if self.kind is Parallelism.PMAP or jax.process_count() == 1:
            return tree
        return jax.tree.map(_addressable_rows, tree)

    def abstract(self, tree, place: Place):
        """ShapeDtypeStructs of what `put(tree, place)` would give: for ahead-of-time lowering.

        `tree` holds arrays or ShapeDtypeStructs of the host value (PER_DEVICE: [devices, ...]).
        """
        if self.kind is Parallelism.PMAP:
            lead = (self.num_devices,) if place is Place.REPLICATED else ()
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype), tree)
        spec = PartitionSpec(AXIS) if place is Place.PER_DEVICE else PartitionSpec()
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )


def _jit_shard_map(fn, mesh: Mesh, in_places, out_places, donate_argnums) -> Callable:
    """jit(shard_map(fn)) with pmap's view inside: PER_DEVICE blocks [1, ...] lose their axis."""
    single = isinstance(out_places, Place)
    outs = (out_places,) if single else tuple(out_places)
    unstack = lambda tree: jax.tree.map(lambda x: x[0], tree)
    stack = lambda tree: jax.tree.map(lambda x: x[None], tree)

    def body(*args):
        args = [unstack(a) if p is Place.PER_DEVICE else a for a, p in zip(args, in_places)]
        out = fn(*args)
        out = (out,) if single else tuple(out)
        out = tuple(stack(o) if p is Place.PER_DEVICE else o for o, p in zip(out, outs))
        return out[0] if single else out

    spec = lambda p: PartitionSpec(AXIS) if p is Place.PER_DEVICE else PartitionSpec()
    in_specs = tuple(spec(p) for p in in_places)
    out_specs = spec(outs[0]) if single else tuple(spec(p) for p in outs)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    to_sharding = lambda specs: jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
    return jax.jit(
        mapped,
        in_shardings=to_sharding(in_specs),
        out_shardings=to_sharding(out_specs),
        donate_argnums=tuple(donate_argnums),
    )


def _make_global(x, sharding: NamedSharding) -> jax.Array:
    """One leaf as a global array of `sharding` from this process's part (keys included)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _make_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def _addressable_rows(x) -> np.ndarray:
    """The rows of a [devices, ...] global array that live on this host, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
