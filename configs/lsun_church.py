"""LSUN church 256x256 (Ho et al. 2020, Appendix B): 1.2M steps, fixedsmall sampling, flips."""

from diffusion_jax import config_defaults


def get_config():
  return config_defaults.get_256_config(
    'lsun_lmdb/church_outdoor', num_train_steps=1_200_000, random_flip=True
  )
