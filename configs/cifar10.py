"""The paper's CIFAR-10 run (Ho et al. 2020, Sec. 4 and App. B): 35.7M-parameter UNet.

Run (TPU pod or GPU box; data prepared with `tfds build cifar10` into --config.data.data_dir):
  python -m ddpm_jax.main train --config configs/cifar10.py --workdir gs://BUCKET/cifar10

Expected (paper, Table 1): FID 3.17, IS 9.46, NLL <= 3.75 bits/dim after 800k steps at batch 128.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1

    config.train.batch_size = 128
    config.train.num_steps = 800_000
    return config
