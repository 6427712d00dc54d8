"""CIFAR10 32x32 (Ho et al. 2020): the shared defaults are the paper's CIFAR10 settings."""

from configs import default


def get_config():
  return default.get_config()
