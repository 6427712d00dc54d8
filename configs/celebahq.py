"""CelebA-HQ 256x256 (Ho et al. 2020, Appendix B): 0.5M steps, fixedsmall sampling."""

from configs import default


def get_config():
  return default.get_256_config('celeb_a_hq/256', num_train_steps=500_000, random_flip=True)
