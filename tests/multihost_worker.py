"""One process of a multi-process CPU job, started by tests/test_multihost.py (not a test file).

  python tests/multihost_worker.py SPEC_JSON PROCESS_ID

SPEC_JSON names the job: {"num_processes", "devices" (fake CPU devices per process), "port",
"cache_dir", "out" (where results go), "tasks": [...]}. The tasks run in order, each writing
`<out>/<name>-p<process_id>.npz`:

  {"kind": "train", "name", "workdir", "model" / "train" / "sample": {config overrides}}
      train.train_and_evaluate on configs/test.py; saves the final state's leaves and the
      example indices of every batch this process fed ("index" [steps, local devices, b]).
  {"kind": "restore", "name", "workdir", "model" / "train" / "sample": {...}}
      restores the newest checkpoint into the state the last "train" task returned, as a
      resumed run does (jax arrays on this process's first device as the target).
  {"kind": "generate", "name", "workdir", "out_dir", "num_samples", "batch_size", "seed"}
      sample_command.generate (every process runs the sampler; process 0 writes the shards).

Compilation. Only the single-process job uses the persistent compilation cache. On a
multi-process CPU job, jax (0.12) gives each process its own cache keys and only process 0 writes
entries, so process 0 would load in a second what the others compile for a minute, and gloo gives
up on a peer that lags by more than 30 s. (Sharing binaries between hosts fails the same way: the
others wait for keys that process 0 never writes.) Without the cache, all compile alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys


def _set_up_environment(devices: int) -> None:
    """Fake CPU devices for this process only (before jax is imported)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _configure_compilation(jax, spec: dict) -> None:
    if spec["num_processes"] == 1 and spec.get("cache_dir"):
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(spec: dict, process_id: int) -> None:
    _set_up_environment(spec["devices"])
    import jax
    from absl import logging

    from ddpm_jax import distributed

    jax.config.update("jax_enable_x64", False)
    _configure_compilation(jax, spec)
    logging.use_absl_handler()  # timestamped lines: when each process reached what
    logging.set_verbosity(logging.INFO)

    if spec["num_processes"] > 1:
        distributed.maybe_initialize(
            coordinator_address=f"127.0.0.1:{spec['port']}",
            num_processes=spec["num_processes"],
            process_id=process_id,
            cpu_collectives="gloo",
        )
    distributed.log_topology()
    assert jax.process_index() == process_id and jax.process_count() == spec["num_processes"]
    context = {}
    for task in spec["tasks"]:
        result = TASKS[task["kind"]](task, context)
        _save_npz(os.path.join(spec["out"], f"{task['name']}-p{process_id}.npz"), result)


def _save_npz(path: str, arrays: dict) -> None:
    import numpy as np

    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def _state_arrays(state) -> dict:
    """'params/...', 'ema_params/...', 'opt_state/...' -> numpy, plus the step."""
    import jax
    import numpy as np

    out = {"step": np.asarray(jax.device_get(state.step))}
    for name in ("params", "ema_params", "opt_state"):
        leaves, _ = jax.tree_util.tree_flatten_with_path(getattr(state, name))
        for path, leaf in leaves:
            out[name + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return out


def _test_config(task: dict):
    from configs import test as test_config

    config = test_config.get_config()
    for section in ("model", "train", "sample"):
        for key, value in task.get(section, {}).items():
            config[section][key] = tuple(value) if isinstance(value, list) else value
    return config


def _train(task: dict, context: dict) -> dict:
    import numpy as np

    from ddpm_jax import input_pipeline, train

    fed = []
    make_train_iterator = input_pipeline.make_train_iterator

    def recording_iterator(*args, **kwargs):
        with contextlib.closing(make_train_iterator(*args, **kwargs)) as batches:
            for batch in batches:  # exactly the batches the loop takes (not the read-ahead)
                fed.append(batch["index"])
                yield batch

    input_pipeline.make_train_iterator = recording_iterator
    try:
        state = train.train_and_evaluate(_test_config(task), task["workdir"])
    finally:
        input_pipeline.make_train_iterator = make_train_iterator
    context["state"] = state
    return {**_state_arrays(state), "index": np.stack(fed)}


def _restore(task: dict, context: dict) -> dict:
    from ddpm_jax import checkpoint, train_state

    with checkpoint.Checkpointer(task["workdir"], train_state.LAYOUT) as ckpt:
        return _state_arrays(train_state.restore(ckpt, context["state"], _test_config(task)))


def _generate(task: dict, context: dict) -> dict:
    from ddpm_jax.commands import sample as sample_command

    del context
    sample_command.generate(
        task["workdir"],
        out_dir=task["out_dir"],
        num_samples=task["num_samples"],
        batch_size=task["batch_size"],
        seed=task["seed"],
    )
    return {}  # the test reads the shards once every process has finished


TASKS = {"train": _train, "restore": _restore, "generate": _generate}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f), int(sys.argv[2]))
