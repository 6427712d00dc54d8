"""Evaluators: plug-ins that score samples or the bound and return named metrics and files.

``samples``: sample chunks and their gathering; ``inception``: FID and IS; ``digits``: the digits
metric; ``bound``: bits/dim (Eq. 5), its per-t table and plot. ``diffusion_jax.evaluate`` builds
them from the config, runs them and writes what they return.
"""
