"""The paper's protocol to the letter: per-method optimiser, the one-cycle
schedule with PyTorch's momentum cycling, which checkpoint each table reports."""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bat_jax import configlib, experiment, rundir, train, train_state, util

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def config_file(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


# --------------------------------------------------------------------------
# MART on MNIST: SGD from lr 0.01 (Table 1's footnote), however it is started.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_mart_on_mnist_uses_the_papers_optimiser(tmp_path):
  base = config_file("mnist")()
  base.method = "mart"
  resolved = configlib.resolve(base)
  assert (resolved.optimizer, resolved.learning_rate) == ("sgd", 0.01)
  # What the user typed on the command line wins.
  typed = ["prog", "--config=configs/mnist.py", "--config.learning_rate=0.05"]
  assert util.overridden_fields(typed) == ["learning_rate"]
  base.learning_rate = 0.05
  kept = configlib.resolve(base, util.overridden_fields(typed))
  assert (kept.optimizer, kept.learning_rate) == ("sgd", 0.05)
  # Other methods keep Adam; experiment.py resolves per run.
  runs = experiment.plan_runs(config_file("mnist")(), ["mart", "bat"], [0.3], [0])
  assert runs["mart_eps0.3_seed0"].optimizer == "sgd"
  assert (runs["bat_eps0.3_seed0"].optimizer, runs["bat_eps0.3_seed0"].learning_rate) == (
      "adam", 1e-3)
  # config.json records the optimiser the run trained with.
  tiny = config_file("mnist")()
  tiny.update(method="mart", dataset="mnist_subset", model="tiny_cnn", batch_size=16,
              num_train_examples=64, num_train_steps=1, attack_steps=1,
              num_eval_examples=16, eval_batch_size=16, eval_attack_steps=1,
              schedule="constant")
  train.train_and_evaluate(tiny, str(tmp_path))
  stored = json.loads((tmp_path / "config.json").read_text())
  assert (stored["optimizer"], stored["learning_rate"]) == ("sgd", 0.01)
  assert stored["method_settings"] == {}


def test_method_settings_are_validated():
  c = configlib.base_config()
  c.method_settings = configlib.method_settings(marty=dict(optimizer="sgd"))
  with pytest.raises(configlib.ConfigError, match="names no method"):
    configlib.validate(c)
  c.method_settings = configlib.method_settings(mart=dict(optimiser="sgd"))
  with pytest.raises(configlib.ConfigError, match="optimiser"):
    configlib.validate(c)


# --------------------------------------------------------------------------
# One-cycle: SGD + PyTorch's CyclicLR(base_lr=0, max_lr, step_size_up =
# step_size_down = steps / 2), momentum cycling 0.9 -> 0.8 -> 0.9.
# --------------------------------------------------------------------------


def pytorch_sgd_cyclic_lr(grad_fn, p0, steps, max_lr, weight_decay,
                          base_momentum=0.8, max_momentum=0.9):
  """The parameter trajectory, from PyTorch's documented formulas (float64).

  CyclicLR: cycle = floor(1 + t / total), x = 1 + t / total - cycle, scale =
  x / r for x <= r else (x - 1) / (r - 1) with r = up / total; lr = max_lr *
  scale; momentum = max_momentum - (max_momentum - base_momentum) * scale.
  SGD: g += wd * p; buf = g at the first step, else momentum * buf + g;
  p -= lr * buf. Step t uses the scheduler's values at last_epoch = t.
  """
  up = down = steps / 2
  total, ratio = up + down, up / (up + down)
  p, buf, path, momenta = p0.copy(), None, [], []
  for t in range(steps):
    cycle = np.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    lr = max_lr * scale
    momentum = max_momentum - (max_momentum - base_momentum) * scale
    g = grad_fn(p) + weight_decay * p
    buf = g.copy() if buf is None else momentum * buf + g
    p = p - lr * buf
    path.append(p.copy())
    momenta.append(momentum)
  return np.stack(path), np.array(momenta)


@pytest.mark.parametrize("steps", [20, 15])  # an odd length: a half-cycle of 7.5
def test_onecycle_matches_pytorch_sgd_with_cyclic_lr(steps):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  a = a @ a.T / 6 + np.eye(6)
  b = rng.normal(size=6)
  p0 = rng.normal(size=6)
  grad_fn = lambda p: a @ p - b
  expected, momenta = pytorch_sgd_cyclic_lr(grad_fn, p0, steps, max_lr=0.3,
                                            weight_decay=5e-4)
  # The momentum really cycles, so the test checks the schedule, not a constant.
  assert momenta[0] == pytest.approx(0.9) and momenta.min() < 0.81
  config = config_file("cifar10")()  # onecycle, lr 0.3, momentum 0.9, wd 5e-4
  assert (config.schedule, config.learning_rate, config.momentum) == ("onecycle", 0.3, 0.9)
  schedule = train_state.learning_rate_schedule(config, 1, steps)
  tx = train_state.make_optimizer(config, schedule, steps)
  params = jnp.asarray(p0, jnp.float32)
  state = tx.init(params)
  got = []
  for _ in range(steps):  # float32, as training runs; the reference in float64
    grads = jnp.asarray(a, jnp.float32) @ params - jnp.asarray(b, jnp.float32)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    got.append(np.asarray(params))
  np.testing.assert_allclose(np.stack(got), expected, rtol=1e-5, atol=1e-6)
  # Without the momentum cycling the trajectory is measurably different.
  constant, _ = pytorch_sgd_cyclic_lr(grad_fn, p0, steps, 0.3, 5e-4, base_momentum=0.9)
  assert np.max(np.abs(constant - expected)) > 1e-3


def test_constant_momentum_without_cycling():
  config = config_file("cifar10")()
  config.cycle_momentum = False
  assert train_state.momentum_schedule(config, 100) == 0.9
  config.base_momentum = 0.95
  with pytest.raises(configlib.ConfigError, match="base_momentum"):
    configlib.validate(config)


def test_old_onecycle_runs_are_not_mixed_with_momentum_cycling():
  stored = json.loads(config_file("cifar10")().to_json_best_effort())
  del stored["cycle_momentum"], stored["base_momentum"]  # as saved before the fields
  conflicts = rundir.resume_conflicts(stored, config_file("cifar10")())
  assert conflicts == ["cycle_momentum: False -> True"]


# --------------------------------------------------------------------------
# Which checkpoint: Table 2 (onecycle) reports final models, B.1 (step) adds ES.
# --------------------------------------------------------------------------


def test_early_stopping_only_with_the_step_schedule():
  assert not config_file("cifar10")().early_stopping
  assert config_file("cifar10")("schedule=step").early_stopping
