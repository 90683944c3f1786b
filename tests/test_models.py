"""Tests for bat_jax.models: shapes, sizes, normalisation, BatchNorm."""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import models

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """XLA's optimisation passes dominate these tests on a CPU (compiling the
  threefry RNG of a model's init takes ~30 s with them, ~4 s without)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _init(model, x, seed=0):
  """Real variables from one compiled init (eager init compiles per op)."""
  return jax.jit(model.init)(jax.random.key(seed), x)


def _uniform(shape, seed=0):
  """Random images in [0, 1], made by NumPy (no RNG kernel to compile)."""
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _input_shape(name, batch=2):
  return (batch, 28, 28, 1) if name == "lenet" else (batch, 32, 32, 3)


def _abstract_init(model, shape):
  """Variables' shapes and dtypes without running (or compiling) anything."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_model_has_the_right_output_shape_and_collections(name):
  model = models.create_model(name, 7, mean=None, std=None)
  variables = _abstract_init(model, _input_shape(name))
  logits = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(_input_shape(name))), variables)
  assert logits.shape == (2, 7)
  assert logits.dtype == jnp.float32
  expected = {"params", "batch_stats"} if models.has_batch_norm(name) else {
      "params"}
  assert set(variables) == expected


@pytest.mark.parametrize("name,expected", [
    # The authors' LeNet (valid padding, 4*4*64 flatten): 1.11M, not 3.3M.
    ("lenet", 1_111_946),
    ("resnet18", 11_173_962),
    ("preact_resnet18", 11_172_170),
    ("wrn28_10", 36_479_194),
    ("wrn34_10", 46_160_474),
    ("wrn70_16", 266_796_506),  # RobustBench's WideResNet(depth=70, widen_factor=16)
])
def test_parameter_counts_match_the_reference_architectures(name, expected):
  model = models.create_model(name, 10)
  params = _abstract_init(model, _input_shape(name, 1))["params"]
  assert models.count_params(params) == expected


def test_lenet_layer_shapes():
  params = _abstract_init(models.create_model("lenet", 10), (1, 28, 28, 1))
  params = params["params"]
  assert params["conv1"]["kernel"].shape == (5, 5, 1, 32)
  assert params["conv2"]["kernel"].shape == (5, 5, 32, 64)
  assert params["fc1"]["kernel"].shape == (4 * 4 * 64, 1024)
  assert params["fc2"]["kernel"].shape == (1024, 10)


def test_preact_final_norm_knob_and_tiny_widths():
  with_norm = _abstract_init(models.PreActResNet(stage_sizes=(1, 1, 1, 1),
                                                 width=8), (1, 32, 32, 3))
  without = _abstract_init(models.PreActResNet(stage_sizes=(1, 1, 1, 1),
                                               width=8, final_norm=False),
                           (1, 32, 32, 3))
  assert "final_bn" in with_norm["params"]
  assert "final_bn" not in without["params"]
  # Widths 8, 16, 32, 64: the last stage's second conv is 64 -> 64.
  assert with_norm["params"]["stage4_block1"]["conv2"]["kernel"].shape == (
      3, 3, 64, 64)
  assert with_norm["params"]["fc"]["kernel"].shape == (64, 10)


def test_unknown_model_name_raises_and_lists_the_names():
  with pytest.raises(ValueError, match="resnet18"):
    models.create_model("resnet19", 10)
  with pytest.raises(ValueError, match="tiny_cnn"):
    models.has_batch_norm("vgg")
  with pytest.raises(ValueError, match="6n \\+ 4"):
    _abstract_init(models.WideResNet(depth=27), (1, 32, 32, 3))


def test_normalisation_happens_inside_the_model():
  x = _uniform((4, 16, 16, 3))
  normalised = models.create_model("tiny_cnn", 10, mean=CIFAR_MEAN,
                                   std=CIFAR_STD)
  plain = models.create_model("tiny_cnn", 10)
  variables = _init(plain, x)
  pre = (x - jnp.array(CIFAR_MEAN)) / jnp.array(CIFAR_STD)
  with_norm, pre_normalised, raw = jax.jit(lambda v: (
      normalised.apply(v, x), plain.apply(v, pre), plain.apply(v, x)))(
          variables)
  np.testing.assert_allclose(with_norm, pre_normalised, rtol=1e-5, atol=1e-5)
  assert not np.allclose(with_norm, raw, atol=1e-3)


