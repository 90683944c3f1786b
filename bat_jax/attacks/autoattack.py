"""AutoAttack (Croce & Hein 2020; docs/ALGORITHMS.md section 2), natively in JAX.

Attacks run in order, each only on the examples that are still robust
(classified correctly and not broken by an earlier attack). The versions are
the reference's ``set_version``, in the L-inf or the L2 norm:

  * ``'standard'``: APGD-CE (100 iterations, 1 restart), APGD-T (100
    iterations, the 9 most likely wrong classes as targets), FAB-T (100
    iterations, 9 targets, 1 restart each), Square (5000 queries, p_init 0.8);
  * ``'plus'``: APGD-CE and APGD-DLR with 5 restarts each, untargeted FAB
    with 5 restarts, Square, APGD-T and FAB-T (9 targets, 1 restart each);
  * ``'rand'``, for randomised defences: APGD-CE and APGD-DLR, 1 restart,
    each gradient averaged over 20 draws of the model (EoT);
  * ``'custom'``: a given list of attacks with the standard budgets.

An example is robust only if every attack fails. The robust accuracy is
reported after each attack, as the reference ``AutoAttack.run_standard_evaluation``
does. With fixed shapes, "only the still-robust examples" is a mask: every
attack computes each example independently of the others (one PRNG key per
example), so masking gives exactly what running on the subset would. To not
pay for examples already broken, ``batch_size`` gathers the still-robust
examples to the front before each attack and runs it chunk by chunk, skipping
(``lax.cond``) chunks with nothing left; results do not depend on it.

Everything is jit-compilable (``jax.jit(functools.partial(autoattack, f,
eps=..., ...))``); budgets are static.
"""

import collections
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from bat_jax.attacks.apgd import apgd, apgd_targeted
from bat_jax.attacks.common import (fixed_draw, fold_in_each, per_example,
                                    per_example_keys, predict)
from bat_jax.attacks.fab import fab, fab_targeted
from bat_jax.attacks.pgd import NORMS
from bat_jax.attacks.square import square

Array = jax.Array
LogitsFn = Callable[..., Array]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
PLUS_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
RAND_ATTACKS = ("apgd-ce", "apgd-dlr")
# Every attack this module can run; an attack's position seeds its keys, so
# it draws the same random numbers whichever list it runs in.
ATTACK_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")
# The attacks that can average gradients over draws of a randomised model.
EOT_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t")
# The standard version's budgets (the reference's set_version('standard')).
# apgd_restarts: APGD-CE / APGD-DLR; fab_restarts: FAB-T's restarts per
# target; fab_untargeted_restarts: FAB's; eot_iter: draws per APGD gradient
# (randomised models only).
STANDARD_SETTINGS = dict(
    apgd_iters=100, apgd_restarts=1, apgd_targeted_restarts=1, rho=0.75,
    n_target_classes=9, fab_iters=100, fab_restarts=1,
    square_queries=5000, square_p_init=0.8, square_restarts=1,
    square_rescale_schedule=False, fab_untargeted_restarts=1, eot_iter=1)
# Each version's attacks and its budgets where they differ from the standard.
VERSIONS = {
    "standard": (STANDARD_ATTACKS, {}),
    "plus": (PLUS_ATTACKS, dict(apgd_restarts=5, fab_untargeted_restarts=5)),
    "rand": (RAND_ATTACKS, dict(apgd_restarts=1, eot_iter=20)),
}
# The final check of a randomised model draws from the stage's keys folded with this.
_CHECK_STREAM = 0xC4EC


def version_settings(version: str) -> Tuple[Tuple[str, ...], Dict]:
  """``(attacks, settings)`` of a version (``'standard'``, ``'plus'`` or ``'rand'``)."""
  if version not in VERSIONS:
    raise ValueError(f"AutoAttack version must be one of {sorted(VERSIONS)} or "
                     f"'custom'; got {version!r}.")
  attacks, overrides = VERSIONS[version]
  return attacks, {**STANDARD_SETTINGS, **overrides}


