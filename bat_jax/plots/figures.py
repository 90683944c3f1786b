"""The paper's figures, one function each: runs in, one PNG out.

  fig2  margin ``M(x)`` and smoothness ``KL(p||p*)`` histograms;
  fig3  clean / robust accuracy against the training eps;
  fig4  cosine between each loss term's descent direction and ``grad M``;
  fig5  ``log alpha_y`` and ``-log alpha_t`` histograms;
  fig6  expected margin increase and actual margin during training;
  fig7  normalised gradient norm during training;
  fig8  ``(M(x), M(x*))`` quadrant scatter coloured by KL (Figure B.1 on MNIST).

Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg), so
importing this module never changes the pyplot backend.
"""

import collections
import io
import logging
import math
from typing import List, Sequence, Tuple

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.figure import Figure

from bat_jax import fs, naming
from bat_jax.plots.runs import (Run, _group, _has_metric, _styles, distinct_labels,
                                metric_series, run_accuracies, run_summary)

DPI = 120
# Keys that may hold the actual margin during training (Figure 6, bottom).
MARGIN_KEYS = ("diag/margin", "train/margin", "eval/margin")




def _trained_at(runs: Sequence[Run]) -> str:
  """'trained at L2 1.5' (the training threat models of the runs drawn)."""
  return "trained at " + ", ".join(dict.fromkeys(run.threat_model for run in runs))


def _save(fig: Figure, path: str) -> str:
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
  fs.write_bytes(path, png.getvalue())
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
  fig.suptitle("PGD at " + ", ".join(dict.fromkeys(r.analysis_threat_model for r in runs)))
  return _save(fig, path)


def plot_accuracy_vs_eps(runs: Sequence[Run], path: str,
                         robust_key: str = "pgd_acc") -> str:
  """Figure 3: clean (dotted) and robust (solid) accuracy against the training eps.

  One line per method variant (method plus any differing beta / m); runs
  with the same variant and eps (seeds) are averaged, with +-1 std bars.
  Every run must share one norm (``make_all_figures`` groups them so): an
  L-inf and an L2 radius are no points of one curve.
  """
  norms = sorted({run.norm for run in runs})
  if len(norms) != 1:
    raise ValueError(f"plot_accuracy_vs_eps: runs of norms {norms} on one axis; "
                     "draw each norm on its own (make_all_figures does).")
  norm = norms[0]
  # Runs differing only in seed (or eps) share a variant and are averaged.
  variants = distinct_labels(runs, fields=("beta", "num_bridges"),
                             append_dir=False)
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  per_255 = norm == "linf" and all("mnist" not in run.dataset.lower() for run in runs)
  scale = 255.0 if per_255 else 1.0
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
  ax.set(xlabel=f"training and evaluation {naming.norm_label(norm)} ε"
         + (" (×1/255)" if per_255 else ""), ylabel="accuracy (%)",
         title=f"Accuracy against the maximum {naming.norm_label(norm)} perturbation")
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
  fig.suptitle(_trained_at(runs))
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
  fig.suptitle(_trained_at(runs))
  return _save(fig, path)


def plot_grad_norm_ratio(runs: Sequence[Run], path: str) -> str:
  """Figure 7: normalised gradient norm ``||∇ℓ|| / |ℓ|`` against the training step."""
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  _plot_curves(ax, runs, ["diag/grad_norm_ratio"], x_key="step")
  ax.set(xlabel="training step (batch)", ylabel="||∇ℓ||₂ / |ℓ|", yscale="log",
         title="Normalised gradient norm")
  fig.suptitle(_trained_at(runs))
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
           title=f"{run.label}, {run.analysis_threat_model}")
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
    top.set_title(f"{run.label}, {run.analysis_threat_model}")
  colorbar = fig.colorbar(scatter, cax=fig.add_subplot(outer[0, -1]))
  colorbar.set_label("KL(p(x) || p(x*))")
  return _save(fig, path)
