"""LSUN cat 256x256 (Ho et al. 2020, Appendix B): 1.8M steps, fixedsmall sampling."""

from configs import default


def get_config():
  return default.get_256_config('lsun/cat', num_train_steps=1_800_000, random_flip=True)
