"""ops='cpu_fast' (bat_jax/cpu/) computes the same functions as the stock Flax layers."""

import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import configlib, cpu, models, train_state
from bat_jax.cpu import conv, tuning
from bat_jax.models.layers import STOCK

_NHWC = ("NHWC", "HWIO", "NHWC")


def _rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _value_and_grads(conv, x, w, strides, padding, probe):
  """conv(x, w) and the gradients of <conv(x, w), probe> w.r.t. x and w, jitted."""
  def f(x, w):
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
    return conv(x, w, strides, padding, dimension_numbers=dn)

  def value_and_grads(x, w):
    y, vjp = jax.vjp(f, x, w)
    return (y,) + vjp(probe)
  return jax.jit(value_and_grads)(x, w)


@pytest.mark.parametrize("cin,kernel,strides,padding", [
    (1, 5, (1, 1), "VALID"),        # LeNet conv1: the patch path.
    (3, 3, (1, 1), ((1, 1), (1, 1))),  # a CIFAR stem.
    (3, 3, (2, 2), ((1, 1), (1, 1))),  # strided, patch path.
    (6, 5, (1, 1), "VALID"),        # LeNet conv2's shape: input grad as a conv.
    (6, 3, (2, 2), ((1, 1), (1, 1))),  # a ResNet downsampling conv.
    (6, 1, (2, 2), ((0, 0), (0, 0))),  # a 1x1 projection shortcut.
    (5, 3, (2, 2), "SAME"),         # string padding with a stride.
    (5, 4, (1, 1), ((2, 1), (0, 3))),  # asymmetric padding, even kernel.
    (5, 5, (3, 3), ((2, 2), (1, 0))),  # stride 3: nine residue classes.
    (5, 4, (2, 2), ((1, 2), (2, 1))),  # even kernel, asymmetric padding, stride 2.
    (5, 2, (2, 2), "VALID"),        # the last row gets no gradient.
    (5, 5, (1, 1), ((1, 0), (0, 2))),  # input gradient by kernel rows, asymmetric pads.
    (2, 3, (1, 1), ((2, 0), (1, 1))),  # kernel rows as channels, asymmetric pads.
    (2, 3, (2, 1), ((0, 1), (1, 1))),  # the same with a stride in one axis.
])
def test_conv_values_and_gradients_match_lax(cin, kernel, strides, padding):
  x = _rand((3, 11, 10, cin), 0)
  w = _rand((kernel, kernel, cin, 4), 1)
  out_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC)).shape
  probe = _rand(out_shape, 2)
  y_ref, dx_ref, dw_ref = _value_and_grads(jax.lax.conv_general_dilated, x, w,
                                           strides, padding, probe)
  y, dx, dw = _value_and_grads(cpu.conv_general_dilated, x, w, strides, padding,
                               probe)
  # The forward pass is the same XLA conv, compiled in another program, or
  # (few input channels) one over the kernel's rows as channels: the same
  # products, summed in another order.
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(y_ref))))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,programs", [
    ((2, 28, 28, 1), (5, 5, 1, 32), (1, 1), "VALID",  # LeNet conv1
     ("kernel_rows_as_channels", "patches", "direct")),
    ((2, 12, 12, 32), (5, 5, 32, 64), (1, 1), "VALID",  # LeNet conv2
     ("direct", "kernel_rows", "direct")),
    ((2, 32, 32, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1)),  # a ResNet downsampling
     ("direct", "residue_classes", "direct")),
    ((2, 8, 8, 16), (3, 3, 16, 16), (1, 1), "SAME",  # too small to measure
     ("direct", "direct", "direct")),
])
def test_unmeasured_programs_are_named_by_shape_and_logged(x_shape, w_shape, strides, padding,
                                                          programs, caplog):
  caplog.set_level(logging.INFO)
  tuning.reset()  # each program is logged once per process
  x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
  pads = (jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
          if isinstance(padding, str) else padding)
  pads = tuple(tuple(int(p) for p in pair) for pair in pads)
  for part, expected in zip(("forward", "input_grad", "weight_grad"), programs):
    assert cpu.conv_program(x, w, strides, pads, part) == expected
    assert f"{w_shape} strides {strides} pads {pads} {part} -> {expected} (by shape)" in caplog.text


