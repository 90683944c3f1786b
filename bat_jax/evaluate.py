"""Robust evaluation of trained runs: clean, FGSM, PGD^50 x 10, AutoAttack (SPEC.md 2, 4).

  python -m bat_jax.evaluate --workdir=runs/c10 [--which=best,last]
      [--num_examples=N] [--eps=8/255] [--attacks=clean,fgsm,pgd,autoattack]
      [--pgd_steps=50 --pgd_restarts=10] [--autoattack_version=standard|fast|custom]
  python -m bat_jax.evaluate --aggregate --workdirs=a,b,c [--out=table.md]

Read top-down:
  1. metrics: per-device functions ``(logits_fn, x, labels, valid, keys, eps,
     step_size) -> {name: [B]}`` giving per-example results (clean, FGSM, PGD,
     AutoAttack, zero input gradient);
  2. :class:`Evaluator`: runs a metric over a whole data set in padded, masked
     batches on all local devices; each metric compiles once, with the model
     variables, eps and step size as arguments. Every example gets its own
     PRNG key from its index, so results do not depend on the batch size or
     on the number of devices;
  3. sanity checks (warnings, never failures) against broken evaluations and
     gradient masking, on a small subset;
  4. :func:`evaluate` (arrays in, numbers out) and :func:`evaluate_workdir`
     (a trained run in, ``WORKDIR/eval/{which}_results.json`` and
     ``WORKDIR/eval/results.md`` out);
  5. :func:`aggregate`: mean ± std over seeds, in the paper's table format;
  6. the command line.
"""

import collections
import dataclasses
import glob
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import attacks as attacks_lib
from bat_jax import checkpointing, input_pipeline, losses, parallel

Array = jax.Array
# (logits_fn, x, labels, valid, keys, eps, step_size) -> {output: [B] array}.
MetricFn = Callable[..., Dict[str, Array]]

ATTACKS = ("clean", "fgsm", "pgd", "autoattack")
# Each metric draws its random numbers from fold_in(PRNGKey(seed), id).
_METRIC_IDS = {"clean": 0, "fgsm": 1, "pgd": 2, "autoattack": 3, "zero_grad": 4}

# Sanity-check thresholds (accuracies are fractions in [0, 1]).
TOLERANCE = 0.01             # allowed violation of an ordering between accuracies
LARGE_EPS = 1.0              # L-inf radius that contains the whole input box
LARGE_EPS_MAX_ACC = 0.02     # PGD accuracy above this at LARGE_EPS is suspicious
ZERO_GRAD_MAX_FRACTION = 0.01  # examples with an all-zero input gradient
SANITY_EXAMPLES = 200


# --------------------------------------------------------------------------
# 1. Per-example metrics.
# --------------------------------------------------------------------------


def _predict(logits_fn, x):
  return jnp.argmax(logits_fn(x), axis=-1)


def clean_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """Whether each clean example is classified correctly."""
  del valid, keys, eps, step_size
  return {"correct": _predict(logits_fn, x) == labels}


def fgsm_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """Whether each example is still classified correctly after FGSM."""
  del valid, keys, step_size
  return {"correct": _predict(logits_fn, attacks_lib.fgsm(logits_fn, x, labels, eps))
                     == labels}


def make_pgd_metric(num_steps: int = 50, num_restarts: int = 10) -> MetricFn:
  """PGD-CE, uniform start; an example counts only if every restart fails."""

  def pgd_metric(logits_fn, x, labels, valid, keys, eps, step_size):
    del valid
    x_adv = attacks_lib.pgd(logits_fn, x, labels, eps=eps, step_size=step_size,
                            num_steps=num_steps, key=keys,
                            num_restarts=num_restarts)
    return {"correct": _predict(logits_fn, x_adv) == labels}

  return pgd_metric


def zero_grad_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """Whether the input gradient of the CE loss is exactly zero (gradient masking)."""
  del valid, keys, eps, step_size
  grad = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), labels)))(x)
  return {"zero_grad": jnp.max(jnp.abs(grad.reshape(grad.shape[0], -1)), axis=1) == 0}


@dataclasses.dataclass(frozen=True)
class AutoAttackOptions:
  """Which AutoAttack to run.

  ``version``: 'standard' (APGD-CE, APGD-T, FAB-T, Square with the standard
  budgets), 'fast' (APGD-CE and APGD-T only: in Croce & Hein's experiments
  they make nearly all of AutoAttack's successes) or 'custom' (``attacks``,
  names from ``bat_jax.attacks.ATTACK_NAMES``). ``settings`` overrides
  budgets (``apgd_iters``, ``n_target_classes``, ``fab_iters``,
  ``square_queries``, ...) of any version. ``chunk_size``: run each attack
  on the still-robust examples only, this many at a time (speed only).
  """
  version: str = "standard"
  attacks: Optional[Tuple[str, ...]] = None
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  chunk_size: Optional[int] = None

  def attack_names(self) -> Tuple[str, ...]:
    if self.version == "standard":
      return tuple(attacks_lib.STANDARD_ATTACKS)
    if self.version == "fast":
      return ("apgd-ce", "apgd-t")
    if self.version == "custom":
      if not self.attacks:
        raise ValueError("AutoAttack version 'custom' needs a list of attacks "
                         f"from {attacks_lib.ATTACK_NAMES} (--autoattack_attacks).")
      return tuple(self.attacks)
    raise ValueError(f"AutoAttack version must be 'standard', 'fast' or 'custom'; "
                     f"got {self.version!r}.")

  def is_standard(self) -> bool:
    """Whether this is the paper's AutoAttack (standard attacks and budgets)."""
    return self.version == "standard" and not self.settings

  def describe(self) -> Dict[str, Any]:
    return {"version": self.version, "attacks": list(self.attack_names()),
            "settings": dict(self.settings), "chunk_size": self.chunk_size,
            "standard": self.is_standard()}


