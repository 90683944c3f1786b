"""Robust evaluation: clean, FGSM, PGD^50 x 10, AutoAttack, of a run or of any model.

  python -m bat_jax.evaluate --workdir=runs/c10 [--which=best,last]
      [--num_examples=N] [--eps=8/255] [--norm=l2 --eps=0.5]
      [--attacks=clean,fgsm,pgd,autoattack]
      [--pgd_steps=50 --pgd_restarts=10] [--autoattack_version=standard|fast|plus|rand|custom]
  python -m bat_jax.evaluate --model=my_model.py:make_model [--checkpoint=PATH]
      (--data=test.npz | --dataset=cifar10 --data_dir=DIR) --eps=8/255 --out_dir=DIR
  python -m bat_jax.evaluate --aggregate --workdirs=a,b,c [--out=table.md]
  python -m bat_jax.evaluate --compare=a_per_example.npz,b_per_example.npz

:func:`evaluate_workdir` restores a run's checkpoints, evaluates each with
``bat_jax.evaluation`` (the stages, the engine, the sanity checks) and
writes ``WORKDIR/eval/{which}_results.json`` (with the protocol record),
``{which}_per_example.npz`` and ``WORKDIR/eval/results.md``;
:func:`evaluate_model` does the same for a model trained elsewhere
(``evaluation.external``) into ``--out_dir``. Both save progress batch by
batch and a rerun of the same command continues it (``evaluation.resume``);
SIGTERM, Ctrl-C or ``--max_chunks_this_run`` stop with exit code 75. On
several hosts, run the same command on each (launch/README.md). From Python:
:func:`evaluate` (a model and arrays in, numbers out), :func:`evaluate_model`,
:func:`evaluate_workdir` (``evaluation.workdir``), :func:`aggregate`. This
module is the command line: every flag is checked before any work. The
stages ``--attacks`` chooses from are those registered in
``evaluation.stages``.

Every number is made at, and shown with, its threat model: the norm
(``--norm``, any spelling: l2, L2, linf, Linf, L-inf; the run's own by
default) and eps. The run's ``config.eps`` is the default eps only in the norm
it trained in; under another norm ``--eps`` is required, and its absence is
refused before any work.
"""

import os
import signal
import sys
from typing import Any, Dict, Sequence

from absl import flags
import jax

from bat_jax import attacks as attacks_lib
from bat_jax import (checkpointing, configlib, datasets, errors, fs, naming, rundir,
                     util)
from bat_jax.errors import UserError
from bat_jax.evaluation import external, sanity, stages
from bat_jax.evaluation.metrics import AUTOATTACK_VERSIONS, AutoAttackOptions
from bat_jax.evaluation.report import (aggregate, compare_markdown, count_flips,
                                      results_markdown)
from bat_jax.evaluation.resume import EvaluationInterrupted, request_stop
from bat_jax.evaluation.stages import Protocol
from bat_jax.evaluation.suite import evaluate
from bat_jax.evaluation.workdir import (default_pgd_step_size, eps_for_norm,
                                        evaluate_model, evaluate_workdir)

__all__ = ["evaluate", "evaluate_workdir", "evaluate_model", "aggregate",
           "count_flips", "AutoAttackOptions", "Protocol", "EvaluationInterrupted",
           "default_pgd_step_size", "eps_for_norm", "results_markdown"]


