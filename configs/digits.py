"""The embedded default: scikit-learn's 8x8 digits, a small U-Net, minutes on 2 CPU cores.

Same architecture, ε-prediction and L_simple as the paper. The process is the paper's linear
schedule discretized into T=200 steps instead of 1000: betas scaled by 1000/T keep
alphas_cumprod at the last step (≈4.5e-5) where the paper's is, and sampling costs 5x less.
Width, depth, batch, learning rate and EMA are chosen for a short run (see README). On a CPU-only
host the run is data parallel over 2 CPU devices, one per core of the 2-core target machine.

``--config=configs/digits.py:cond`` is the class-conditional model (a class embedding, 10 % of
examples trained without their class) sampled with classifier-free guidance, one row per class
in its grids. ``--config=configs/digits.py:tiny`` shrinks it to seconds (one level, 20 diffusion
steps, 4 train steps, small samples): the end-to-end tests run it.
"""

import ml_collections

from diffusion_jax import config_defaults


def get_config(variant: str | None = None):
  if variant not in (None, 'tiny', 'cond'):
    raise ValueError(
      f'Unknown digits config variant {variant!r}; use configs/digits.py, :tiny or :cond.'
    )
  config = config_defaults.get_config()
  config.dataset.name = 'sklearn_digits'
  config.dataset.image_size = 8
  config.dataset.num_channels = 1
  config.dataset.random_flip = False  # digits are not mirror-symmetric
  config.dataset.shuffle_buffer_size = 2_000

  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0

  config.diffusion.num_diffusion_timesteps = 200
  config.diffusion.beta_start = 1e-4 * 1000 / 200
  config.diffusion.beta_end = 0.02 * 1000 / 200
  config.diffusion.model_var_type = 'fixedsmall'  # sharper than fixedlarge here (README)

  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995

  config.train.batch_size = 64
  config.train.num_train_steps = 8000
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 2000
  config.train.sample_every_steps = 8000
  config.train.num_sample_images = 100

  # 50 respaced steps sample as well as all 200 here at a quarter of the network calls (README).
  config.sample.num_steps = 50

  # The digits metric (not the FID Inception: digits are 8x8 gray), once at the end of training;
  # --mode=eval also computes the bound on the test split.
  config.evals = ml_collections.ConfigDict()
  config.evals.digits = config_defaults.sample_eval('digits')
  config.evals.digits.update(
    every_steps=config.train.num_train_steps, num_samples=500, in_loop_num_samples=500
  )
  config.evals.digits.batch_size = 100
  config.evals.bpd = config_defaults.bound_eval()
  config.evals.bpd.batch_size = 100
  if variant == 'cond':  # class-conditional, sampled with classifier-free guidance (README)
    config.model.num_classes = 10
    config.train.p_uncond = 0.1
    config.sample.guidance = 1.0
  if variant == 'tiny':
    config.model.update(ch_mult=(1,), attn_resolutions=())
    config.diffusion.num_diffusion_timesteps = 20
    config.sample.num_steps = None  # all 20
    config.optim.warmup_steps = 1
    config.train.update(
      batch_size=16,
      num_train_steps=4,
      log_every_steps=2,
      checkpoint_every_steps=2,
      sample_every_steps=4,
      num_sample_images=8,
    )
    config.evals.digits.update(every_steps=0, num_samples=20, batch_size=16, in_loop_num_samples=16)
    config.evals.bpd.update(num_examples=16, batch_size=16)
  return config
