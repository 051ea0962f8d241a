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
import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import files

CHECKPOINTS_DIR = "checkpoints"
TREE_ITEMS = ("params", "ema_params", "opt_state")
JSON_ITEMS = ("meta", "config")
ALL_ITEMS = TREE_ITEMS + JSON_ITEMS
DEFAULT_RESTORE_ITEMS = ("params", "ema_params", "opt_state", "meta")
# Names of the items a step holds, kept in its meta (empty pytrees are not written: orbax refuses
# them). Stripped from the meta that `restore` returns.
_ITEMS_KEY = "checkpoint_items"


class _TargetMismatchError(ValueError):
    """The checkpoint does not fit the target: raised at once, never a reason to fall back."""


class Checkpointer:
    """Saves and restores the train state of one run under `<workdir>/checkpoints`.

    Example::

      with Checkpointer(workdir, max_to_keep=3) as ckpt:
          if ckpt.latest_step() is not None:
              restored = ckpt.restore(target={"params": p, "ema_params": e, "opt_state": o})
          ...
          ckpt.save(step, params=p, ema_params=e, opt_state=o, meta={"num_skipped": 0},
                    config=config.to_dict())
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """Args:
        workdir: the run's directory; checkpoints go to `<workdir>/checkpoints/<step>`.
        max_to_keep: newest complete checkpoints kept (None: all).
        save_interval_steps: `save` without `force` writes only every this many steps.
        async_save: write in a background thread after the device-to-host copy.
        read_only: never create, write or clean up anything (sample/eval jobs that read the
          checkpoints of a running trainer must not remove its in-flight tmp directory).
        """
        # orbax refuses relative paths (`--workdir runs/digits`): made absolute here, once.
        self.directory = epath.Path(files.absolute(workdir)) / CHECKPOINTS_DIR
        self.read_only = read_only
        self._options = _manager_options(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            async_save=async_save,
            read_only=read_only,
        )
        self._manager: ocp.CheckpointManager | None = None
        # Steps that `restore` found unreadable and skipped; `save` may write them again.
        self._unreadable: set[int] = set()
        if not read_only:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(f"Checkpoint path {self.directory} is not a directory.")
            self._get_manager()  # creates the directory, removes stale tmp directories

    # -- context manager ------------------------------------------------------------------

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
        return sorted(s for s in steps if (self._step_dir(s) / "meta").is_dir())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None; in-flight and tmp steps do not count."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def reached_preemption(self, step: int) -> bool:
        """Whether all hosts reached orbax's preemption sync point (call every step, all hosts)."""
        return bool(self._get_manager().reached_preemption(int(step)))

    # -- save -----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: Any,
        ema_params: Any,
        opt_state: Any,
        meta: Mapping[str, Any],
        config: Mapping[str, Any] | Any | None = None,
        force: bool = False,
    ) -> bool:
        """Starts writing checkpoint `step` (asynchronously unless `async_save=False`).

        Args:
          step: the training step (number of updates applied to `params`).
          params, ema_params, opt_state: pytrees of numpy / jax arrays (host-local or globally
            sharded). Numpy buffers must not be modified in place until the save finished.
          meta: small JSON-serialisable dict (e.g. num_skipped); "step" is added.
          config: `config.to_dict()` (or the ConfigDict itself); stored as JSON.
          force: write even when `step` is not a multiple of `save_interval_steps`.

        Returns:
          Whether a save was started (False: skipped by the interval, or `step` already saved).
        """
        if self.read_only:
            raise PermissionError(f"Checkpointer for {self.directory} is read-only.")
        step = int(step)
        meta = dict(meta)
        if meta.setdefault("step", step) != step:
            raise ValueError(f"meta['step']={meta['step']} differs from the saved step {step}.")
        manager = self._get_manager()
        # Decide before converting anything, so skipped steps cost nothing.
        if not force and not manager.should_save(step):
            return False
        if step in self._unreadable:
            self._remove_unreadable(step, manager)
        if step in manager.all_steps() or step in self.all_steps():
            return False  # in flight, or complete on disk: never overwrite a checkpoint
        trees = {"params": params, "ema_params": ema_params, "opt_state": opt_state}
        written = [name for name, tree in trees.items() if jax.tree_util.tree_leaves(tree)]
        items = [*written, "meta"] + (["config"] if config is not None else [])
        args = {name: ocp.args.PyTreeSave(_savable(trees[name])) for name in written}
        args["meta"] = ocp.args.JsonSave(_jsonable({**meta, _ITEMS_KEY: items}))
        if config is not None:
            args["config"] = ocp.args.JsonSave(_jsonable(_config_dict(config)))
        with self._resync_on_error():
            # force=True: the interval was checked above (checking twice would pass the
            # preemption sync point twice).
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

    def restore(
        self,
        step: int | None = None,
        *,
        target: Mapping[str, Any] | None = None,
        items: Iterable[str] = DEFAULT_RESTORE_ITEMS,
    ) -> dict[str, Any]:
        """Restores `items` of checkpoint `step` (default: the newest restorable one).

        Args:
          step: the step to read; None: the newest complete one, falling back (with a warning)
            to older ones while a checkpoint cannot be read (truncated / deleted files).
          target: item name -> pytree of arrays, jax.ShapeDtypeStruct or jax.Array giving the
            structure, shapes and dtypes (and, for jax leaves with a sharding, the placement) to
            restore into. Items without a target come back as saved, as numpy arrays.
          items: which of "params", "ema_params", "opt_state", "meta", "config" to read.

        Returns:
          dict item name -> restored value ("config": None when the step has none).

        Raises:
          FileNotFoundError: no complete checkpoint (or not `step`) under `self.directory`.
          ValueError: a target does not match the checkpoint (names the first mismatched
            parameter with both shapes, and the missing / unexpected keys).
          RuntimeError: no checkpoint could be read (chained to the last error).
        """
        return self._restore(step, target, items)[1]

    def read_config(self, step: int | None = None) -> dict[str, Any]:
        """The config dict stored with checkpoint `step` (default: the newest restorable)."""
        step, out = self._restore(step, None, ("config",))
        if out["config"] is None:
            raise FileNotFoundError(f"Checkpoint {self._step_dir(step)} holds no config.")
        return out["config"]

    def _restore(self, step, target, items) -> tuple[int, dict[str, Any]]:
        """Restores and returns (the step read, the items)."""
        self.wait_until_finished()  # a failed in-flight save raises here, as a save error
        items = tuple(items)
        target = dict(target or {})
        unknown = sorted(set(items) - set(ALL_ITEMS)) + sorted(set(target) - set(TREE_ITEMS))
        if unknown:
            raise ValueError(f"Unknown checkpoint item(s) {unknown}; items are {ALL_ITEMS}.")
        if step is not None:
            step = int(step)
            if step not in self.all_steps():
                raise FileNotFoundError(f"No complete checkpoint {self._step_dir(step)}.")
            return step, self._restore_step(step, target, items)
        return self._restore_newest(target, items)

    def _restore_newest(self, target, items) -> tuple[int, dict[str, Any]]:
        """Newest readable step, falling back to older ones; all hosts take the same path."""
        steps = self.all_steps()
        if not _on_all_hosts_from_first(len(steps)):
            raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        bound, error = None, None
        while True:
            older = [s for s in steps if bound is None or s < bound]
            step = _on_all_hosts_from_first(older[-1] if older else -1)
            if step < 0:
                raise RuntimeError(
                    f"No checkpoint in {self.directory} could be restored "
                    f"(tried steps {sorted(steps, reverse=True)})."
                ) from error
            try:
                out, error = self._restore_step(step, target, items), None
            except _TargetMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means: try an older one
                out, error = None, e
            if _ok_on_all_hosts(error is None):
                return step, out
            logging.warning(
                "Checkpoint step %d in %s cannot be restored (%s); falling back to an older one.",
                step,
                self.directory,
                f"{type(error).__name__}: {error}" if error else "failed on another host",
            )
            self._unreadable.add(step)
            bound = step

    def _restore_step(self, step: int, target, items) -> dict[str, Any]:
        """Reads `items` of one step; meta first, since it lists what the step holds."""
        manager = self._get_manager()
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        meta = dict(meta)
        held = meta.pop(_ITEMS_KEY, None) or _listed_items(self._step_dir(step))
        out, args = {"meta": meta}, {}
        for name in items:
            if name == "meta":
                continue
            if name not in held:
                out[name] = self._absent_item(step, name, target.get(name))
            elif name in TREE_ITEMS:
                args[name] = self._tree_restore_args(step, name, target.get(name))
            else:
                args[name] = ocp.args.JsonRestore()
        if args:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
            out.update({name: restored[name] for name in args})
        return {name: out[name] for name in items}

    def _absent_item(self, step: int, name: str, target: Any) -> Any:
        """An item the step does not hold: an empty pytree (e.g. pretrained opt_state) or config."""
        if name not in TREE_ITEMS:
            return None
        if target is not None and jax.tree_util.tree_leaves(target):
            raise _TargetMismatchError(
                f"Checkpoint {self._step_dir(step)} holds no {name!r} (it was saved empty), "
                f"but the target expects {len(jax.tree_util.tree_leaves(target))} arrays."
            )
        return {} if target is None else target

    def _tree_restore_args(self, step: int, name: str, target: Any) -> ocp.args.PyTreeRestore:
        """Per-leaf restore args: as saved (numpy) without a target, else the target's."""
        path = self._step_dir(step) / name
        saved = _tree_metadata(path)
        if target is None:
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved, is_leaf=_is_array_like
            )
            return ocp.args.PyTreeRestore(restore_args=restore_args)
        _check_matches(saved, target, name=name, path=path)
        restore_args = jax.tree_util.tree_map(_leaf_restore_args, target)
        return ocp.args.PyTreeRestore(item=target, restore_args=restore_args)

    # -- internals ------------------------------------------------------------------------

    def _remove_unreadable(self, step: int, manager: ocp.CheckpointManager) -> None:
        """Deletes step `step`, which `restore` could not read, so that it can be written again.

        Otherwise the resumed run, which recomputes exactly that state, would skip saving it
        ("never overwrite"), and every restart would fall back past it again.
        """
        self._unreadable.discard(step)
        if step in manager.all_steps():
            logging.warning("Replacing the unreadable checkpoint %s.", self._step_dir(step))
            with self._resync_on_error():
                manager.delete(step)

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _get_manager(self) -> ocp.CheckpointManager:
        """The orbax manager, created on first use (read-only: once the directory exists)."""
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options, item_handlers=_item_handlers()
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