def _conv_float64(x, w):
  """3x3 stride-1 'same' NHWC/HWIO convolution in float64, one tap at a time."""
  n, h, wd, _ = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + wd], w[i, j].astype(np.float64))
             for i in range(3) for j in range(3))


# Max error against float64, relative to the largest value: F(4x4)'s transforms
# have coefficients up to 8 (measured: ~3e-7 for F(2x2), ~5e-6 for F(4x4)).
_WINOGRAD_ATOL = {"winograd": 2e-6, "winograd4": 2e-5}


@pytest.mark.slow
@pytest.mark.parametrize("program", sorted(conv.WINOGRAD_TILINGS))
@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (3, 7, 5, 12), (1, 1, 1, 8), (2, 4, 4, 8)])
def test_winograd_convolution_and_both_gradients_match_float64(shape, program, monkeypatch):
  # Large 3x3 convolutions may take Winograd (forward, input and weight gradient); the
  # threshold is lowered so that small ones qualify (odd sizes included), and
  # the program is chosen here instead of measured.
  monkeypatch.setattr(conv, "WINOGRAD_MIN_MACS", 0)
  chosen = []

  def choose(key, candidates, default):
    chosen.append(key)
    assert set(candidates) == {"direct", "winograd", "winograd4"}
    return program
  monkeypatch.setattr(conv.tuning, "choose", choose)
  x, w = _rand(shape, 0), _rand((3, 3, shape[-1], 6), 1)
  probe = _rand(shape[:3] + (6,), 2)
  y, dx, dw = _value_and_grads(cpu.conv_general_dilated, x, w, (1, 1),
                               ((1, 1), (1, 1)), probe)
  assert [k.rsplit(" ", 1)[1] for k in chosen] == ["forward", "input_grad", "weight_grad"]
  # The references: y = conv(x, w); <conv(x, w), probe> is linear in x, and its
  # gradient is the convolution of probe with the flipped, in/out-swapped kernel;
  # dw[i, j] = sum over pixels of the shifted x times probe.
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  n, h, wd, _ = shape
  dw_ref = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + h, j:j + wd], probe)
                               for j in range(3)]) for i in range(3)])
  for got, ref in ((y, _conv_float64(x, w)),
                   (dx, _conv_float64(probe, np.transpose(w[::-1, ::-1], (0, 1, 3, 2)))),
                   (dw, dw_ref)):
    np.testing.assert_allclose(got, ref, rtol=0, atol=_WINOGRAD_ATOL[program] * np.abs(ref).max())
  # A convolution that does not qualify keeps the direct path, unmeasured.
  monkeypatch.setattr(conv, "WINOGRAD_MIN_MACS", 10**9)
  chosen.clear()
  assert cpu.conv_program(x, w, (1, 1), ((1, 1), (1, 1))) == "direct" and not chosen


def test_unsupported_convolutions_fall_back_to_lax():
  x, w = _rand((2, 9, 9, 4), 0), _rand((3, 3, 4, 4), 1)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
  kwargs = dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2),
                dimension_numbers=dn)
  np.testing.assert_allclose(cpu.conv_general_dilated(x, w, **kwargs),
                             jax.lax.conv_general_dilated(x, w, **kwargs),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])  # 7x9: edges dropped
