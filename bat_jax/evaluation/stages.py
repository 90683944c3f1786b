"""The evaluation stages: one registry that the suite, reports, sanity checks, records
and exports read.

A stage is one accuracy of an evaluation (clean, FGSM, PGD, AutoAttack): its
per-example metric, its column in the tables, its place in the sanity checks'
ordering and what the records say about its budgets. Adding a stage is one
:func:`register` call (docs/LAYOUT.md); nothing else names stages.
:class:`Protocol` picks the stages of one evaluation and their budgets.
"""

import dataclasses
import re
from typing import (Any, Callable, Collection, Dict, List, Mapping, NamedTuple,
                    Optional, Tuple)

from absl import logging
import numpy as np

from bat_jax import errors, naming
from bat_jax.evaluation import metrics
from bat_jax.evaluation.engine import MetricFn, per_example_keys
from bat_jax.evaluation.metrics import AutoAttackOptions
from bat_jax.evaluation.resume import StageRunner


class StageContext(NamedTuple):
  """What a stage runs with: the runner of the evaluation's examples, the
  per-example flags so far (a stage adds its own), eps, PGD's step, the protocol."""
  runner: StageRunner
  per_example: Dict[str, np.ndarray]
  eps: float
  step_size: float
  protocol: "Protocol"


class StageRecord(NamedTuple):
  """What the records of an evaluation say about a stage (None: nothing).

  ``budget``: the protocol record's ``budgets[name]``; ``settings``: its
  entries in the results' ``settings``; ``record``: its entries in the
  protocol record beside the budgets; ``progress``: what changes its
  numbers, in the fingerprint of saved progress (``suite.progress_store``).
  """
  budget: Optional[Dict[str, Any]] = None
  settings: Optional[Dict[str, Any]] = None
  record: Optional[Dict[str, Any]] = None
  progress: Optional[Dict[str, Any]] = None