def save_pretrained(workdir: str | epath.PathLike, params: Any, config: Any) -> None:
    """Writes converted weights as step 0: params = ema_params, empty opt_state, and the config.

    Raises:
      FileExistsError: `<workdir>/checkpoints/0` already exists.
    """
    with Checkpointer(workdir, max_to_keep=None, async_save=False) as ckpt:
        if 0 in ckpt.all_steps():
            raise FileExistsError(f"Checkpoint {ckpt.directory / '0'} already exists.")
        ckpt.save(
            0,
            params=params,
            ema_params=params,
            opt_state={},
            meta={"step": 0, "source": "pretrained"},
            config=config,
            force=True,
        )


def restore_ema_params(
    workdir: str | epath.PathLike, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """(EMA params as numpy arrays, config dict) of `step` (default: newest restorable).

    Reads only the ema_params and config items and writes nothing (safe beside a running trainer).

    Raises:
      FileNotFoundError: no (complete) checkpoint under `<workdir>/checkpoints`, or no config.
    """
    with Checkpointer(workdir, read_only=True) as ckpt:
        step, out = ckpt._restore(step, None, ("ema_params", "config"))
        if out["config"] is None:
            raise FileNotFoundError(f"Checkpoint {ckpt.directory / str(step)} holds no config.")
    logging.info("Restored EMA params of step %d from %s.", step, ckpt.directory)
    return out["ema_params"], out["config"]


# -- orbax set-up ---------------------------------------------------------------------------


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    handlers = {name: ocp.PyTreeCheckpointHandler() for name in TREE_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return handlers


def _manager_options(*, max_to_keep, save_interval_steps, async_save, read_only):
    """CheckpointManagerOptions, passing only the fields this orbax version has."""
    if read_only:  # values read_only would otherwise override with a warning each
        kwargs = dict(read_only=True, create=False, save_interval_steps=0)
        kwargs.update(enable_async_checkpointing=False)
    else:
        kwargs = dict(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        async_fields = {f.name for f in dataclasses.fields(ocp.AsyncOptions)}
        if async_save and "create_directories_asynchronously" in async_fields:
            # orbax 0.12 creates the step directory in a background thread by default; when that
            # fails, its writer threads wait for the directory until a coordination timeout
            # (minutes) and block the exit. Creating it in `save` is cheap, and raises there.
            kwargs["async_options"] = ocp.AsyncOptions(create_directories_asynchronously=False)
    fields = {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}
    return ocp.CheckpointManagerOptions(**{k: v for k, v in kwargs.items() if k in fields})


def _listed_items(step_dir: epath.Path) -> list[str]:
    """Items present as sub-directories (for checkpoints whose meta does not list them)."""
    return [name for name in ALL_ITEMS if (step_dir / name).is_dir()]


def _tree_metadata(path: epath.Path) -> Any:
    """The saved pytree of per-array metadata (shape, dtype) of one item."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    return getattr(metadata, "tree", metadata)  # a TreeMetadata in newer orbax, else the tree


# -- pytree helpers -------------------------------------------------------------------------


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


def _key_name(key: Any) -> str:
    """One path element as text: dict key, attribute (namedtuple / dataclass) or index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """'a/b/0/c' -> shape, for every array leaf (saved metadata and targets alike)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
    return {"/".join(_key_name(k) for k in path): _shape(leaf) for path, leaf in leaves}


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))


def _check_matches(saved: Any, target: Any, *, name: str, path: epath.Path) -> None:
    """Raises ValueError naming the first shape mismatch and missing / unexpected keys."""
    saved_shapes, target_shapes = _shapes_by_path(saved), _shapes_by_path(target)
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
        raise _TargetMismatchError(
            f"Checkpoint {path} does not match the target {name!r} (was it written with a "
            f"different model config?): " + "; ".join(problems)
        )


def _head(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


# -- JSON items -----------------------------------------------------------------------------


def _config_dict(config: Any) -> Any:
    """A ConfigDict's plain dict (FieldReferences resolved); dicts pass through."""
    return config.to_dict() if hasattr(config, "to_dict") else config


def _jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data (numpy scalars, arrays, dtypes and enums converted)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    with contextlib.suppress(TypeError):
        return np.dtype(x).name  # dtypes and scalar types such as jnp.bfloat16
    raise TypeError(f"{x!r} ({type(x).__name__}) cannot be stored in a checkpoint's JSON.")


# -- multi-host agreement -------------------------------------------------------------------


def _on_all_hosts_from_first(value: int) -> int:
    """Process 0's `value` on every process (a no-op on one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only multi-process

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def _ok_on_all_hosts(ok: bool) -> bool:
    """True only where every process reports ok (a no-op on one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only multi-process

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))
