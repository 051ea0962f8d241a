"""Child process of tests/test_reliability.py: resume a run on another number of devices.

  python tests/reliability_worker.py SPEC.json

SPEC: {"devices": n, "workdir": "...", "overrides": {"train.num_steps": 24, ...}, "out": "x.npz"}.
Sets n fake CPU devices before jax is imported, runs `train.train_and_evaluate` on the test
config with the overrides (with num_steps equal to the checkpoint's step this only restores and
replicates the state onto the n devices), and writes the returned state as an .npz of named
arrays ("params/conv_in/kernel", ..., "step", "num_skipped", "device_count"); no pickle.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax  # noqa: PLC0415 - after XLA_FLAGS
    import numpy as np  # noqa: PLC0415

    from configs import test as test_config  # noqa: PLC0415
    from ddpm_jax import checkpoint, train  # noqa: PLC0415

    config = test_config.get_config()
    for dotted, value in spec["overrides"].items():
        section, field = dotted.split(".")
        config[section][field] = tuple(value) if isinstance(value, list) else value
    state = train.train_and_evaluate(config, spec["workdir"])
    arrays = {"step": np.asarray(state.step), "num_skipped": np.asarray(state.num_skipped)}
    arrays["device_count"] = np.asarray(jax.device_count())
    for name in ("params", "ema_params", "opt_state"):
        leaves, _ = jax.tree_util.tree_flatten_with_path(getattr(state, name))
        for path, leaf in leaves:
            key = "/".join([name] + [checkpoint.key_name(k) for k in path])
            arrays[key] = np.asarray(leaf)
    np.savez(spec["out"], **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
