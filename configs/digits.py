"""The embedded default: scikit-learn's 8x8 digits at 16x16, a small U-Net, minutes on 2 CPU cores.

Same architecture and diffusion (T=1000, linear betas, ε-prediction, L_simple) as the paper;
width, depth, batch, learning rate and EMA are chosen for a short run (see README).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'sklearn_digits'
  config.dataset.image_size = 16
  config.dataset.num_channels = 1
  config.dataset.random_flip = False  # digits are not mirror-symmetric
  config.dataset.shuffle_buffer_size = 2_000

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995

  config.train.batch_size = 128
  config.train.num_train_steps = 1500
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 500
  config.train.sample_every_steps = 500
  config.train.num_sample_images = 100
  return config
