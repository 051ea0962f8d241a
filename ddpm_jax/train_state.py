"""The train state (parameters, optimiser state, EMA of the parameters) and its checkpoint schema.

A checkpoint step holds (see `checkpoint.py` for how it is written)::

  params/  ema_params/  opt_state/   pytrees of arrays
  meta/                              JSON: step, num_skipped (and "source" for converted weights)
  config/                            JSON of the experiment config (`experiment.to_json`)

The sample and eval commands read only `ema_params` and `config` (`restore_ema_params`); the
converter writes weights as step 0 (`save_pretrained`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from flax.training import train_state

from ddpm_jax import checkpoint, experiment
from ddpm_jax.models import unet

LAYOUT = checkpoint.Layout(trees=("params", "ema_params", "opt_state"), jsons=("meta", "config"))


class TrainState(train_state.TrainState):
    """Optax train state plus the EMA of the parameters and a count of skipped updates."""

    ema_params: Any
    num_skipped: jax.Array


def create(rng: jax.Array, config: ml_collections.ConfigDict, model: unet.UNet) -> TrainState:
    """Initialises parameters (from `rng`), the optimiser state and the EMA copy.

    One jitted program (cached by the persistent compilation cache), rather than the optimiser's
    zeros built eagerly, leaf by leaf, each shape a small compilation at every start.
    """
    x = jnp.zeros((1, *experiment.image_shape(config)), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    tx = experiment.create_optimizer(config.optim)

    def init(rng):
        params = model.init(rng, x, t, y, train=False)["params"]
        state = TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            ema_params=params,
            num_skipped=jnp.zeros((), jnp.int32),
        )
        # A strongly typed step: TrainState.create's Python 0 would be weakly typed, and the
        # step's output (strong int32) would then trigger a second compilation of the step.
        return state.replace(step=jnp.zeros((), jnp.int32))

    return jax.jit(init)(rng)


def save(ckpt: checkpoint.Checkpointer, state: TrainState, config) -> bool:
    """Starts writing `state` (unreplicated, host arrays) as checkpoint `state.step`."""
    step = int(state.step)
    return ckpt.save(
        step,
        trees={
            "params": state.params,
            "ema_params": state.ema_params,
            "opt_state": state.opt_state,
        },
        jsons={
            "meta": {"step": step, "num_skipped": int(state.num_skipped)},
            "config": experiment.to_json(config),
        },
    )


def restore(
    ckpt: checkpoint.Checkpointer, state: TrainState, config: ml_collections.ConfigDict
) -> TrainState:
    """The newest restorable checkpoint, into the structure (and dtypes) of `state`.

    Raises TargetMismatchError naming the first mismatched parameter if the checkpoint was
    written by another model config; warns if it was written with a config that trains
    differently.
    """
    target = {"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state}
    _, restored = checkpoint.restore_newest(ckpt, target=target, items=(*target, "meta", "config"))
    meta = restored["meta"]
    if restored["config"] is not None:
        changed = experiment.config_changes(restored["config"], config)
        if changed:
            logging.warning(
                "Resuming step %d with a config that differs from the checkpoint's, so the run "
                "will not match an uninterrupted one: %s",
                meta["step"],
                "; ".join(changed),
            )
    return state.replace(
        step=jnp.asarray(meta["step"], jnp.int32),
        params=restored["params"],
        ema_params=restored["ema_params"],
        opt_state=restored["opt_state"],
        num_skipped=jnp.asarray(meta.get("num_skipped", 0), jnp.int32),
    )


def restore_ema_params(
    workdir: str | epath.PathLike, step: int | None = None
) -> tuple[Any, ml_collections.ConfigDict, int]:
    """(EMA params as numpy arrays, the experiment config, the step) of `step` (default: newest).

    Reads only the ema_params and config items and writes nothing (safe beside a running
    trainer). The config is `experiment.from_checkpoint` of the stored one.

    Raises:
      FileNotFoundError: no (complete) checkpoint under `<workdir>/checkpoints`, or no config.
    """
    with checkpoint.Checkpointer(workdir, LAYOUT, read_only=True) as ckpt:
        step, out = checkpoint.restore(ckpt, step, items=("ema_params", "config"))
        if out["config"] is None:
            raise FileNotFoundError(f"Checkpoint {ckpt.step_dir(step)} holds no config.")
    logging.info("Restored EMA params of step %d from %s.", step, ckpt.directory)
    return out["ema_params"], experiment.from_checkpoint(out["config"]), step


def save_pretrained(workdir: str | epath.PathLike, params: Any, config) -> None:
    """Writes converted weights as step 0: params = ema_params, empty opt_state, and the config.

    Raises:
      FileExistsError: `<workdir>/checkpoints/0` already exists.
    """
    with checkpoint.Checkpointer(workdir, LAYOUT, keep=None, async_save=False) as ckpt:
        if 0 in ckpt.all_steps():
            raise FileExistsError(f"Checkpoint {ckpt.step_dir(0)} already exists.")
        ckpt.save(
            0,
            trees={"params": params, "ema_params": params, "opt_state": {}},
            jsons={
                "meta": {"step": 0, "source": "pretrained"},
                "config": experiment.to_json(config),
            },
        )
