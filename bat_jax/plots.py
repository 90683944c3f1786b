"""The paper's figures, drawn from the files that training, evaluation and
analysis write into each run's workdir.

Inputs per workdir (each optional; a figure is drawn from the runs that have
its data, and the others are skipped with a log line):
  * ``metrics.jsonl``    training metrics (``train/*``, ``eval/*``, ``diag/*``);
  * ``config.json``      the run's config (``method``, ``eps``, ``dataset``, ...);
  * ``analysis/{which}_measures.npz`` and ``{which}_summary.json``
                         from :mod:`bat_jax.analysis`;
  * ``eval/{which}_results.json`` from evaluation.

Figures (PNG):
  fig2  margin ``M(x)`` and smoothness ``KL(p||p*)`` histograms;
  fig3  clean / robust accuracy against the training eps;
  fig4  cosine between each loss term's descent direction and ``grad M``;
  fig5  ``log alpha_y`` and ``-log alpha_t`` histograms;
  fig6  expected margin increase and actual margin during training;
  fig7  normalised gradient norm during training;
  fig8  ``(M(x), M(x*))`` quadrant scatter coloured by KL (Figure B.1 on MNIST).

Usage: ``python -m bat_jax.plots --workdirs runs/at runs/trades --out_dir figs``.
Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg), so
importing this module never changes the pyplot backend.
"""

import argparse
import collections
import dataclasses
import glob
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.figure import Figure

from bat_jax import analysis

METHOD_NAMES = {"standard": "Standard", "at": "AT", "trades": "TRADES",
                "mart": "MART", "bat": "BAT"}
METHOD_COLORS = {"standard": "tab:gray", "at": "tab:orange",
                 "trades": "tab:blue", "mart": "tab:purple", "bat": "tab:red"}
LINESTYLES = ("-", "--", "-.", ":")
DPI = 120
# Keys that may hold the actual margin during training (Figure 6, bottom).
MARGIN_KEYS = ("diag/margin", "train/margin", "eval/margin")


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
  def color(self) -> str:
    return METHOD_COLORS.get(self.method, "black")


def _as_float(value: Any) -> Optional[float]:
  """Floats, ints and fraction strings like ``"8/255"`` -> float, else None."""
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    try:
      if "/" in value:
        num, den = value.split("/", 1)
        return float(num) / float(den)
      return float(value)
    except (ValueError, ZeroDivisionError):
      return None
  return None


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """The JSON objects of a JSONL file; blank or truncated lines are skipped."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d is not valid JSON; skipped.", path, line_number)
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def _available(pattern: str) -> List[str]:
  return sorted(os.path.basename(p) for p in glob.glob(pattern))


def load_run(workdir: str, which: str = "best") -> Run:
  """Reads whatever of a run's outputs exist (see the module docstring)."""
  config = _read_json(os.path.join(workdir, "config.json")) or {}
  if not config:
    logging.info("%s: no config.json; the run is labelled by its directory.",
                 workdir)
  measures_path = os.path.join(workdir, "analysis", f"{which}_measures.npz")
  measures = None
  if os.path.exists(measures_path):
    with np.load(measures_path) as data:
      measures = {k: data[k] for k in data.files}
  else:
    others = _available(os.path.join(workdir, "analysis", "*_measures.npz"))
    logging.info("%s: no analysis/%s_measures.npz%s.", workdir, which,
                 f" (found {others}; pass which=...)" if others else "")
  return Run(
      workdir=workdir, config=config,
      metrics=read_metrics(os.path.join(workdir, "metrics.jsonl")),
      measures=measures,
      summary=_read_json(
          os.path.join(workdir, "analysis", f"{which}_summary.json")),
      eval_results=_read_json(
          os.path.join(workdir, "eval", f"{which}_results.json")))


def load_runs(workdirs: Sequence[str], which: str = "best") -> List[Run]:
  """Loads every existing workdir and gives each run a distinct label."""
  runs = []
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      logging.warning("%s is not a directory; skipped.", workdir)
      continue
    runs.append(load_run(workdir, which))
  for run, label in zip(runs, distinct_labels(runs)):
    run.label = label
  return runs


# --------------------------------------------------------------------------
# Labels.
# --------------------------------------------------------------------------


def format_eps(eps: Optional[float], dataset: str = "") -> str:
  """``8/255`` style for image data sets other than MNIST, else ``0.3``."""
  if eps is None:
    return "?"
  scaled = eps * 255
  if "mnist" not in dataset.lower() and eps > 0 and abs(scaled - round(scaled)) < 1e-3:
    return f"{int(round(scaled))}/255"
  return f"{eps:g}"