def make_autoattack_metric(options: AutoAttackOptions) -> MetricFn:
  """Per-example "still robust" flags after each AutoAttack stage (clean first)."""
  names = options.attack_names()

  def autoattack_metric(logits_fn, x, labels, valid, keys, eps, step_size):
    del step_size
    _, flags_by_stage = attacks_lib.autoattack_robust_flags(
        logits_fn, x, labels, eps=eps, key=keys, version="custom", attacks=names,
        batch_size=options.chunk_size, valid=valid, **dict(options.settings))
    return dict(flags_by_stage)

  return autoattack_metric


def make_metrics(*, pgd_steps: int = 50, pgd_restarts: int = 10,
                 autoattack: AutoAttackOptions = AutoAttackOptions()
                 ) -> Dict[str, MetricFn]:
  """The metrics :func:`evaluate` uses, with their static budgets."""
  return {"clean": clean_metric, "fgsm": fgsm_metric,
          "pgd": make_pgd_metric(pgd_steps, pgd_restarts),
          "autoattack": make_autoattack_metric(autoattack),
          "zero_grad": zero_grad_metric}


def example_keys(seed: int, metric: str, indices: Array) -> Array:
  """One PRNG key per example from its index in the data set (batch-independent)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _METRIC_IDS.get(metric, 99))
  return jax.vmap(jax.random.fold_in, (None, 0))(key, indices)


# --------------------------------------------------------------------------
# 2. Running a metric over a data set.
# --------------------------------------------------------------------------


class Evaluator:
  """Runs per-example metrics of one model over a data set on all local devices.

  Batches are padded to ``batch_size`` and masked, so every example is
  computed exactly once and each metric compiles once: the variables are a
  device-resident argument, ``eps`` and ``step_size`` ride in the batch.
  """

  def __init__(self, apply_fn: Callable, variables: Any, *, batch_size: int,
               seed: int = 0, pgd_steps: int = 50, pgd_restarts: int = 10,
               autoattack: AutoAttackOptions = AutoAttackOptions(), par=None):
    """``apply_fn(variables, x) -> logits`` in inference mode, x float in [0, 1].

    ``batch_size`` is rounded up to a multiple of the number of devices.
    """
    self.par = par or parallel.Pmap()
    shards = len(self.par.devices) * jax.process_count()
    self.batch_size = max(shards, -(-int(batch_size) // shards) * shards)
    self.apply_fn, self.seed = apply_fn, int(seed)
    self.pgd_steps, self.pgd_restarts = pgd_steps, pgd_restarts
    self.autoattack = autoattack
    self.metrics = make_metrics(pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
                                autoattack=autoattack)
    self.trace_counts: Dict[str, int] = collections.Counter()
    self._compiled: Dict[str, Callable] = {}
    self.set_variables(variables)

  def set_variables(self, variables: Any) -> None:
    """Evaluates another model of the same architecture, without recompiling."""
    self.variables = self.par.put_state(variables)

  def _per_device(self, name: str) -> Callable:
    metric = self.metrics[name]

    def step(variables, batch):
      self.trace_counts[name] += 1
      logits_fn = lambda z: self.apply_fn(variables, z)
      x = input_pipeline.to_float(batch["image"])
      keys = example_keys(self.seed, name, batch["index"])
      out = metric(logits_fn, x, batch["label"], batch["mask"], keys,
                   batch["eps"], batch["step_size"])
      out = dict(out, mask=batch["mask"], index=batch["index"])
      # Every device returns the whole (global) batch: works for pmap and shard_map.
      return jax.lax.all_gather(out, parallel.AXIS)

    return step

  def _batches(self, images, labels, eps, step_size):
    """Padded, masked batches carrying each example's index, eps and step size."""
    n_dev = len(self.par.devices)
    indices = np.arange(len(images), dtype=np.int32)
    for batch in input_pipeline.eval_batches(
        images, indices, self.batch_size, n_dev,
        process_index=jax.process_index(), process_count=jax.process_count()):
      batch["index"] = batch.pop("label")
      batch["label"] = np.where(batch["mask"], labels[batch["index"]], 0).astype(np.int32)
      batch["eps"] = np.full((n_dev,), eps, np.float32)
      batch["step_size"] = np.full((n_dev,), step_size, np.float32)
      yield batch

  def run(self, name: str, images: np.ndarray, labels: np.ndarray, *,
          eps: float = 0.0, step_size: float = 0.0) -> Dict[str, np.ndarray]:
    """Metric ``name`` on uint8 ``images`` [N, H, W, C]: ``{output: [N] array}``."""
    if name not in self._compiled:
      self._compiled[name] = self.par.compile(self._per_device(name))
    compiled = self._compiled[name]
    labels = np.asarray(labels, np.int32)
    num, results = len(images), {}
    seen = np.zeros((num,), np.int64)
    began = last_log = time.time()
    for batch in self._batches(np.asarray(images), labels, eps, step_size):
      out = jax.device_get(self.par.get_output(
          compiled(self.variables, self.par.put_batch(batch))))
      mask = np.asarray(out.pop("mask")).reshape(-1)
      index = np.asarray(out.pop("index")).reshape(-1)[mask]
      np.add.at(seen, index, 1)
      for key, value in out.items():
        value = np.asarray(value).reshape(-1)
        if key not in results:
          results[key] = np.zeros((num,), value.dtype)
        results[key][index] = value[mask]
      if time.time() - last_log > 60:
        last_log, done = time.time(), int(np.sum(seen > 0))
        rate = done / (last_log - began)
        logging.info("%s: %d/%d examples, %.1f examples/s, ETA %.0fs", name, done,
                     num, rate, (num - done) / max(rate, 1e-9))
    if num and not np.all(seen == 1):
      raise RuntimeError(f"{name}: examples evaluated {sorted(set(seen.tolist()))} "
                         "times; expected each exactly once (a batching bug).")
    return results

  def accuracy(self, name: str, images, labels, **kwargs) -> float:
    """Fraction of examples with ``correct`` (clean, FGSM, PGD metrics)."""
    return float(np.mean(self.run(name, images, labels, **kwargs)["correct"]))


