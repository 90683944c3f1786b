"""The paper's comparison as one command: train methods x eps x seeds, then
evaluate, analyse and plot (Table 1, Figures 2-8).

MNIST prepared once by TFDS into a folder DIR (`tfds build mnist --data_dir=DIR
--file_format=array_record`). GPU, the paper's MNIST sweep (Figure 3 / Table 1):
  python -m bat_jax.experiment --config=configs/mnist.py \
      --config.data_dir=DIR --root=runs/mnist_sweep \
      --methods=at,trades,mart,bat --eps=0.1,0.2,0.3,0.35,0.4,0.45 --seeds=0,1,2
CPU-sized (8,000 MNIST digits, one large eps, cheap evaluation budgets):
  python -m bat_jax.experiment --config=configs/mnist.py:runlocal \
      --config.data_dir=DIR --root=runs/mnist_cpu \
      --methods=at,trades,bat --eps=0.45 --seeds=0 --cpu_budget

Each run lives in ROOT/<method>_eps<eps>_seed<seed>; ``bat_jax.sweep`` trains
and evaluates the runs, as ``bat_jax.reproduce``'s, and skips or resumes what
is done, so rerunning the command continues where it stopped. ROOT/table.md
holds the mean +- std table and ROOT/figures the PNGs.
"""

import copy
import os
import sys
from typing import Dict, List

from absl import flags, logging
from ml_collections import config_flags

from bat_jax import (analysis, configlib, errors, evaluate, fs, naming, plots, sweep,
                     train, util)
from bat_jax import methods as methods_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.")
_ROOT = flags.DEFINE_string("root", None, "Directory holding one workdir per run.")
_METHODS = flags.DEFINE_list("methods", ["at", "trades", "bat"], "Methods to train.")
_EPS = flags.DEFINE_list("eps", [], "Training/evaluation eps values, radii in the "
                         "config's norm ('' = the config's); fractions like 8/255 are "
                         "accepted.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
STAGES = ("train", "evaluate", "analyse", "plot")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "Which stages to run.")
_CPU_BUDGET = flags.DEFINE_bool(
    "cpu_budget", False, "Cheap evaluation for a CPU (bat_jax.sweep.CPU_BUDGET, as "
    f"bat_jax.reproduce --runlocal): first {sweep.CPU_BUDGET['num_examples']} test "
    f"images, PGD^50 x {sweep.CPU_BUDGET['pgd_restarts']} restarts, AutoAttack "
    f"'{sweep.CPU_BUDGET['autoattack_version']}' (APGD-CE + APGD-T), sanity checks on "
    f"{sweep.CPU_BUDGET['sanity_examples']} images.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", -1,
                                     "Evaluate/analyse the first N test images (-1: all).")
flags.mark_flags_as_required(["config", "root"])


def run_name(method: str, eps: float, seed: int) -> str:
  return f"{method}_eps{eps:.4g}_seed{seed}"


def plan_runs(base, methods: List[str], eps_values: List[float],
              seeds: List[int], explicit=()) -> Dict[str, object]:
  """{run name: config} for every (method, eps, seed).

  Each config is resolved for its method (``configlib.resolve``: the config
  file's per-method settings, e.g. SGD for MART on MNIST), except for the
  fields in ``explicit`` (set on the command line).
  """
  runs = {}
  for eps in eps_values or [base.eps]:
    for method in methods:
      for seed in seeds:
        config = copy.deepcopy(base)
        config.method, config.eps, config.seed = method, eps, seed
        runs[run_name(method, eps, seed)] = configlib.resolve(config, explicit)
  return runs


def check_plan(runs: Dict[str, object], root: str, stages, num_examples: int) -> None:
  """Refuses a bad stage, count, root or run config before the first run starts."""
  errors.choose_each("--stages", stages, STAGES)
  errors.count_or_all("--num_examples", num_examples)
  errors.output_dir("--root", root)
  if "train" in stages:
    train.check_runs(runs)


def run_experiment(base, root: str, methods, eps_values, seeds, stages,
                   cpu_budget: bool = False, num_examples: int = -1,
                   explicit=()) -> List[str]:
  """Runs the requested stages for every run; returns the workdirs.

  Every name, number and run's config is checked first (:func:`check_plan`):
  a bad one stops the command before the first run trains.
  """
  errors.choose_each("--methods", methods, tuple(methods_lib.METHODS))
  runs = plan_runs(base, methods, eps_values, seeds, explicit)
  check_plan(runs, root, stages, num_examples)
  # Each run is evaluated at its training threat model.
  options = sweep.evaluation_options(naming.canonical_norm(base.norm, "config.norm"),
                                     cpu_budget=cpu_budget, num_examples=num_examples)
  # A run that keeps a weight average (config.ema_decay > 0) is also evaluated
  # at its final average; its 'best' checkpoint already is an average.
  checkpoints = ("best", "last") + (("ema",) if base.ema_decay > 0 else ())
  workdirs = list(sweep.run(runs, root, stages=stages, checkpoints=checkpoints,
                            options=options).values())
  if "analyse" in stages:
    for name, workdir in zip(runs, workdirs):
      logging.info("=== analyse %s", name)
      analysis.analyse_workdir(workdir, which="best", num_examples=options["num_examples"])
  if "evaluate" in stages:
    table = evaluate.aggregate(workdirs, which=checkpoints)  # final + (ES) (+ EMA)
    fs.write_text(os.path.join(root, "table.md"), table)
    print(table, flush=True)
  if "plot" in stages:
    paths = plots.make_all_figures(workdirs, os.path.join(root, "figures"))
    logging.info("Figures: %s", paths)
  return workdirs


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  util.setup_runtime()
  run_experiment(_CONFIG.value, _ROOT.value, _METHODS.value,
                 [configlib.parse_number(e, "--eps") for e in _EPS.value],
                 errors.integers("--seeds", _SEEDS.value),
                 _STAGES.value, _CPU_BUDGET.value, _NUM_EXAMPLES.value,
                 explicit=util.overridden_fields(sys.argv))


if __name__ == "__main__":
  util.run(main)
