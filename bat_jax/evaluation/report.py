"""Reports: one run's evaluation as Markdown, and the paper's tables over many runs.

:func:`results_markdown` summarises ``WORKDIR/eval/*_results.json`` (every
checkpoint, AutoAttack per stage, non-finite values met per stage, timings,
sanity checks, the protocol record) and :func:`runs_markdown` any such results; :func:`count_flips`
compares two evaluations example by example; :func:`aggregate`
groups runs by (dataset, threat model, method) and prints mean ± std over
seeds in the paper's table format. Every eps is shown with its norm
(``naming.threat_model_label``), and runs of different threat models are
never averaged together.
"""

import collections
import json
import os
from typing import Any, Dict, Mapping, Sequence

import numpy as np

from bat_jax import fs, methods, naming, rundir
from bat_jax.evaluation import record, stages


def _pct(value) -> str:
  return "–" if value is None else f"{100 * value:.2f}"


def _checkpoint_label(which: str, results: Mapping[str, Any]) -> str:
  """'best', 'best (fell back to last)', 'last (same step as best)', 'best (EMA weights)'."""
  notes = []
  if results.get("same_as"):
    notes.append(f"same step as {results['same_as']}")
  elif results.get("checkpoint", which) != which:
    notes.append(f"fell back to {results['checkpoint']}")
  if results.get("weights") == "ema" and which != "ema":
    notes.append("EMA weights")
  return f"{which} ({'; '.join(notes)})" if notes else which


def results_markdown(workdir: str) -> str:
  """A Markdown summary of every evaluated checkpoint of ``workdir`` (in %)."""
  runs = rundir.load_results(workdir)
  if not runs:
    return f"No evaluation results in {os.path.join(workdir, 'eval')}.\n"
  first = next(iter(runs.values()))
  trained = naming.threat_model_label(_train_norm(workdir, first),
                                      first.get("train_eps", 0), first.get("dataset", ""))
  return runs_markdown(
      runs, f"Evaluation of `{workdir}`",
      f"method `{first.get('method')}`, model `{first.get('model')}`, dataset "
      f"`{first.get('dataset')}` (test), trained at {trained}")


def _train_norm(workdir: str, results: Mapping[str, Any]) -> str:
  """The norm the run trained in: the results' ``train_norm``, else config.json's."""
  if results.get("train_norm"):
    return naming.canonical_norm(results["train_norm"])
  return naming.norm_of(rundir.read_json(rundir.config_path(workdir)))


def runs_markdown(runs: Mapping[str, Mapping[str, Any]], title: str,
                  subtitle: str) -> str:
  """The Markdown summary of ``{which: results}`` (one row per checkpoint or model)."""
  first = next(iter(runs.values()))
  settings = first.get("settings", {})
  columns = list(stages.STAGES.values())
  lines = [f"# {title}", "", f"{subtitle}; accuracies in %.", "",
           "| checkpoint | step | examples | norm | eps | "
           + "".join(f"{stage.column_header(settings)} | " for stage in columns)
           + "warnings |",
           "|" + "---|" * (len(columns) + 6)]
  for w, r in runs.items():
    step = "–" if r.get("step") is None else r.get("step")
    lines.append(f"| {_checkpoint_label(w, r)} | {step} | "
                 f"{r.get('num_examples')} | {naming.norm_label(naming.norm_of(r))} | "
                 f"{r.get('eps', 0):.4g} | "
                 + "".join(f"{_pct(r.get(stage.result_key))} | " for stage in columns)
                 + f"{len(r.get('sanity_warnings', []))} |")
  for stage in columns:
    lines += _parts_table(stage, runs)
  met = {w: {stage: n for stage, n in (r.get("non_finite_examples") or {}).items() if n}
         for w, r in runs.items()}
  if any(met.values()):
    lines += ["", "Non-finite values (NaN or inf in the logits or input gradients) met "
              "under attack, examples per stage; they count as not robust:", ""]
    lines += [f"- {w}: " + ", ".join(f"{stage} {n}" for stage, n in counts.items())
              for w, counts in met.items() if counts]
  lines += ["", "Timings (s, compilation included):", ""]
  for w, r in runs.items():
    if r.get("same_as"):
      lines.append(f"- {w}: not evaluated again (the {r['same_as']} checkpoint)")
      continue
    run = r.get("run") or {}
    timings = run.get("timings_s", r.get("timings_s", {}))
    resumed = sum(s.get("loaded", 0) for s in (run.get("stages") or {}).values())
    lines.append(f"- {w}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                 + (f" (this run; {resumed} stage-examples loaded from saved progress)"
                    if resumed else ""))
  lines += ["", "Sanity checks:", ""]
  for w, r in runs.items():
    warnings = r.get("sanity_warnings", [])
    if not r.get("sanity"):
      lines.append(f"- {w}: not run")
    elif not warnings:
      lines.append(f"- {w}: all passed")
    for warning in warnings:
      lines.append(f"- {w}: WARNING {warning}")
  for w, r in runs.items():
    if r.get("protocol") and not r.get("same_as"):
      lines += ["", f"Protocol ({w}):", ""] + record.protocol_lines(r["protocol"])
  return "\n".join(lines) + "\n"