# --------------------------------------------------------------------------
# 3. Sanity checks: warnings, never failures.
# --------------------------------------------------------------------------


def sanity_measurements(evaluator: Evaluator, images, labels, *, eps: float,
                        step_size: float, large_eps: float = LARGE_EPS,
                        pgd_at_eps: Optional[np.ndarray] = None) -> Dict[str, Any]:
  """The numbers the sanity checks judge, measured on ``images`` (a small subset).

  PGD runs at 0, eps/2, eps, 2 eps (step size scaled with eps) and at
  ``large_eps`` (step ``2.5 large_eps / steps``, Madry et al.'s rule);
  ``pgd_at_eps`` reuses per-example results at eps (same keys, same numbers).
  """
  sweep = sorted({0.0, min(0.5 * eps, 1.0), min(eps, 1.0), min(2.0 * eps, 1.0)})
  pgd_sweep = []
  for e in sweep:
    e_step = step_size * e / eps if eps > 0 else step_size
    if e == eps and pgd_at_eps is not None:
      acc = float(np.mean(pgd_at_eps))
    else:
      acc = evaluator.accuracy("pgd", images, labels, eps=e, step_size=e_step)
    pgd_sweep.append({"eps": e, "step_size": e_step, "acc": acc})
  large_step = 2.5 * large_eps / max(evaluator.pgd_steps, 1)
  zero_grad = evaluator.run("zero_grad", images, labels)["zero_grad"]
  return {
      "num_examples": int(len(images)),
      "clean_acc": evaluator.accuracy("clean", images, labels),
      "pgd_eps_sweep": pgd_sweep,
      "large_eps": float(large_eps),
      "large_eps_step_size": large_step,
      "large_eps_pgd_acc": evaluator.accuracy("pgd", images, labels, eps=large_eps,
                                              step_size=large_step),
      "zero_grad_fraction": float(np.mean(zero_grad)),
  }


def sanity_warnings(sanity: Mapping[str, Any], accuracies: Mapping[str, Any], *,
                    tolerance: float = TOLERANCE,
                    large_eps_max_acc: float = LARGE_EPS_MAX_ACC,
                    zero_grad_max_fraction: float = ZERO_GRAD_MAX_FRACTION) -> List[str]:
  """What looks wrong in an evaluation, as human-readable warnings.

  ``sanity`` is :func:`sanity_measurements` output; ``accuracies`` holds the
  full-set ``clean_acc``, ``fgsm_acc``, ``pgd_acc``, ``autoattack_acc``
  (missing or None: not checked). Checks: PGD at eps = 0 equals clean; PGD
  accuracy does not increase with eps; AutoAttack <= PGD <= FGSM <= clean;
  a huge eps breaks (almost) everything; input gradients are not zero.
  """
  warnings = []
  sweep = sanity.get("pgd_eps_sweep") or []
  at_zero = [p["acc"] for p in sweep if p["eps"] == 0]
  clean = sanity.get("clean_acc")
  if at_zero and clean is not None and abs(at_zero[0] - clean) > tolerance:
    warnings.append(f"PGD at eps=0 gives accuracy {at_zero[0]:.4f}, not the clean "
                    f"accuracy {clean:.4f}: the attack changes unperturbed inputs.")
  for lo, hi in zip(sweep, sweep[1:]):
    if hi["acc"] > lo["acc"] + tolerance:
      warnings.append(f"PGD accuracy increases with eps: {lo['acc']:.4f} at eps="
                      f"{lo['eps']:.4g} but {hi['acc']:.4f} at eps={hi['eps']:.4g} "
                      "(a weak or masked attack).")
  order = [("autoattack_acc", "AutoAttack"), ("pgd_acc", "PGD"), ("fgsm_acc", "FGSM"),
           ("clean_acc", "clean")]
  measured = [(key, label) for key, label in order if accuracies.get(key) is not None]
  for (strong, strong_label), (weak, weak_label) in zip(measured, measured[1:]):
    if accuracies[strong] > accuracies[weak] + tolerance:
      warnings.append(f"{strong_label} accuracy {accuracies[strong]:.4f} exceeds "
                      f"{weak_label} accuracy {accuracies[weak]:.4f}: the stronger "
                      "attack is weaker (gradient masking or a bug).")
  large = sanity.get("large_eps_pgd_acc")
  if large is not None and large > large_eps_max_acc:
    warnings.append(f"PGD at eps={sanity['large_eps']:g} leaves accuracy {large:.4f} "
                    f"(> {large_eps_max_acc}): the model may be (near) constant or "
                    "mask its gradients.")
  zero = sanity.get("zero_grad_fraction")
  if zero is not None and zero > zero_grad_max_fraction:
    warnings.append(f"{100 * zero:.1f}% of examples have an all-zero input gradient "
                    "of the CE loss: gradient masking (saturated softmax, dead "
                    "units or a non-differentiable model).")
  return warnings


