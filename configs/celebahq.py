"""CelebA-HQ 256x256 (Ho et al. 2020, Appendix B): 0.5M steps, fixedsmall sampling, flips."""

from diffusion_jax import config_defaults


def get_config():
  return config_defaults.get_256_config('celeb_a_hq/256', num_train_steps=500_000, random_flip=True)
