"""bat_jax: Bridged Adversarial Training and its baselines in JAX/Flax.

Import what you need: ``bat_jax.losses`` and ``bat_jax.attacks`` are pure JAX
and pull in no Flax; the trainer lives in ``bat_jax.train``.
"""

__version__ = "0.1.0"
