"""TFDS dataset builders of this project; importing the package registers them."""

from diffusion_jax.datasets import sklearn_digits  # noqa: F401  (registers ``sklearn_digits``)