def _field_text(run: Run, field: str) -> str:
  if field == "eps":
    return "ε=" + format_eps(run.eps, run.dataset)
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
  base = [METHOD_NAMES.get(run.method, run.method) for run in runs]
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


def run_accuracies(run: Run, robust_key: str = "pgd_acc"
                   ) -> Tuple[Optional[float], Optional[float]]:
  """``(clean, robust)`` accuracy of a run, from the best source it has.

  Sources in order: ``eval/{which}_results.json`` (``clean_acc``,
  ``robust_key``); the analysis summary (``clean_acc``, ``robust_acc`` under
  PGD^50); the last ``eval/clean_acc`` / ``eval/pgd_acc`` in metrics.jsonl.
  """
  sources = []
  if run.eval_results:
    sources.append((run.eval_results.get("clean_acc"),
                    run.eval_results.get(robust_key)))
  summary = run_summary(run)
  if summary:
    sources.append((summary.get("clean_acc"), summary.get("robust_acc")))
  if run.metrics:
    clean = metric_series(run, "eval/clean_acc")[1]
    robust = metric_series(run, "eval/pgd_acc")[1]
    sources.append((clean[-1] if clean.size else None,
                    robust[-1] if robust.size else None))
  clean = next((_as_float(c) for c, _ in sources if _as_float(c) is not None), None)
  robust = next((_as_float(r) for _, r in sources if _as_float(r) is not None), None)
  return clean, robust


# --------------------------------------------------------------------------
# Figures. Each takes runs that have its data and writes one PNG.
# --------------------------------------------------------------------------


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  logging.info("wrote %s", path)
  return path


def _fraction_weights(values: np.ndarray) -> np.ndarray:
  return np.full(values.shape, 1.0 / max(values.size, 1))


def _log_bins(values: Sequence[np.ndarray], num: int = 50) -> np.ndarray:
  """Log-spaced bins for values spanning many decades (KL).

  The first edge is the 0.5th percentile of the positive values; callers
  clamp smaller values (and zeros) into the first bin.
  """
  pooled = np.concatenate([np.ravel(v) for v in values])
  positive = pooled[pooled > 0]
  low = max(float(np.percentile(positive, 0.5)) if positive.size else 1e-6, 1e-8)
  high = max(float(pooled.max()), low * 10)
  return np.logspace(np.log10(low), np.log10(high), num)


