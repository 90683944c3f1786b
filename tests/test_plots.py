"""Every figure of bat_jax.plots renders from small synthetic run outputs."""

import json
import logging
import os
import zlib

import numpy as np
import pytest

from absl import flags

from bat_jax import analysis as analysis_lib
from bat_jax import naming, plots
from bat_jax.plots import __main__ as plots_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root, name, *, method, eps, seed=0, dataset="mnist",
               metrics=True, analysis=True, evaluation=True, which="best",
               num_examples=200):
  """A fake workdir with the files training, analysis and evaluation write."""
  workdir = root / name
  workdir.mkdir()
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  config = dict(method=method, eps=eps, dataset=dataset, beta=5.0,
                num_bridges=2, seed=seed)
  (workdir / "config.json").write_text(json.dumps(config))

  if metrics:
    lines = []
    for step in range(0, 401, 50):
      epoch = step / 100
      row = {"step": step, "epoch": epoch,
             "train/loss": 2.0 / (1 + epoch), "train/ce": 1.5 / (1 + epoch),
             "diag/cos_ce_margin": 0.8 - 0.1 * epoch + 0.05 * rng.normal(),
             "diag/cos_total_margin": 0.5,
             "diag/margin_increase": 0.1 * rng.normal(),
             "diag/grad_norm_ratio": 1.0 + rng.uniform(),
             "diag/margin": min(0.9, 0.1 * (1 + epoch))}
      if method != "at":
        row["diag/cos_kl_margin"] = -0.3 - 0.1 * epoch
      if step % 100 == 0:
        row.update({"eval/clean_acc": 0.9, "eval/pgd_acc": 0.5 + 0.01 * epoch})
      lines.append(json.dumps(row))
    lines.append('{"step": 999, "train/lo')  # a line cut off by a crash
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

  if analysis:
    m_clean = np.clip(rng.normal(0.7, 0.4, num_examples), -1, 1)
    m_adv = np.clip(m_clean - rng.uniform(0, 1.2, num_examples), -1, 1)
    measures = dict(
        margin_clean=m_clean, margin_adv=m_adv,
        kl=rng.exponential(0.5, num_examples) * (rng.uniform(size=num_examples) > 0.05),
        log_alpha_true=rng.normal(1.0, 1.0, num_examples),
        log_alpha_target=rng.normal(-1.5, 1.0, num_examples),
        correct_clean=m_clean > 0, correct_adv=m_adv > 0)
    analysis_dir = workdir / "analysis"
    analysis_dir.mkdir()
    np.savez(analysis_dir / f"{which}_measures.npz", **measures)
    summary = analysis_lib.summarize(measures)
    summary["eps"] = eps
    (analysis_dir / f"{which}_summary.json").write_text(json.dumps(summary))

  if evaluation:
    (workdir / "eval").mkdir()
    (workdir / "eval" / f"{which}_results.json").write_text(json.dumps(
        {"clean_acc": 0.99 - eps / 10, "pgd_acc": 0.95 - eps + 0.01 * seed,
         "fgsm_acc": 0.97 - eps, "eps": eps}))
  return str(workdir)


def _assert_png(path):
  assert os.path.getsize(path) > 1000, path
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC, path


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  workdirs = [
      _write_run(root, "at", method="at", eps=0.3),
      _write_run(root, "trades", method="trades", eps=0.3),
      _write_run(root, "bat_s0", method="bat", eps=0.3, seed=0),
      _write_run(root, "bat_s1", method="bat", eps=0.3, seed=1,
                 analysis=False, metrics=False),
      _write_run(root, "bat_eps45", method="bat", eps=0.45, analysis=False),
      _write_run(root, "c10_trades", method="trades", eps=8 / 255,
                 dataset="cifar10", metrics=False, evaluation=False),
  ]
  empty = root / "empty"
  empty.mkdir()
  return root, workdirs + [str(empty), str(root / "does_not_exist")]


@pytest.mark.slow
def test_make_all_figures_renders_every_figure(runs_root, tmp_path):
  _, workdirs = runs_root
  paths = plots.make_all_figures(workdirs, str(tmp_path / "figs"))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted([
      "fig2_margin_smoothness_mnist_linf_eps0.3.png",
      "fig2_margin_smoothness_cifar10_linf_eps8-255.png",
      "fig3_accuracy_vs_eps_mnist_linf.png",
      "fig3_accuracy_vs_eps_cifar10_linf.png",
      "fig4_gradient_cosines_mnist_linf.png",
      "fig5_log_alpha_mnist_linf.png",
      "fig5_log_alpha_cifar10_linf.png",
      "fig6_margin_increase_mnist_linf.png",
      "fig7_grad_norm_ratio_mnist_linf.png",
      "fig8_quadrants_mnist_linf_eps0.3.png",
      "fig8_quadrants_cifar10_linf_eps8-255.png",
  ])
  for path in paths:
    _assert_png(path)


def test_cli_and_missing_data(runs_root, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  root, _ = runs_root
  out_dir = tmp_path / "cli"
  # A run with metrics only draws the training curves (and the accuracy
  # from its last eval/* metrics); "last" analysis files do not exist.
  fv = flags.FlagValues()
  plots_cli.define_flags(fv)
  fv(["prog", f"--workdirs={root / 'trades'},{root / 'empty'}", f"--out_dir={out_dir}",
      "--which=last"])
  paths = plots_cli.run_from_flags(fv)
  assert sorted(os.path.basename(p)[:4] for p in paths) == [
      "fig3", "fig4", "fig6", "fig7"]
  for path in paths:
    _assert_png(path)
  assert "no run has the data" in caplog.text
  assert plots.make_all_figures([str(root / "empty")], str(out_dir)) == []


def test_loading_and_labels(runs_root):
  root, _ = runs_root
  runs = plots.load_runs([str(root / n) for n in
                          ("at", "bat_s0", "bat_s1", "bat_eps45")])
  assert [r.label for r in runs] == [
      "AT", "BAT (L-inf ε=0.3, seed 0)", "BAT (L-inf ε=0.3, seed 1)",
      "BAT (L-inf ε=0.45, seed 0)"]
  at = runs[0]
  assert len(at.metrics) == 9  # the truncated line is skipped
  assert plots.run_accuracies(at) == (pytest.approx(0.96), pytest.approx(0.65))
  assert runs[2].measures is None and runs[2].summary is None
  epochs, cosines = plots.runs.metric_series(at, "diag/cos_ce_margin")
  assert epochs.tolist() == [s / 100 for s in range(0, 401, 50)]
  assert cosines.shape == epochs.shape


def test_format_eps():
  assert naming.format_eps(8 / 255, "cifar10") == "8/255"
  assert naming.format_eps(0.3, "mnist") == "0.3"
  assert naming.format_eps(0.2, "mnist") == "0.2"  # 51/255 on MNIST is written 0.2
  assert naming.format_eps(0.3, "cifar10") == "0.3"
  assert naming.format_eps(0.031, "cifar10") == "0.031"  # not 8/255
  assert naming.format_eps(0.0, "cifar10") == "0"
  assert naming.format_eps(None) == "?"
