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


class LinearForward:
  """A stand-in for the train step's forward passes: linear logits of the flat input."""

  def __init__(self, weights):
    self.weights = weights

  def __call__(self, x):
    return jnp.reshape(x, (x.shape[0], -1)) @ self.weights

  def many(self, xs):
    return [self(x) for x in xs]


SMOOTHING_METHODS = ("standard", "at", "trades", "mart", "bat")


@pytest.mark.parametrize("name", SMOOTHING_METHODS)
def test_label_smoothing_smooths_each_methods_ce_term_only(name):
  """Loss(s) = Loss(0) + s * mean_b[mean_c(-log p_c) - (-log p_y)] on the CE term's
  logits: clean for standard, TRADES and BAT, x* for AT and MART (its BCE's CE part)."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
  x_adv = np.clip(x + 0.1 * np.sign(rng.normal(size=x.shape)), 0, 1).astype(np.float32)
  labels = rng.integers(0, 5, size=6)
  forward = LinearForward(jnp.asarray(rng.normal(size=(16, 5)), jnp.float32))
  loss_fn = methods.get(name).loss
  plain, _, logits = loss_fn(tiny_config(method=name), forward, x, x_adv, labels)
  smoothed, aux, _ = loss_fn(tiny_config(method=name, label_smoothing=0.1), forward, x,
                             x_adv, labels)
  z = np.asarray(logits["adv" if name in ("at", "mart") else "clean"], np.float64)
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  correction = 0.1 * np.mean(-log_p.mean(-1) + log_p[np.arange(6), labels])
  assert abs(correction) > 1e-3  # the smoothing changes the loss
  assert float(smoothed) == pytest.approx(float(plain) + correction, rel=1e-5, abs=1e-6)
  assert "ce" in aux or "adv_ce" in aux


def test_label_smoothing_is_checked_and_refused_for_methods_that_ignore_it(toy_method):
  assert sorted(n for n, m in methods.METHODS.items() if m.label_smoothing) == sorted(
      SMOOTHING_METHODS)
  configlib.validate(tiny_config(method="bat", label_smoothing=0.1))
  for bad in (1.0, -0.1):
    with pytest.raises(configlib.ConfigError, match=r"config.label_smoothing=.*\[0, 1\)"):
      configlib.validate(tiny_config(label_smoothing=bad))
  with pytest.raises(configlib.ConfigError, match="method='half' has no smoothed CE term"):
    configlib.validate(tiny_config(method="half", label_smoothing=0.1))
  configlib.validate(tiny_config(method="half"))
  assert methods.describe(tiny_config(method="trades", label_smoothing=0.1)) == (
      "TRADES (beta = 5, label_smoothing = 0.1)")
  assert methods.describe(tiny_config(method="trades")) == "TRADES (beta = 5)"
  assert methods.describe(tiny_config(method="at", awp_gamma=0.01)) == (
      "AT-AWP (awp_gamma = 0.01)")
