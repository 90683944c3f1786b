"""Adversarial weight perturbation (config.awp_gamma): the step against NumPy, warm-up,
devices, every method, validation and exact resume."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import (awp, configlib, datasets, methods, parallel, rundir, train,
                     train_state, train_step)
from bat_jax.train_state import TrainState
from test_train import assert_trees_close, global_batch, one_device_pmap, tiny_config

GAMMA = 0.2  # large, so that the step at w + v differs well beyond the tolerances


class TinyMLP(nn.Module):
  """flatten -> dense 8 -> tanh -> dense 3: small enough for hand-written gradients."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = jnp.tanh(nn.Dense(8, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="head")(h)


@pytest.fixture(scope="module")
def mnist_train():
  return datasets.load_split("mnist_subset", "train", num_examples=256)


def mlp_config(**overrides):
  settings = dict(method="at", optimizer="sgd", learning_rate=0.5, momentum=0.0,
                  batch_size=8, eps=0.1, attack_step_size=0.05)
  return tiny_config(**dict(settings, **overrides))


def mlp_setup(config):
  """The MLP, its optimiser and a start state whose biases are not zero."""
  model = TinyMLP()
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 1)))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, w: w + 0.1 if path[-1].key == "bias" else w, params)
  schedule = train_state.learning_rate_schedule(config, 1, 1)
  tx = train_state.make_optimizer(config, schedule)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(2))
  return model, tx, schedule, state


def mlp_batches(num_steps, batch_size=8):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (batch_size, 4, 4, 1), dtype=np.uint8),
           "label": rng.integers(0, 3, (batch_size,)).astype(np.int32)}
          for _ in range(num_steps)]


def split(batch, n):
  return {k: v.reshape((n, -1) + v.shape[1:]) for k, v in batch.items()}


def run(config, model, tx, schedule, state, batches, par=None, steps_per_epoch=None):
  """Compiled steps over ``batches``: the host states before each step and the metrics."""
  par = par or one_device_pmap()
  step_fn = par.compile(train_step.make_train_step(config, model, tx, schedule,
                                                   steps_per_epoch))
  device_state, states, metrics = par.put_state(state), [state], []
  for batch in batches:
    device_state, m = step_fn(device_state, par.put_batch(split(batch, len(par.devices))))
    jax.block_until_ready(device_state)  # await each collective step on CPU
    states.append(jax.device_get(par.get_state(device_state)))
    metrics.append({k: float(v) for k, v in jax.device_get(par.get_output(m)).items()})
  return states, metrics


def attack_inputs(config, model, state, batch):
  """The inputs the train step attacks, and its adversarial inputs (at ``state``)."""
  par = one_device_pmap()

  def attack(state, batch):
    x, labels, keys = train_step.prepare_batch(config, state, batch)
    return x, train_step.training_attack(config, model, state, x, labels, keys)

  x, x_adv = par.get_output(par.compile(attack)(par.put_state(state),
                                                par.put_batch(split(batch, 1))))
  return np.asarray(x, np.float64), np.asarray(x_adv, np.float64)


# --------------------------------------------------------------------------
# The reference's step, in NumPy (float64), for the MLP and CE at x_adv (AT).
# --------------------------------------------------------------------------


def np_grads(p, x, labels):
  """Parameter gradients of mean CE(f(x), y), by hand."""
  x = x.reshape(len(x), -1)
  h = np.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  z = h @ p["head"]["kernel"] + p["head"]["bias"]
  q = np.exp(z - z.max(1, keepdims=True))
  q /= q.sum(1, keepdims=True)
  dz = (q - np.eye(z.shape[1])[labels]) / len(x)
  da = dz @ p["head"]["kernel"].T * (1 - h ** 2)
  return {"hidden": {"kernel": x.T @ da, "bias": da.sum(0)},
          "head": {"kernel": h.T @ dz, "bias": dz.sum(0)}}


