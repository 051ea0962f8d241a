"""A tiny model for the end-to-end tests: seconds on a CPU, nothing meaningful learned.

Run:
  python -m ddpm_jax.main train --config configs/test.py --workdir /tmp/ddpm_test
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0

    config.diffusion.num_timesteps = 20

    config.optim.warmup_steps = 2
    config.train.batch_size = 16
    config.train.num_steps = 6
    config.train.ema_decay = 0.9
    config.train.log_every = 2
    config.train.checkpoint_every = 3
    config.train.sample_every = 6
    config.sample.num_grid = 4
    return config
