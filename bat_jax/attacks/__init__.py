"""Attacks as pure functions of a ``logits_fn(x) -> logits`` (SPEC.md section 2).

Inputs live in ``[0, 1]``; every result lies in the eps-ball around the clean
input intersected with ``[0, 1]`` and is wrapped in ``stop_gradient``.
"""

from bat_jax.attacks.pgd import (ascent_direction, ce_objective, fgsm,
                                 get_objective, kl_objective, pgd, project,
                                 random_start)

__all__ = ["ascent_direction", "ce_objective", "fgsm", "get_objective",
           "kl_objective", "pgd", "project", "random_start"]
