"""Robust evaluation of trained runs: clean, FGSM, PGD^50 x 10, AutoAttack.

  python -m bat_jax.evaluate --workdir=runs/c10 [--which=best,last]
      [--num_examples=N] [--eps=8/255] [--attacks=clean,fgsm,pgd,autoattack]
      [--pgd_steps=50 --pgd_restarts=10] [--autoattack_version=standard|fast|custom]
  python -m bat_jax.evaluate --aggregate --workdirs=a,b,c [--out=table.md]

:func:`evaluate_workdir` restores a run's checkpoints, evaluates each with
``bat_jax.evaluation`` (the metrics, the engine, the sanity checks) and
writes ``WORKDIR/eval/{which}_results.json`` and ``WORKDIR/eval/results.md``;
the command line below drives it or ``aggregate`` (the paper's tables).
From Python: :func:`evaluate` (a model and arrays in, numbers out),
:func:`evaluate_workdir`, :func:`aggregate`.
"""

import json
import os
from typing import Any, Dict, Optional, Sequence

from absl import app, flags, logging
import jax

from bat_jax import attacks as attacks_lib
from bat_jax import checkpointing, configlib, datasets, parallel, rundir, util
from bat_jax.errors import UserError
from bat_jax.evaluation import sanity
from bat_jax.evaluation.metrics import ATTACKS, AutoAttackOptions, Protocol
from bat_jax.evaluation.report import aggregate, results_markdown
from bat_jax.evaluation.suite import evaluate, evaluate_with, make_evaluator

__all__ = ["evaluate", "evaluate_workdir", "aggregate", "AutoAttackOptions", "Protocol"]


def evaluate_workdir(workdir: str, *, which: Sequence[str] = ("best", "last"),
                     num_examples: Optional[int] = None, eps: Optional[float] = None,
                     pgd_step_size: Optional[float] = None,
                     batch_size: Optional[int] = None, data_dir: Optional[str] = None,
                     data_file: Optional[str] = None, protocol: Protocol = Protocol(),
                     **options) -> Dict[str, Dict[str, Any]]:
  """Evaluates checkpoints of a training run; writes JSON files and a Markdown table.

  ``which``: checkpoints ('best', 'last'; a string or a sequence). A
  checkpoint with the same step as one already evaluated (e.g. 'best'
  falling back to 'last') is not evaluated twice. ``num_examples``: the
  first N test examples (None: all). ``eps`` / ``pgd_step_size`` /
  ``batch_size`` / ``data_dir`` default to the run's ``config.eps``,
  ``config.eval_attack_step_size``, ``config.eval_batch_size`` and
  ``config.data_dir`` (``data_file``, a local .npz replacing TFDS, to
  ``config.data_file``). ``protocol`` (attacks, budgets, seed) and ``options``
  are :func:`evaluate`'s; all checkpoints share one evaluator, so each
  metric compiles once.
  Writes ``WORKDIR/eval/{which}_results.json`` and ``WORKDIR/eval/results.md``;
  returns ``{which: results}``.
  """
  which = [which] if isinstance(which, str) else list(which)
  for w in which:
    if w not in checkpointing.WHICH:
      raise ValueError(f"which must name checkpoints in {checkpointing.WHICH}; "
                       f"got {w!r}.")
  config = rundir.load_config(workdir)
  eps = float(config.eps if eps is None else eps)
  pgd_step_size = float(config.eval_attack_step_size if pgd_step_size is None
                        else pgd_step_size)
  data_dir = (config.data_dir or None) if data_dir is None else data_dir
  data_file = (config.data_file or None) if data_file is None else data_file
  images, labels = datasets.load_split(
      config.dataset, "test", data_dir=data_dir, data_file=data_file,
      num_examples=num_examples if num_examples and num_examples > 0 else None)
  par = parallel.make(config.parallel)
  out_dir = os.path.join(workdir, "eval")
  is_chief = jax.process_index() == 0

  all_results, by_checkpoint, evaluator = {}, {}, None
  for w in which:
    series, step = rundir.resolve_checkpoint(workdir, w)
    if step in by_checkpoint:  # Same step, same state: reuse.
      logging.info("%s: checkpoint %r is step %d, already evaluated as %r.",
                   workdir, w, step, by_checkpoint[step]["which"])
      results = dict(by_checkpoint[step], which=w, checkpoint=series,
                     same_as=by_checkpoint[step]["which"])
    else:
      restored = rundir.restore_model(workdir, w)
      logging.info("Evaluating %s checkpoint %r (%s, step %d) on %d examples at eps=%g.",
                   workdir, w, series, restored.step, len(images), eps)
      if evaluator is None:
        model = restored.model
        evaluator = make_evaluator(
            lambda v, x: model.apply(v, x, train=False), restored.variables, protocol,
            batch_size=min(batch_size or config.eval_batch_size, len(images)), par=par)
      else:
        evaluator.set_variables(restored.variables)
      results = evaluate_with(evaluator, images, labels, eps=eps,
                              pgd_step_size=pgd_step_size, protocol=protocol, **options)
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


