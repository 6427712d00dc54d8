"""CIFAR10 32x32 (Ho et al. 2020): the shared defaults are the paper's CIFAR10 settings.

``configs/cifar10.py:cond``: class-conditional on CIFAR10's 10 labels (Ho & Salimans 2021: 10 %
of examples trained without their class, here guidance w = 0.5 when sampling; conditional FID
samples every class alike).
"""

from diffusion_jax import config_defaults


def get_config(variant: str | None = None):
  if variant not in (None, 'cond'):
    raise ValueError(
      f'Unknown cifar10 config variant {variant!r}; use configs/cifar10.py or :cond.'
    )
  config = config_defaults.get_config()
  if variant == 'cond':
    config.model.num_classes = 10
    config.train.p_uncond = 0.1
    config.sample.guidance = 0.5
  return config