def test_max_pool_values_and_gradients_match_flax_with_ties(shape):
  x = _rand(shape, 0)
  x[0, :4, :4, :] = 0.5  # windows of equal values: the first entry takes the gradient
  x[1] = np.round(x[1])  # many ties in every window
  pool_ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  pool = lambda x: cpu.max_pool(x, (2, 2), strides=(2, 2))
  y_ref, vjp_ref = jax.vjp(pool_ref, x)
  y, vjp = jax.vjp(pool, x)
  probe = _rand(y_ref.shape, 1)
  # Max-pooling and its gradient only select values: no rounding, exact.
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(probe)[0], vjp_ref(probe)[0])


def _batch_norm_outputs(module, variables, x, probes, axis_name=None):
  """Training-mode BN: y, the new running statistics, and the gradients of a
  loss that reads y and both statistics, w.r.t. the parameters and x."""
  probe_y, probe_mean, probe_var = probes

  def loss(params, x):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              x, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    value = (jnp.sum(y * probe_y) + jnp.sum(stats["mean"] * probe_mean)
             + jnp.sum(stats["var"] * probe_var))
    return value, (y, stats)

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  if axis_name is None:
    return jax.jit(grad_fn)(variables["params"], x)
  return jax.pmap(grad_fn, axis_name=axis_name, in_axes=(None, 0))(variables["params"], x)


@pytest.mark.parametrize("devices", [1, 2])
def test_batch_norm_matches_flax_values_statistics_and_gradients(devices):
  shape = (devices, 6, 5, 5, 8)
  x = _rand(shape, 0) * 2.0 + 1.0  # a mean far from 0: E[x^2] - E[x]^2 must hold up
  probes = (_rand(shape[1:], 1), _rand((8,), 2), _rand((8,), 3))
  kwargs = dict(use_running_average=False, momentum=0.9, epsilon=1e-5,
                axis_name="batch" if devices > 1 else None)
  flax_bn, fast_bn = nn.BatchNorm(**kwargs), cpu.BatchNorm(**kwargs)
  variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0])
  fast_variables = cpu.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0])
  assert (jax.tree_util.tree_structure(variables)
          == jax.tree_util.tree_structure(fast_variables))
  variables = {"params": {"scale": variables["params"]["scale"] * 1.5 - 0.2,
                          "bias": variables["params"]["bias"] + 0.3},
               "batch_stats": {"mean": variables["batch_stats"]["mean"] + 0.1,
                               "var": variables["batch_stats"]["var"] * 2.0}}
  inputs = x if devices > 1 else x[0]
  expected = _batch_norm_outputs(flax_bn, variables, inputs, probes, kwargs["axis_name"])
  got = _batch_norm_outputs(fast_bn, variables, inputs, probes, kwargs["axis_name"])
  # (loss, (y, stats)), (d params, dx): the sums differ from flax's by rounding.
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(np.max(np.abs(b))))
  (_, (_, stats)), (d_params, dx) = got
  assert float(np.max(np.abs(dx))) > 0.1 and float(np.max(np.abs(d_params["scale"]))) > 0.1
  if devices > 1:  # the statistics are of the whole batch, the same on each device
    np.testing.assert_allclose(stats["mean"][0], stats["mean"][1], rtol=1e-6)
  # Inference mode is flax's formula op for op.
  infer = lambda m: m.clone(use_running_average=True).apply(variables, x[0])
  np.testing.assert_array_equal(jax.jit(lambda: infer(fast_bn))(),
                                jax.jit(lambda: infer(flax_bn))())