def test_batch_norm_updates_running_stats_only_in_training():
  model = models.create_model("tiny_resnet", 10)
  x = _uniform((8, 16, 16, 3))
  # Same first two examples, different rest of the batch.
  x_other = np.concatenate([x[:2], _uniform((6, 16, 16, 3), seed=1)])
  variables = _init(model, x)

  @jax.jit
  def forward(variables, x):
    train = model.apply(variables, x, train=True, mutable=["batch_stats"])
    test = model.apply(variables, x, train=False, mutable=["batch_stats"])
    return train, test

  (train_logits, train_updates), (eval_logits, eval_updates) = forward(
      variables, x)
  (train_other, _), (eval_other, _) = forward(variables, x_other)

  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(train_updates["batch_stats"])
  assert all(np.all(np.isfinite(n)) for n in new)
  assert all(not np.allclose(o, n) for o, n in zip(old, new))
  # Inference mode leaves the statistics alone...
  for o, n in zip(old, jax.tree_util.tree_leaves(eval_updates["batch_stats"])):
    np.testing.assert_array_equal(o, n)
  # ... and each example's logits ignore the rest of the batch; in training
  # mode they depend on it through the batch statistics.
  np.testing.assert_allclose(eval_logits[:2], eval_other[:2], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(train_logits[:2], train_other[:2], atol=1e-4)


@pytest.mark.parametrize("model", [
    models.create_model("lenet", 10),
    models.PreActResNet(stage_sizes=(1, 1), width=4),
], ids=["lenet", "tiny_preact"])
def test_small_variants_run_and_give_finite_logits(model):
  shape = (2, 28, 28, 1) if isinstance(model, models.LeNet) else (
      2, 16, 16, 3)
  x = _uniform(shape)
  variables = _init(model, x)
  logits = model.apply(variables, x)
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = _uniform((4, 16, 16, 3))
  f32 = models.create_model("tiny_cnn", 10)
  bf16 = models.create_model("tiny_cnn", 10, dtype=jnp.bfloat16)
  variables = _init(bf16, x)
  assert all(p.dtype == jnp.float32
             for p in jax.tree_util.tree_leaves(variables))
  logits, reference = jax.jit(lambda v: (bf16.apply(v, x), f32.apply(v, x)))(
      variables)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, atol=0.1)


def test_initialisation_follows_the_pytorch_reference():
  model = models.WideResNet(depth=10, widen_factor=4)
  x = _uniform((2, 32, 32, 3))
  variables, logits = jax.jit(
      lambda x: (lambda v: (v, model.apply(v, x)))(_init(model, x)))(x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  params = variables["params"]
  kernel = params["group3_block1"]["conv2"]["kernel"]  # 3x3, 256 -> 256.
  expected_std = np.sqrt(2.0 / (3 * 3 * 256))  # Kaiming normal, fan_out.
  assert abs(float(jnp.std(kernel)) / expected_std - 1) < 0.05
  np.testing.assert_array_equal(params["fc"]["bias"], 0.0)
  bound = 1 / np.sqrt(256)  # PyTorch's nn.Linear default: U(+-1/sqrt(fan_in)).
  assert float(jnp.max(jnp.abs(params["fc"]["kernel"]))) <= bound


def _primitive_counts(model, x, variables):
  """How often each primitive occurs in the inference program of ``model``."""
  counts = {}

  def count(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    for sub in jax_core.subjaxprs(jaxpr):
      count(sub)

  count(jax.make_jaxpr(lambda v: model.apply(v, x))(variables).jaxpr)
  return counts


def test_wide_resnet_activation_replaces_every_relu_and_keeps_the_parameters():
  """WRN-16-2 has 2 blocks a group, 2 activations a block, plus the final one: 13."""
  relu = models.create_model("wrn16_2", 10)
  silu = models.create_model("wrn16_2", 10, activation="swish")
  assert (relu.activation, silu.activation) == ("relu", "silu")
  assert relu == models.WideResNet(depth=16, widen_factor=2)  # the default: ReLU
  x = jnp.zeros((1, 32, 32, 3))
  variables = _abstract_init(relu, x.shape)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      _abstract_init(silu, x.shape))
  relu_ops, silu_ops = (_primitive_counts(m, x, variables) for m in (relu, silu))
  assert relu_ops.get("max") == 13 and "logistic" not in relu_ops
  assert silu_ops.get("logistic") == 13 and "max" not in silu_ops
  with pytest.raises(ValueError, match="Unknown activation 'gelu'"):
    _abstract_init(models.WideResNet(depth=10, widen_factor=1, activation="gelu"), x.shape)


def test_silu_changes_the_function_and_only_models_with_the_field_take_it():
  x = _uniform((2, 32, 32, 3))
  relu = models.create_model("tiny_wrn", 10)
  silu = models.create_model("tiny_wrn", 10, activation="silu")
  variables = _init(relu, x)
  a, b = jax.jit(lambda v: (relu.apply(v, x), silu.apply(v, x)))(variables)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
  assert models.activations("wrn70_16") == ("relu", "silu")
  assert models.activations("resnet18") == ("relu",)
  assert models.create_model("resnet18", 10, activation="relu") == models.create_model(
      "resnet18", 10)
  with pytest.raises(ValueError, match="'resnet18' has ReLU activations only"):
    models.create_model("resnet18", 10, activation="silu")
