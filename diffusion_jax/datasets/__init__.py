"""TFDS dataset builders of this project; importing the package registers them."""

# Importing registers the builders ``lsun_lmdb`` and ``sklearn_digits``.
from diffusion_jax.datasets import (  # noqa: F401
  lsun_lmdb,
  sklearn_digits,
)