# --------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training workdir to evaluate.", **fv)
  flags.DEFINE_list("which", ["best", "last"], "Checkpoints to evaluate (or aggregate): of "
                    f"{list(checkpointing.CHOICES)}; 'ema' is the weight average.",
                    **fv)
  flags.DEFINE_string("model", None, "A model trained elsewhere: path/to/file.py:"
                      "function or package.module:function returning (apply_fn, "
                      "variables) or a logits_fn (instead of --workdir).", **fv)
  flags.DEFINE_string("checkpoint", None, "With --model: passed to the function.", **fv)
  flags.DEFINE_string("data", None, "With --model: a .npz with <split>_image (uint8 "
                      "[N, H, W, C]) and <split>_label.", **fv)
  flags.DEFINE_string("dataset", None, "With --model: a bat_jax data set (or the shape "
                      "and classes --data holds).", **fv)
  flags.DEFINE_string("split", "test", "With --model: the split to evaluate.", **fv)
  flags.DEFINE_string("out_dir", None, "With --model: where results and progress go.",
                      **fv)
  flags.DEFINE_integer("num_examples", -1, "First N test examples; -1: all.", **fv)
  flags.DEFINE_string("norm", None, "Threat model: linf (L-inf) or l2 (L2), any "
                      "spelling (L2, Linf, L-inf); default: the run's (config.norm), "
                      "linf for --model. Another norm than the run's needs --eps.", **fv)
  flags.DEFINE_string("eps", "", "Radius in --norm, e.g. 0.3 or 8/255 (L-inf: [0, 1]), "
                      "0.5 (L2: >= 0); '': the run's config.eps, only in the norm "
                      "it trained in (no default under another norm).", **fv)
  flags.DEFINE_list("attacks", list(stages.DEFAULT_ATTACKS),
                    f"Subset of {stages.names()}.", **fv)
  flags.DEFINE_integer("pgd_steps", 50, "PGD iterations.", **fv)
  flags.DEFINE_integer("pgd_restarts", 10, "PGD random restarts.", **fv)
  flags.DEFINE_string("pgd_step_size", "", "PGD step size; '': the config's "
                      "eval_attack_step_size, times eps / config.eps under another "
                      "eps or norm (--model: 2.5 eps / pgd_steps).", **fv)
  flags.DEFINE_string("autoattack_version", "standard", f"One of {AUTOATTACK_VERSIONS}: "
                      "standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE, "
                      "APGD-T; plus: APGD-CE/DLR, FAB, Square, APGD-T, FAB-T with "
                      "restarts; rand: APGD-CE/DLR with EoT; custom: "
                      "--autoattack_attacks.", **fv)
  flags.DEFINE_list("autoattack_attacks", [], "The attacks of version custom, in "
                    f"order: names from {attacks_lib.ATTACK_NAMES} (any case). Given "
                    "alone, it implies --autoattack_version=custom; with another "
                    "version it is refused.", **fv)
  flags.DEFINE_list("autoattack_settings", [], "Budget overrides, e.g. "
                    "apgd_iters=20,n_target_classes=3,square_queries=1000; keys: "
                    f"{sorted(attacks_lib.STANDARD_SETTINGS)}.", **fv)
  flags.DEFINE_integer("autoattack_chunk_size", 0, "Attack still-robust examples "
                       "this many at a time (0: whole batch).", **fv)
  flags.DEFINE_integer("batch_size", 0, "Examples per batch; 0: config.eval_batch_size "
                       "(--model: 500).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts.", **fv)
  flags.DEFINE_integer("sanity_examples", sanity.SANITY_EXAMPLES,
                       "Examples for the sanity checks; 0: skip them.", **fv)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; default: the config's.", **fv)
  flags.DEFINE_string("data_file", None, "Local .npz replacing TFDS; default: the "
                      "config's.", **fv)
  flags.DEFINE_bool("resume", True, "Save progress and continue saved progress.", **fv)
  flags.DEFINE_integer("max_chunks_this_run", 0, "Stop (exit code 75) after this many "
                       "new batches; rerun to continue. 0: no limit.", **fv)
  flags.DEFINE_bool("aggregate", False, "Aggregate --workdirs instead of evaluating.",
                    **fv)
  flags.DEFINE_list("workdirs", [], "Workdirs to aggregate.", **fv)
  flags.DEFINE_string("out", "", "Write the aggregated table here too.", **fv)
  flags.DEFINE_list("compare", [], "A.npz,B.npz: count the examples whose flags differ "
                    "between two *_per_example.npz files, per stage.", **fv)


def _setting_value(text: str):
  """An ``--autoattack_settings`` value: an integer, true/false or a number."""
  text = text.strip()
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return configlib.parse_number(text, "--autoattack_settings value")


def _parse_settings(items: Sequence[str]) -> Dict[str, Any]:
  settings = {}
  for item in items:
    if "=" not in item:
      raise UserError(f"--autoattack_settings takes key=value items (e.g. "
                      f"apgd_iters=20); got {item!r}.")
    key, value = item.split("=", 1)
    key = key.strip()
    if key in settings:
      raise UserError(f"--autoattack_settings sets {key!r} twice.")
    settings[key] = _setting_value(value)
  return settings


