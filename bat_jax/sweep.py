"""Train and evaluate a set of named runs, skipping what is done: the runner of
``bat_jax.experiment`` and ``bat_jax.reproduce``.

A sweep is a plan, ``{run name: config}``; each run lives in ``ROOT/<name>``.
:func:`run` trains every run whose training has not finished (:func:`trained`)
and evaluates every requested checkpoint that has no results at the requested
threat model and protocol (:func:`evaluated`). A run is done when both hold,
so rerunning the command continues an interrupted sweep: finished runs are
neither retrained nor re-evaluated, an interrupted training resumes from its
last checkpoint and an interrupted evaluation from its last saved batch.
"""

import json
import math
import os
import sys
import time
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import jax

from bat_jax import datasets, errors, evaluate, fs, naming, rundir, train
from bat_jax.evaluation import sanity

# Written in a run's workdir when its training finished, for the config in its
# config.json: {"steps": ..., "seconds": ...}.
TRAINED_FILE = "trained.json"

# A sweep's evaluation at a CPU's size (`experiment --cpu_budget`, `reproduce
# --runlocal`; docs/REPRODUCE.md, docs/ANALYSIS.md): the first 500 test
# examples, PGD^50 x 2 restarts, AutoAttack's APGD stages, sanity checks on
# 100 examples. The paper's protocol, cut to what two cores finish in minutes.
CPU_BUDGET = dict(num_examples=500, sanity_examples=100, pgd_restarts=2,
                  autoattack_version="fast")


def evaluation_options(norm: str, *, cpu_budget: bool = False,
                       attacks: Optional[Sequence[str]] = None,
                       num_examples: Optional[int] = None,
                       pgd_step_size: Optional[float] = None) -> Dict[str, Any]:
  """``evaluate_workdir``'s arguments for a sweep evaluated in ``norm``.

  The paper's protocol on the whole test split, or :data:`CPU_BUDGET`'s with
  ``cpu_budget``; ``num_examples`` > 0 replaces either's count. ``attacks``
  (None: all) and ``pgd_step_size`` (None: each run's) are passed on.
  """
  protocol = dict(norm=norm)
  if attacks is not None:
    protocol["attacks"] = tuple(attacks)
  options = {"num_examples": None, "pgd_step_size": pgd_step_size}
  if cpu_budget:
    protocol.update(pgd_restarts=CPU_BUDGET["pgd_restarts"],
                    autoattack=evaluate.AutoAttackOptions(
                        version=CPU_BUDGET["autoattack_version"]))
    options.update(num_examples=CPU_BUDGET["num_examples"],
                   sanity_examples=CPU_BUDGET["sanity_examples"])
  if num_examples is not None and num_examples > 0:
    options["num_examples"] = num_examples
  return dict(options, protocol=evaluate.Protocol(**protocol))


# --------------------------------------------------------------------------
# When a run is done.
# --------------------------------------------------------------------------


def trained(workdir: str, config) -> bool:
  """Whether the training of ``config`` finished in ``workdir``.

  :data:`TRAINED_FILE` is there and ``config.json`` holds ``config`` (its
  norm in any spelling, as ``configlib.validate`` writes it): a changed
  config (a longer run, a new data_dir) trains on from the run's last
  checkpoint, and ``train`` refuses one that would mix two runs.
  """
  if not fs.exists(os.path.join(workdir, TRAINED_FILE)):
    return False
  try:
    stored = rundir.read_config_json(workdir)
  except errors.WorkdirError:
    return False
  planned = json.loads(config.to_json_best_effort())
  planned["norm"] = naming.canonical_norm(planned.get("norm", naming.DEFAULT_NORM))
  return stored == planned


def at_threat_model(results: Mapping[str, Any], norm: str, eps: float) -> bool:
  """Whether ``results`` were measured in ``norm`` (any spelling) at ``eps``."""
  return (naming.norm_of(results) == naming.canonical_norm(norm)
          and abs(float(results.get("eps", -1)) - eps) <= 1e-9)


