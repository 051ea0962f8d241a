"""Checkpoint wrapper: round trips, rotation, completeness, corruption fallback, failures."""

import asyncio
import glob
import json
import logging
import os
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint, train_state

# The rename that finalises a step on local disk (orbax's public `path` module).
_FINALIZE = ocp.path.atomicity.AtomicRenameTemporaryPath


def _params(seed=0, width=4):
    rng = np.random.default_rng(seed)
    return {
        "conv_in": {
            "kernel": rng.standard_normal((3, 3, 1, width)).astype(np.float32),
            "bias": rng.standard_normal(width).astype(np.float32),
        },
        "temb": {"kernel": jnp.asarray(rng.standard_normal((width, 2 * width)), jnp.bfloat16)},
        "norm": {"scale": np.ones(width, np.float32)},
    }


def _adam_state(params):
    """An Adam state after one update, so mu, nu and count are all non-trivial."""
    tx = optax.adam(1e-3)
    f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(f32)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), f32)
    return tx.update(grads, state, f32)[1]


def _flat(tree):
    """'path' -> numpy array, with the same path names for namedtuples and dicts."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(checkpoint.key_name(k) for k in p): np.asarray(x) for p, x in leaves}


def _assert_bitwise_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        assert fa[key].shape == fb[key].shape, key
        assert fa[key].tobytes() == fb[key].tobytes(), key


LAYOUT = train_state.LAYOUT
DEFAULT_ITEMS = ("params", "ema_params", "opt_state", "meta")


def _ckpt(path, **kwargs):
    return checkpoint.Checkpointer(path, LAYOUT, **kwargs)


def _save(ckpt, step, params, meta=None):
    trees = {"params": params, "ema_params": params, "opt_state": _adam_state(params)}
    return ckpt.save(step, trees=trees, jsons={"meta": meta or {"num_skipped": 0}})


def _restore(ckpt, step=None, *, target=None, items=DEFAULT_ITEMS):
    return checkpoint.restore(ckpt, step, target=target, items=items)[1]


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def test_round_trip_is_bitwise(tmp_path):
    params, ema = _params(0), _params(1)
    opt_state = _adam_state(params)
    config = ml_collections.ConfigDict({"model": {"ch": 8, "ch_mult": (1, 2)}, "seed": 3})
    meta = {"step": 7, "num_skipped": 2, "note": "x"}
    with _ckpt(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        trees = {"params": params, "ema_params": ema, "opt_state": opt_state}
        assert ckpt.save(7, trees=trees, jsons={"meta": meta, "config": config.to_dict()})
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 7
        assert os.path.isdir(tmp_path / "checkpoints" / "7" / "ema_params")
        target = {"params": params, "ema_params": _abstract(ema), "opt_state": opt_state}
        out = _restore(ckpt, target=target, items=LAYOUT.names)
        as_saved = _restore(ckpt, 7)  # no target: numpy, in the saved (dict / list) structure
        assert not ckpt.reached_preemption(7)
    _assert_bitwise_equal(out["params"], params)
    _assert_bitwise_equal(out["ema_params"], ema)
    _assert_bitwise_equal(out["opt_state"], opt_state)
    assert jax.tree.structure(out["opt_state"]) == jax.tree.structure(opt_state)
    assert out["meta"] == meta
    assert out["config"] == json.loads(json.dumps(config.to_dict()))
    trees = [as_saved[name] for name in train_state.LAYOUT.trees]
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(trees))
    _assert_bitwise_equal(as_saved["params"], params)
    _assert_bitwise_equal(as_saved["opt_state"], opt_state)
    assert set(as_saved) == set(DEFAULT_ITEMS)
    with _ckpt(tmp_path, read_only=True) as reader:
        assert reader.restore_step(7, items=("config",))["config"] == out["config"]


def test_a_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    """`--workdir runs/digits` as in the README: orbax itself refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    params = _params(0)
    with _ckpt(os.path.join("runs", "digits")) as ckpt:
        assert _save(ckpt, 3, params)
        ckpt.wait_until_finished()
    assert os.path.isdir(tmp_path / "runs" / "digits" / "checkpoints" / "3")
    with _ckpt("runs/digits", read_only=True) as reader:
        assert reader.latest_step() == 3
        _assert_bitwise_equal(_restore(reader, 3)["params"], params)


