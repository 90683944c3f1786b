"""Reproduce a table of the paper: train every row with the paper's settings, evaluate
with its protocol, and print bat_jax's numbers beside the reported ones.

  python -m bat_jax.reproduce --table=1 --data_dir=DIR
  python -m bat_jax.reproduce --table=1 --runlocal --seeds=0 --data_dir=DIR  # CPU-sized
  python -m bat_jax.reproduce --table=B1 --rows=bat,at --eps=8/255

DIR holds the data set prepared by TFDS: `tfds build mnist --data_dir=DIR
--file_format=array_record` (CIFAR: cifar10, cifar100). Tables: 1 (MNIST), 2 (CIFAR10, WRN-28-10), 3 (RST), B1, B2, B3 (appendix); the
reported numbers live in ``bat_jax.paper``. Each (method, eps, seed) trains in
``ROOT/table<T>/<method>_eps<eps>_seed<seed>`` with the table's config file
(``configs/``) and is evaluated on the whole test split with PGD^50 x 10 and
AutoAttack "standard" (plus FGSM where the table has it), the final model and,
for the appendix's "(ES)" rows, the early-stopped one. Rerunning resumes and
skips what is done. ``ROOT/table<T>.md`` holds, per cell, the paper's
mean ± std, bat_jax's mean ± std over the seeds, the difference, and whether
it lies within two standard deviations of the difference
(``sqrt(std_paper^2 + std_ours^2)``), with the protocol recorded beside it.
``--runlocal`` trains the config's ``:runlocal`` variant and evaluates with
``sweep.CPU_BUDGET`` (500 test examples, PGD^50 x 2, AutoAttack's APGD stages):
a shape of the command for a CPU, not the paper's numbers. The runs are
trained and evaluated by ``bat_jax.sweep``, as ``bat_jax.experiment``'s are.
"""

import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import flags, logging
import numpy as np

from bat_jax import (configlib, errors, fs, methods, naming, paper, rundir, sweep,
                     train, util)
from bat_jax.evaluation import stages

STAGES = ("train", "evaluate", "report")


# --------------------------------------------------------------------------
# Runs: which configs a table trains.
# --------------------------------------------------------------------------


def table_config(table: paper.Table, eps: float, runlocal: bool):
  """The table's config file at ``eps`` (and ``:runlocal`` for a CPU)."""
  path = configlib.configs_dir() / f"{table.config}.py"
  eps_text = (f"eps={eps:g}" if table.eps_arg == "fraction"
              else f"eps={round(eps * 255)}")
  arg = ",".join(a for a in (eps_text, table.config_arg, "runlocal" if runlocal else "")
                 if a)
  return configlib.load_config_file(path).get_config(arg)


def run_name(row: paper.Row, seed: int) -> str:
  beta = f"_beta{row.beta:g}" if row.beta is not None else ""
  return f"{row.method}_eps{row.eps:.4g}{beta}_seed{seed}"


def plan(table: paper.Table, seeds: Sequence[int], runlocal: bool = False,
         rows: Optional[Sequence[paper.Row]] = None, overrides: Optional[dict] = None,
         explicit: Sequence[str] = ()) -> Dict[str, Any]:
  """``{run name: config}``: one run per (method, eps, beta, seed) of ``rows``.

  A final and an "(ES)" row of one method share a run. ``overrides`` (field
  -> value) apply on top of the table's settings, e.g. a ``data_dir``.
  """
  runs = {}
  for row in rows if rows is not None else table.rows:
    for seed in seeds:
      name = run_name(row, seed)
      if name in runs:
        continue
      config = table_config(table, row.eps, runlocal)
      config.method, config.seed = row.method, int(seed)
      if row.beta is not None:
        config.beta = row.beta
      config.update(overrides or {})
      if naming.norm_of(config) != paper.NORM:
        raise configlib.ConfigError(
            f"config.norm={config.norm!r}: the paper's tables are "
            f"{naming.norm_label(paper.NORM)}; its numbers compare with no other threat "
            "model (train other norms with bat_jax.experiment).")
      runs[name] = configlib.resolve(config, explicit)
  return runs


