"""Robust accuracy of one model: every stage of a protocol, with sanity checks.

:func:`evaluate` takes a model (``apply_fn`` and variables) and uint8 images
and returns accuracies as fractions, AutoAttack's accuracy after each stage,
timings, the sanity checks, and the protocol that produced the numbers.
:func:`evaluate_with` does the same with a ready :class:`Evaluator`, so
several checkpoints of one architecture compile each metric once;
:func:`run_evaluation` also returns each example's flags and saves and
resumes progress in a :func:`progress_store`. The stages (clean, FGSM, PGD,
AutoAttack, and any other registered in ``evaluation.stages``) run in the
registry's order, each batch of each through an
``evaluation.resume.StageRunner``: AutoAttack runs attack by attack over the
whole data set, each attack only on the examples still robust, packed into
full batches. Before any attack, the model's clean logits on the first
batch are checked (shape, class count, labels in range, finite); NaN or
inf met later, inside an attack, are counted per stage
(``non_finite_examples``) and such examples count as neither correct nor
robust.
"""

import math
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

import bat_jax
from bat_jax import datasets, naming
from bat_jax.errors import UserError
from bat_jax.evaluation import record as record_lib
from bat_jax.evaluation import resume
from bat_jax.evaluation import sanity as sanity_lib
from bat_jax.evaluation import stages as stages_lib
from bat_jax.evaluation.engine import Evaluator, check_logits
from bat_jax.evaluation.stages import Protocol, StageContext


def make_evaluator(apply_fn: Callable, variables: Any, protocol: Protocol, *,
                   batch_size: int, par=None) -> Evaluator:
  """An :class:`Evaluator` of ``protocol``'s metrics and per-example keys."""
  return Evaluator(apply_fn, variables, batch_size=batch_size,
                   metrics=protocol.metrics(), key_fn=protocol.key_fn(), par=par)


def evaluate(apply_fn: Callable, variables: Any, images: np.ndarray,
             labels: np.ndarray, *, eps: float, pgd_step_size: float,
             protocol: Protocol = Protocol(), batch_size: int = 500, par=None,
             **options) -> Dict[str, Any]:
  """The accuracies of one model under ``protocol``'s stages, and sanity checks.

  ``apply_fn(variables, x) -> logits`` (inference mode), ``images`` uint8
  ``[N, H, W, C]``. See :func:`run_evaluation` for the other arguments and
  the result.
  """
  evaluator = make_evaluator(apply_fn, variables, protocol,
                             batch_size=min(batch_size, len(images)), par=par)
  return evaluate_with(evaluator, images, labels, eps=eps, pgd_step_size=pgd_step_size,
                       protocol=protocol, **options)


def evaluate_with(evaluator: Evaluator, images: np.ndarray, labels: np.ndarray,
                  **kwargs) -> Dict[str, Any]:
  """:func:`evaluate` with a ready :class:`Evaluator` of ``protocol``'s metrics."""
  return run_evaluation(evaluator, images, labels, **kwargs).results


class Evaluation(NamedTuple):
  results: Dict[str, Any]           # the numbers, settings and protocol (JSON)
  per_example: Dict[str, np.ndarray]  # 'index' and each stage's flags, [N]