def np_awp_step(p, x_adv, labels, gamma, lr, weight_decay=0.0, momentum=0.0, buf=None):
  """utils_awp.py's step: proxy SGD on -loss, layer-wise rescaled diff on the weights
  ('weight', ndim > 1), perturb, SGD step (coupled decay, PyTorch momentum), restore."""
  tree = jax.tree_util.tree_map
  proxy_lr = 0.01
  g = np_grads(p, x_adv, labels)
  proxy = tree(lambda w, gw: w - proxy_lr * (-gw), p, g)  # a step on the negated loss
  diff = {}
  for layer in p:
    d = proxy[layer]["kernel"] - p[layer]["kernel"]
    diff[layer] = {"kernel": np.linalg.norm(p[layer]["kernel"])
                   / (np.linalg.norm(d) + 1e-20) * d, "bias": np.zeros_like(p[layer]["bias"])}
  perturbed = tree(lambda w, v: w + gamma * v, p, diff)
  g2 = np_grads(perturbed, x_adv, labels)
  d_p = tree(lambda gw, w: gw + weight_decay * w, g2, perturbed)
  buf = d_p if buf is None else tree(lambda b, d: momentum * b + d, buf, d_p)
  stepped = tree(lambda w, b: w - lr * b, perturbed, buf)
  restored = tree(lambda w, v: w - gamma * v, stepped, diff)
  grad_norm = np.sqrt(sum(np.sum(a ** 2) for a in jax.tree_util.tree_leaves(g2)))
  return restored, buf, grad_norm


def to_numpy(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("weight_decay,momentum", [(0.0, 0.0), (0.05, 0.9)])
def test_awp_steps_match_the_reference_in_numpy(weight_decay, momentum):
  config = mlp_config(awp_gamma=GAMMA, weight_decay=weight_decay, momentum=momentum)
  model, tx, schedule, state = mlp_setup(config)
  batches = mlp_batches(2)
  states, metrics = run(config, model, tx, schedule, state, batches)
  expected, buf = to_numpy(state.params), None
  for t, batch in enumerate(batches):
    # x_adv as given input, from the JAX attack at the JAX state of that step.
    _, x_adv = attack_inputs(config, model, states[t], batch)
    without, _, _ = np_awp_step(expected, x_adv, batch["label"], 0.0, config.learning_rate,
                                weight_decay, momentum, buf)
    expected, buf, grad_norm = np_awp_step(expected, x_adv, batch["label"], GAMMA,
                                           config.learning_rate, weight_decay, momentum, buf)
    assert_trees_close(states[t + 1].params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics[t]["train/grad_norm"], grad_norm, rtol=1e-5)
    assert metrics[t]["train/awp_active"] == 1.0
    # The perturbation matters: without it the step lands elsewhere.
    gap = max(np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(expected),
                                                   jax.tree_util.tree_leaves(without)))
    assert gap > 1e-3


def test_gamma_zero_is_the_plain_step():
  config = mlp_config()
  assert config.awp_gamma == 0.0 and configlib.base_config().awp_gamma == 0.0
  model, tx, schedule, state = mlp_setup(config)
  batch = mlp_batches(1)[0]
  states, metrics = run(config, model, tx, schedule, state, [batch])
  _, x_adv = attack_inputs(config, model, state, batch)
  grads = np_grads(to_numpy(state.params), x_adv, batch["label"])
  expected = jax.tree_util.tree_map(lambda w, g: w - config.learning_rate * g,
                                    to_numpy(state.params), grads)
  assert_trees_close(states[1].params, expected, rtol=1e-5, atol=1e-6)
  assert not any(k.startswith("train/awp") for k in metrics[0])  # metrics as before