def select_rows(table: paper.Table, methods_filter: Sequence[str] = (),
                eps_filter: Sequence[float] = ()) -> List[paper.Row]:
  """The rows of ``table`` with a method and an eps from the filters (empty: all).

  A filter value that matches no row is refused (it is a typo or another
  table's), with the table's methods or eps listed.
  """
  table_methods = sorted({r.method for r in table.rows})
  if methods_filter:
    errors.choose_each(f"--rows (table {table.name})", methods_filter, table_methods)
  for e in eps_filter:
    if not any(abs(r.eps - e) < 1e-9 for r in table.rows):
      known = sorted({r.eps for r in table.rows})
      raise configlib.ConfigError(
          f"--eps={naming.format_eps(e, table.config)}: table {table.name} has no row "
          f"at it; its eps: {', '.join(naming.format_eps(k, table.config) for k in known)}.")
  rows = [r for r in table.rows
          if (not methods_filter or r.method in methods_filter)
          and (not eps_filter or any(abs(r.eps - e) < 1e-9 for e in eps_filter))]
  if not rows:
    raise configlib.ConfigError(
        f"no row of table {table.name} has method in {list(methods_filter)} and eps "
        f"in {list(eps_filter)}; its rows: "
        f"{sorted({(r.method, round(r.eps, 4)) for r in table.rows})}")
  return rows


# --------------------------------------------------------------------------
# How the runs are evaluated (bat_jax.sweep trains and evaluates them).
# --------------------------------------------------------------------------


def evaluation_protocol(table: paper.Table, runlocal: bool) -> Dict[str, Any]:
  """``evaluate_workdir`` arguments of the table's protocol (with ``runlocal``,
  at ``sweep.CPU_BUDGET``)."""
  attacks = [name for name in stages.names()  # the stages the table reports
             if any(name in row.values for row in table.rows)]
  return sweep.evaluation_options(paper.NORM, cpu_budget=runlocal, attacks=attacks,
                                  pgd_step_size=table.pgd_step_size)


def _checkpoints(table: paper.Table, rows: Sequence[paper.Row]) -> List[str]:
  return sorted({row.checkpoint for row in rows}, key=["last", "best"].index)


# --------------------------------------------------------------------------
# The side-by-side report.
# --------------------------------------------------------------------------


def _mean_std(values: Sequence[float]):
  values = [100 * v for v in values]
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def _cell(mean: Optional[float], std: Optional[float]) -> str:
  if mean is None:
    return "–"
  return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def compare(reported: paper.Cell, ours: Sequence[float]) -> Dict[str, Any]:
  """Paper vs bat_jax for one cell: means, stds, difference, within 2 sigma."""
  mean, std = _mean_std(ours)
  paper_mean, paper_std = reported
  out = {"paper": reported, "ours": (mean, std), "n": len(ours), "diff": None,
         "within_2sd": None}
  if mean is None:
    return out
  out["diff"] = mean - paper_mean
  variances = [s ** 2 for s in (paper_std, std) if s is not None]
  if variances:
    sigma = math.sqrt(sum(variances))
    out["within_2sd"] = abs(out["diff"]) <= max(2 * sigma, 0.005)
  return out


def collect(table: paper.Table, rows: Sequence[paper.Row], seeds: Sequence[int],
            workdirs: Dict[str, str]) -> List[Dict[str, Any]]:
  """For each row: its cells compared, from the runs' evaluation results."""
  out = []
  for row in rows:
    per_column = {c: [] for c in row.values}
    steps, examples = set(), set()
    for seed in seeds:
      results = rundir.read_json(os.path.join(
          workdirs[run_name(row, seed)], "eval", f"{row.checkpoint}_results.json"))
      if not results or (row.checkpoint == "best" and results.get("checkpoint") != "best"):
        continue
      if not sweep.at_threat_model(results, paper.NORM, row.eps):  # since at another one
        logging.warning("%s: %s results are not at %s; left out of the table.",
                        workdirs[run_name(row, seed)], row.checkpoint,
                        naming.threat_model_label(paper.NORM, row.eps))
        continue
      steps.add(results.get("step"))
      examples.add(results.get("num_examples"))
      for column in row.values:
        if results.get(f"{column}_acc") is not None:
          per_column[column].append(results[f"{column}_acc"])
    out.append({"row": row, "cells": {c: compare(row.values[c], v)
                                      for c, v in per_column.items()},
                "steps": sorted(s for s in steps if s is not None),
                "examples": sorted(e for e in examples if e is not None)})
  return out


