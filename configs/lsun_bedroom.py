"""LSUN bedroom 256x256 (Ho et al. 2020, Appendix B): 2.4M steps, fixedsmall sampling."""

from configs import default


def get_config():
  return default.get_256_config('lsun/bedroom', num_train_steps=2_400_000, random_flip=False)
