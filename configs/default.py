"""Defaults shared by every experiment; the per-experiment files override a few fields.

Run (the built-in default, digits):
  python -m ddpm_jax.main train --config configs/digits.py --workdir runs/digits

Every field can be overridden on the command line, e.g. `--config.train.num_steps=2000`.
ml_collections refuses to override a field whose default is a bare None (it cannot tell the type),
so an optional field is declared with `config_dict.placeholder(TYPE)`: None until set, and
settable from the command line. Readers treat None and "" alike ("not set").
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: a tfds name (read with tfds.data_source, no TensorFlow), or "digits" (built in).
    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"
    # tfds data_dir; a gs:// bucket on a pod. Unset (None, or "") = tfds's default data_dir.
    data.data_dir = config_dict.placeholder(str)
    data.split = "train"
    data.eval_split = "test"
    data.image_size = 8
    data.channels = 1
    data.random_flip = False
    data.class_conditional = False
    data.num_classes = 10

    # The epsilon-network (Appendix B of Ho et al. 2020). Passed to UNet(**model) by the trainer.
    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.dtype = "float32"  # "bfloat16": bf16 activations, f32 params/norms/softmax/output.

    # The forward process and what the network predicts.
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.beta_schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.model_mean_type = "epsilon"  # epsilon | x_start | v
    # fixed_large (sigma^2 = beta) | fixed_small (beta-tilde) | learned_range (Nichol & Dhariwal
    # 2021: 2C output channels, trained with L_simple + vlb_weight * L_vlb).
    diffusion.model_var_type = "fixed_large"
    diffusion.vlb_weight = 0.001  # lambda of the hybrid loss (learned_range only)
    diffusion.loss_weighting = "none"  # none | min_snr
    diffusion.min_snr_gamma = 5.0

    # Optimiser: clip at global norm 1, Adam 2e-4 with linear warm-up (Ho et al. 2020, App. B).
    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-4
    optim.warmup_steps = 5000
    optim.grad_clip_norm = 1.0
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128  # global, over all devices of all hosts
    train.num_steps = 800_000
    train.ema_decay = 0.9999
    train.ema_warmup = False  # decay min(ema_decay, (1 + step) / (10 + step))
    # Steps fused with lax.scan inside one pmap call (GPU/TPU: fewer host round trips). Keep 1 on
    # CPU: XLA:CPU runs backward convolutions inside a loop ~15x slower (benchmarks/RESULTS.md).
    train.steps_per_dispatch = 1
    train.log_every = 100
    train.checkpoint_every = 5000
    train.keep_checkpoints = 3
    train.sample_every = 20_000
    train.nonfinite = "stop"  # stop | skip
    # How the per-device step is spread over the devices: "pmap" (jax.pmap over the local
    # devices) or "shard_map" (jax.jit of jax.shard_map over a 1-D mesh of all devices of all
    # hosts; the state one replicated global array). The same step, keys and collectives.
    train.parallelism = "pmap"
    train.max_skipped_steps = 10
    # Classifier-free guidance (Ho & Salimans 2021): each label is replaced by the null class
    # (label num_classes; the UNet gets one more embedding row) with this probability. 0: off.
    train.label_dropout = 0.0

    # Samples written during training and by the `sample` command's defaults.
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_grid = 64
    sample.sampler = "ddpm"  # ddpm | ddim | respaced | dpm++2m
    sample.ddim_steps = 50  # steps of the few-step samplers (ddim, respaced, dpm++2m)
    sample.ddim_eta = 0.0  # ddim only
    sample.ddim_spacing = "uniform"  # uniform | quadratic | logsnr (few-step samplers)
    sample.clip_denoised = True
    # Classifier-free guidance weight w (every sampler): (1 + w) eps(x, y) - w eps(x, null).
    # 0: off; > 0 needs data.class_conditional and train.label_dropout > 0.
    sample.guidance = 0.0

    # FID during training (0: off). Needs converted Inception weights (`ddpm-jax fid-weights`)
    # and reference statistics (`ddpm-jax fid-stats`); strings default to "" (not None, which
    # the command line could not override). The samples come from the grid's sampler.
    config.eval = eval_ = ml_collections.ConfigDict()
    eval_.fid_every = 0
    eval_.fid_num_samples = 5000
    eval_.fid_batch = 256  # images per sampler call, over all devices
    eval_.fid_ref = ""
    eval_.fid_weights = ""
    return config