def markdown(table: paper.Table, compared: List[Dict[str, Any]], seeds: Sequence[int],
             options: Dict[str, Any], configs: Dict[str, Any], runlocal: bool) -> str:
  """The side-by-side table and the protocol that produced it."""
  columns = [c for c in paper.COLUMNS if any(c in r["row"].values for r in compared)]
  names = {name: stage.column for name, stage in stages.STAGES.items()}
  lines = [f"# {table.title}: the paper vs bat_jax", ""]
  if runlocal:
    lines += ["**A CPU-sized shape of the command (`--runlocal`): the config's "
              "`:runlocal` training and a smaller evaluation. Not the paper's protocol; "
              "the comparison shows the machinery, not a reproduction.**", ""]
  lines += ["Accuracy in %. Each cell: paper (mean±std over its 3 seeds) | bat_jax "
            f"(mean±std over seeds {list(seeds)}) | difference, ✓ when within two "
            "standard deviations of the difference (√(std_paper² + std_ours²)), "
            "✗ when not, – when no std is known.", "",
            f"| {naming.norm_label(paper.NORM)} ε | Method | "
            + " | ".join(f"{names[c]} paper | bat_jax | Δ" for c in columns) + " |",
            "|---|---|" + "---|---|---|" * len(columns)]
  dataset = next(iter(configs.values())).dataset if configs else ""
  for item in compared:
    row = item["row"]
    label = methods.display_name(row.method)
    if row.beta is not None:
      label += f" (β = {row.beta:g})"
    if row.checkpoint == "best":
      label += " (ES)"
    cells = []
    for column in columns:
      cell = item["cells"].get(column)
      if cell is None:
        cells.append("– | – | –")
        continue
      mark = {True: " ✓", False: " ✗", None: ""}[cell["within_2sd"]]
      diff = "–" if cell["diff"] is None else f"{cell['diff']:+.2f}{mark}"
      cells.append(f"{_cell(*cell['paper'])} | {_cell(*cell['ours'])} | {diff}")
    lines.append(f"| {naming.format_eps(row.eps, dataset, paper.NORM)} | {label} | "
                 + " | ".join(cells) + " |")
  protocol = options["protocol"]
  first = next(iter(configs.values())) if configs else None
  eps_values = sorted({r["row"].eps for r in compared})
  lines += ["", "## Protocol", ""]
  lines.append(f"- threat model: {naming.norm_label(paper.NORM)}; eps: " + ", ".join(
      f"{e:.6g}" + (f" (= {naming.format_eps(e, 'cifar')})" if table.eps_arg == "per255"
                    else "") for e in eps_values))
  examples = sorted({e for r in compared for e in r["examples"]})
  lines.append(f"- evaluated on {examples or ['–']} test examples (the first N of "
               "the split); seeds " + str(list(seeds)))
  if first is not None:
    step = options.get("pgd_step_size", first.eval_attack_step_size)
    lines.append(f"- PGD^{protocol.pgd_steps} x {protocol.pgd_restarts} restarts, step "
                 f"{step:.6g}" + (f" (= {naming.format_eps(step, 'cifar')})"
                                  if table.eps_arg == "per255" else "")
                 + f"; AutoAttack {protocol.autoattack.describe()['version']} "
                 f"({', '.join(protocol.autoattack.attack_names())})")
    length = (f"{first.num_train_steps} steps" if first.num_train_steps > 0
              else f"{first.num_epochs} epochs")
    optimisers = {}
    for config in configs.values():
      optimisers.setdefault(f"{config.optimizer} lr {config.learning_rate:g}",
                            set()).add(methods.display_name(config.method))
    optimiser = "; ".join(
        text + ("" if len(optimisers) == 1 else f" ({', '.join(sorted(names))})")
        for text, names in optimisers.items())
    lines.append(f"- training ({table.config}.py): {first.model}, {length}, "
                 f"{optimiser}, {first.schedule} schedule, batch {first.batch_size}, "
                 f"PGD^{first.attack_steps} step {first.attack_step_size:.4g}, "
                 f"beta {first.beta:g}")
  lines.append("- checkpoints: final model" + (", early-stopped (ES: the best PGD^10 "
               "accuracy on the first test batch)" if any(
                   r["row"].checkpoint == "best" for r in compared) else ""))
  if table.note:
    lines.append(f"- {table.note}")
  missing = [f"{r['row'].method}@{r['row'].eps:.4g}" for r in compared
             if not any(c["n"] for c in r["cells"].values())]
  if missing:
    lines.append(f"- not yet evaluated: {', '.join(missing)}")
  return "\n".join(lines) + "\n"