# ((2, 2), 1): the models' PyTorch-style padding, an int as flax reads it.
@pytest.mark.parametrize("strides,padding", [((1, 1), "VALID"), ((2, 2), "SAME"), ((2, 2), 1)])
def test_conv_module_matches_flax_conv_initialisation_values_and_gradients(strides, padding):
  kwargs = dict(features=6, kernel_size=(3, 3), strides=strides, padding=padding)
  flax_conv, fast_conv = nn.Conv(**kwargs), cpu.Conv(**kwargs)
  x = _rand((4, 9, 9, 5), 0)
  variables = flax_conv.init(jax.random.key(1), x)
  fast_variables = fast_conv.init(jax.random.key(1), x)
  for a, b in zip(jax.tree_util.tree_leaves(fast_variables), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)  # the same parameters from the same key
  assert jax.tree_util.tree_structure(fast_variables) == jax.tree_util.tree_structure(variables)
  params = {"kernel": variables["params"]["kernel"], "bias": jnp.arange(6.0) / 10}
  probe = _rand(flax_conv.apply({"params": params}, x).shape, 2)

  def value_and_grads(module):
    f = lambda p, x: jnp.sum(module.apply({"params": p}, x) * probe)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

  got, expected = value_and_grads(fast_conv), value_and_grads(flax_conv)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
  np.testing.assert_allclose(got[1][0]["bias"], probe.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)


def _model_pair(name):
  make = lambda layers: (models.WideResNet(depth=10, widen_factor=1, layers=layers)
                         if name == "wrn10_1" else models.create_model(name, 10, layers=layers))
  return make(STOCK), make(cpu.LAYERS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet", "tiny_cnn", "tiny_resnet", "wrn10_1"])
def test_models_compute_the_same_function_with_either_ops(name):
  stock, fast = _model_pair(name)
  assert (stock.layers, fast.layers) == (STOCK, cpu.LAYERS)
  shape = (4, 28, 28, 1) if name == "lenet" else (4, 16, 16, 3)
  x = np.clip(_rand(shape, 0) * 0.3 + 0.5, 0, 1)
  x[:, :6] = 0.0  # a blank band, like MNIST's background: pooling ties
  variables = jax.jit(stock.init)(jax.random.key(0), x)
  labels = jnp.arange(4) % 10

  def loss_and_grads(model):
    def loss(params, x):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(4), labels])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)

  (loss_ref, (dp_ref, dx_ref)), (loss, (dp, dx)) = loss_and_grads(stock), loss_and_grads(fast)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(dp), jax.tree_util.tree_leaves(dp_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(dx_ref))) > 0


def test_auto_ops_picks_by_backend_and_bad_values_are_named():
  assert jax.default_backend() == "cpu"
  assert cpu.layers_for("auto") is cpu.LAYERS and cpu.layers_for("cpu_fast") is cpu.LAYERS
  assert cpu.layers_for("xla") is STOCK
  assert models.create_model("lenet", 10).layers is STOCK  # models know no backend
  config = configlib.base_config()  # ops='auto': chosen once, where the model is built
  assert train_state.build_model(config).layers is cpu.LAYERS
  config.ops = "xla"
  assert train_state.build_model(config).layers is STOCK
  with pytest.raises(ValueError, match="ops='fast'"):
    cpu.layers_for("fast")
  config.ops = "fast"
  with pytest.raises(configlib.ConfigError, match="config.ops"):
    configlib.validate(config)
  assert cpu.OPS == configlib.OPS == ("auto", "xla", "cpu_fast")


def test_default_xla_flags_are_appended_and_a_users_setting_wins(monkeypatch):
  from bat_jax import util  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  util.add_default_xla_flags()
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=4", *util.CPU_XLA_FLAGS]
  util.add_default_xla_flags()  # idempotent
  assert len(os.environ["XLA_FLAGS"].split()) == 1 + len(util.CPU_XLA_FLAGS)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  util.add_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.delenv("XLA_FLAGS")
  util.add_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == " ".join(util.CPU_XLA_FLAGS)


def test_cpu_description_names_the_model_and_the_features(tmp_path):
  from bat_jax import util  # pylint: disable=g-import-not-at-top
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\n"
                     "flags\t\t: fpu avx2 fma avx512f amx_bf16 avx512_bf16\n\n"
                     "processor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu\n")
  text = util.cpu_description(str(cpuinfo))
  assert text.startswith("Some Xeon, ") and text.endswith("avx2 fma avx512f avx512_bf16 amx_bf16")
  assert "features unknown" in util.cpu_description(str(tmp_path / "missing"))