# --------------------------------------------------------------------------
# 4. Evaluating a model and a trained run.
# --------------------------------------------------------------------------


def evaluate(apply_fn: Callable, variables: Any, images: np.ndarray,
             labels: np.ndarray, *, eps: float, pgd_step_size: float,
             attacks: Sequence[str] = ATTACKS, pgd_steps: int = 50,
             pgd_restarts: int = 10,
             autoattack: AutoAttackOptions = AutoAttackOptions(),
             batch_size: int = 500, seed: int = 0,
             sanity_examples: int = SANITY_EXAMPLES, large_eps: float = LARGE_EPS,
             tolerance: float = TOLERANCE, par=None) -> Dict[str, Any]:
  """Clean / FGSM / PGD / AutoAttack accuracies of one model, and sanity checks.

  ``apply_fn(variables, x) -> logits`` (inference mode), ``images`` uint8
  ``[N, H, W, C]``. Builds an :class:`Evaluator` and calls
  :func:`evaluate_with`, which documents the other arguments and the result.
  """
  evaluator = Evaluator(apply_fn, variables, batch_size=min(batch_size, len(images)),
                        seed=seed, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
                        autoattack=autoattack, par=par)
  return evaluate_with(evaluator, images, labels, eps=eps, pgd_step_size=pgd_step_size,
                       attacks=attacks, sanity_examples=sanity_examples,
                       large_eps=large_eps, tolerance=tolerance)