def plot_margin_smoothness(runs: Sequence[Run], path: str) -> str:
  """Figure 2: histograms of ``M(x)`` (a) and ``KL(p(x)||p(x*))`` (b), runs overlaid."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  ax_margin, ax_kl = fig.subplots(1, 2)
  margin_bins = np.linspace(-1, 1, 41)
  kl_bins = _log_bins([run.measures["kl"] for run in runs])
  for run, (color, style) in zip(runs, _styles(runs)):
    margin = np.asarray(run.measures["margin_clean"], np.float64)
    kl = np.maximum(np.asarray(run.measures["kl"], np.float64), kl_bins[0])
    for ax, values, bins in ((ax_margin, margin, margin_bins), (ax_kl, kl, kl_bins)):
      ax.hist(values, bins=bins, weights=_fraction_weights(values),
              histtype="step", linewidth=1.6, color=color, linestyle=style,
              label=run.label)
  ax_margin.set(xlabel="margin M(x)", ylabel="fraction of examples",
                title="(a) margin (higher is better)")
  ax_kl.set(xscale="log", xlabel="KL(p(x) || p(x*))  (first bin: all below it)",
            ylabel="fraction of examples", title="(b) smoothness (lower is better)")
  ax_margin.legend(loc="upper left")
  return _save(fig, path)


def plot_accuracy_vs_eps(runs: Sequence[Run], path: str,
                         robust_key: str = "pgd_acc") -> str:
  """Figure 3: clean (dotted) and robust (solid) accuracy against the training eps.

  One line per method variant (method plus any differing beta / m); runs
  with the same variant and eps (seeds) are averaged, with +-1 std bars.
  """
  # Runs differing only in seed (or eps) share a variant and are averaged.
  variants = distinct_labels(runs, fields=("beta", "num_bridges"),
                             append_dir=False)
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  cifar_like = all("mnist" not in run.dataset.lower() for run in runs)
  scale = 255.0 if cifar_like else 1.0
  for variant, members in _group(list(zip(variants, runs)), lambda vr: vr[0]).items():
    run0 = members[0][1]
    by_eps = collections.defaultdict(lambda: ([], []))
    for _, run in members:
      clean, robust = run_accuracies(run, robust_key)
      if clean is not None:
        by_eps[run.eps][0].append(clean)
      if robust is not None:
        by_eps[run.eps][1].append(robust)
    eps_values = sorted(by_eps)
    for which, style in ((0, ":"), (1, "-")):
      points = [(e * scale, np.mean(by_eps[e][which]), np.std(by_eps[e][which]))
                for e in eps_values if by_eps[e][which]]
      if not points:
        continue
      x, mean, std = (np.asarray(v) for v in zip(*points))
      ax.errorbar(x, 100 * mean, yerr=100 * std, color=run0.color,
                  linestyle=style, marker="o", markersize=4, capsize=3,
                  label=f"{variant} ({'clean' if which == 0 else 'robust'})")
  ax.set(xlabel="training and evaluation ε" + (" (×1/255)" if cifar_like else ""),
         ylabel="accuracy (%)", title="Accuracy against the maximum perturbation")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  return _save(fig, path)


def _cosine_terms(runs: Sequence[Run]) -> List[str]:
  """Loss-term names ``t`` with ``diag/cos_t_margin`` in any run (total last)."""
  terms = set()
  for run in runs:
    for row in run.metrics:
      for key in row:
        if key.startswith("diag/cos_") and key.endswith("_margin"):
          terms.add(key[len("diag/cos_"):-len("_margin")])
  ordered = sorted(terms - {"total"})
  return ordered or sorted(terms)


def plot_gradient_cosines(runs: Sequence[Run], path: str) -> str:
  """Figure 4: cosine of each term's descent direction with ``grad M(x)``.

  Top row: the cosine against the epoch; bottom row: the same as an angle
  to ``grad M`` (polar, radius = epoch), as the paper draws it.
  """
  terms = _cosine_terms(runs)
  fig = Figure(figsize=(4.5 * len(terms), 8), layout="constrained")
  styles = _styles(runs)
  for column, term in enumerate(terms):
    key = f"diag/cos_{term}_margin"
    ax = fig.add_subplot(2, len(terms), column + 1)
    polar = fig.add_subplot(2, len(terms), len(terms) + column + 1,
                            projection="polar")
    for run, (color, style) in zip(runs, styles):
      epoch, cosine = metric_series(run, key)
      if not cosine.size:
        continue
      ax.plot(epoch, cosine, color=color, linestyle=style, label=run.label)
      angle = np.arccos(np.clip(cosine, -1.0, 1.0))
      polar.plot(angle, epoch, color=color, linestyle=style, marker=".",
                 markersize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(ylim=(-1.05, 1.05), xlabel="epoch",
           ylabel="cos(−∇ term, ∇M(x))", title=f"term: {term}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    polar.set_thetamin(0)
    polar.set_thetamax(180)
    polar.yaxis.set_major_locator(ticker.MaxNLocator(4))
    polar.tick_params(labelsize="small")
    polar.set_title("angle to ∇M(x) (radius: epoch)", fontsize="small")
  return _save(fig, path)


def _plot_curves(ax, runs: Sequence[Run], key_options: Sequence[str],
                 x_key: str = "epoch") -> None:
  for run, (color, style) in zip(runs, _styles(runs)):
    key = next((k for k in key_options if _has_metric(run, k)), None)
    if key is None:
      continue
    x, y = metric_series(run, key, x_key)
    ax.plot(x, y, color=color, linestyle=style, label=run.label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")


def plot_margin_increase(runs: Sequence[Run], path: str) -> str:
  """Figure 6: expected margin increase ``∇M·(−∇loss)`` (top) and ``M(x)`` (bottom)."""
  fig = Figure(figsize=(7, 7), layout="constrained")
  top, bottom = fig.subplots(2, 1, sharex=True)
  _plot_curves(top, [r for r in runs if _has_metric(r, "diag/margin_increase")],
               ["diag/margin_increase"])
  top.axhline(0.0, color="black", linewidth=0.8)
  top.set(ylabel="expected margin increase", title="−∇M(x) · ∇ℓ")
  with_margin = [r for r in runs if any(_has_metric(r, k) for k in MARGIN_KEYS)]
  if with_margin:
    _plot_curves(bottom, with_margin, MARGIN_KEYS)
  bottom.set(xlabel="epoch", ylabel="margin M(x)")
  return _save(fig, path)


def plot_grad_norm_ratio(runs: Sequence[Run], path: str) -> str:
  """Figure 7: normalised gradient norm ``||∇ℓ|| / |ℓ|`` against the training step."""
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  _plot_curves(ax, runs, ["diag/grad_norm_ratio"], x_key="step")
  ax.set(xlabel="training step (batch)", ylabel="||∇ℓ||₂ / |ℓ|", yscale="log",
         title="Normalised gradient norm")
  return _save(fig, path)


def _panel_grid(num: int, max_columns: int = 3) -> Tuple[int, int]:
  columns = min(num, max_columns)
  return int(math.ceil(num / columns)), columns


def plot_log_alpha(runs: Sequence[Run], path: str) -> str:
  """Figure 5: ``log α_y`` (red) and ``−log α_t`` (blue), one panel per run.

  Proposition 1 assumes both are positive: the attack lowers ``p_y`` and
  raises ``p_t``.
  """
  rows, columns = _panel_grid(len(runs))
  fig = Figure(figsize=(5 * columns, 3.8 * rows), layout="constrained")
  for index, run in enumerate(runs):
    ax = fig.add_subplot(rows, columns, index + 1)
    true = np.asarray(run.measures["log_alpha_true"], np.float64)
    target = -np.asarray(run.measures["log_alpha_target"], np.float64)
    pooled = np.concatenate([true, target])
    low, high = np.percentile(pooled, [0.5, 99.5]) if pooled.size else (0, 1)
    bins = np.linspace(min(low, 0.0), max(high, low + 1e-3), 50)
    ax.hist(np.clip(true, bins[0], bins[-1]), bins=bins, alpha=0.6,
            color="tab:red", weights=_fraction_weights(true),
            label=f"log α_y ({100 * np.mean(true > 0):.1f}% > 0)")
    ax.hist(np.clip(target, bins[0], bins[-1]), bins=bins, alpha=0.6,
            color="tab:blue", weights=_fraction_weights(target),
            label=f"−log α_t ({100 * np.mean(target > 0):.1f}% > 0)")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="log ratio", ylabel="fraction of examples",
           title=f"{run.label}, ε={format_eps(run.analysis_eps, run.dataset)}")
    ax.legend(fontsize="small")
  return _save(fig, path)


def plot_quadrants(runs: Sequence[Run], path: str) -> str:
  """Figure 8 / B.1: ``M(x)`` against ``M(x*)`` coloured by KL, with marginals.

  Top histogram: ``M(x)``; right histogram: ``M(x*)``. The panel text gives
  ``R_nat`` (quadrants II+III), ``R_bdy`` (quadrant IV) and the fractions of
  margins above 0.9 (appendix B.1). High KL (poor smoothness) is red and
  drawn on top.
  """
  kl_all = np.concatenate([np.ravel(run.measures["kl"]) for run in runs])
  positive = kl_all[kl_all > 0]
  vmin = max(float(np.percentile(positive, 1)) if positive.size else 1e-6, 1e-8)
  vmax = max(float(kl_all.max()), vmin * 10)
  norm = mcolors.LogNorm(vmin=vmin, vmax=vmax)

  fig = Figure(figsize=(5.2 * len(runs) + 0.8, 5.4))
  outer = fig.add_gridspec(1, len(runs) + 1,
                           width_ratios=[1.0] * len(runs) + [0.05], wspace=0.25)
  bins = np.linspace(-1, 1, 41)
  scatter = None
  for index, run in enumerate(runs):
    inner = outer[0, index].subgridspec(2, 2, width_ratios=[4, 1],
                                        height_ratios=[1, 4], wspace=0.05,
                                        hspace=0.05)
    ax = fig.add_subplot(inner[1, 0])
    top = fig.add_subplot(inner[0, 0], sharex=ax)
    right = fig.add_subplot(inner[1, 1], sharey=ax)
    m_clean = np.asarray(run.measures["margin_clean"], np.float64)
    m_adv = np.asarray(run.measures["margin_adv"], np.float64)
    kl = np.clip(np.asarray(run.measures["kl"], np.float64), vmin, vmax)
    order = np.argsort(kl)
    scatter = ax.scatter(m_clean[order], m_adv[order], c=kl[order], s=4,
                         cmap="coolwarm", norm=norm, linewidths=0)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    for text, (x, y) in (("I", (0.97, 0.97)), ("II", (0.03, 0.97)),
                         ("III", (0.03, 0.03)), ("IV", (0.97, 0.03))):
      ax.text(x, y, text, transform=ax.transAxes, color="gray",
              ha="right" if x > 0.5 else "left", va="top" if y > 0.5 else "bottom")
    summary = run_summary(run)
    ax.text(0.04, 0.9,
            f"R_nat = {100 * summary['R_nat']:.1f}%\n"
            f"R_bdy = {100 * summary['R_bdy']:.1f}%\n"
            f"M(x) > 0.9: {100 * summary['frac_high_margin_clean']:.1f}%\n"
            f"M(x*) > 0.9: {100 * summary['frac_high_margin_adv']:.1f}%",
            transform=ax.transAxes, fontsize="small", va="top",
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel="M(x)",
           ylabel="M(x*)" if index == 0 else None)
    top.hist(m_clean, bins=bins, color="gray")
    right.hist(m_adv, bins=bins, color="gray", orientation="horizontal")
    top.tick_params(labelbottom=False, labelleft=False, left=False)
    right.tick_params(labelleft=False, labelbottom=False, bottom=False)
    top.set_title(f"{run.label}, ε={format_eps(run.analysis_eps, run.dataset)}")
  colorbar = fig.colorbar(scatter, cax=fig.add_subplot(outer[0, -1]))
  colorbar.set_label("KL(p(x) || p(x*))")
  return _save(fig, path)


# --------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------


def _eps_slug(eps: Optional[float], dataset: str) -> str:
  return "eps" + _slug(format_eps(eps, dataset))


def make_all_figures(workdirs: Sequence[str], out_dir: str, *,
                     which: str = "best",
                     robust_key: str = "pgd_acc") -> List[str]:
  """Draws every figure the workdirs have data for; returns the PNG paths.

  Runs are grouped by data set (and, for the analysis figures 2 and 8, by
  the attack eps), one PNG per group, named
  ``fig<N>_<what>_<dataset>[_eps<eps>].png``. A figure without data is
  skipped and logged.
  """
  runs = load_runs(workdirs, which)
  paths = []

  def draw(name: str, plot: Callable[..., str], selected: Sequence[Run],
           group_key: Callable[[Run], Any], suffix: Callable[[Any], str],
           **kwargs) -> None:
    if not selected:
      logging.info("%s: no run has the data; skipped.", name)
      return
    for key, members in _group(selected, group_key).items():
      # Labels only tell apart the runs that share this figure.
      for run, label in zip(members, distinct_labels(members)):
        run.label = label
      path = os.path.join(out_dir, f"{name}_{suffix(key)}.png")
      paths.append(plot(members, path, **kwargs))

  with_measures = [r for r in runs if r.measures is not None]
  by_dataset = lambda r: r.dataset
  by_dataset_eps = lambda r: (r.dataset, r.analysis_eps)
  dataset_name = _slug
  dataset_eps_name = lambda key: f"{_slug(key[0])}_{_eps_slug(key[1], key[0])}"

  draw("fig2_margin_smoothness", plot_margin_smoothness, with_measures,
       by_dataset_eps, dataset_eps_name)
  draw("fig3_accuracy_vs_eps", plot_accuracy_vs_eps,
       [r for r in runs if r.eps is not None
        and any(v is not None for v in run_accuracies(r, robust_key))],
       by_dataset, dataset_name, robust_key=robust_key)
  draw("fig4_gradient_cosines", plot_gradient_cosines,
       [r for r in runs if _cosine_terms([r])], by_dataset, dataset_name)
  draw("fig5_log_alpha", plot_log_alpha,
       [r for r in with_measures
        if {"log_alpha_true", "log_alpha_target"} <= set(r.measures)],
       by_dataset, dataset_name)
  draw("fig6_margin_increase", plot_margin_increase,
       [r for r in runs if _has_metric(r, "diag/margin_increase")],
       by_dataset, dataset_name)
  draw("fig7_grad_norm_ratio", plot_grad_norm_ratio,
       [r for r in runs if _has_metric(r, "diag/grad_norm_ratio")],
       by_dataset, dataset_name)
  draw("fig8_quadrants", plot_quadrants, with_measures, by_dataset_eps,
       dataset_eps_name)
  return paths


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
  parser = argparse.ArgumentParser(
      prog="python -m bat_jax.plots",
      description="Draw the paper's figures from trained run workdirs.")
  parser.add_argument("--workdirs", nargs="+", required=True,
                      help="run directories (metrics.jsonl, config.json, "
                           "analysis/, eval/)")
  parser.add_argument("--out_dir", required=True, help="where the PNGs go")
  parser.add_argument("--which", default="best",
                      help="checkpoint name of the analysis/eval files")
  parser.add_argument("--robust_key", default="pgd_acc",
                      help="robust accuracy key of eval/{which}_results.json "
                           "for Figure 3 (e.g. autoattack_acc)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  paths = make_all_figures(args.workdirs, args.out_dir, which=args.which,
                           robust_key=args.robust_key)
  for path in paths:
    print(path)
  return paths


if __name__ == "__main__":
  main()
