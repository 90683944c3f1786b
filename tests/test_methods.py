"""A new training method is one registry entry plus its loss (docs/LAYOUT.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import configlib, losses, methods, plots, rundir, train
from bat_jax.evaluation import report
from test_train import tiny_config


def clean_plus_adv(config, forward, x, x_adv, labels):
  """Half clean CE, half adversarial CE."""
  del config
  clean, adv = forward.many([x, x_adv])
  ce = losses.cross_entropy
  loss = 0.5 * jnp.mean(ce(clean, labels)) + 0.5 * jnp.mean(ce(adv, labels))
  return loss, {"ce": loss}, {"clean": clean, "adv": adv}


@pytest.fixture
def toy_method():
  """The method of docs/LAYOUT.md, registered as the docs say; removed after the test."""
  method = methods.register(methods.Method(
      "half", clean_plus_adv, attack_objective="ce",
      display_name="Half", color="tab:green"))
  try:
    yield method
  finally:
    del methods.METHODS["half"]


@pytest.mark.slow
def test_a_registered_method_trains_and_is_named_everywhere(toy_method, tmp_path):
  workdir = str(tmp_path / "half")
  summary = train.train_and_evaluate(tiny_config(method="half", num_train_steps=2),
                                     workdir)
  assert summary["steps"] == 2 and 0 <= summary["clean_acc"] <= 1
  records = rundir.read_metrics(workdir)
  assert any("train/ce" in r and np.isfinite(r["train/ce"]) for r in records)
  assert methods.resolved_attack(rundir.load_config(workdir)) == ("ce", "uniform")
  run = plots.load_runs([workdir])[0]
  assert (run.label, run.color) == ("Half", "tab:green")
  # The tables order and name it from the registry too.
  (tmp_path / "half" / "eval").mkdir()
  (tmp_path / "half" / "eval" / "last_results.json").write_text(
      '{"clean_acc": 0.5, "pgd_acc": 0.25, "eps": 0.3, "which": "last"}')
  assert "| Half | 50.00 | 25.00 | 1 |" in report.aggregate([workdir])


def test_unknown_methods_never_reach_the_step():
  with pytest.raises(configlib.ConfigError, match="config.method='halve'"):
    configlib.validate(tiny_config(method="halve"), num_devices=4)
  with pytest.raises(ValueError, match="already registered"):
    methods.register(methods.METHODS["bat"])
  with pytest.raises(ValueError, match="attack_objective"):
    methods.register(methods.Method("x", clean_plus_adv, "l2", "X", "k"))
  with pytest.raises(ValueError, match="diagnostic_exclude must be a tuple"):
    methods.register(methods.Method("x", clean_plus_adv, "ce", "X", "k",
                                    diagnostic_exclude="ce"))
  assert "x" not in methods.METHODS
