"""Per-example metrics: what the evaluation engine computes for each example.

Each metric is a per-device function ``(logits_fn, x, labels, valid, keys,
eps, step_size) -> {output: [B, ...] array}`` (``valid`` is False on
padding, ``keys`` one PRNG key per example). Every attack metric also
returns ``non_finite``: the example's attack met NaN or inf (in the logits
or in the attacked input, where a non-finite gradient ends up); such an
example counts as neither correct nor robust, and the evaluation reports
how many per stage. The stages of an evaluation and the protocol that picks
them are in ``evaluation.stages``. docs/ALGORITHMS.md, section 2, says what
each attack computes.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from bat_jax import attacks as attacks_lib
from bat_jax import errors, losses, naming
from bat_jax.evaluation.engine import MetricFn

# Threat models, as written in results and taken by the attacks (any spelling is
# read: naming.canonical_norm).
NORMS = naming.NORMS
# Each metric draws its random numbers from fold_in(PRNGKey(seed), id): the
# stages' ids are in their entries (evaluation.stages), these are the others'.
OTHER_METRIC_IDS = {"zero_grad": 4, "pgd_logits": 5, "logits": 6}


def finite_rows(a):
  """``[B]``: whether every value of each example of ``a`` is finite."""
  return jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)


def judge(logits_fn, x, labels):
  """``correct`` and ``non_finite`` at inputs ``x`` (the clean or attacked ones).

  An input or logits row holding NaN or inf is ``non_finite`` and never
  ``correct``.
  """
  logits = logits_fn(x)
  non_finite = ~(finite_rows(logits) & finite_rows(x))
  return {"correct": (jnp.argmax(logits, axis=-1) == labels) & ~non_finite,
          "non_finite": non_finite}


def clean_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """Whether each clean example is classified correctly (and its logits finite)."""
  del valid, keys, eps, step_size
  return judge(logits_fn, x, labels)


def logits_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """The clean logits (the evaluation's first-batch check of the model)."""
  del labels, valid, keys, eps, step_size
  return {"logits": logits_fn(x)}


def make_fgsm_metric(norm: str = "linf") -> MetricFn:
  """FGSM (L-inf) or the fast gradient method (L2)."""

  def metric(logits_fn, x, labels, valid, keys, eps, step_size):
    del valid, keys, step_size
    x_adv = attacks_lib.fgsm(logits_fn, x, labels, eps, norm=norm)
    return judge(logits_fn, x_adv, labels)

  return metric


def make_pgd_metric(num_steps: int = 50, num_restarts: int = 10,
                    norm: str = "linf") -> MetricFn:
  """PGD-CE, uniform start; an example counts only if every restart fails."""

  def pgd_metric(logits_fn, x, labels, valid, keys, eps, step_size):
    del valid
    x_adv = attacks_lib.pgd(logits_fn, x, labels, eps=eps, step_size=step_size,
                            num_steps=num_steps, key=keys, norm=norm,
                            num_restarts=num_restarts)
    return judge(logits_fn, x_adv, labels)

  return pgd_metric


def zero_grad_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """Whether the input gradient of the CE loss is exactly zero (gradient masking),
  or not finite."""
  del valid, keys, eps, step_size
  grad = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), labels)))(x)
  return {"zero_grad": jnp.max(jnp.abs(grad.reshape(grad.shape[0], -1)), axis=1) == 0,
          "non_finite": ~finite_rows(grad)}


AUTOATTACK_VERSIONS = ("standard", "fast", "plus", "rand", "custom")


def check_autoattack_settings(settings: Mapping[str, Any]) -> None:
  """Each AutoAttack budget override names a budget and has a usable value."""
  for key, value in settings.items():
    errors.choose("--autoattack_settings key", key, sorted(attacks_lib.STANDARD_SETTINGS))
    what = f"--autoattack_settings: {key}={value!r}"
    standard = attacks_lib.STANDARD_SETTINGS[key]
    if isinstance(standard, bool):
      if not isinstance(value, bool):
        raise errors.UserError(f"{what} must be true or false.")
    elif isinstance(standard, int):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.UserError(f"{what} must be an integer >= 1 (standard: {standard}).")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
      raise errors.UserError(f"{what} must be a fraction in (0, 1] (standard: {standard}).")


