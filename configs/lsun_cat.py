"""LSUN cat 256x256 (Ho et al. 2020, Appendix B): 1.8M steps, fixedsmall sampling.

Random flips, as the paper's Appendix B says (flips on every data set but LSUN bedroom). The
released training script (scripts/run_lsun.py) differs: it trains cat with --randflip 0.
"""

from diffusion_jax import config_defaults


def get_config():
  return config_defaults.get_256_config(
    'lsun_lmdb/cat', num_train_steps=1_800_000, random_flip=True
  )
