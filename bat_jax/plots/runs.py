"""The runs the figures are drawn from: what each workdir holds, labels, and series.

A :class:`Run` is whatever of a workdir's outputs exist (each optional):
``metrics.jsonl``, ``config.json``, ``analysis/{which}_measures.npz`` and
``{which}_summary.json``, ``eval/{which}_results.json``.
"""

import collections
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bat_jax import analysis, configlib, fs, methods, naming, rundir
from bat_jax.errors import UserError

LINESTYLES = ("-", "--", "-.", ":")

# --------------------------------------------------------------------------
# Loading runs.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything the figures need from one workdir (missing parts are None/empty)."""
  workdir: str
  config: Dict[str, Any]
  metrics: List[Dict[str, Any]]
  measures: Optional[Dict[str, np.ndarray]]
  summary: Optional[Dict[str, Any]]
  eval_results: Optional[Dict[str, Any]]
  label: str = ""

  @property
  def method(self) -> str:
    return str(self.config.get("method", os.path.basename(self.workdir)))

  @property
  def dataset(self) -> str:
    return str(self.config.get("dataset", "unknown"))

  @property
  def eps(self) -> Optional[float]:
    """The training eps (``config.eps``), as a float."""
    return _as_float(self.config.get("eps"))

  @property
  def analysis_eps(self) -> Optional[float]:
    """The eps the analysis attacked with (defaults to the training eps)."""
    eps = _as_float((self.summary or {}).get("eps"))
    return self.eps if eps is None else eps

  @property
  def norm(self) -> str:
    """The norm the run trained in (``config.norm``), canonical: 'linf' or 'l2'."""
    return naming.norm_of(self.config)

  @property
  def analysis_norm(self) -> str:
    """The norm the analysis attacked in: its summary's (an analysis written
    before the norm was recorded ran in L-inf), else the training norm."""
    return naming.norm_of(self.summary) if self.summary else self.norm

  @property
  def threat_model(self) -> str:
    """The training threat model, e.g. 'L2 ε=1.5' or 'L-inf ε=8/255'."""
    return naming.threat_model_label(self.norm, self.eps, self.dataset)

  @property
  def analysis_threat_model(self) -> str:
    """The analysis' threat model, e.g. 'L2 ε=1.5'."""
    return naming.threat_model_label(self.analysis_norm, self.analysis_eps, self.dataset)

  @property
  def color(self) -> str:
    return methods.color(self.method)


def _as_float(value: Any) -> Optional[float]:
  """Floats, ints and fraction strings like ``"8/255"`` -> float, else None."""
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    try:
      return configlib.parse_number(value)
    except UserError:
      return None
  return None


def _available(pattern: str) -> List[str]:
  directory, pattern = os.path.split(pattern)
  return [os.path.basename(p) for p in fs.glob(directory, pattern)]


def load_run(workdir: str, which: str = "best") -> Run:
  """Reads whatever of a run's outputs exist (see the module docstring)."""
  config = rundir.read_json(os.path.join(workdir, "config.json")) or {}
  if not config:
    logging.info("%s: no config.json; the run is labelled by its directory.",
                 workdir)
  measures_path = os.path.join(workdir, "analysis", f"{which}_measures.npz")
  measures = None
  if fs.exists(measures_path):
    with fs.load_npz(measures_path) as data:
      measures = {k: data[k] for k in data.files}
  else:
    others = _available(os.path.join(workdir, "analysis", "*_measures.npz"))
    logging.info("%s: no analysis/%s_measures.npz%s.", workdir, which,
                 f" (found {others}; pass which=...)" if others else "")
  return Run(
      workdir=workdir, config=config,
      metrics=rundir.read_metrics(workdir),
      measures=measures,
      summary=rundir.read_json(
          os.path.join(workdir, "analysis", f"{which}_summary.json")),
      eval_results=rundir.read_json(
          os.path.join(workdir, "eval", f"{which}_results.json")))


def load_runs(workdirs: Sequence[str], which: str = "best") -> List[Run]:
  """Loads every existing workdir and gives each run a distinct label."""
  runs = []
  for workdir in workdirs:
    if not fs.is_dir(workdir):
      logging.warning("%s is not a directory; skipped.", workdir)
      continue
    runs.append(load_run(workdir, which))
  for run, label in zip(runs, distinct_labels(runs)):
    run.label = label
  return runs


# --------------------------------------------------------------------------
# Labels.
# --------------------------------------------------------------------------


def _field_text(run: Run, field: str) -> str:
  if field == "eps":  # an eps means something only with its norm
    return run.threat_model
  value = run.config.get(field)
  if field == "beta":
    return f"β={value:g}" if isinstance(value, (int, float)) else f"β={value}"
  if field == "num_bridges":
    return f"m={value}"
  if field == "seed":
    return f"seed {value}"
  return f"{field}={value}"