@dataclasses.dataclass(frozen=True)
class AutoAttackOptions:
  """Which AutoAttack to run.

  ``version``: 'standard' (APGD-CE, APGD-T, FAB-T, Square with the standard
  budgets), 'fast' (APGD-CE and APGD-T only: in Croce & Hein's experiments
  they make nearly all of AutoAttack's successes), 'plus' (APGD-CE,
  APGD-DLR, FAB, Square, APGD-T, FAB-T; 5 restarts for APGD and FAB), 'rand'
  (APGD-CE and APGD-DLR with 20 EoT draws, for randomised defences) or
  'custom' (``attacks``, names from ``bat_jax.attacks.ATTACK_NAMES``).
  ``settings`` overrides budgets (``apgd_iters``, ``n_target_classes``,
  ``fab_iters``, ``square_queries``, ...) of any version;
  :meth:`attack_settings` adds them to the version's own. ``chunk_size``: run
  each attack on the still-robust examples only, this many at a time (speed
  only). Everything is checked on construction (a UserError), so a bad name
  or budget is refused before any stage of an evaluation runs; attack names
  are case-insensitive ('APGD-CE' is 'apgd-ce').
  """
  version: str = "standard"
  attacks: Optional[Tuple[str, ...]] = None
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  chunk_size: Optional[int] = None

  def __post_init__(self):
    errors.choose("--autoattack_version", self.version, AUTOATTACK_VERSIONS)
    if self.attacks is not None:
      names = tuple(str(a).strip().lower() for a in self.attacks)
      errors.choose_each("--autoattack_attacks", names, attacks_lib.ATTACK_NAMES)
      object.__setattr__(self, "attacks", names)
    if self.attacks and self.version != "custom":
      raise errors.UserError(
          f"--autoattack_attacks={','.join(self.attacks)} is given but "
          f"--autoattack_version={self.version} runs its own attacks "
          f"({', '.join(self.attack_names())}); use --autoattack_version=custom (or "
          "leave --autoattack_attacks out).")
    check_autoattack_settings(self.settings)
    if self.chunk_size is not None:
      errors.at_least("AutoAttack chunk_size", self.chunk_size, 1,
                      " (None: the whole batch)")

  def attack_names(self) -> Tuple[str, ...]:
    if self.version in ("standard", "plus", "rand"):
      return tuple(attacks_lib.version_settings(self.version)[0])
    if self.version == "fast":
      return ("apgd-ce", "apgd-t")
    if self.version == "custom":
      if not self.attacks:
        raise ValueError("AutoAttack version 'custom' needs a list of attacks "
                         f"from {attacks_lib.ATTACK_NAMES} (--autoattack_attacks).")
      return tuple(self.attacks)
    raise ValueError("AutoAttack version must be 'standard', 'fast', 'plus', 'rand' "
                     f"or 'custom'; got {self.version!r}.")

  def attack_settings(self) -> Dict[str, Any]:
    """The version's budgets where they differ from the standard ones, under ``settings``."""
    base = {}
    if self.version in attacks_lib.VERSIONS:
      base = dict(attacks_lib.VERSIONS[self.version][1])
    return {**base, **dict(self.settings)}

  def is_standard(self) -> bool:
    """Whether this is the paper's AutoAttack (standard attacks and budgets)."""
    return self.version == "standard" and not self.settings

  def describe(self) -> Dict[str, Any]:
    return {"version": self.version, "attacks": list(self.attack_names()),
            "settings": dict(self.settings), "chunk_size": self.chunk_size,
            "standard": self.is_standard()}

  def budgets(self) -> Dict[str, Any]:
    """Every budget the attacks run with: the standard ones and the overrides."""
    return {**attacks_lib.STANDARD_SETTINGS, **dict(self.settings)}


def make_autoattack_stage_metric(options: AutoAttackOptions, attack: str,
                                 norm: str = "linf") -> MetricFn:
  """One AutoAttack stage: "still robust" flags after ``attack``.

  The engine feeds it only the examples still robust after the stages before
  (``valid`` marks them; padding is not valid), so each stage attacks just
  those, compacted into full batches. Each example's keys are AutoAttack's
  (``attacks.attack_remaining`` folds in the attack's position), so the flags
  are those of ``attacks.autoattack_robust_flags`` on the whole batch.
  """

  def stage_metric(logits_fn, x, labels, valid, keys, eps, step_size):
    del step_size
    x_out, robust = attacks_lib.attack_remaining(
        attack, logits_fn, x, labels, valid, eps=eps, key=keys, norm=norm,
        batch_size=options.chunk_size, **options.attack_settings())
    non_finite = valid & judge(logits_fn, x_out, labels)["non_finite"]
    return {"robust": robust & ~non_finite, "non_finite": non_finite}

  return stage_metric


def make_pgd_logits_metric(num_steps: int = 50, num_restarts: int = 1,
                           start: str = "uniform", norm: str = "linf") -> MetricFn:
  """Clean and PGD-CE logits per example (the paper's margin / smoothness analysis)."""

  def pgd_logits_metric(logits_fn, x, labels, valid, keys, eps, step_size):
    del valid
    x_adv = attacks_lib.pgd(logits_fn, x, labels, eps=eps, step_size=step_size,
                            num_steps=num_steps, key=keys, objective="ce",
                            start=start, num_restarts=num_restarts, norm=norm)
    return {"clean_logits": logits_fn(x), "adv_logits": logits_fn(x_adv)}

  return pgd_logits_metric
