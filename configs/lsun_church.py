"""LSUN church 256x256 (Ho et al. 2020, Appendix B): 1.2M steps, fixedsmall sampling."""

from configs import default


def get_config():
  return default.get_256_config('lsun/church_outdoor', num_train_steps=1_200_000, random_flip=True)
