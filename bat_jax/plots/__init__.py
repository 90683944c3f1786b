"""The paper's figures, drawn from the files that training, evaluation and
analysis write into each run's workdir.

  python -m bat_jax.plots --workdirs=runs/at,runs/trades --out_dir=figs

``runs.py`` reads the workdirs (each file optional: a figure is drawn from
the runs that have its data, and the others are skipped with a log line),
``figures.py`` draws each figure, :func:`make_all_figures` draws them all,
grouped by data set and threat model (norm, and eps where a figure is at one):
runs of different threat models never share a figure.
"""

import logging
import os
from typing import Any, Callable, List, Optional, Sequence

from bat_jax import fs, naming
from bat_jax.plots.figures import (_cosine_terms, plot_accuracy_vs_eps,
                                   plot_grad_norm_ratio, plot_gradient_cosines,
                                   plot_log_alpha, plot_margin_increase,
                                   plot_margin_smoothness, plot_quadrants)
from bat_jax.plots.runs import (Run, _group, _has_metric, _slug, distinct_labels,
                                load_runs, run_accuracies)




def _eps_slug(eps: Optional[float], dataset: str, norm: str) -> str:
  return "eps" + _slug(naming.format_eps(eps, dataset, norm))


def make_all_figures(workdirs: Sequence[str], out_dir: str, *,
                     which: str = "best",
                     robust_key: str = "pgd_acc") -> List[str]:
  """Draws every figure the workdirs have data for; returns the PNG paths.

  Runs are grouped by data set and norm (training figures: the training
  norm; analysis figures: the analysis' norm and, for figures 2 and 8, its
  eps), one PNG per group, named ``fig<N>_<what>_<dataset>_<norm>[_eps<eps>].png``
  (norm: linf or l2). A figure without data is skipped and logged.
  """
  fs.check_writable(out_dir, "figures folder (--out_dir)")
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
  by_dataset = lambda r: (r.dataset, r.norm)
  by_analysis = lambda r: (r.dataset, r.analysis_norm)
  by_dataset_eps = lambda r: (r.dataset, r.analysis_norm, r.analysis_eps)
  dataset_name = lambda key: f"{_slug(key[0])}_{key[1]}"
  dataset_eps_name = (lambda key: f"{_slug(key[0])}_{key[1]}_"
                      f"{_eps_slug(key[2], key[0], key[1])}")

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
       by_analysis, dataset_name)
  draw("fig6_margin_increase", plot_margin_increase,
       [r for r in runs if _has_metric(r, "diag/margin_increase")],
       by_dataset, dataset_name)
  draw("fig7_grad_norm_ratio", plot_grad_norm_ratio,
       [r for r in runs if _has_metric(r, "diag/grad_norm_ratio")],
       by_dataset, dataset_name)
  draw("fig8_quadrants", plot_quadrants, with_measures, by_dataset_eps,
       dataset_eps_name)
  return paths