def test_keeps_the_last_k_and_never_rewrites_a_step(tmp_path):
    params = _params()
    with _ckpt(tmp_path, keep=2) as ckpt:
        assert all(_save(ckpt, s, params, meta={"s": s}) for s in range(1, 8))
        assert not _save(ckpt, 7, params)  # an existing step is never rewritten
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]
    reopened = _ckpt(tmp_path, keep=2)
    assert reopened.latest_step() == 7
    assert reopened.restore_step(6, items=("meta",))["meta"] == {"s": 6, "step": 6}
    reopened.close()


def test_latest_step_ignores_unfinished_and_in_flight_saves(tmp_path, monkeypatch):
    params = _params()
    ckpt = _ckpt(tmp_path)
    _save(ckpt, 1, params)
    ckpt.wait_until_finished()
    # What a crash mid-save leaves behind, and a stray step directory without items.
    tmp_dir = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp"
    os.makedirs(tmp_dir / "params")
    os.makedirs(tmp_path / "checkpoints" / "6")
    assert ckpt.latest_step() == 1
    assert _restore(ckpt, items=("meta",))["meta"]["step"] == 1

    # An asynchronous save is not complete until orbax renamed its tmp directory.
    release, original = threading.Event(), _FINALIZE.finalize

    async def held_finalize(self):
        await asyncio.to_thread(release.wait, 20)
        await original(self)

    monkeypatch.setattr(_FINALIZE, "finalize", held_finalize)
    assert _save(ckpt, 2, params)
    assert ckpt.latest_step() == 1
    release.set()
    ckpt.close()
    assert ckpt.latest_step() == 2
    # A new writer removes the crash's tmp directory (before its first save). The stray "6"
    # goes first: orbax's own step list counts it, and it would skip steps up to 6.
    os.rmdir(tmp_path / "checkpoints" / "6")
    with _ckpt(tmp_path) as ckpt:
        _save(ckpt, 3, params)
    assert not tmp_dir.exists()
    assert ckpt.all_steps() == [1, 2, 3]