def distinct_labels(runs: Sequence[Run],
                    fields: Sequence[str] = ("eps", "beta", "num_bridges", "seed"),
                    append_dir: bool = True) -> List[str]:
  """Method names, extended by the config fields that tell same-method runs apart.

  Runs that share a method name get the fields (in ``fields`` order) whose
  values differ among them; if that still leaves duplicates and
  ``append_dir``, the directory name is appended.
  """
  base = [methods.display_name(run.method) for run in runs]
  labels = list(base)
  by_base = collections.defaultdict(list)
  for index, name in enumerate(base):
    by_base[name].append(index)
  for name, indices in by_base.items():
    if len(indices) == 1:
      continue
    varying = [f for f in fields
               if len({_field_text(runs[i], f) for i in indices}) > 1]
    for i in indices:
      extra = ", ".join(_field_text(runs[i], f) for f in varying)
      labels[i] = f"{name} ({extra})" if extra else name
  if not append_dir:
    return labels
  counts = collections.Counter(labels)
  return [f"{label} [{os.path.basename(os.path.normpath(run.workdir))}]"
          if counts[label] > 1 else label for label, run in zip(labels, runs)]


def _styles(runs: Sequence[Run]) -> List[Tuple[str, str]]:
  """(colour, linestyle) per run: colour by method, linestyle cycles within it."""
  seen = collections.Counter()
  styles = []
  for run in runs:
    styles.append((run.color, LINESTYLES[seen[run.method] % len(LINESTYLES)]))
    seen[run.method] += 1
  return styles


def _group(runs: Sequence[Run], key: Callable[[Run], Any]) -> Dict[Any, List[Run]]:
  groups = collections.OrderedDict()
  for run in runs:
    groups.setdefault(key(run), []).append(run)
  return groups


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() or c in "._" else "-" for c in text)


# --------------------------------------------------------------------------
# Data extraction.
# --------------------------------------------------------------------------


def metric_series(run: Run, key: str, x_key: str = "epoch"
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """``(x, y)`` over the metrics lines that have a finite ``key``.

  ``x`` is ``x_key`` (falling back to ``step`` where a line lacks it).
  """
  xs, ys = [], []
  for row in run.metrics:
    y = _as_float(row.get(key))
    x = _as_float(row.get(x_key, row.get("step")))
    if x is None or y is None or not math.isfinite(y):
      continue
    xs.append(x)
    ys.append(y)
  return np.asarray(xs), np.asarray(ys)


def _has_metric(run: Run, key: str) -> bool:
  return any(_as_float(row.get(key)) is not None for row in run.metrics)


def run_summary(run: Run) -> Optional[Dict[str, Any]]:
  """The analysis summary, recomputed from the measures if the JSON is absent."""
  if run.summary and "R_nat" in run.summary:
    return run.summary
  if run.measures is None:
    return None
  measures = dict(run.measures)
  measures.setdefault("correct_clean", measures["margin_clean"] > 0)
  measures.setdefault("correct_adv", measures["margin_adv"] > 0)
  return analysis.summarize(measures)


def at_training_threat_model(run: Run, record: Optional[Dict[str, Any]]) -> bool:
  """Whether ``record`` (evaluation results, an analysis summary) was made at
  the run's own norm and eps; one without an eps is taken to be."""
  if not record:
    return False
  eps = _as_float(record.get("eps"))
  return naming.norm_of(record) == run.norm and (
      eps is None or run.eps is None or abs(eps - run.eps) <= 1e-9)


def run_accuracies(run: Run, robust_key: str = "pgd_acc"
                   ) -> Tuple[Optional[float], Optional[float]]:
  """``(clean, robust)`` accuracy of a run at its training threat model.

  Sources in order: ``eval/{which}_results.json`` (``clean_acc``,
  ``robust_key``); the analysis summary (``clean_acc``, ``robust_acc`` under
  PGD^50); the last ``eval/clean_acc`` / ``eval/pgd_acc`` in metrics.jsonl
  (measured during training, at its norm and eps). Results and summaries
  made at another norm or eps are passed over (logged): their robust
  accuracy belongs to another threat model.
  """
  sources = []
  if at_training_threat_model(run, run.eval_results):
    sources.append((run.eval_results.get("clean_acc"),
                    run.eval_results.get(robust_key)))
  elif run.eval_results:
    logging.info("%s: its evaluation results are at %s, not at the training %s; "
                 "not used for accuracy against eps.", run.workdir,
                 naming.threat_model_label(naming.norm_of(run.eval_results),
                                           _as_float(run.eval_results.get("eps")),
                                           run.dataset), run.threat_model)
  summary = run_summary(run)
  if summary and (summary is not run.summary
                  or at_training_threat_model(run, run.summary)):
    sources.append((summary.get("clean_acc"), summary.get("robust_acc")))
  if run.metrics:
    clean = metric_series(run, "eval/clean_acc")[1]
    robust = metric_series(run, "eval/pgd_acc")[1]
    sources.append((clean[-1] if clean.size else None,
                    robust[-1] if robust.size else None))
  clean = next((_as_float(c) for c, _ in sources if _as_float(c) is not None), None)
  robust = next((_as_float(r) for _, r in sources if _as_float(r) is not None), None)
  return clean, robust
