"""The paper's 256x256 LSUN Church model (Ho et al. 2020, App. B).

Run:
  python -m ddpm_jax.main train --config configs/lsun_church256.py --workdir gs://BUCKET/church

Expected (paper, Table 3): FID 7.89 after 1.2M steps at batch 64.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "lsun/church_outdoor"
    config.data.split = "train"
    config.data.eval_split = "validation"
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
    config.train.num_steps = 1_200_000
    return config