def _protocol_from_flags(fv: flags.FlagValues) -> Protocol:
  """The protocol the flags ask for; every name and budget checked (a UserError)."""
  version = fv.autoattack_version
  if fv.autoattack_attacks and not fv["autoattack_version"].present:
    version = "custom"  # --autoattack_attacks alone asks for exactly those attacks
  errors.at_least("--autoattack_chunk_size", fv.autoattack_chunk_size, 0,
                  " (0: the whole batch)")
  autoattack = AutoAttackOptions(
      version=version, attacks=tuple(fv.autoattack_attacks) or None,
      settings=_parse_settings(fv.autoattack_settings),
      chunk_size=fv.autoattack_chunk_size or None)
  norm = naming.canonical_norm(fv.norm, "--norm") if fv.norm else _run_norm(fv)
  return Protocol(attacks=tuple(fv.attacks), pgd_steps=fv.pgd_steps,
                  pgd_restarts=fv.pgd_restarts, autoattack=autoattack, seed=fv.seed,
                  norm=norm)


def _run_norm(fv: flags.FlagValues) -> str:
  """The norm a workdir's run trained in (L-inf for a model from elsewhere)."""
  if fv.workdir:
    return naming.norm_of(rundir.read_config_json(fv.workdir))
  return "linf"


def _compare(paths: Sequence[str]) -> str:
  if len(paths) != 2 or not all(fs.exists(p) and not fs.is_dir(p) for p in paths):
    raise UserError(f"--compare takes two existing *_per_example.npz files; got {paths}.")
  return compare_markdown(*paths)


def _evaluate_model_from_flags(fv: flags.FlagValues, eps, step_size, protocol,
                               options) -> str:
  if eps is None:
    raise UserError("--model needs --eps (e.g. --eps=8/255).")
  if not fv.out_dir:
    raise UserError("--model needs --out_dir=DIR for the results and the progress.")
  if not fv.data and not fv.dataset:
    raise UserError("--model needs --data=FILE.npz or --dataset=NAME [--data_dir=DIR].")
  num = fv.num_examples if fv.num_examples > 0 else None
  if fv.data and not fv.dataset:
    images, labels = datasets.load_npz_split(fv.data, fv.split)
    images, labels = images[:num], labels[:num]
  else:
    try:
      images, labels = datasets.load_split(fv.dataset, fv.split, data_dir=fv.data_dir,
                                           data_file=fv.data, num_examples=num)
    except ValueError as e:
      raise UserError(str(e)) from None
  apply_fn, variables, model_record = external.load_model(fv.model, fv.checkpoint)
  evaluate_model((apply_fn, variables), images, labels, eps=eps,
                 pgd_step_size=step_size, protocol=protocol,
                 batch_size=fv.batch_size or 500, out_dir=fv.out_dir,
                 dataset=fv.dataset or os.path.basename(fv.data), split=fv.split,
                 source=fv.data or fv.data_dir, model_record=model_record, **options)
  return fs.read_text(os.path.join(fv.out_dir, "results.md"))


# The ways of running that read each flag: a flag given to another way is
# refused rather than silently ignored.
_EVALUATING = ("workdir", "model")
_MODES_OF_FLAG = {
    **{f: ("model",) for f in ("checkpoint", "data", "dataset", "split", "out_dir")},
    **{f: ("aggregate",) for f in ("workdirs", "out")},
    **{f: ("workdir",) for f in ("data_file", "resume")},
    "which": ("workdir", "aggregate"),
    **{f: _EVALUATING for f in (
        "num_examples", "norm", "eps", "attacks", "pgd_steps", "pgd_restarts",
        "pgd_step_size", "autoattack_version", "autoattack_attacks", "autoattack_settings",
        "autoattack_chunk_size", "batch_size", "seed", "sanity_examples", "data_dir",
        "max_chunks_this_run")},
}