# Config fields that bat_jax.reproduce sets with a flag of the same name.
OVERRIDE_FLAGS = ("data_dir", "data_file", "extra_data_path")


def check_runs(runs: Dict[str, Any], stages: Sequence[str]) -> None:
  """To train: every run's config and data are usable, refused before any run starts."""
  if "train" not in stages:
    return
  try:
    train.check_runs(runs)
  except errors.UserError as e:
    hint = "".join(f" (bat_jax.reproduce: --{f}=...)" for f in OVERRIDE_FLAGS
                   if f"config.{f}" in str(e))
    raise errors.UserError(f"{e}{hint}") from None


def reproduce(table_name: str, root: str, *, seeds: Sequence[int] = (0, 1, 2),
              runlocal: bool = False, methods_filter: Sequence[str] = (),
              eps_filter: Sequence[float] = (), overrides: Optional[dict] = None,
              stages: Sequence[str] = STAGES,
              explicit: Sequence[str] = (),
              options: Optional[Dict[str, Any]] = None) -> str:
  """Trains, evaluates and reports ``table_name``; returns the Markdown written."""
  table = paper.TABLES[errors.choose("--table", str(table_name).upper(), list(paper.TABLES))]
  errors.choose_each("--stages", stages, STAGES)
  errors.output_dir("--root", root)
  rows = select_rows(table, methods_filter, eps_filter)
  runs = plan(table, seeds, runlocal, rows, overrides, explicit)
  check_runs(runs, stages)
  options = options or evaluation_protocol(table, runlocal)
  run_root = os.path.join(root, f"table{table.name}")
  workdirs = sweep.run(runs, run_root, stages=stages,
                       checkpoints=_checkpoints(table, rows), options=options)
  text = markdown(table, collect(table, rows, seeds, workdirs), seeds, options, runs,
                  runlocal)
  if "report" in stages:
    fs.write_text(os.path.join(root, f"table{table.name}.md"), text)
  return text


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("table", None, f"One of {list(paper.TABLES)}.", **fv)
  flags.DEFINE_string("root", "reproduce", "Runs go to ROOT/table<T>/, the report "
                      "to ROOT/table<T>.md.", **fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (the paper: 3).", **fv)
  flags.DEFINE_list("rows", [], "Only these methods (e.g. bat,trades).", **fv)
  flags.DEFINE_list("eps", [], "Only these eps (e.g. 0.45 or 8/255).", **fv)
  flags.DEFINE_bool("runlocal", False, "The configs' :runlocal training and a "
                    "smaller evaluation: a CPU-sized shape, not the paper's numbers.", **fv)
  flags.DEFINE_list("stages", list(STAGES), "Stages to run.", **fv)
  flags.DEFINE_string("data_dir", "", "TFDS data_dir for every run.", **fv)
  flags.DEFINE_string("data_file", "", "A local .npz replacing TFDS for every run.", **fv)
  flags.DEFINE_string("extra_data_path", "", "The extra data (.npz, or a directory of "
                      "array_record shards) of the tables that train with it (Table 3, "
                      "RST).", **fv)
  flags.mark_flag_as_required("table", flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  util.setup_runtime()
  overrides = {k: FLAGS[k].value for k in OVERRIDE_FLAGS if FLAGS[k].value}
  began = time.time()
  text = reproduce(FLAGS.table, FLAGS.root, seeds=errors.integers("--seeds", FLAGS.seeds),
                   runlocal=FLAGS.runlocal, methods_filter=FLAGS.rows,
                   eps_filter=[configlib.parse_number(e, "--eps") for e in FLAGS.eps],
                   overrides=overrides, stages=FLAGS.stages)
  print(text, flush=True)
  logging.info("bat_jax.reproduce --table=%s: %.0f s", FLAGS.table, time.time() - began)


if __name__ == "__main__":
  define_flags()
  util.run(main)
