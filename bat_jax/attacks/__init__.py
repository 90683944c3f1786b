"""Attacks as pure functions of a ``logits_fn(x) -> logits`` (docs/ALGORITHMS.md section 2).

Inputs live in ``[0, 1]``; every result lies in the eps-ball (L-inf or L2)
around the clean input intersected with ``[0, 1]`` and is wrapped in
``stop_gradient``.
"""

from bat_jax.attacks.pgd import (ascent_direction, ce_objective, fgsm, fold_in,
                                 get_objective, kl_objective, pgd, project,
                                 random_start)
from bat_jax.attacks.l2 import project_l2, projection_l2
from bat_jax.attacks.apgd import (apgd, apgd_checkpoints, apgd_targeted,
                                  dlr_loss, eot_loss_and_grad, targeted_dlr_loss)
from bat_jax.attacks.fab import fab, fab_targeted, projection_linf
from bat_jax.attacks.square import square, square_p_selection
from bat_jax.attacks.autoattack import (ATTACK_NAMES, STANDARD_ATTACKS,
                                        STANDARD_SETTINGS, VERSIONS,
                                        attack_remaining, autoattack,
                                        autoattack_robust_flags, version_settings)

__all__ = ["ascent_direction", "ce_objective", "fgsm", "fold_in", "get_objective",
           "kl_objective", "pgd", "project", "random_start",
           # AutoAttack.
           "apgd", "apgd_checkpoints", "apgd_targeted", "dlr_loss",
           "eot_loss_and_grad", "targeted_dlr_loss", "fab", "fab_targeted",
           "projection_linf", "project_l2", "projection_l2", "square",
           "square_p_selection", "ATTACK_NAMES", "STANDARD_ATTACKS",
           "STANDARD_SETTINGS", "VERSIONS", "attack_remaining", "autoattack",
           "autoattack_robust_flags", "version_settings"]