def test_perturbation_moves_only_kernels_by_gamma_times_their_norm():
  config = tiny_config()
  params = train_state.abstract_state(config).params
  params = jax.tree_util.tree_map(
      lambda s: jax.random.normal(jax.random.PRNGKey(s.size), s.shape), params)
  grads = jax.tree_util.tree_map(lambda w: jnp.cos(3.0 * w), params)
  v = awp.perturbation(params, grads, 0.01)
  moved = []
  for (path, w), g, d in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(v)):
    name = jax.tree_util.keystr(path)
    if path[-1].key == "kernel" and w.ndim > 1:
      moved.append(name)
      np.testing.assert_allclose(jnp.linalg.norm(d), 0.01 * jnp.linalg.norm(w), rtol=1e-5)
      cosine = jnp.vdot(d, g) / (jnp.linalg.norm(d) * jnp.linalg.norm(g))
      np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)  # along the gradient
    else:
      assert not np.any(np.asarray(d)), name  # biases, BatchNorm scale and bias
  assert moved == ["['conv1']['kernel']", "['conv2']['kernel']", "['fc']['kernel']"]
  zero = awp.perturbation(params, jax.tree_util.tree_map(jnp.zeros_like, grads), 0.01)
  assert not any(np.any(np.asarray(d)) for d in jax.tree_util.tree_leaves(zero))


def test_warm_up_steps_are_plain_then_awp_starts():
  steps_per_epoch = 2
  batches = mlp_batches(3)
  warm = mlp_config(awp_gamma=GAMMA, awp_warmup_epochs=1)
  model, tx, schedule, state = mlp_setup(warm)
  states, metrics = run(warm, model, tx, schedule, state, batches,
                        steps_per_epoch=steps_per_epoch)
  plain, _ = run(mlp_config(), model, tx, schedule, state, batches)
  assert [m["train/awp_active"] for m in metrics] == [0.0, 0.0, 1.0]
  for t in (1, 2):
    assert_trees_close(states[t].params, plain[t].params, rtol=1e-6, atol=1e-7)
  # Step 2, the first of epoch 1, is AWP's step from the state it started at.
  _, x_adv = attack_inputs(warm, model, states[2], batches[2])
  expected, _, _ = np_awp_step(to_numpy(states[2].params), x_adv, batches[2]["label"],
                               GAMMA, warm.learning_rate)
  assert_trees_close(states[3].params, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(states[3].params["head"]["kernel"], plain[3].params["head"]["kernel"],
                         rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    train_step.make_train_step(warm, model, tx, schedule)
  train_step.make_train_step(mlp_config(awp_warmup_epochs=1), model, tx, schedule)  # off


@pytest.mark.parametrize("par", [lambda: parallel.Pmap(jax.local_devices()[:2]),
                                 lambda: parallel.ShardMap(jax.local_devices()[:2])],
                         ids=["pmap", "shard_map"])
def test_two_devices_perturb_along_the_global_batch_gradient(par):
  """The warm-up's cond and the gradient's mean run in pmap and shard_map alike."""
  config = mlp_config(awp_gamma=GAMMA, awp_warmup_epochs=1)
  model, tx, schedule, state = mlp_setup(config)
  batches = mlp_batches(2)
  two, m2 = run(config, model, tx, schedule, state, batches, par(), steps_per_epoch=1)
  one, m1 = run(config, model, tx, schedule, state, batches, steps_per_epoch=1)
  assert [m["train/awp_active"] for m in m2] == [0.0, 1.0]
  assert_trees_close(two[2].params, one[2].params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m2[1]["train/loss"], m1[1]["train/loss"], rtol=1e-5)


@pytest.mark.parametrize("method", ["bat", "trades", "at"])
def test_every_method_trains_with_awp_on_two_devices(method, mnist_train):
  images, labels = mnist_train
  config = tiny_config(method=method, awp_gamma=0.01, awp_warmup_epochs=1, ops="xla")
  setup = train_state.setup(config, images.shape[1:], steps_per_epoch=1, total_steps=2)
  batches = [dict(zip(("image", "label"), global_batch(images, labels, t))) for t in range(2)]
  par = parallel.Pmap(jax.local_devices()[:2])
  states, metrics = run(config, setup.model, setup.tx, setup.schedule, setup.state, batches,
                        par, steps_per_epoch=1)
  assert [m["train/awp_active"] for m in metrics] == [0.0, 1.0]
  assert all(np.isfinite(m["train/loss"]) and m["train/finite"] == 1.0 for m in metrics)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(states[2]),
                                                jax.tree_util.tree_leaves(states[1]))
           if np.asarray(a).dtype == np.float32]
  assert min(moved) > 0  # parameters, BatchNorm statistics and momentum all moved