def evaluate_with(evaluator: Evaluator, images: np.ndarray, labels: np.ndarray, *,
                  eps: float, pgd_step_size: float, attacks: Sequence[str] = ATTACKS,
                  sanity_examples: int = SANITY_EXAMPLES, large_eps: float = LARGE_EPS,
                  tolerance: float = TOLERANCE) -> Dict[str, Any]:
  """:func:`evaluate` with a ready :class:`Evaluator` (reused: no recompilation).

  Runs ``attacks`` (a subset of ``ATTACKS``) on every example, then the
  sanity checks on the first ``sanity_examples`` examples rounded up to whole
  batches (0: no checks). Returns accuracies as fractions (None for attacks
  not run), AutoAttack's accuracy after each stage, timings in seconds
  (compilation included), the sanity measurements and warnings, and the
  settings.
  """
  unknown = set(attacks) - set(ATTACKS)
  if unknown:
    raise ValueError(f"Unknown attacks {sorted(unknown)}; choose from {ATTACKS}.")
  if not 0 <= eps <= 1:
    raise ValueError(f"eps={eps} must lie in [0, 1] (pixel units, e.g. 8/255).")
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if images.dtype != np.uint8 or len(images) != len(labels) or not len(images):
    raise ValueError("evaluate: need uint8 images [N, H, W, C] and N labels, N > 0; "
                     f"got {images.dtype} {images.shape} and {labels.shape}.")
  autoattack = evaluator.autoattack
  results: Dict[str, Any] = {f"{name}_acc": None for name in ATTACKS}
  results["autoattack_per_attack"] = None
  timings, per_example = {}, {}
  began = time.time()
  for name in ATTACKS:
    if name not in attacks:
      continue
    start = time.time()
    out = evaluator.run(name, images, labels, eps=eps, step_size=pgd_step_size)
    timings[name] = time.time() - start
    if name == "autoattack":
      # Stages in the order they ran (device_get sorts dictionary keys).
      stages = ("clean",) + autoattack.attack_names()
      per_attack = {stage: float(np.mean(out[stage])) for stage in stages}
      results["autoattack_per_attack"] = per_attack
      results["autoattack_acc"] = list(per_attack.values())[-1]
    else:
      per_example[name] = out["correct"]
      results[f"{name}_acc"] = float(np.mean(out["correct"]))
    logging.info("%s accuracy %.4f on %d examples (%.1fs)", name,
                 results[f"{name}_acc"], len(images), timings[name])

  sanity, warnings = {}, []
  if sanity_examples > 0:
    start = time.time()
    subset = min(len(images), -(-sanity_examples // evaluator.batch_size)
                 * evaluator.batch_size)
    pgd_at_eps = per_example["pgd"][:subset] if "pgd" in per_example else None
    sanity = sanity_measurements(
        evaluator, images[:subset], labels[:subset], eps=eps,
        step_size=pgd_step_size, large_eps=large_eps,
        pgd_at_eps=pgd_at_eps)
    warnings = sanity_warnings(sanity, results, tolerance=tolerance)
    timings["sanity"] = time.time() - start
    for warning in warnings:
      logging.warning("Sanity check: %s", warning)
  timings["total"] = time.time() - began
  results.update(
      eps=float(eps), num_examples=int(len(images)), timings_s=timings,
      sanity=sanity, sanity_warnings=warnings,
      settings={"attacks": [a for a in ATTACKS if a in attacks],
                "pgd_steps": int(evaluator.pgd_steps),
                "pgd_restarts": int(evaluator.pgd_restarts),
                "pgd_step_size": float(pgd_step_size),
                "autoattack": autoattack.describe(),
                "batch_size": evaluator.batch_size, "seed": evaluator.seed,
                "devices": len(evaluator.par.devices) * jax.process_count(),
                "tolerance": tolerance})
  return results


def resolve_checkpoint(workdir: str, which: str) -> Tuple[str, int]:
  """The checkpoint series ('best' or 'last') and step that ``which`` restores.

  'best' falls back to 'last' when the run kept no best checkpoint, as
  ``train.restore_model`` does.
  """
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  try:
    series = which
    if which == "best" and ckpts.latest_step("best") is None:
      series = "last"
    step = ckpts.latest_step(series)
  finally:
    ckpts.close()
  if step is None:
    raise FileNotFoundError(f"No {which!r} checkpoint in {workdir}: train first with "
                            "`python -m bat_jax.main --config=... --workdir=...`.")
  return series, int(step)


def evaluate_workdir(workdir: str, *, which: Sequence[str] = ("best", "last"),
                     num_examples: Optional[int] = None, eps: Optional[float] = None,
                     pgd_step_size: Optional[float] = None,
                     batch_size: Optional[int] = None, data_dir: Optional[str] = None,
                     data_file: Optional[str] = None,
                     attacks: Sequence[str] = ATTACKS, pgd_steps: int = 50,
                     pgd_restarts: int = 10,
                     autoattack: AutoAttackOptions = AutoAttackOptions(),
                     seed: int = 0, **options) -> Dict[str, Dict[str, Any]]:
  """Evaluates checkpoints of a training run; writes JSON files and a Markdown table.

  ``which``: checkpoints ('best', 'last'; a string or a sequence). A
  checkpoint with the same step as one already evaluated (e.g. 'best'
  falling back to 'last') is not evaluated twice. ``num_examples``: the
  first N test examples (None: all). ``eps`` / ``pgd_step_size`` /
  ``batch_size`` / ``data_dir`` default to the run's ``config.eps``,
  ``config.eval_attack_step_size``, ``config.eval_batch_size`` and
  ``config.data_dir`` (``data_file``, a local .npz replacing TFDS, to
  ``config.data_file``). The other arguments are :func:`evaluate`'s; all
  checkpoints share one :class:`Evaluator`, so each metric compiles once.
  Writes ``WORKDIR/eval/{which}_results.json`` and ``WORKDIR/eval/results.md``;
  returns ``{which: results}``.
  """
  from bat_jax import train  # Deferred: the trainer is heavy to import.
  which = [which] if isinstance(which, str) else list(which)
  for w in which:
    if w not in checkpointing.WHICH:
      raise ValueError(f"which must name checkpoints in {checkpointing.WHICH}; "
                       f"got {w!r}.")
  config = train.load_config(workdir)
  eps = float(config.eps if eps is None else eps)
  pgd_step_size = float(config.eval_attack_step_size if pgd_step_size is None
                        else pgd_step_size)
  data_dir = (config.data_dir or None) if data_dir is None else data_dir
  data_file = (config.data_file or None) if data_file is None else data_file
  images, labels = input_pipeline.load_split(
      config.dataset, "test", data_dir=data_dir, data_file=data_file,
      num_examples=num_examples if num_examples and num_examples > 0 else None)
  par = parallel.make(config.parallel)
  out_dir = os.path.join(workdir, "eval")
  is_chief = jax.process_index() == 0

  all_results, by_checkpoint, evaluator = {}, {}, None
  for w in which:
    series, step = resolve_checkpoint(workdir, w)
    if step in by_checkpoint:  # Same step, same state: reuse.
      logging.info("%s: checkpoint %r is step %d, already evaluated as %r.",
                   workdir, w, step, by_checkpoint[step]["which"])
      results = dict(by_checkpoint[step], which=w, checkpoint=series,
                     same_as=by_checkpoint[step]["which"])
    else:
      restored = train.restore_model(workdir, w)
      logging.info("Evaluating %s checkpoint %r (%s, step %d) on %d examples at eps=%g.",
                   workdir, w, series, restored.step, len(images), eps)
      if evaluator is None:
        model = restored.model
        evaluator = Evaluator(
            lambda v, x: model.apply(v, x, train=False), restored.variables,
            batch_size=min(batch_size or config.eval_batch_size, len(images)),
            seed=seed, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
            autoattack=autoattack, par=par)
      else:
        evaluator.set_variables(restored.variables)
      results = evaluate_with(evaluator, images, labels, eps=eps,
                              pgd_step_size=pgd_step_size, attacks=attacks, **options)
      results.update(which=w, checkpoint=series, step=int(restored.step))
      results.update(workdir=os.path.abspath(workdir), dataset=config.dataset,
                     split="test", method=config.method, model=config.model,
                     train_seed=int(config.seed), train_eps=float(config.eps))
      by_checkpoint[step] = results
    all_results[w] = results
    if is_chief:
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, f"{w}_results.json"), "w") as f:
        json.dump(results, f, indent=2)
  if is_chief:
    with open(os.path.join(out_dir, "results.md"), "w") as f:
      f.write(results_markdown(workdir))
  return all_results