class Composite(NamedTuple):
  """A stage of several metrics run in turn (AutoAttack: one per attack).

  ``metrics(protocol)``: the metrics by name; ``run(context)``: runs them and
  returns the stage's result fields; ``parts``: the results key of the
  accuracy after each part (``{part: accuracy}``).
  """
  metrics: Callable[[Any], Dict[str, MetricFn]]
  run: Callable[[StageContext], Dict[str, Any]]
  parts: str


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of an evaluation.

  Attributes:
    name: its ``--attacks`` value; ``<name>_acc`` in the results, its flags in
      the per-example files and its saved progress are named after it.
    column: its column in the tables (results.md, aggregate, reproduce).
    metric_id: folded into the seed for its examples' keys; unique.
    metric: ``protocol -> MetricFn`` returning per-example ``correct`` (and
      ``non_finite``): the stage's flags, whose mean is its accuracy.
    composite: instead of ``metric``, several metrics run in turn.
    text: its name in sentences (sanity warnings); default ``column``.
    at_most: stages whose accuracy this one's must not exceed (sanity
      checks); one not run passes the check on to its own ``at_most``.
    record: ``(protocol, eps, step_size) -> StageRecord``.
    header: ``settings -> str``, its results.md column with its budgets.
    standard: ``settings -> bool``: the paper's budgets (aggregate notes
      runs that are not).
    record_line: ``protocol record -> str``, its line in results.md's protocol.
    card: ``results -> {field: value}`` in the export's evaluation record
      (default: its accuracy).
    card_row: ``export evaluation record -> row or None`` in the model card.
  """
  name: str
  column: str
  metric_id: int
  metric: Optional[Callable[[Any], MetricFn]] = None
  composite: Optional[Composite] = None
  text: str = ""
  at_most: Tuple[str, ...] = ()
  record: Optional[Callable[[Any, float, float], StageRecord]] = None
  header: Optional[Callable[[Mapping[str, Any]], str]] = None
  standard: Optional[Callable[[Mapping[str, Any]], bool]] = None
  record_line: Optional[Callable[[Mapping[str, Any]], str]] = None
  card: Optional[Callable[[Mapping[str, Any]], Dict[str, Any]]] = None
  card_row: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None

  @property
  def result_key(self) -> str:
    return f"{self.name}_acc"

  @property
  def text_name(self) -> str:
    return self.text or self.column

  def metrics_of(self, protocol) -> Dict[str, MetricFn]:
    """The metrics the engine compiles for this stage, by name."""
    if self.composite is not None:
      return self.composite.metrics(protocol)
    return {self.name: self.metric(protocol)}

  def run(self, context: StageContext) -> Dict[str, Any]:
    """Runs the stage on every example; returns its result fields."""
    if self.composite is not None:
      return self.composite.run(context)
    out = context.runner.run(self.name, self.name, eps=context.eps,
                             step_size=context.step_size)
    context.per_example[self.name] = out["correct"]
    keep_non_finite(context.per_example, self.name, out)
    return {self.result_key: float(np.mean(out["correct"]))}

  def describe(self, protocol, eps: float, step_size: float) -> StageRecord:
    return self.record(protocol, eps, step_size) if self.record else StageRecord()

  def column_header(self, settings: Mapping[str, Any]) -> str:
    return self.header(settings) if self.header else self.column

  def card_fields(self, results: Mapping[str, Any]) -> Dict[str, Any]:
    if self.card:
      return self.card(results)
    return {self.result_key: results.get(self.result_key)}


STAGES: Dict[str, Stage] = {}
_UNKNOWN_METRIC_ID = 99  # the id of a metric name no stage or other metric has
# Names the per-example files, the progress fingerprint and the other metrics use.
_RESERVED = ("index", "sanity", "model", "examples", "norm", "eps", "seed", "outputs",
             *metrics.OTHER_METRIC_IDS)


def register(stage: Stage) -> Stage:
  """Adds ``stage`` after the registered ones (it runs, and is shown, after them)."""
  if stage.name in STAGES:
    raise ValueError(f"stage {stage.name!r} is already registered.")
  if not re.fullmatch(r"[a-z][a-z0-9_]*", stage.name) or stage.name in _RESERVED:
    raise ValueError(f"stage name {stage.name!r}: lower-case letters, digits and '_', "
                     f"not one of {list(_RESERVED)}.")
  if (stage.metric is None) == (stage.composite is None):
    raise ValueError(f"stage {stage.name!r}: give a metric or a composite (one).")
  if stage.metric_id in (*metric_ids().values(), _UNKNOWN_METRIC_ID):
    raise ValueError(f"stage {stage.name!r}: metric_id {stage.metric_id} is taken "
                     f"({metric_ids()}).")
  unknown = [name for name in stage.at_most if name not in STAGES]
  if unknown:
    raise ValueError(f"stage {stage.name!r}: at_most names {unknown}, not registered "
                     f"stages ({list(STAGES)}).")
  STAGES[stage.name] = stage
  return stage


def names() -> Tuple[str, ...]:
  return tuple(STAGES)


def selected(attacks: Collection[str]) -> List[Stage]:
  """The stages among ``attacks``, in the registry's order (the order they run)."""
  return [stage for stage in STAGES.values() if stage.name in attacks]


def metric_ids() -> Dict[str, int]:
  """Every metric's id: the stages', then the other metrics' (the protocol record)."""
  return {**{s.name: s.metric_id for s in STAGES.values()}, **metrics.OTHER_METRIC_IDS}


def metric_id(name: str) -> int:
  """The id a metric folds into the seed; a composite's parts ('autoattack/apgd-ce')
  share their stage's."""
  return metric_ids().get(name.split("/")[0], _UNKNOWN_METRIC_ID)


def ordering(measured: Collection[str]) -> List[Tuple[Stage, Stage]]:
  """``(stage, bound)`` pairs of measured stages: ``stage``'s accuracy must not
  exceed ``bound``'s. Strongest first (the registry's order, reversed); a bound
  not measured passes on to its own ``at_most``."""

  def nearest(bounds):
    found = []
    for name in bounds:
      found += [name] if name in measured else nearest(STAGES[name].at_most)
    return found

  return [(stage, STAGES[bound]) for stage in reversed(list(STAGES.values()))
          if stage.name in measured for bound in dict.fromkeys(nearest(stage.at_most))]