def _parts_table(stage: stages.Stage, runs: Mapping[str, Mapping[str, Any]]):
  """A composite stage's accuracy after each part (AutoAttack's attacks), per run."""
  key = stage.composite.parts if stage.composite else None
  with_parts = [r for r in runs.values() if key and r.get(key)]
  if not with_parts:
    return []
  names = list(with_parts[0][key])
  lines = ["", f"{stage.column}, robust accuracy (%) after each attack:", "",
           "| checkpoint | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for w, r in runs.items():
    if r.get(key):
      lines.append(f"| {w} | " + " | ".join(_pct(r[key].get(n)) for n in names) + " |")
  return lines


def _row_label(method: str, which: str, runs: Sequence[Mapping[str, Any]],
               first: bool) -> str:
  """'BAT', '(ES)', '(EMA)', '(ES, EMA)': the checkpoint and the weights of a row.

  The method's name starts its first row; the rows below it name only what
  differs. 'EMA' marks rows of the weight average (results' ``weights``).
  """
  tags = {"best": ["ES"], "last": []}.get(which, [which.upper()])
  if any(r.get("weights") == "ema" for r in runs) and "EMA" not in tags:
    tags.append("EMA")
  tag = f"({', '.join(tags)})" if tags else ""
  if first:
    return f"{method} {tag}".strip()
  return tag or method


def mean_std(values: Sequence[float]) -> str:
  """Percent 'mean±std', 2 decimals; sample std (ddof=1); one run: just the mean."""
  values = 100 * np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f}±{values.std(ddof=1):.2f}"


