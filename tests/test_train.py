"""The fused train step: every method, pmap vs one device vs shard_map, resume, compile-once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import configlib, datasets, methods, parallel, rundir, train, train_state
from bat_jax import train_step

METHODS = tuple(methods.METHODS)


def tiny_config(**overrides):
  c = configlib.base_config()
  c.dataset = "mnist_subset"
  c.model = "tiny_cnn"
  c.batch_size = 16
  c.attack_steps = 2
  c.attack_step_size = 0.1
  c.num_train_steps = 3
  c.num_train_examples = 256
  c.num_eval_examples = 40
  c.eval_batch_size = 16
  c.eval_attack_steps = 2
  c.early_stopping_attack_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100
  c.schedule = "constant"
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def mnist_train():
  return datasets.load_split("mnist_subset", "train", num_examples=256)


def global_batch(images, labels, step, batch_size=16):
  """The same global batch of 16, for any device layout."""
  i = np.arange(step * batch_size, (step + 1) * batch_size) % len(images)
  return images[i], labels[i]


def run_steps(config, par, images, labels, num_steps):
  """Runs ``num_steps`` compiled steps with ``par`` and returns (state, metrics)."""
  setup = train_state.setup(config, images.shape[1:], steps_per_epoch=10, total_steps=10)
  step_fn = par.compile(train_step.make_train_step(config, setup.model, setup.tx,
                                              setup.schedule), donate_state=True)
  state = par.put_state(setup.state)
  n = len(par.devices)
  metrics = []
  for s in range(num_steps):
    x, y = global_batch(images, labels, s, config.batch_size)
    batch = {"image": x.reshape((n, -1) + x.shape[1:]), "label": y.reshape(n, -1)}
    state, m = step_fn(state, par.put_batch(batch))
    jax.block_until_ready(state)  # await each collective step on CPU (XLA rendezvous)
    metrics.append(jax.device_get(par.get_output(m)))
  return par.get_state(state), metrics


def one_device_pmap():
  return parallel.Pmap(jax.local_devices()[:1])


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(method, mnist_train):
  images, labels = mnist_train
  config = tiny_config(method=method, learning_rate=3e-3)
  before = train_state.setup(config, images.shape[1:], 10, 10).state
  state, metrics = run_steps(config, one_device_pmap(), images, labels, 3)
  assert int(state.step) == 3
  assert all(np.isfinite(m["train/loss"]) for m in metrics)
  assert "train/kl" in metrics[0] if method in ("trades", "mart", "bat") else True
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(before.params))]
  assert max(moved) > 0
  # BatchNorm running statistics were updated by the training forward passes.
  stats_moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(state.batch_stats),
      jax.tree_util.tree_leaves(before.batch_stats))]
  assert max(stats_moved) > 0


# TRADES's KL attack starts 0.001 from x, where the input gradient is ~1e-6 and
# the sign of its smallest components flips under the reassociation that a
# different batch split brings; the CE attacks of BAT and MART are stable.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["bat", "mart"])
def test_pmap_four_devices_matches_one_device(method, mnist_train):
  assert jax.local_device_count() == 4, "conftest sets 4 CPU devices"
  images, labels = mnist_train
  # Random starts and augmentation use one key per example (from its position
  # in the global batch), so the device split must not change anything.
  config = tiny_config(method=method, augment=True)
  four, m4 = run_steps(config, parallel.Pmap(), images, labels, 2)
  one, m1 = run_steps(config, one_device_pmap(), images, labels, 2)
  assert_trees_close(four.params, one.params)
  assert_trees_close(four.batch_stats, one.batch_stats)
  np.testing.assert_allclose(m4[-1]["train/loss"], m1[-1]["train/loss"], rtol=1e-5)


@pytest.mark.parametrize("method,objective,start,expected", [
    ("bat", "", "", ("ce", "uniform")),
    ("bat", "kl", "", ("kl", "normal")),  # the reference's BAT with KL: TPGD
    ("bat", "kl", "uniform", ("kl", "uniform")),  # an explicit start wins
    ("trades", "", "", ("kl", "normal")),
    ("trades", "ce", "", ("ce", "uniform")),
    ("at", "", "", ("ce", "uniform")),
    ("at", "kl", "", ("kl", "normal")),
    ("mart", "", "none", ("ce", "none")),
])
def test_default_attack_start_follows_the_objective(method, objective, start, expected):
  config = tiny_config(method=method, attack_objective=objective, attack_start=start)
  assert methods.resolved_attack(config) == expected


@pytest.mark.slow
def test_shard_map_matches_pmap(mnist_train):
  images, labels = mnist_train
  config = tiny_config(method="bat", attack_start="uniform")
  via_pmap, mp = run_steps(config, parallel.Pmap(), images, labels, 2)
  via_shard_map, ms = run_steps(config, parallel.ShardMap(), images, labels, 2)
  assert_trees_close(via_pmap.params, via_shard_map.params)
  assert_trees_close(via_pmap.batch_stats, via_shard_map.batch_stats)
  np.testing.assert_allclose(mp[-1]["train/loss"], ms[-1]["train/loss"], rtol=1e-5)


def test_bat_one_bridge_step_equals_trades_step(mnist_train):
  images, labels = mnist_train
  common = dict(attack_objective="ce", attack_start="uniform")
  bat, _ = run_steps(tiny_config(method="bat", num_bridges=1, **common),
                     one_device_pmap(), images, labels, 2)
  trades, _ = run_steps(tiny_config(method="trades", **common),
                        one_device_pmap(), images, labels, 2)
  assert_trees_close(bat.params, trades.params, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_train_step_compiles_once_and_resume_is_exact(tmp_path, monkeypatch):
  config = tiny_config(method="bat", num_train_steps=6, checkpoint_every_steps=2,
                       eval_every_epochs=100, schedule="step", lr_decay_epochs=(0.2,),
                       augment=True)
  with monkeypatch.context() as patch:  # the step (attack loop included) traces once
    patch.setattr(train, "make_train_step",
                  lambda *a: chex.assert_max_traces(train_step.make_train_step(*a), n=1))
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["steps"] == 6

  interrupted = train.train_and_evaluate(config, str(tmp_path / "resumed"),
                                         max_steps_this_run=3)
  assert interrupted["steps"] == 3 and interrupted["clean_acc"] is None
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["steps"] == 6
  for a, b in zip(jax.tree_util.tree_leaves(full["final_state"]),
                  jax.tree_util.tree_leaves(resumed["final_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["pgd_acc"] == full["pgd_acc"]

  restored = rundir.restore_model(str(tmp_path / "full"), "last")
  assert restored.step == 6
  logits = restored.logits_fn(jnp.zeros((2, 28, 28, 1)))
  assert logits.shape == (2, 10)
  lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) >= 6 and (tmp_path / "full" / "config.json").exists()


@pytest.mark.parametrize("field,value,message", [
    ("eps", -0.1, "config.eps"),
    ("eps", 8.0, "8/255"),
    ("num_bridges", 0, "config.num_bridges"),
    ("method", "fast_at", "'standard', 'at', 'trades', 'mart', 'bat'"),
    ("model", "vgg16", "config.model"),
    ("dataset", "imagenet", "config.dataset"),
    ("batch_size", 30, "multiple of the number of devices"),
])
def test_bad_configs_name_the_field(field, value, message, tmp_path):
  config = tiny_config(**{field: value})
  with pytest.raises(configlib.ConfigError, match=message.replace("(", r"\(")):
    configlib.validate(config, num_devices=4)


def test_config_files_load_and_validate(tmp_path):
  import importlib.util
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  extra = tmp_path / "extra.npz"  # stands in for a required extra-data file
  extra.write_bytes(b"")
  train_size = {"mnist": 60000, "mnist_subset": 6000, "cifar10": 50000, "cifar100": 50000}
  for path in sorted(root.glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variants = [None, "runlocal"]
    if path.stem == "cifar10":
      variants += ["schedule=step", "schedule=step,runlocal"]
    for arg in variants:
      config = module.get_config(arg)
      if config.extra_data_path == configlib.REQUIRED:  # cifar10_rst.py
        with pytest.raises(configlib.ConfigError, match="extra_data_path is required"):
          configlib.validate(config, num_devices=1)
        config.extra_data_path = str(extra)
      configlib.validate(config, num_devices=1)
      n = config.num_train_examples if config.num_train_examples > 0 else (
          train_size[config.dataset])
      steps_per_epoch = n // config.batch_size
      configlib.check_schedule_fits(
          config, steps_per_epoch, train.total_train_steps(config, steps_per_epoch))
  with pytest.raises(configlib.ConfigError, match="unknown config argument"):
    module.get_config("epz=3")


@pytest.mark.slow
def test_training_diagnostics_are_logged(tmp_path):
  config = tiny_config(method="bat", num_train_steps=2, diagnostics_every_steps=1,
                       early_stopping=False)
  train.train_and_evaluate(config, str(tmp_path))
  records = [r for r in rundir.read_metrics(str(tmp_path))
             if "diag/cos_ce_margin" in r]
  train_records = [r for r in rundir.read_metrics(str(tmp_path)) if "train/loss" in r]
  assert [r["step"] for r in records] == [0, 1]
  for r in records:
    for key in ("diag/cos_ce_margin", "diag/cos_kl_margin", "diag/margin_increase",
                "diag/grad_norm_ratio", "diag/margin"):
      assert np.isfinite(r[key]), key
    assert -1 <= r["diag/cos_ce_margin"] <= 1 and -1 <= r["diag/cos_kl_margin"] <= 1
    # Descending CE raises the margin at initialisation (the paper's Figure 4).
    assert r["diag/cos_ce_margin"] > 0
    # The terms the method's registry entry leaves out have no diagnostics.
    for term in methods.get("bat").diagnostic_exclude:
      assert f"train/{term}" in train_records[0] and f"diag/cos_{term}_margin" not in r


@pytest.mark.slow
def test_fused_forward_is_exact_without_batch_norm_and_joint_with_it(mnist_train):
  images, labels = mnist_train
  small = dict(method="bat", num_bridges=3, model="lenet", batch_size=8,
               num_train_examples=64)
  sequential, ms = run_steps(tiny_config(**small), one_device_pmap(), images, labels, 1)
  fused, mf = run_steps(tiny_config(fused_forward=True, **small), one_device_pmap(),
                        images, labels, 1)
  # LeNet has no BatchNorm: one batched pass computes exactly the same loss.
  np.testing.assert_allclose(mf[0]["train/loss"], ms[0]["train/loss"], rtol=1e-5)
  assert_trees_close(fused.params, sequential.params, rtol=1e-4, atol=1e-6)
  # With BatchNorm the semantics change (joint batch statistics, one update of
  # the running statistics), so fused and sequential steps must differ there.
  bn = dict(method="bat", num_bridges=2)
  seq_bn, _ = run_steps(tiny_config(**bn), one_device_pmap(), images, labels, 1)
  fused_bn, m_bn = run_steps(tiny_config(fused_forward=True, **bn), one_device_pmap(),
                             images, labels, 1)
  assert np.isfinite(m_bn[0]["train/loss"])
  assert not np.allclose(np.asarray(seq_bn.batch_stats["bn1"]["var"]),
                         np.asarray(fused_bn.batch_stats["bn1"]["var"]))


def test_experiment_plans_one_run_per_method_eps_seed():
  from bat_jax import experiment
  assert configlib.parse_number("8/255") == pytest.approx(8 / 255)
  assert configlib.parse_number("0.3") == 0.3
  runs = experiment.plan_runs(tiny_config(), ["at", "bat"], [0.1, 0.3], [0, 1])
  assert len(runs) == 8
  config = runs["bat_eps0.3_seed1"]
  assert (config.method, config.eps, config.seed) == ("bat", 0.3, 1)
  assert runs["at_eps0.1_seed0"].method == "at"  # copies, not one shared config
