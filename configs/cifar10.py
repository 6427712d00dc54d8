"""CIFAR10 32x32 (Ho et al. 2020): the shared defaults are the paper's CIFAR10 settings."""

from diffusion_jax import config_defaults


def get_config():
  return config_defaults.get_config()
