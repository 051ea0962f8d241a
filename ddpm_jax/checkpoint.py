"""Checkpoints: a thin wrapper around orbax-checkpoint's `CheckpointManager`.

Layout (one orbax Composite checkpoint per step)::

  <workdir>/checkpoints/<step>/
      params/  ema_params/  opt_state/   pytrees of arrays (orbax PyTree items)
      meta/                              JSON: step, num_skipped, ... (small things)
      config/                            JSON of the ml_collections config (config.to_dict())

Completeness. A step directory only ever appears complete or not at all:
  * local / POSIX paths: orbax writes into `<step>.orbax-checkpoint-tmp` (older orbax:
    `<step>.orbax-checkpoint-tmp-<timestamp>`) and renames it to `<step>` once every item is
    written (an atomic rename on POSIX; orbax 0.12 also writes `commit_success.txt` first).
  * gs:// paths: orbax writes `<step>/` in place and marks completion with
    `<step>/commit_success.txt` last (GCS has no atomic directory rename).
  `latest_step()` lists the directory with orbax's own test of finalisation
  (`ocp.utils.checkpoint_steps`), not the manager's in-memory list, which already holds a step
  whose asynchronous save is still in flight. A tmp directory left by a crash is ignored, and
  removed by the next writing `Checkpointer` before its first save (`cleanup_tmp_directories`).
  A partial save never replaces a good one: an existing step is never written again (unless
  `restore` found it unreadable and fell back past it: then the resumed run writes it anew), and
  old steps are deleted (`max_to_keep`) only after the new one is finalised, not when it failed.

Errors. The step directory is created synchronously (orbax 0.12 would create it in the
background), so an unwritable path raises in `save`; errors of the background write surface from
`check_for_errors` (once the write ended; the trainer calls it every log interval), the next
`save` that writes, `wait_until_finished`, `restore` or `close`.

Multi-host. Every process calls the same methods in the same order with the same step (save,
restore, wait_until_finished, reached_preemption, close); orbax runs the barriers. Arrays that are
host-local on a multi-process run (numpy, or jax arrays on this host's devices, e.g. the
unreplicated train state) are written by process 0 only; globally sharded jax arrays are written
shard by shard. `restore(step=None)` takes process 0's choice of step and falls back on all hosts
together when any host fails to read one. The checkpoint directory must be shared (GCS, NFS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import files, parallel

CHECKPOINTS_DIR = "checkpoints"
# Names of the items a step holds, kept in its meta (empty pytrees are not written: orbax refuses
# them). Stripped from the meta that `restore_step` returns.
_ITEMS_KEY = "checkpoint_items"
META = "meta"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The items of one checkpoint step: pytrees of arrays, and small JSON dicts.

    The trainer owns its layout (`train_state.LAYOUT`); "meta" (JSON, holding at least the step)
    is always one of the JSON items.
    """

    trees: tuple[str, ...]
    jsons: tuple[str, ...] = (META,)

    @property
    def names(self) -> tuple[str, ...]:
        return self.trees + self.jsons


class TargetMismatchError(ValueError):
    """The checkpoint does not fit the target: raised at once, never a reason to fall back."""