def keep_non_finite(per_example: Dict[str, np.ndarray], stage: str,
                    out: Dict[str, np.ndarray]) -> None:
  """Adds ``<stage>.non_finite`` to the per-example flags when the stage met any."""
  flags = out.get("non_finite")
  if flags is not None and np.any(flags):
    per_example[f"{stage}.non_finite"] = flags


# --------------------------------------------------------------------------
# The stages of bat_jax.
# --------------------------------------------------------------------------


def _pgd_header(settings: Mapping[str, Any]) -> str:
  steps, restarts = settings.get("pgd_steps", 50), settings.get("pgd_restarts", 10)
  return f"PGD^{steps}" + (f"×{restarts}" if restarts > 1 else "")


def _pgd_record(protocol, eps: float, step_size: float) -> StageRecord:
  del eps
  steps, restarts = int(protocol.pgd_steps), int(protocol.pgd_restarts)
  return StageRecord(
      budget={"loss": "ce", "start": "uniform", "steps": steps, "restarts": restarts,
              "step_size": float(step_size)},
      settings={"pgd_steps": steps, "pgd_restarts": restarts,
                "pgd_step_size": float(step_size)},
      progress={"steps": steps, "restarts": restarts, "step_size": float(step_size)})


def _pgd_line(record: Mapping[str, Any]) -> str:
  pgd = record.get("budgets", {}).get("pgd", {})
  return (f"- PGD: {pgd.get('steps')} steps x {pgd.get('restarts')} restarts, step "
          f"{pgd.get('step_size', 0):.4g}, CE loss, uniform start")


def _pgd_card(results: Mapping[str, Any]) -> Dict[str, Any]:
  settings = results.get("settings") or {}
  return {"pgd_acc": results.get("pgd_acc"),
          "pgd": {k: settings.get(k) for k in ("pgd_steps", "pgd_restarts",
                                               "pgd_step_size")}}


def _pgd_card_row(evaluation: Mapping[str, Any]) -> Optional[str]:
  if evaluation.get("pgd_acc") is None:
    return None
  pgd = evaluation["pgd"]
  return (f"| PGD accuracy | {100 * evaluation['pgd_acc']:.2f}% (PGD-{pgd['pgd_steps']}, "
          f"{pgd['pgd_restarts']} restarts, step {pgd['pgd_step_size']:g}) |")


def _autoattack_header(settings: Mapping[str, Any]) -> str:
  aa = settings.get("autoattack") or {}
  if not aa or aa.get("standard", True):
    return "AutoAttack"
  budgets = ", custom budgets" if aa.get("settings") else ""
  return f"AutoAttack ({aa.get('version')}{budgets})"


def _autoattack_metrics(protocol) -> Dict[str, MetricFn]:
  """One metric per attack, ``'autoattack/<attack>'``."""
  return {f"autoattack/{name}": metrics.make_autoattack_stage_metric(
      protocol.autoattack, name, protocol.norm)
          for name in protocol.autoattack.attack_names()}


def _run_autoattack(context: StageContext) -> Dict[str, Any]:
  """Attack by attack over the whole data set, each on the examples still robust."""
  runner, per_example = context.runner, context.per_example
  robust = per_example.get("clean")
  if robust is None:
    robust = runner.run("clean", "clean")["correct"]
  per_attack = {"clean": float(np.mean(robust))}
  attacks = context.protocol.autoattack.attack_names()
  for attack in attacks:
    stage = f"autoattack.{attack}"
    out = runner.run(stage, f"autoattack/{attack}", eps=context.eps, select=robust)
    robust = robust & out.get("robust", np.zeros_like(robust))
    per_example[stage] = robust
    keep_non_finite(per_example, stage, out)
    per_attack[attack] = float(np.mean(robust))
    logging.info("AutoAttack: robust accuracy %.4f after %s", per_attack[attack], attack)
  return {"autoattack_acc": per_attack[attacks[-1]], "autoattack_per_attack": per_attack}


def _autoattack_record(protocol, eps: float, step_size: float) -> StageRecord:
  del eps, step_size
  aa = protocol.autoattack
  return StageRecord(
      budget=aa.budgets(), settings={"autoattack": aa.describe()},
      record={"autoattack": aa.describe()},
      progress={"version": aa.version, "attacks": list(aa.attack_names()),
                "budgets": aa.budgets()})