# --------------------------------------------------------------------------
# The command line.
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
  flags.DEFINE_integer("sanity_examples", sanity.SANITY_EXAMPLES,
                       "Examples for the sanity checks; 0: skip them.", **fv)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; default: the config's.", **fv)
  flags.DEFINE_string("data_file", None, "Local .npz replacing TFDS; default: the "
                      "config's.", **fv)
  flags.DEFINE_bool("aggregate", False, "Aggregate --workdirs instead of evaluating.",
                    **fv)
  flags.DEFINE_list("workdirs", [], "Workdirs to aggregate.", **fv)
  flags.DEFINE_string("out", "", "Write the aggregated table here too.", **fv)


def parse_number(text: str, what: str = "value") -> float:
  """'0.3' -> 0.3, '8/255' -> 0.03137...; a UserError naming ``what`` otherwise."""
  return configlib.parse_number(text, what)


def _parse_settings(items: Sequence[str]) -> Dict[str, Any]:
  settings = {}
  for item in items:
    if "=" not in item:
      raise app.UsageError(f"--autoattack_settings takes key=value items; got {item!r}.")
    key, value = item.split("=", 1)
    try:
      settings[key.strip()] = int(value)
    except ValueError:
      settings[key.strip()] = parse_number(value, f"--autoattack_settings {key.strip()}")
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
  if fv.num_examples == 0 or fv.num_examples < -1:
    raise UserError(f"--num_examples={fv.num_examples}: must be -1 (the whole test "
                    "split) or a positive count.")
  eps = parse_number(fv.eps, "--eps") if fv.eps else None
  if eps is not None and not 0 <= eps <= 1:
    raise UserError(f"--eps={fv.eps}: must lie in [0, 1] (pixel units, e.g. 8/255).")
  step_size = parse_number(fv.pgd_step_size, "--pgd_step_size") if fv.pgd_step_size else None
  if step_size is not None and not step_size > 0:
    raise UserError(f"--pgd_step_size={fv.pgd_step_size}: must be > 0 (e.g. 2/255).")
  for flag in ("pgd_steps", "pgd_restarts"):
    if fv[flag].value < 1:
      raise UserError(f"--{flag}={fv[flag].value}: must be >= 1.")
  autoattack = AutoAttackOptions(
      version=fv.autoattack_version, attacks=tuple(fv.autoattack_attacks) or None,
      settings=_parse_settings(fv.autoattack_settings),
      chunk_size=fv.autoattack_chunk_size or None)
  unknown = set(fv.attacks) - set(ATTACKS)
  if unknown:
    raise UserError(f"--attacks: unknown {sorted(unknown)}; choose from {list(ATTACKS)}.")
  protocol = Protocol(attacks=tuple(fv.attacks), pgd_steps=fv.pgd_steps,
                      pgd_restarts=fv.pgd_restarts, autoattack=autoattack, seed=fv.seed)
  evaluate_workdir(
      fv.workdir, which=fv.which,
      num_examples=fv.num_examples if fv.num_examples > 0 else None,
      eps=eps, pgd_step_size=step_size,
      batch_size=fv.batch_size or None, data_dir=fv.data_dir, data_file=fv.data_file,
      protocol=protocol,
      sanity_examples=fv.sanity_examples)
  return results_markdown(fv.workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  util.setup_runtime()
  text = run_from_flags(FLAGS)
  if jax.process_index() == 0:
    print(text, flush=True)


if __name__ == "__main__":
  define_flags()
  util.run(main)