class Checkpointer:
    """Saves and restores the steps of one run under `<workdir>/checkpoints`, in a `Layout`.

    Example::

      with Checkpointer(workdir, layout, keep=3) as ckpt:
          step = ckpt.latest_step()
          ...
          ckpt.save(step, trees={"params": p, ...}, jsons={"meta": {...}})

    Falling back past an unreadable step is `restore_newest`; shape diagnostics are
    `check_matches`; both are plain functions beside this class.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        layout: Layout,
        *,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """Args:
        workdir: the run's directory; checkpoints go to `<workdir>/checkpoints/<step>`.
        layout: the items of a step.
        keep: newest complete checkpoints kept (None: all).
        async_save: write in a background thread after the device-to-host copy.
        read_only: never create, write or clean up anything (sample/eval jobs that read the
          checkpoints of a running trainer must not remove its in-flight tmp directory).
        """
        # orbax refuses relative paths (`--workdir runs/digits`): made absolute here, once.
        self.directory = epath.Path(files.absolute(workdir)) / CHECKPOINTS_DIR
        self.layout = layout
        self.read_only = read_only
        self._options = _manager_options(keep=keep, async_save=async_save, read_only=read_only)
        self._manager: ocp.CheckpointManager | None = None
        # Steps that `restore_newest` found unreadable; `save` may write them again.
        self.unreadable: set[int] = set()
        if not read_only:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(f"Checkpoint path {self.directory} is not a directory.")
            self._get_manager()  # creates the directory, removes stale tmp directories

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- queries --------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete (finalised) checkpoint steps on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        steps = ocp.utils.checkpoint_steps(self.directory)
        return sorted(s for s in steps if (self.step_dir(s) / META).is_dir())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None; in-flight and tmp steps do not count."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def reached_preemption(self, step: int) -> bool:
        """Whether all hosts reached orbax's preemption sync point (call every step, all hosts)."""
        return bool(self._get_manager().reached_preemption(int(step)))

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # -- save -----------------------------------------------------------------------------

    def save(self, step: int, *, trees: Mapping[str, Any], jsons: Mapping[str, Any]) -> bool:
        """Starts writing checkpoint `step` (asynchronously unless `async_save=False`).

        Args:
          step: the training step (number of updates applied to the parameters).
          trees: item name -> pytree of numpy / jax arrays (host-local or globally sharded);
            numpy buffers must not be modified in place until the save finished. An empty pytree
            is recorded as absent.
          jsons: item name -> JSON-serialisable dict; "meta" is required ("step" is added).

        Returns:
          Whether a save was started (False: `step` is in flight or complete already).
        """
        if self.read_only:
            raise PermissionError(f"Checkpointer for {self.directory} is read-only.")
        step = int(step)
        unknown = sorted(set(trees) - set(self.layout.trees)) + sorted(
            set(jsons) - set(self.layout.jsons)
        )
        if unknown or META not in jsons:
            raise ValueError(f"Items {unknown or [META]} do not fit the layout {self.layout}.")
        meta = dict(jsons[META])
        if meta.setdefault("step", step) != step:
            raise ValueError(f"meta['step']={meta['step']} differs from the saved step {step}.")
        manager = self._get_manager()
        if step in self.unreadable:
            self._remove_unreadable(step, manager)
        if step in manager.all_steps() or step in self.all_steps():
            return False  # in flight, or complete on disk: never overwrite a checkpoint
        written = [name for name, tree in trees.items() if jax.tree_util.tree_leaves(tree)]
        args = {name: ocp.args.PyTreeSave(_savable(trees[name])) for name in written}
        items = [*written, *jsons]
        for name, value in jsons.items():
            value = {**meta, _ITEMS_KEY: items} if name == META else value
            args[name] = ocp.args.JsonSave(_plain_json(value))
        with self._resync_on_error():
            return bool(manager.save(step, args=ocp.args.Composite(**args), force=True))

    def check_for_errors(self) -> None:
        """Raises the error of a background save that already failed; never waits.

        Cheap enough to call every few steps, so that a write that failed (disk full, lost
        permissions) stops the job at once rather than at the next checkpoint.
        """
        in_progress = getattr(self._manager, "is_saving_in_progress", None)
        if in_progress is not None and not in_progress():
            self.wait_until_finished()  # nothing left to wait for: joins and re-raises

    def wait_until_finished(self) -> None:
        """Blocks until the in-flight save is finalised; raises its error if it failed."""
        if self._manager is not None:
            with self._resync_on_error():
                self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the in-flight save (raising its error) and releases orbax's resources."""
        if self._manager is None:
            return
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()
            self._manager = None

    # -- restore --------------------------------------------------------------------------

    def restore_step(
        self, step: int, *, target: Mapping[str, Any] | None = None, items: Iterable[str]
    ) -> dict[str, Any]:
        """Reads `items` of one complete step.

        Args:
          step: the step to read.
          target: tree item name -> pytree of arrays, jax.ShapeDtypeStruct or jax.Array giving
            the structure, shapes and dtypes (and, for jax leaves with a sharding, the placement)
            to restore into. Items without a target come back as saved, as numpy arrays.
          items: names from the layout.

        Returns:
          item name -> value; a JSON item the step does not hold comes back as None, a tree item
          it holds as empty (e.g. a pretrained checkpoint's optimiser state) as {}.

        Raises:
          FileNotFoundError: `step` is not a complete checkpoint.
          TargetMismatchError: a target does not match the checkpoint (see `check_matches`).
        """
        self.wait_until_finished()  # a failed in-flight save raises here, as a save error
        items, target = tuple(items), dict(target or {})
        unknown = sorted(set(items) - set(self.layout.names))
        unknown += sorted(set(target) - set(self.layout.trees))
        if unknown:
            raise ValueError(
                f"Unknown checkpoint item(s) {unknown}; items are {self.layout.names}."
            )
        step = int(step)
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint {self.step_dir(step)}.")
        manager = self._get_manager()
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[META]
        meta = dict(meta)
        held = meta.pop(_ITEMS_KEY, None) or self._listed_items(step)
        out, args = {META: meta}, {}
        for name in items:
            if name == META:
                continue
            if name not in held:
                out[name] = self._absent_item(step, name, target.get(name))
            elif name in self.layout.trees:
                args[name] = self._tree_restore_args(step, name, target.get(name))
            else:
                args[name] = ocp.args.JsonRestore()
        if args:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
            out.update({name: restored[name] for name in args})
        return {name: out[name] for name in items}

    def _listed_items(self, step: int) -> list[str]:
        """Items present as sub-directories (for checkpoints whose meta does not list them)."""
        return [name for name in self.layout.names if (self.step_dir(step) / name).is_dir()]

    def _absent_item(self, step: int, name: str, target: Any) -> Any:
        """An item the step does not hold: an empty pytree (e.g. pretrained opt_state) or None."""
        if name not in self.layout.trees:
            return None
        if target is not None and jax.tree_util.tree_leaves(target):
            raise TargetMismatchError(
                f"Checkpoint {self.step_dir(step)} holds no {name!r} (it was saved empty), "
                f"but the target expects {len(jax.tree_util.tree_leaves(target))} arrays."
            )
        return {} if target is None else target

    def _tree_restore_args(self, step: int, name: str, target: Any) -> ocp.args.PyTreeRestore:
        """Per-leaf restore args: as saved (numpy) without a target, else the target's."""
        path = self.step_dir(step) / name
        saved = tree_metadata(path)
        if target is None:
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved, is_leaf=_is_array_like
            )
            return ocp.args.PyTreeRestore(restore_args=restore_args)
        check_matches(saved, target, name=name, path=path)
        restore_args = jax.tree_util.tree_map(_leaf_restore_args, target)
        return ocp.args.PyTreeRestore(item=target, restore_args=restore_args)

    # -- internals ------------------------------------------------------------------------

    def _remove_unreadable(self, step: int, manager: ocp.CheckpointManager) -> None:
        """Deletes step `step`, which `restore_newest` could not read, so it can be written again.

        Otherwise the resumed run, which recomputes exactly that state, would skip saving it
        ("never overwrite"), and every restart would fall back past it again.
        """
        self.unreadable.discard(step)
        if step in manager.all_steps():
            logging.warning("Replacing the unreadable checkpoint %s.", self.step_dir(step))
            with self._resync_on_error():
                manager.delete(step)

    def _get_manager(self) -> ocp.CheckpointManager:
        """The orbax manager, created on first use (read-only: once the directory exists)."""
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options, handler_registry=_registry(self.layout)
            )
        return self._manager

    @contextlib.contextmanager
    def _resync_on_error(self):
        """After a failed save, re-reads the step list: orbax's copy then misses good steps."""
        try:
            yield
        except BaseException:
            if self._manager is not None:
                with contextlib.suppress(Exception):
                    self._manager.reload()
            raise