def load_results(workdir: str) -> Dict[str, Dict[str, Any]]:
  """``{which: results}`` from ``WORKDIR/eval/*_results.json`` (best first)."""
  found = {}
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "*_results.json"))):
    with open(path) as f:
      results = json.load(f)
    which = os.path.basename(path)[:-len("_results.json")]
    found[results.get("which") or which] = results
  order = {w: i for i, w in enumerate(("best", "last"))}
  return dict(sorted(found.items(), key=lambda item: order.get(item[0], 99)))


def _pct(value) -> str:
  return "–" if value is None else f"{100 * value:.2f}"


def _pgd_label(settings: Mapping[str, Any]) -> str:
  steps, restarts = settings.get("pgd_steps", 50), settings.get("pgd_restarts", 10)
  return f"PGD^{steps}" + (f"×{restarts}" if restarts > 1 else "")


def _autoattack_label(settings: Mapping[str, Any]) -> str:
  aa = settings.get("autoattack") or {}
  if not aa or aa.get("standard", True):
    return "AutoAttack"
  budgets = ", custom budgets" if aa.get("settings") else ""
  return f"AutoAttack ({aa.get('version')}{budgets})"


def _checkpoint_label(which: str, results: Mapping[str, Any]) -> str:
  """'best', 'best (fell back to last)' or 'last (same step as best)'."""
  if results.get("same_as"):
    return f"{which} (same step as {results['same_as']})"
  if results.get("checkpoint", which) != which:
    return f"{which} (fell back to {results['checkpoint']})"
  return which