def evaluated(workdir: str, which: str, options: Mapping[str, Any]) -> bool:
  """Whether checkpoint ``which`` has results for its current step, made with
  ``options`` (``evaluate_workdir``'s arguments): the threat model, the
  attacks and their budgets, the seed, the sanity checks and the examples."""
  results = rundir.read_json(os.path.join(workdir, "eval", f"{which}_results.json"))
  if not results:
    return False
  try:
    _, step = rundir.resolve_checkpoint(workdir, which)
  except (errors.CheckpointError, errors.WorkdirError):
    return False
  config = rundir.load_config(workdir)
  protocol = options.get("protocol") or evaluate.Protocol(norm=naming.norm_of(config))
  eps = float(config.eps if options.get("eps") is None else options["eps"])
  step_size = options.get("pgd_step_size")
  if step_size is None:
    step_size = evaluate.default_pgd_step_size(config, eps, protocol)
  settings = results.get("settings") or {}
  count = results.get("num_examples") or 0
  sanity_count = min(count, max(int(options.get("sanity_examples",
                                                sanity.SANITY_EXAMPLES)), 0))
  same = (at_threat_model(results, protocol.norm, eps) and results.get("step") == step
          and sorted(settings.get("attacks") or ()) == sorted(protocol.attacks)
          and settings.get("pgd_steps") == protocol.pgd_steps
          and settings.get("pgd_restarts") == protocol.pgd_restarts
          and math.isclose(settings.get("pgd_step_size") or -1.0, step_size,
                           rel_tol=1e-9)
          and settings.get("autoattack") == json.loads(json.dumps(
              protocol.autoattack.describe()))
          and settings.get("seed") == protocol.seed
          and ((results.get("protocol") or {}).get("sanity") or {}).get("examples")
          == sanity_count)
  if not same:
    return False
  wanted = options.get("num_examples")
  if wanted is not None and 0 < wanted <= count:
    return count == wanted
  # The whole split, or more examples than it holds: all of them.
  return count == datasets.split_size(
      config.dataset, "test",
      data_dir=options.get("data_dir") or config.data_dir or None,
      data_file=options.get("data_file") or config.data_file or None)


# --------------------------------------------------------------------------
# The runner.
# --------------------------------------------------------------------------


def _train(name: str, config, workdir: str) -> None:
  """Trains one run to its end and marks it trained; a stopped run exits (75)."""
  began = time.time()
  summary = train.train_and_evaluate(config, workdir)
  if summary["stopped"]:
    logging.warning("Stopped in %s (%s); rerun the command to resume.", name,
                    summary["stopped"])
    sys.exit(errors.EXIT_PREEMPTED)
  if jax.process_index() == 0:
    fs.write_json(os.path.join(workdir, TRAINED_FILE),
                  {"steps": summary["steps"], "seconds": time.time() - began})


def run(runs: Mapping[str, Any], root: str, *, stages: Sequence[str],
        checkpoints: Sequence[str], options: Mapping[str, Any]) -> Dict[str, str]:
  """Trains and evaluates every run of ``runs`` that is not done; ``{name: workdir}``.

  ``stages``: 'train' and / or 'evaluate' (other names are the caller's).
  ``checkpoints``: 'best' and / or 'last', evaluated in this order.
  ``options``: ``evaluate_workdir``'s arguments (:func:`evaluation_options`).
  A run is evaluated only once its training finished; a training stopped
  early (preemption) exits with ``errors.EXIT_PREEMPTED``, and rerunning resumes.
  """
  workdirs = {}
  for index, (name, config) in enumerate(runs.items(), 1):
    workdir = workdirs[name] = os.path.join(root, name)
    where = f"[{index}/{len(runs)}] {name}"
    done = trained(workdir, config)
    if "train" in stages and not done:
      logging.info("=== %s: train", where)
      _train(name, config, workdir)
      done = True
    if "evaluate" not in stages:
      continue
    if not done:
      logging.warning("%s: its training has not finished; run the 'train' stage "
                      "before evaluating it.", where)
      continue
    todo = [w for w in checkpoints if not evaluated(workdir, w, options)]
    if todo:
      logging.info("=== %s: evaluate %s", where, todo)
      evaluate.evaluate_workdir(workdir, which=todo, **options)
    else:
      logging.info("%s: %s already evaluated with this protocol.", where,
                   list(checkpoints))
  return workdirs