def _attack(name: str, logits_fn: LogitsFn, eps, settings, norm: str,
            stochastic: bool) -> Callable:
  """``(x, labels, active, keys) -> x_adv`` for one named attack."""
  s = settings
  eot = dict(norm=norm, eot_iter=s["eot_iter"], stochastic=stochastic)
  if name in ("apgd-ce", "apgd-dlr"):
    return lambda x, y, active, keys: apgd(
        logits_fn, x, y, eps=eps, key=keys, loss=name[5:], n_iter=s["apgd_iters"],
        n_restarts=s["apgd_restarts"], rho=s["rho"], active=active, **eot)
  if name == "apgd-t":
    return lambda x, y, active, keys: apgd_targeted(
        logits_fn, x, y, eps=eps, key=keys, n_iter=s["apgd_iters"],
        n_target_classes=s["n_target_classes"],
        n_restarts=s["apgd_targeted_restarts"], rho=s["rho"], active=active, **eot)
  if stochastic:
    raise ValueError(f"AutoAttack: {name!r} takes a deterministic logits_fn (the "
                     f"reference runs it without EoT); with stochastic=True use "
                     f"{EOT_ATTACKS}, e.g. version='rand'.")
  if name == "fab-t":
    return lambda x, y, active, keys: fab_targeted(
        logits_fn, x, y, eps=eps, key=keys, n_iter=s["fab_iters"],
        n_target_classes=s["n_target_classes"], n_restarts=s["fab_restarts"],
        active=active, norm=norm)
  if name == "fab":
    return lambda x, y, active, keys: fab(
        logits_fn, x, y, eps=eps, key=keys, n_iter=s["fab_iters"],
        n_restarts=s["fab_untargeted_restarts"], active=active, norm=norm)
  if name == "square":
    return lambda x, y, active, keys: square(
        logits_fn, x, y, eps=eps, key=keys, n_queries=s["square_queries"],
        p_init=s["square_p_init"], n_restarts=s["square_restarts"],
        rescale_schedule=s["square_rescale_schedule"], active=active, norm=norm)
  raise ValueError(f"Unknown attack {name!r}; choose from {ATTACK_NAMES}.")


def _settings(overrides, base=None) -> Dict:
  unknown = set(overrides) - set(STANDARD_SETTINGS)
  if unknown:
    raise TypeError(f"Unknown AutoAttack settings {sorted(unknown)}; the settings "
                    f"are {sorted(STANDARD_SETTINGS)}.")
  return {**(base or STANDARD_SETTINGS), **overrides}