def results_markdown(workdir: str) -> str:
  """A Markdown summary of every evaluated checkpoint of ``workdir`` (in %)."""
  runs = load_results(workdir)
  if not runs:
    return f"No evaluation results in {os.path.join(workdir, 'eval')}.\n"
  first = next(iter(runs.values()))
  settings = first.get("settings", {})
  lines = [f"# Evaluation of `{workdir}`", "",
           f"method `{first.get('method')}`, model `{first.get('model')}`, dataset "
           f"`{first.get('dataset')}` (test), training eps "
           f"{first.get('train_eps', 0):.4g}; "
           "accuracies in %.", "",
           "| checkpoint | step | examples | eps | Clean | FGSM | "
           f"{_pgd_label(settings)} "
           f"| {_autoattack_label(settings)} | warnings |",
           "|---|---|---|---|---|---|---|---|---|"]
  for w, r in runs.items():
    lines.append(f"| {_checkpoint_label(w, r)} | {r.get('step')} | "
                 f"{r.get('num_examples')} | "
                 f"{r.get('eps', 0):.4g} | {_pct(r.get('clean_acc'))} | "
                 f"{_pct(r.get('fgsm_acc'))} | {_pct(r.get('pgd_acc'))} | "
                 f"{_pct(r.get('autoattack_acc'))} | "
                 f"{len(r.get('sanity_warnings', []))} |")
  stages = [r for r in runs.values() if r.get("autoattack_per_attack")]
  if stages:
    names = list(stages[0]["autoattack_per_attack"])
    lines += ["", "AutoAttack, robust accuracy (%) after each attack:", "",
              "| checkpoint | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for w, r in runs.items():
      if r.get("autoattack_per_attack"):
        lines.append(f"| {w} | " + " | ".join(
            _pct(r["autoattack_per_attack"].get(n)) for n in names) + " |")
  lines += ["", "Timings (s, compilation included):", ""]
  for w, r in runs.items():
    if r.get("same_as"):
      lines.append(f"- {w}: not evaluated again (the {r['same_as']} checkpoint)")
      continue
    lines.append(f"- {w}: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                        r.get("timings_s", {}).items()))
  lines += ["", "Sanity checks:", ""]
  for w, r in runs.items():
    warnings = r.get("sanity_warnings", [])
    if not r.get("sanity"):
      lines.append(f"- {w}: not run")
    elif not warnings:
      lines.append(f"- {w}: all passed")
    for warning in warnings:
      lines.append(f"- {w}: WARNING {warning}")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# 5. Aggregation over runs (the paper's Tables 1-3: mean ± std over seeds).
# --------------------------------------------------------------------------

_METHOD_NAMES = {"standard": "Standard", "at": "AT", "trades": "TRADES",
                 "mart": "MART", "bat": "BAT"}
_DATASET_NAMES = {"mnist": "MNIST", "mnist_subset": "MNIST (subset)",
                  "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_COLUMNS = (("clean_acc", "Clean"), ("fgsm_acc", "FGSM"), ("pgd_acc", "PGD^50"),
            ("autoattack_acc", "AutoAttack"))


def format_eps(eps: float, dataset: str = "") -> str:
  """0.3 -> '0.3'; on CIFAR, 0.0313... -> '8/255'."""
  scaled = eps * 255
  if dataset.startswith("cifar") and abs(scaled - round(scaled)) < 1e-4:
    return f"{int(round(scaled))}/255"
  return f"{eps:g}"


def mean_std(values: Sequence[float]) -> str:
  """Percent 'mean±std', 2 decimals; sample std (ddof=1); one run: just the mean."""
  values = 100 * np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f}±{values.std(ddof=1):.2f}"


def _read_run(workdir: str, which: str):
  config_path = os.path.join(workdir, "config.json")
  results_path = os.path.join(workdir, "eval", f"{which}_results.json")
  if not os.path.exists(config_path) or not os.path.exists(results_path):
    return None
  with open(config_path) as f:
    config = json.load(f)
  with open(results_path) as f:
    return config, json.load(f)


def aggregate(workdirs: Sequence[str], which: Sequence[str] = ("best",)) -> str:
  """A Markdown table of mean ± std over seeds, one row per method.

  Runs are grouped by (dataset, training eps, evaluation eps, method) from
  each workdir's ``config.json`` and ``eval/{which}_results.json``. With
  several ``which``, each method gets one row per checkpoint, the later ones
  labelled like the paper's Table B.1 ('(ES)' for 'best'). Columns without any
  value are left out (Tables 1-2 have no FGSM); missing values in a group are
  averaged over the runs that have them, marked ``(n=k)``.
  """
  which = [which] if isinstance(which, str) else list(which)
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  configs = collections.defaultdict(list)
  skipped, warned, budgets, fell_back = [], [], [], []
  for workdir in workdirs:
    for w in which:
      run = _read_run(workdir, w)
      if run is None:
        skipped.append(f"{workdir} ({w})")
        continue
      config, results = run
      train_eps = float(config.get("eps", results.get("train_eps", 0.0)))
      key = (config.get("dataset", "?"), train_eps, float(results.get("eps", train_eps)),
             config.get("method", "?"))
      groups[key][w].append(results)
      configs[key].append(config)
      if results.get("sanity_warnings"):
        warned.append(f"{workdir} ({w}): {len(results['sanity_warnings'])}")
      settings = results.get("settings") or {}
      pgd_budget = (settings.get("pgd_steps"), settings.get("pgd_restarts"))
      aa_standard = (settings.get("autoattack") or {}).get("standard", True)
      if settings and (pgd_budget != (50, 10) or not aa_standard):
        budgets.append(f"{workdir} ({w}): {_pgd_label(settings)}, "
                       f"{_autoattack_label(settings)}")
      if results.get("checkpoint", w) != w:
        fell_back.append(f"{workdir} ({w} = {results['checkpoint']})")
  columns = [(k, label) for k, label in _COLUMNS
             if any(r.get(k) is not None for g in groups.values() for rs in g.values()
                    for r in rs)]
  lines = ["| Method | " + " | ".join(label for _, label in columns) + " | runs |",
           "|---|" + "---|" * (len(columns) + 1)]
  order = {m: i for i, m in enumerate(_METHOD_NAMES)}
  heading = None
  for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 99), k[3])):
    dataset, train_eps, eval_eps, method = key
    title = (f"{_DATASET_NAMES.get(dataset, dataset)} "
             f"(ε = {format_eps(train_eps, dataset)}")
    if abs(eval_eps - train_eps) > 1e-9:
      title += f", evaluated at ε = {format_eps(eval_eps, dataset)}"
    title += ")"
    if title != heading:
      heading = title
      lines.append(f"| **{title}** |" + " |" * (len(columns) + 1))
    for i, w in enumerate(which):
      runs = groups[key].get(w)
      if not runs:
        continue
      label = _METHOD_NAMES.get(method, method)
      if i > 0:
        label = "(ES)" if w == "best" else f"({w})"
      cells = []
      for k, _ in columns:
        values = [r[k] for r in runs if r.get(k) is not None]
        cell = mean_std(values) if values else "–"
        if values and len(values) < len(runs):
          cell += f" (n={len(values)})"
        cells.append(cell)
      lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")
  notes = []
  for key, group_configs in configs.items():
    varying = sorted(k for k in set().union(*group_configs)
                     if k not in ("seed", "data_dir", "data_file")
                     and len({json.dumps(c.get(k), sort_keys=True)
                              for c in group_configs}) > 1)
    if varying:
      notes.append(f"- {_METHOD_NAMES.get(key[3], key[3])} on {key[0]} "
                   f"(ε = {format_eps(key[1], key[0])}): runs differ in "
                   f"{', '.join(varying)} besides the seed.")
  if budgets:
    notes.append("- not the paper's attack budgets: " + "; ".join(budgets))
  if fell_back:
    notes.append("- no best checkpoint, evaluated the last: " + "; ".join(fell_back))
  if warned:
    notes.append("- sanity-check warnings: " + "; ".join(warned))
  if skipped:
    notes.append("- no results (skipped): " + "; ".join(skipped))
  text = "Accuracy (%), mean±std over seeds (sample std).\n\n" + "\n".join(lines) + "\n"
  if notes:
    text += "\n" + "\n".join(notes) + "\n"
  return text