def check_flags(fv: flags.FlagValues) -> str:
  """Checks every flag before anything runs; returns the way to run.

  One of 'compare', 'aggregate', 'workdir' or 'model'; a UserError names a
  conflicting, unknown or out-of-range value.
  """
  given = [m for m in ("compare", "aggregate", "workdir", "model") if fv[m].value]
  if len(given) != 1:
    raise UserError(
        ("Pass one of " if not given else f"--{' and --'.join(given)} exclude each "
         "other; pass one of ") + "--workdir=DIR, --model=FILE.py:FUNCTION (with --data "
        "or --dataset, and --out_dir), --aggregate --workdirs=a,b or --compare=A,B.")
  mode = given[0]
  for flag, modes in _MODES_OF_FLAG.items():
    if fv[flag].present and mode not in modes:
      raise UserError(f"--{flag} works with --{' or --'.join(modes)}, not with "
                      f"--{mode}.")
  if mode in ("workdir", "aggregate"):
    errors.choose_each("--which", fv.which, checkpointing.CHOICES)
  if mode == "aggregate":
    if not fv.workdirs:
      raise UserError("--aggregate needs --workdirs=a,b,c.")
    missing = [w for w in fv.workdirs if not fs.is_dir(w)]
    if missing:
      raise UserError(f"--workdirs: {missing} not found (no such folder).")
    errors.output_file("--out", fv.out)
    if fv.out:
      fs.check_writable(os.path.dirname(os.path.abspath(fv.out)), "--out folder")
  if mode == "model":
    errors.output_dir("--out_dir", fv.out_dir)
    if fv.dataset:
      errors.choose("--split", fv.split, datasets.get_dataset_info(fv.dataset).splits)
  errors.count_or_all("--num_examples", fv.num_examples)
  for flag, note in (("batch_size", " (0: the default)"),
                     ("sanity_examples", " (0: skip the sanity checks)"),
                     ("max_chunks_this_run", " (0: no limit)")):
    errors.at_least(f"--{flag}", fv[flag].value, 0, note)
  return mode


def run_from_flags(fv: flags.FlagValues = FLAGS) -> str:
  """Evaluates, aggregates or compares as the flags say; returns the Markdown printed.

  Every flag is checked first (:func:`check_flags`, the protocol and eps), so
  a bad value stops the command before any stage runs or any file is written.
  """
  mode = check_flags(fv)
  if mode == "compare":
    return _compare(fv.compare)
  if mode == "aggregate":
    text = aggregate(fv.workdirs, which=fv.which)
    if fv.out:
      fs.write_text(fv.out, text)
    return text
  step_size = (configlib.parse_number(fv.pgd_step_size, "--pgd_step_size")
               if fv.pgd_step_size else None)
  if step_size is not None and not step_size > 0:
    raise UserError(f"--pgd_step_size={fv.pgd_step_size}: must be > 0 (e.g. 2/255).")
  eps = configlib.parse_number(fv.eps, "--eps") if fv.eps else None
  protocol = _protocol_from_flags(fv)
  eps_error = None if eps is None else naming.eps_range_error(eps, protocol.norm)
  if eps_error:
    raise UserError(f"--eps={fv.eps}: {eps_error}.")
  if fv.workdir:  # no default eps under another norm: refused before any work
    eps_for_norm(rundir.load_config(fv.workdir), protocol.norm, eps)
  options = dict(sanity_examples=fv.sanity_examples,
                 max_chunks_this_run=fv.max_chunks_this_run or None)
  if mode == "model":
    return _evaluate_model_from_flags(fv, eps, step_size, protocol, options)
  evaluate_workdir(
      fv.workdir, which=fv.which,
      num_examples=fv.num_examples if fv.num_examples > 0 else None,
      eps=eps, pgd_step_size=step_size,
      batch_size=fv.batch_size or None, data_dir=fv.data_dir, data_file=fv.data_file,
      protocol=protocol, resume=fv.resume, **options)
  return results_markdown(fv.workdir)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
  util.setup_runtime()
  if FLAGS.resume:  # Finish and save the batch in flight, then exit 75.
    signal.signal(signal.SIGTERM, lambda *_: request_stop("by SIGTERM"))
  try:
    text = run_from_flags(FLAGS)
  except EvaluationInterrupted as e:
    print(f"Evaluation {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_PREEMPTED)
  except KeyboardInterrupt:
    print("Evaluation interrupted (Ctrl-C); every finished batch is saved: rerun the "
          "same command to continue.", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_PREEMPTED)
  if jax.process_index() == 0:
    print(text, flush=True)


if __name__ == "__main__":
  define_flags()
  util.run(main)
