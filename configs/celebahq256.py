"""The paper's 256x256 CelebA-HQ model (Ho et al. 2020, App. B): ch_mult (1, 1, 2, 2, 4, 4).

Run:
  python -m ddpm_jax.main train --config configs/celebahq256.py --workdir gs://BUCKET/celebahq

Expected: samples like the paper's Fig. 1/Fig. 3 after ~0.5M steps at batch 64 (TPU v3-8).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "celeb_a_hq/256"
    config.data.image_size = 256
    config.data.channels = 3
    config.data.random_flip = True

    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0

    config.optim.learning_rate = 2e-5
    config.train.batch_size = 64
    config.train.num_steps = 500_000
    return config
