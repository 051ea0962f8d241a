"""The paper's 256x256 LSUN Church model (Ho et al. 2020, App. B): the CelebA-HQ network.

Run:
  python -m ddpm_jax.main train --config configs/lsun_church256.py --workdir gs://BUCKET/church

Expected (paper, Table 3): FID 7.89 after 1.2M steps at batch 64.
"""

from configs import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.name = "lsun/church_outdoor"
    config.data.split = "train"
    config.data.eval_split = "validation"
    config.train.num_steps = 1_200_000
    return config
