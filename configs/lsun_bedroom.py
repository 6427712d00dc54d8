"""LSUN bedroom 256x256 (Ho et al. 2020, Appendix B): 2.4M steps, fixedsmall sampling.

No random flips, as the paper's Appendix B says (flips on every data set but LSUN bedroom). The
released training script (scripts/run_lsun.py) differs: it flips bedroom and church, not cat.
"""

from diffusion_jax import config_defaults


def get_config():
  return config_defaults.get_256_config(
    'lsun_lmdb/bedroom', num_train_steps=2_400_000, random_flip=False
  )