def test_batch_norm_keeps_the_statistics_of_the_pass_at_the_perturbed_weights(mnist_train):
  """The gradient pass at w only picks the perturbation; its statistics are dropped."""
  images, labels = mnist_train
  config = tiny_config(method="at", awp_gamma=0.5, ops="xla")
  setup = train_state.setup(config, images.shape[1:], steps_per_epoch=1, total_steps=1)
  batch = dict(zip(("image", "label"), global_batch(images, labels, 0)))
  states, _ = run(config, setup.model, setup.tx, setup.schedule, setup.state, [batch])
  _, x_adv = attack_inputs(config, setup.model, setup.state, batch)
  model, state = train_state.without_axis(setup.model), setup.state

  def loss_and_statistics(params):
    forward = train_step.TrainingForward(model, params, state.batch_stats)
    loss, _, _ = methods.get("at").loss(config, forward, None, jnp.float32(x_adv),
                                        batch["label"])
    return loss, forward.batch_stats

  statistics = jax.jit(lambda p: loss_and_statistics(p)[1])
  grads = jax.jit(jax.grad(lambda p: loss_and_statistics(p)[0]))(state.params)
  perturbed = awp.add(state.params, awp.perturbation(state.params, grads, config.awp_gamma))
  assert_trees_close(states[1].batch_stats, statistics(perturbed))
  at_w = statistics(state.params)
  assert not np.allclose(states[1].batch_stats["bn2"]["mean"], at_w["bn2"]["mean"],
                         rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("awp_gamma", -0.01, r"config\.awp_gamma=-0\.01 .*>= 0"),
    ("awp_gamma", float("nan"), r"config\.awp_gamma=nan .*finite"),
    ("awp_warmup_epochs", -1, r"config\.awp_warmup_epochs=-1 .*>= 0"),
])
def test_bad_awp_settings_name_the_field(field, value, message):
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.validate(tiny_config(**{field: value}))


def test_a_warm_up_past_the_run_is_refused():
  config = tiny_config(awp_gamma=0.01, awp_warmup_epochs=3)
  configlib.validate(config)
  with pytest.raises(configlib.ConfigError, match=r"awp_warmup_epochs=3 .*never run"):
    configlib.check_schedule_fits(config, steps_per_epoch=10, total_steps=30)
  configlib.check_schedule_fits(config, steps_per_epoch=10, total_steps=31)
  configlib.check_schedule_fits(tiny_config(awp_warmup_epochs=3), 10, 30)  # AWP off


@pytest.mark.slow  # ~20 s: three runs, each compiling its step and evaluation
def test_resume_is_exact_with_awp(tmp_path):
  # 32 examples: 2 steps per epoch; AWP starts at step 2 and the run stops at step 3.
  config = tiny_config(method="at", awp_gamma=0.01, awp_warmup_epochs=1,
                       num_train_examples=32, num_train_steps=4, checkpoint_every_steps=2,
                       eval_every_epochs=100, early_stopping=False, num_eval_examples=16,
                       eval_attack_steps=1)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"), max_steps_this_run=3)
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["steps"] == 4
  for a, b in zip(jax.tree_util.tree_leaves(full["final_state"]),
                  jax.tree_util.tree_leaves(resumed["final_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = [r for r in rundir.read_metrics(str(tmp_path / "resumed")) if "train/loss" in r]
  assert [(r["step"], r["train/awp_active"]) for r in records] == [
      (1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]