def _autoattack_line(record: Mapping[str, Any]) -> str:
  aa = record.get("autoattack", {})
  settings = ", ".join(f"{k}={v}" for k, v in sorted(
      record.get("budgets", {}).get("autoattack", {}).items()))
  return (f"- AutoAttack: version '{aa.get('version')}' ({', '.join(aa.get('attacks', []))})"
          f"{'' if aa.get('standard') else ', not the standard one'}; budgets {settings}")


def _autoattack_card(results: Mapping[str, Any]) -> Dict[str, Any]:
  autoattack = (results.get("settings") or {}).get("autoattack") or {}
  return {"autoattack_acc": results.get("autoattack_acc"),
          "autoattack": {k: autoattack.get(k) for k in ("version", "attacks", "settings",
                                                        "standard")},
          "autoattack_per_attack": results.get("autoattack_per_attack")}


register(Stage("clean", "Clean", metric_id=0, metric=lambda p: metrics.clean_metric,
               text="clean"))
register(Stage("fgsm", "FGSM", metric_id=1,
               metric=lambda p: metrics.make_fgsm_metric(p.norm), at_most=("clean",),
               record=lambda p, eps, step: StageRecord(budget={"eps": float(eps)})))
register(Stage("pgd", "PGD^50", metric_id=2,
               metric=lambda p: metrics.make_pgd_metric(p.pgd_steps, p.pgd_restarts,
                                                        p.norm),
               text="PGD", at_most=("fgsm",), record=_pgd_record, header=_pgd_header,
               standard=lambda s: (s.get("pgd_steps"), s.get("pgd_restarts")) == (50, 10),
               record_line=_pgd_line, card=_pgd_card, card_row=_pgd_card_row))
register(Stage("autoattack", "AutoAttack", metric_id=3,
               composite=Composite(_autoattack_metrics, _run_autoattack,
                                   "autoattack_per_attack"),
               at_most=("pgd",), record=_autoattack_record, header=_autoattack_header,
               standard=lambda s: (s.get("autoattack") or {}).get("standard", True),
               record_line=_autoattack_line, card=_autoattack_card))
# What an evaluation runs unless told otherwise: bat_jax's own stages.
DEFAULT_ATTACKS = names()


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What a robustness evaluation runs, with which budgets and seed.

  ``attacks``: registered stages (:data:`STAGES`; default
  :data:`DEFAULT_ATTACKS`); PGD is PGD-CE with a uniform start, ``pgd_steps``
  steps and ``pgd_restarts`` restarts (an example counts only if every
  restart fails); ``seed`` seeds every random start. ``norm`` is the threat
  model, 'linf' or 'l2' (any spelling: 'Linf', 'L2', ... is stored
  canonical); every attack, FGSM included, runs in it.
  """
  attacks: Tuple[str, ...] = DEFAULT_ATTACKS
  pgd_steps: int = 50
  pgd_restarts: int = 10
  autoattack: AutoAttackOptions = AutoAttackOptions()
  seed: int = 0
  norm: str = "linf"

  def __post_init__(self):
    errors.choose_each("--attacks", self.attacks, names())
    errors.at_least("--pgd_steps", self.pgd_steps, 1)
    errors.at_least("--pgd_restarts", self.pgd_restarts, 1)
    errors.at_least("--seed", self.seed, 0)
    object.__setattr__(self, "norm", naming.canonical_norm(self.norm, "--norm"))

  def metrics(self) -> Dict[str, MetricFn]:
    """The metric functions by name (what the engine compiles): every stage's and
    the sanity checks' ``zero_grad`` and the first-batch check's ``logits``."""
    found = {"zero_grad": metrics.zero_grad_metric, "logits": metrics.logits_metric}
    for stage in STAGES.values():
      found.update(stage.metrics_of(self))
    return found

  def key_fn(self):
    """Per-example keys: ``fold_in(fold_in(PRNGKey(seed), metric id), index)``."""
    return lambda name, indices: per_example_keys(self.seed, metric_id(name), indices)
