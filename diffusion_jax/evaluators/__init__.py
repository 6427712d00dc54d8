"""Evaluators: plug-ins chosen by ``config.evals``, each a module that checks its settings, builds
its networks and references, and returns named scalars, report details and files.

``registry``: the types by name; ``base``: what a type provides and an evaluator returns;
``samples``: what the sample evaluators share; ``inception``: FID and IS; ``digits``: the digits
metric; ``bound``: bits/dim (Eq. 5), its per-t table and plot. ``diffusion_jax.evaluate`` builds
them from the config, runs them and writes what they return.
"""