def _on_remaining(attack: Callable, x: Array, labels: Array, robust: Array,
                  keys: Array, batch_size: Optional[int]) -> Array:
  """Runs ``attack`` on the robust examples only, in chunks of ``batch_size``.

  The robust examples are moved to the front (stable order), the batch is
  cut into chunks, chunks without a robust example are skipped, and the
  results are put back in the original order.
  """
  def masked(xc, yc, mc, kc):
    return jax.lax.cond(jnp.any(mc), lambda: attack(xc, yc, mc, kc), lambda: xc)

  n = x.shape[0]
  if batch_size is None or batch_size >= n:
    return masked(x, labels, robust, keys)
  order = jnp.argsort(~robust, stable=True)
  n_chunks = -(-n // batch_size)
  pad = n_chunks * batch_size - n   # < batch_size < n, so x[:pad] is padding enough.

  def chunk(v, fill=None):
    v = v[order]
    tail = v[:pad] if fill is None else jnp.full((pad,) + v.shape[1:], fill, v.dtype)
    v = jnp.concatenate([v, tail])
    return v.reshape((n_chunks, batch_size) + v.shape[1:])

  chunks = (chunk(x), chunk(labels), chunk(robust, False), chunk(keys))
  adv = jax.lax.map(lambda c: masked(*c), chunks)
  adv = adv.reshape((n_chunks * batch_size,) + x.shape[1:])[:n]
  return jnp.zeros_like(x).at[order].set(adv)


def attack_remaining(name: str, logits_fn: LogitsFn, x: Array, labels: Array,
                     robust: Array, *, eps, key: Array,
                     batch_size: Optional[int] = None, norm: str = "linf",
                     stochastic: bool = False,
                     **settings) -> Tuple[Array, Array]:
  """One AutoAttack stage: attack ``name`` on the examples where ``robust`` holds.

  ``key`` is AutoAttack's key (one, or one per example); the stage derives its
  own from it, so chaining stages reproduces :func:`autoattack_robust_flags`
  exactly (useful to time or log each attack separately). ``settings`` are
  complete budgets or overrides of ``STANDARD_SETTINGS``. Returns
  ``(x_stage, still_robust)``: the stage's adversarial examples where it broke
  an example (or reached non-finite logits), the clean input elsewhere.
  """
  attack = _attack(name, logits_fn, eps, _settings(settings), norm, stochastic)
  keys = fold_in_each(per_example_keys(key, x.shape[0]), ATTACK_NAMES.index(name))
  x_stage = _on_remaining(attack, x, labels, robust, keys, batch_size)
  # The reference's final check: what the model predicts on the returned points.
  # Non-finite logits there count as broken (not robust) and that point is
  # returned, so the caller sees the non-finite values.
  check = fixed_draw(logits_fn, stochastic, fold_in_each(keys, _CHECK_STREAM))(x_stage)
  finite = jnp.all(jnp.isfinite(check), axis=-1)
  broken = robust & ((jnp.argmax(check, axis=-1) != labels) | ~finite)
  return jnp.where(per_example(broken, x), x_stage, x), robust & ~broken


def autoattack_robust_flags(logits_fn: LogitsFn, x: Array, labels: Array, *,
                            eps, key: Array, version: str = "standard",
                            attacks: Optional[Sequence[str]] = None,
                            batch_size: Optional[int] = None,
                            valid: Optional[Array] = None, norm: str = "linf",
                            stochastic: bool = False,
                            **settings) -> Tuple[Array, Dict[str, Array]]:
  """AutoAttack with per-example results: ``(x_adv, {stage: robust [B] bool})``.

  The stages are ``'clean'`` then each attack in order; ``robust`` after a
  stage is "classified correctly and not broken by any attack so far".
  ``valid`` (``[B]`` bool, e.g. False on padding) excludes examples from
  attack; their flags are False. Other arguments as in :func:`autoattack`.
  """
  if version == "custom":
    if not attacks:
      raise ValueError("autoattack: version='custom' needs a list of `attacks` "
                       f"from {ATTACK_NAMES}.")
    base = STANDARD_SETTINGS
  else:
    if attacks is not None:
      raise ValueError("autoattack: `attacks` is only used with version='custom'.")
    attacks, base = version_settings(version)
  for name in attacks:
    if name not in ATTACK_NAMES:
      raise ValueError(f"Unknown attack {name!r}; choose from {ATTACK_NAMES}.")
  if norm not in NORMS:
    raise ValueError(f"autoattack: norm must be one of {NORMS}; got {norm!r}.")
  if stochastic and set(attacks) - set(EOT_ATTACKS):
    raise ValueError(f"AutoAttack: {sorted(set(attacks) - set(EOT_ATTACKS))} take a "
                     "deterministic logits_fn (the reference runs them without EoT); "
                     f"with stochastic=True use {EOT_ATTACKS}, e.g. version='rand'.")
  settings = _settings(settings, base)

  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  robust = predict(fixed_draw(logits_fn, stochastic, keys), x) == labels
  if valid is not None:
    robust = robust & valid
  flags = collections.OrderedDict(clean=robust)  # Keeps its order through jit.
  x_adv = x
  for name in attacks:
    x_stage, robust = attack_remaining(
        name, logits_fn, x, labels, robust, eps=eps, key=keys, batch_size=batch_size,
        norm=norm, stochastic=stochastic, **settings)
    newly_broken = flags[list(flags)[-1]] & ~robust
    x_adv = jnp.where(per_example(newly_broken, x), x_stage, x_adv)
    flags[name] = robust
  return jax.lax.stop_gradient(x_adv), flags


def autoattack(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, key: Array,
               version: str = "standard", attacks: Optional[Sequence[str]] = None,
               batch_size: Optional[int] = None, valid: Optional[Array] = None,
               norm: str = "linf", stochastic: bool = False,
               **settings) -> Tuple[Array, Dict[str, Array]]:
  """Runs AutoAttack and returns ``(x_adv, robust accuracy after each stage)``.

  Args:
    logits_fn: ``x -> logits``, batch first, inputs in [0, 1] (BatchNorm
      models in inference mode). With ``stochastic``, a randomised model
      ``(x, keys) -> logits`` with one PRNG key per example (``keys[b]``
      draws the randomness for ``x[b]``); only the APGD attacks
      (``EOT_ATTACKS``) accept one, averaging each gradient over
      ``eot_iter`` draws, and the clean and final checks use one draw each.
    x: clean inputs ``[B, ...]`` (Square needs images ``[B, H, W, C]``).
    labels: ``[B]`` integers.
    eps: radius in ``norm`` (may be traced); the usual CIFAR-10 radii are
      8/255 (L-inf) and 0.5 (L2).
    key: one PRNG key (or one per example); same key, same result.
    version: ``'standard'``, ``'plus'``, ``'rand'`` (see the module
      docstring) or ``'custom'`` with ``attacks``, a list from
      ``ATTACK_NAMES``.
    batch_size: chunk size for running each attack on the remaining
      examples only (None: the whole batch at once).
    valid: optional ``[B]`` mask of examples that count (e.g. not padding).
    norm: ``'linf'`` or ``'l2'``.
    stochastic: whether ``logits_fn`` is randomised, as above.
    **settings: budgets overriding the version's (``apgd_iters``,
      ``n_target_classes``, ``fab_iters``, ``square_queries``, ``eot_iter``,
      ...; see ``STANDARD_SETTINGS``).

  Returns:
    ``x_adv``: for each example broken, the adversarial example of the attack
    that broke it; the clean input elsewhere. And a dict ``{'clean': acc,
    'apgd-ce': acc, ...}`` of fractions of the (valid) examples still robust
    after each stage.
  """
  x_adv, flags = autoattack_robust_flags(
      logits_fn, x, labels, eps=eps, key=key, version=version, attacks=attacks,
      batch_size=batch_size, valid=valid, norm=norm, stochastic=stochastic,
      **settings)
  count = x.shape[0] if valid is None else jnp.maximum(jnp.sum(valid), 1)
  return x_adv, collections.OrderedDict(
      (name, jnp.sum(robust) / count) for name, robust in flags.items())