def run_evaluation(evaluator: Evaluator, images: np.ndarray, labels: np.ndarray, *,
                   eps: float, pgd_step_size: float, protocol: Protocol = Protocol(),
                   sanity_examples: int = sanity_lib.SANITY_EXAMPLES,
                   large_eps: float = sanity_lib.LARGE_EPS,
                   tolerance: float = sanity_lib.TOLERANCE,
                   indices: Optional[np.ndarray] = None,
                   examples: Optional[Dict[str, Any]] = None,
                   store: Optional[resume.ProgressStore] = None,
                   show_progress: bool = True, model_name: str = "the model",
                   num_classes: Optional[int] = None) -> Evaluation:
  """Runs ``protocol.attacks`` on every example, then the sanity checks.

  AutoAttack runs attack by attack, each on the examples still robust. The
  sanity checks run on the first ``sanity_examples`` examples (0: none).
  ``indices``: the examples' indices in their data set (their keys; default
  0..N-1); ``examples``: their ``record.data_record`` (for the protocol
  record); ``store``: where progress is saved and resumed from (None: not
  saved). ``model_name`` names the model in errors; ``num_classes``: the data
  set's class count (None: not known), which the model's logits must match.
  Labels out of range and a model whose clean logits on the first batch are
  unusable (wrong shape or class count, NaN or inf) are refused before any
  attack (a UserError). Returns the results (accuracies as fractions, None for attacks not
  run; AutoAttack's accuracy after each attack; the sanity measurements and
  warnings; the threat model, ``norm`` and ``eps``; the settings; the protocol
  record; and, under 'run', what this
  run did: timings in seconds, compilation included, and the examples loaded
  from saved progress or computed per stage; ``non_finite_examples``: per
  stage, the examples whose attack met NaN or inf, counted as not robust)
  and the per-example flags (``<stage>.non_finite`` too, for stages that
  met any).
  """
  eps_error = naming.eps_range_error(eps, protocol.norm)
  if eps_error:
    raise UserError(f"eps={eps} {eps_error}.")
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if protocol.norm == "l2" and large_eps == sanity_lib.LARGE_EPS:
    large_eps = math.sqrt(np.prod(images.shape[1:]))  # the box's diagonal
  if images.dtype != np.uint8 or len(images) != len(labels) or not len(images):
    raise ValueError("evaluate: need uint8 images [N, H, W, C] and N labels, N > 0; "
                     f"got {images.dtype} {images.shape} and {labels.shape}.")
  indices = (np.arange(len(images), dtype=np.int64) if indices is None
             else np.asarray(indices, np.int64))
  examples = examples or record_lib.data_record(images, labels, indices)
  source = _labels_source(examples)
  datasets.check_labels(labels, num_classes, source)
  first = slice(0, min(len(images), evaluator.batch_size))
  probe = evaluator.run("logits", images[first], labels[first],
                        indices=indices[first])["logits"]
  check_logits(probe, labels[first], model=model_name, num_classes=num_classes,
               source=source, indices=indices[first])
  datasets.check_labels(labels, probe.shape[1], f"{source} (the model gives "
                        f"{probe.shape[1]} logits per example)")
  runner = resume.StageRunner(evaluator, images, labels, indices, store,
                              show_progress=show_progress)
  selected = stages_lib.selected(protocol.attacks)
  results: Dict[str, Any] = {s.result_key: None for s in stages_lib.STAGES.values()}
  results.update({s.composite.parts: None for s in stages_lib.STAGES.values()
                  if s.composite is not None})
  timings, per_example = {}, {"index": indices}
  context = StageContext(runner, per_example, eps, pgd_step_size, protocol)
  began = time.time()
  for stage in selected:
    start = time.time()
    results.update(stage.run(context))
    timings[stage.name] = time.time() - start
    logging.info("%s accuracy %.4f on %d examples (%.1fs)", stage.name,
                 results[stage.result_key], len(images), timings[stage.name])

  sanity, warnings = {}, []
  count = min(len(images), max(int(sanity_examples), 0))
  if count:
    start = time.time()
    sanity = sanity_lib.sanity_measurements(
        runner, count, eps=eps, step_size=pgd_step_size, pgd_steps=protocol.pgd_steps,
        large_eps=large_eps, pgd_at_eps=per_example.get("pgd"),
        clean=per_example.get("clean"))
    warnings = sanity_lib.sanity_warnings(sanity, results, tolerance=tolerance,
                                          non_finite=runner.non_finite)
    timings["sanity"] = time.time() - start
  warnings = sanity_lib.non_finite_warnings(runner.non_finite) + warnings
  for warning in warnings:
    logging.warning("Sanity check: %s", warning)
  timings["total"] = time.time() - began
  attacks = [stage.name for stage in selected]
  protocol_record = record_lib.protocol_record(
      protocol, eps=eps, pgd_step_size=pgd_step_size, examples=examples,
      sanity_examples=count, large_eps=large_eps, tolerance=tolerance, attacks=attacks,
      devices=evaluator.par.devices)
  protocol_record["sanity"]["outcome"] = record_lib.sanity_outcome(bool(count), warnings)
  results.update(
      norm=protocol.norm, eps=float(eps), num_examples=int(len(images)),
      non_finite_examples=dict(runner.non_finite),
      sanity=sanity, sanity_warnings=warnings,
      settings={"attacks": attacks,
                **_stage_settings(protocol, eps, pgd_step_size),
                "batch_size": evaluator.batch_size, "seed": protocol.seed,
                "devices": len(evaluator.par.devices) * jax.process_count(),
                "tolerance": tolerance},
      protocol=protocol_record,
      run={"timings_s": timings, "stages": runner.stats,
           "progress_dir": store.dir if store is not None else None})
  return Evaluation(results, per_example)


def _labels_source(examples: Dict[str, Any]) -> str:
  """How errors name the labels: 'the labels of cifar10 (test, from DIR)'."""
  name = examples.get("dataset") or ""
  where = ", ".join(str(v) for v in (examples.get("split"), examples.get("source")) if v)
  if not name and not examples.get("source"):
    return "the labels passed in"
  return f"the labels of {name or 'the data'}" + (f" ({where})" if where else "")


def _stage_settings(protocol: Protocol, eps: float, step_size: float) -> Dict[str, Any]:
  """Every stage's entries in the results' ``settings`` (its budgets)."""
  settings = {}
  for stage in stages_lib.STAGES.values():
    settings.update(stage.describe(protocol, eps, step_size).settings or {})
  return settings


def progress_store(root: str, *, model: Dict[str, Any], examples: Dict[str, Any],
                   protocol: Protocol, eps: float, pgd_step_size: float,
                   sanity_examples: int = sanity_lib.SANITY_EXAMPLES,
                   large_eps: float = sanity_lib.LARGE_EPS,
                   max_new_chunks: Optional[int] = None) -> resume.ProgressStore:
  """The saved progress of this evaluation under ``root`` (see ``evaluation.resume``).

  ``model`` identifies the model (e.g. its weights' digest and checkpoint
  step); ``examples`` is ``record.data_record`` of the data. Only process 0
  writes.
  """
  budgets = {stage.name: stage.describe(protocol, eps, pgd_step_size).progress
             for stage in stages_lib.STAGES.values()}
  key = {"model": model,
         "examples": {k: v for k, v in examples.items() if k != "source"},
         "norm": protocol.norm, "eps": float(eps), "seed": int(protocol.seed),
         # Each stage's budgets (the record is hashed with sorted keys).
         **{name: budget for name, budget in budgets.items() if budget is not None},
         "sanity": {"examples": min(int(examples.get("count", 0)),
                                    max(int(sanity_examples), 0)),
                    "large_eps": float(large_eps)},
         # Saved outputs carry per-example non-finite flags (older ones did not).
         "outputs": ["non_finite"],
         "bat_jax_version": bat_jax.__version__}
  # Before the norm had one spelling, progress was saved with 'Linf' / 'L2'.
  earlier = dict(key, norm={"linf": "Linf", "l2": "L2"}[protocol.norm])
  return resume.ProgressStore(root, key, write=jax.process_index() == 0,
                              max_new_chunks=max_new_chunks, earlier_records=[earlier])