# --------------------------------------------------------------------------
# 6. Command line.
# --------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training workdir to evaluate.", **fv)
  flags.DEFINE_list("which", ["best", "last"], "Checkpoints to evaluate (or aggregate).",
                    **fv)
  flags.DEFINE_integer("num_examples", -1, "First N test examples; -1: all.", **fv)
  flags.DEFINE_string("eps", "", "L-inf radius, e.g. 0.3 or 8/255; '': the config's.",
                      **fv)
  flags.DEFINE_list("attacks", list(ATTACKS), f"Subset of {ATTACKS}.", **fv)
  flags.DEFINE_integer("pgd_steps", 50, "PGD iterations.", **fv)
  flags.DEFINE_integer("pgd_restarts", 10, "PGD random restarts.", **fv)
  flags.DEFINE_string("pgd_step_size", "",
                      "PGD step size; '': the config's eval_attack_step_size.", **fv)
  flags.DEFINE_enum("autoattack_version", "standard", ["standard", "fast", "custom"],
                    "standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE, "
                    "APGD-T; custom: --autoattack_attacks.", **fv)
  flags.DEFINE_list("autoattack_attacks", [], "For custom: names from "
                    f"{attacks_lib.ATTACK_NAMES}.", **fv)
  flags.DEFINE_list("autoattack_settings", [], "Budget overrides, e.g. "
                    "apgd_iters=20,n_target_classes=3,square_queries=1000.", **fv)
  flags.DEFINE_integer("autoattack_chunk_size", 0, "Attack still-robust examples "
                       "this many at a time (0: whole batch).", **fv)
  flags.DEFINE_integer("batch_size", 0, "Examples per batch; 0: config.eval_batch_size.",
                       **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts.", **fv)
  flags.DEFINE_integer("sanity_examples", SANITY_EXAMPLES,
                       "Examples for the sanity checks; 0: skip them.", **fv)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; default: the config's.", **fv)
  flags.DEFINE_string("data_file", None, "Local .npz replacing TFDS; default: the "
                      "config's.", **fv)
  flags.DEFINE_bool("aggregate", False, "Aggregate --workdirs instead of evaluating.",
                    **fv)
  flags.DEFINE_list("workdirs", [], "Workdirs to aggregate.", **fv)
  flags.DEFINE_string("out", "", "Write the aggregated table here too.", **fv)


def parse_number(text: str) -> float:
  """'0.3' -> 0.3, '8/255' -> 0.03137..."""
  if "/" in text:
    num, den = text.split("/", 1)
    return float(num) / float(den)
  return float(text)


def _parse_settings(items: Sequence[str]) -> Dict[str, Any]:
  settings = {}
  for item in items:
    if "=" not in item:
      raise app.UsageError(f"--autoattack_settings takes key=value items; got {item!r}.")
    key, value = item.split("=", 1)
    try:
      settings[key.strip()] = int(value)
    except ValueError:
      settings[key.strip()] = float(value)
  return settings


def run_from_flags(fv: flags.FlagValues = FLAGS) -> str:
  """Evaluates or aggregates as the flags say; returns the Markdown printed."""
  if fv.aggregate:
    if not fv.workdirs:
      raise app.UsageError("--aggregate needs --workdirs=a,b,c.")
    text = aggregate(fv.workdirs, which=fv.which)
    if fv.out:
      with open(fv.out, "w") as f:
        f.write(text)
    return text
  if not fv.workdir:
    raise app.UsageError("Pass --workdir=DIR (or --aggregate --workdirs=...).")
  autoattack = AutoAttackOptions(
      version=fv.autoattack_version, attacks=tuple(fv.autoattack_attacks) or None,
      settings=_parse_settings(fv.autoattack_settings),
      chunk_size=fv.autoattack_chunk_size or None)
  evaluate_workdir(
      fv.workdir, which=fv.which,
      num_examples=fv.num_examples if fv.num_examples > 0 else None,
      eps=parse_number(fv.eps) if fv.eps else None,
      pgd_step_size=parse_number(fv.pgd_step_size) if fv.pgd_step_size else None,
      batch_size=fv.batch_size or None, data_dir=fv.data_dir,
      data_file=fv.data_file, attacks=fv.attacks,
      pgd_steps=fv.pgd_steps, pgd_restarts=fv.pgd_restarts, autoattack=autoattack,
      seed=fv.seed, sanity_examples=fv.sanity_examples)
  return results_markdown(fv.workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from bat_jax import util
  util.setup_runtime()
  text = run_from_flags(FLAGS)
  if jax.process_index() == 0:
    print(text, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