# orbax's concurrent reads leave a failed asyncio task behind when one read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back_with_a_warning(tmp_path, caplog, damage):
    with _ckpt(tmp_path, async_save=False) as ckpt:
        _save(ckpt, 1, _params(1))
        _save(ckpt, 2, _params(2))
    data_files = glob.glob(
        str(tmp_path / "checkpoints" / "2" / "params" / "**" / "d" / "*"), recursive=True
    )
    assert data_files
    for name in data_files:
        if damage == "truncate":
            os.truncate(name, os.path.getsize(name) // 2)
        else:
            os.remove(name)
    ckpt = _ckpt(tmp_path)
    assert ckpt.latest_step() == 2
    with caplog.at_level(logging.WARNING):
        out = _restore(ckpt, target={"params": _params()})
    assert out["meta"]["step"] == 1
    _assert_bitwise_equal(out["params"], _params(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 2" in m and "Error" in m for m in warnings), warnings
    with pytest.raises(ValueError):  # an explicit step does not fall back
        _restore(ckpt, 2)
    # Nothing restorable at all.
    for name in glob.glob(str(tmp_path / "checkpoints" / "1" / "meta" / "*")):
        os.remove(name)
    with pytest.raises(RuntimeError, match="could be restored"):
        _restore(ckpt)
    ckpt.close()


def test_mismatched_target_names_the_parameter_and_shapes(tmp_path):
    with _ckpt(tmp_path, async_save=False) as ckpt:
        _save(ckpt, 3, _params(width=4))
        other = _params(width=8)
        other["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
        del other["norm"]
        with pytest.raises(checkpoint.TargetMismatchError) as info:
            _restore(ckpt, target={"params": _abstract(other)})
    message = str(info.value)
    assert "first mismatched parameter params/conv_in/bias" in message
    assert "saved shape (4,), expected shape (8,)" in message
    assert "missing from the checkpoint: [extra/kernel]" in message
    assert "unexpected key(s) in the checkpoint: [norm/scale]" in message


def test_save_pretrained_and_restore_ema_params(tmp_path):
    from configs import default

    params, config = _params(), default.get_config()
    train_state.save_pretrained(str(tmp_path), params, config)
    ema, restored_config, step = train_state.restore_ema_params(str(tmp_path))
    _assert_bitwise_equal(ema, params)
    assert step == 0
    assert restored_config.to_dict() == config.to_dict()
    with _ckpt(tmp_path, read_only=True) as ckpt:
        out = _restore(ckpt, target={"opt_state": {}}, items=LAYOUT.names)
        assert out["opt_state"] == {}
        assert out["meta"] == {"step": 0, "source": "pretrained"}
        _assert_bitwise_equal(out["ema_params"], params)
        with pytest.raises(ValueError, match="holds no 'opt_state'"):
            _restore(ckpt, target={"opt_state": _adam_state(params)})
    with pytest.raises(FileExistsError):
        train_state.save_pretrained(str(tmp_path), params, config)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=str(missing / "checkpoints")):
        train_state.restore_ema_params(str(missing))
    assert not missing.exists()  # reading never creates anything
    with _ckpt(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "checkpoints")):
            _restore(ckpt)
        _save(ckpt, 1, _params())
        ckpt.wait_until_finished()
        with pytest.raises(FileNotFoundError, match="checkpoints/4"):
            _restore(ckpt, 4)


def test_unwritable_directory_raises(tmp_path):
    (tmp_path / "checkpoints").write_text("a file, not a directory")
    with pytest.raises(NotADirectoryError):
        _ckpt(tmp_path)
    # The path turns unwritable after start-up: the save itself raises.
    run = tmp_path / "run"
    ckpt = _ckpt(run)
    os.rmdir(run / "checkpoints")
    (run / "checkpoints").write_text("x")
    with pytest.raises(OSError):
        _save(ckpt, 1, _params())
    ckpt.close()


def test_background_write_error_surfaces_and_keeps_the_good_step(tmp_path, monkeypatch):
    params = _params()
    ckpt = _ckpt(tmp_path, keep=1)
    _save(ckpt, 1, params)
    ckpt.wait_until_finished()

    async def failing_finalize(self):
        raise OSError("simulated: disk full")

    monkeypatch.setattr(_FINALIZE, "finalize", failing_finalize)
    assert _save(ckpt, 2, params)  # the write fails in the background ...
    with pytest.raises(OSError, match="disk full"):  # ... and raises at the wait
        ckpt.wait_until_finished()
    assert _save(ckpt, 3, params)
    with pytest.raises(OSError, match="disk full"):  # or at the next save
        _save(ckpt, 4, params)
    monkeypatch.undo()
    assert ckpt.all_steps() == [1]  # max_to_keep=1 deleted nothing for failed saves
    _assert_bitwise_equal(_restore(ckpt)["params"], params)
    assert _save(ckpt, 5, params)
    ckpt.close()
    assert ckpt.all_steps() == [5]


def test_restore_onto_a_different_device_count(tmp_path):
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh8 = Mesh(devices, ("d",))
    host = jax.tree.map(np.asarray, _params(width=8))
    sharded = _shard(host, mesh8)  # some arrays split over 8 devices, some replicated on 8
    with _ckpt(tmp_path) as ckpt:
        trees = {"params": sharded, "ema_params": host, "opt_state": {}}
        ckpt.save(1, trees=trees, jsons={"meta": {}})
        ckpt.wait_until_finished()
        plain = _restore(ckpt, items=("params",))["params"]
        into_host = _restore(ckpt, target={"params": host}, items=("params",))["params"]
        mesh4 = Mesh(devices[:4], ("d",))
        on_four = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh4, P())),
            host,
        )
        onto4 = _restore(ckpt, target={"params": on_four, "ema_params": _shard(host, mesh8)})
    for tree in (plain, into_host):
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
        _assert_bitwise_equal(tree, host)
    _assert_bitwise_equal(onto4["params"], host)
    _assert_bitwise_equal(onto4["ema_params"], host)
    assert all(x.sharding.mesh.size == 4 for x in jax.tree.leaves(onto4["params"]))
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(onto4["ema_params"]))


def _shard(tree, mesh):
    """Splits each array's leading axis over the mesh where it divides; replicates the rest."""

    def put(x):
        spec = P("d") if np.ndim(x) and np.shape(x)[0] % mesh.size == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)