# -- the fallback policy --------------------------------------------------------------------


def restore_newest(
    ckpt: Checkpointer, *, target: Mapping[str, Any] | None = None, items: Iterable[str]
) -> tuple[int, dict[str, Any]]:
    """(step, items) of the newest restorable step, falling back to older ones with a warning.

    All hosts take the same path: process 0 picks the step, and a step that fails on any host is
    skipped on all. A step found unreadable is marked so that the resumed run may write it anew.

    Raises:
      FileNotFoundError: no complete checkpoint.
      TargetMismatchError: the newest step does not fit the target (never a reason to fall back).
      RuntimeError: no checkpoint could be read (chained to the last error).
    """
    steps = ckpt.all_steps()
    if not parallel.from_process_zero(len(steps)):
        raise FileNotFoundError(f"No complete checkpoint in {ckpt.directory}.")
    bound, error = None, None
    while True:
        older = [s for s in steps if bound is None or s < bound]
        step = parallel.from_process_zero(older[-1] if older else -1)
        if step < 0:
            raise RuntimeError(
                f"No checkpoint in {ckpt.directory} could be restored "
                f"(tried steps {sorted(steps, reverse=True)})."
            ) from error
        try:
            out, error = ckpt.restore_step(step, target=target, items=items), None
        except TargetMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means: try an older one
            out, error = None, e
        if parallel.on_all_hosts(error is None):
            return step, out
        logging.warning(
            "Checkpoint step %d in %s cannot be restored (%s); falling back to an older one.",
            step,
            ckpt.directory,
            f"{type(error).__name__}: {error}" if error else "failed on another host",
        )
        ckpt.unreadable.add(step)
        bound = step