def aggregate(workdirs: Sequence[str], which: Sequence[str] = ("last", "best")) -> str:
  """A Markdown table of mean ± std over seeds, one row per method and checkpoint.

  Runs are grouped by (dataset, training threat model, evaluation threat
  model, method) from each workdir's ``config.json`` and
  ``eval/{which}_results.json``: a threat model is the norm and eps
  together, so runs of another norm are another group with its own
  heading, never averaged in. As the
  paper's tables: the final model ('last') is the method's row; the
  early-stopped one ('best') is its own '(ES)' row below it (Table B.1), only
  for runs that kept a best checkpoint. Columns without any value are left
  out (Tables 1-2 have no FGSM); missing values in a group are averaged over
  the runs that have them, marked ``(n=k)``.
  """
  which = [which] if isinstance(which, str) else list(which)
  which.sort(key=lambda w: {"last": 0, "best": 1, "ema": 2}.get(w, 3))
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  configs = collections.defaultdict(list)
  skipped, warned, budgets, fell_back = [], [], [], []
  for workdir in workdirs:
    for w in which:
      run = rundir.read_run_results(workdir, w)
      if run is None:
        skipped.append(f"{workdir} ({w})")
        continue
      config, results = run
      train_eps = float(config.get("eps", results.get("train_eps", 0.0)))
      train_norm = naming.norm_of(config)
      key = (config.get("dataset", "?"), train_norm, train_eps, naming.norm_of(results),
             float(results.get("eps", train_eps)), config.get("method", "?"))
      fell_back_to_last = results.get("checkpoint", w) != w
      if fell_back_to_last:
        fell_back.append(f"{workdir} ({w} = {results['checkpoint']})")
        if "last" in which:
          continue  # kept no early-stopped model: its final row says it all
      groups[key][w].append(results)
      configs[key].append(config)
      if results.get("sanity_warnings"):
        warned.append(f"{workdir} ({w}): {len(results['sanity_warnings'])}")
      settings = results.get("settings") or {}
      judged = [stage for stage in stages.STAGES.values() if stage.standard]
      if settings and not all(stage.standard(settings) for stage in judged):
        budgets.append(f"{workdir} ({w}): " + ", ".join(
            stage.column_header(settings) for stage in judged))
  columns = [(stage.result_key, stage.column) for stage in stages.STAGES.values()
             if any(r.get(stage.result_key) is not None
                    for g in groups.values() for rs in g.values() for r in rs)]
  lines = ["| Method | " + " | ".join(label for _, label in columns) + " | runs |",
           "|---|" + "---|" * (len(columns) + 1)]
  order = {m: i for i, m in enumerate(methods.METHODS)}
  heading = None
  for key in sorted(groups, key=lambda k: (*k[:5], order.get(k[5], 99), k[5])):
    dataset, train_norm, train_eps, eval_norm, eval_eps, method = key
    title = (f"{naming.dataset_name(dataset)} "
             f"({naming.threat_model_label(train_norm, train_eps, dataset)}")
    if eval_norm != train_norm or abs(eval_eps - train_eps) > 1e-9:
      title += (f", evaluated at "
                f"{naming.threat_model_label(eval_norm, eval_eps, dataset)}")
    title += ")"
    if title != heading:
      heading = title
      lines.append(f"| **{title}** |" + " |" * (len(columns) + 1))
    for i, w in enumerate(which):
      runs = groups[key].get(w)
      if not runs:
        continue
      label = _row_label(methods.display_name(method), w, runs,
                         first=not any(groups[key].get(v) for v in which[:i]))
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
                     if k not in ("seed", "data_dir", "data_file", "norm")
                     and len({json.dumps(c.get(k), sort_keys=True)
                              for c in group_configs}) > 1)
    if varying:
      notes.append(f"- {methods.display_name(key[5])} on {key[0]} "
                   f"({naming.threat_model_label(key[1], key[2], key[0])}): runs differ in "
                   f"{', '.join(varying)} besides the seed.")
  if budgets:
    notes.append("- not the paper's attack budgets: " + "; ".join(budgets))
  if fell_back:
    notes.append("- no early-stopped checkpoint (the final model instead): "
                 + "; ".join(fell_back))
  if warned:
    notes.append("- sanity-check warnings: " + "; ".join(warned))
  if skipped:
    notes.append("- no results (skipped): " + "; ".join(skipped))
  text = "Accuracy (%), mean±std over seeds (sample std).\n\n" + "\n".join(lines) + "\n"
  if notes:
    text += "\n" + "\n".join(notes) + "\n"
  return text


def count_flips(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]
                ) -> Dict[str, int]:
  """Per stage, how many examples' flags differ between two per-example records.

  ``a``/``b``: ``{'index': [N], stage: [N] bool, ...}`` (the
  ``*_per_example.npz`` files); stages in both, over the indices in both.
  """
  _, ia, ib = np.intersect1d(np.asarray(a["index"]), np.asarray(b["index"]),
                             return_indices=True)
  return {stage: int(np.sum(np.asarray(a[stage])[ia] != np.asarray(b[stage])[ib]))
          for stage in a if stage != "index" and stage in b}


def compare_markdown(path_a: str, path_b: str) -> str:
  """Flips per stage between two ``*_per_example.npz`` files, as Markdown."""
  with fs.load_npz(path_a) as a, fs.load_npz(path_b) as b:
    flips = count_flips(dict(a), dict(b))
    count = len(np.intersect1d(a["index"], b["index"]))
  lines = [f"Examples whose flags differ ({count} examples in both):", ""]
  return "\n".join(lines + [f"- {stage}: {n}" for stage, n in flips.items()]) + "\n"
