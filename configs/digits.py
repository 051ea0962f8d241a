"""The built-in default: scikit-learn's 1,797 8x8 handwritten digits, no download.

Run:
  python -m ddpm_jax.main train --config configs/digits.py --workdir runs/digits

Expected (measured on 2 CPU cores, benchmarks/RESULTS.md): ~12 steps/s (JAX 0.12; ~8 with JAX
0.10), 3,000 steps in 6-8 minutes including start-up and three sample grids; the loss settles
near 0.07; the grids in runs/digits/samples/ show recognisable digits.
`python benchmarks/digits_quality.py` reproduces the figures: a digits classifier recognises ~92%
of 1,000 EMA samples with confidence > 0.9 (97% of real test digits), all ten classes about
evenly, and the test NLL is ~4.6 bits/dim.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric

    # Small enough for 2 CPU cores: the cost of XLA's CPU convolutions, not FLOPs, sets the pace.
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0

    config.diffusion.num_timesteps = 1000

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100

    config.train.batch_size = 64
    config.train.num_steps = 3000
    config.train.ema_decay = 0.999
    config.train.ema_warmup = True
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    config.train.sample_every = 1000
    return config