def restore(
    ckpt: Checkpointer,
    step: int | None = None,
    *,
    target: Mapping[str, Any] | None = None,
    items: Iterable[str],
) -> tuple[int, dict[str, Any]]:
    """(step, items) of `step`, or of the newest restorable step when `step` is None."""
    if step is None:
        return restore_newest(ckpt, target=target, items=items)
    return int(step), ckpt.restore_step(step, target=target, items=items)


# -- orbax set-up ---------------------------------------------------------------------------


def _registry(layout: Layout) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in layout.trees:
        registry.add(name, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler)
        registry.add(name, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    for name in layout.jsons:
        registry.add(name, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(name, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


def _manager_options(*, keep, async_save, read_only) -> ocp.CheckpointManagerOptions:
    """CheckpointManagerOptions for a writer or a reader."""
    if read_only:
        # save_interval_steps=0: what read_only sets anyway, given here to spare its warning.
        return ocp.CheckpointManagerOptions(
            read_only=True, create=False, enable_async_checkpointing=False, save_interval_steps=0
        )
    # orbax 0.12 creates the step directory in a background thread by default; when that fails,
    # its writer threads wait for the directory until a coordination timeout (minutes) and block
    # the exit. Creating it in `save` is cheap, and raises there.
    async_options = (
        ocp.AsyncOptions(create_directories_asynchronously=False) if async_save else None
    )
    policy = None if keep is None else ocp.checkpoint_managers.LatestN(keep)
    return ocp.CheckpointManagerOptions(
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        async_options=async_options,
        preservation_policy=policy,
    )


def tree_metadata(path: epath.Path) -> Any:
    """The saved pytree of per-array metadata (shape, dtype) of one item."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    return getattr(metadata, "tree", metadata)  # a TreeMetadata in newer orbax, else the tree


# -- shape diagnostics ----------------------------------------------------------------------


def _is_array_like(x: Any) -> bool:
    """Arrays, ShapeDtypeStructs and orbax ArrayMetadata: anything with a shape and dtype."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _savable(tree: Any) -> Any:
    """Leaves orbax can write: host-local arrays become numpy on multi-process runs."""
    multi_process = jax.process_count() > 1

    def leaf(x):
        if isinstance(x, jax.Array):
            # A fully addressable array on one of several hosts is a host-local copy (e.g. the
            # unreplicated state); as numpy, orbax writes it from process 0 only.
            return np.asarray(x) if multi_process and x.is_fully_addressable else x
        return x if isinstance(x, np.ndarray) else np.asarray(x)

    return jax.tree_util.tree_map(leaf, tree)


def _leaf_restore_args(leaf: Any) -> ocp.RestoreArgs:
    """jax leaves with a sharding restore as jax.Array there; all others as numpy."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and sharding is not None:
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)


def key_name(key: Any) -> str:
    """One pytree path element as text: dict key, attribute (namedtuple / dataclass) or index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """'a/b/0/c' -> shape, for every array leaf (saved metadata and targets alike)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
    return {"/".join(key_name(k) for k in path): _shape(leaf) for path, leaf in leaves}


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))


def check_matches(saved: Any, target: Any, *, name: str, path: Any) -> None:
    """Raises TargetMismatchError naming the first shape mismatch and missing / unexpected keys."""
    saved_shapes, target_shapes = shapes_by_path(saved), shapes_by_path(target)
    problems = []
    for key, shape in target_shapes.items():
        if key in saved_shapes and saved_shapes[key] != shape:
            problems.append(
                f"first mismatched parameter {name}/{key}: saved shape {saved_shapes[key]}, "
                f"expected shape {shape}"
            )
            break
    missing = [k for k in target_shapes if k not in saved_shapes]
    extra = [k for k in saved_shapes if k not in target_shapes]
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint: {_head(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s) in the checkpoint: {_head(extra)}")
    if problems:
        raise TargetMismatchError(
            f"Checkpoint {path} does not match the target {name!r} (was it written with a "
            f"different model config?): " + "; ".join(problems)
        )


def _head(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


def _plain_json(obj: Any) -> Any:
    """`obj` as plain JSON data; numpy scalars and arrays converted."""

    def default(x):
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, (np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        raise TypeError(f"{x!r} ({type(x).__name__}) cannot be stored in a checkpoint's JSON.")

    return json.loads(json.dumps(obj, default=default))
