"""DDPM (Ho, Jain & Abbeel 2020) in JAX/Flax."""
