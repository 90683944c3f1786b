"""Max-pool, BatchNorm and convolution layers that XLA:CPU runs fast, as ``Layers``.

Same functions and variables as ``flax.linen.max_pool``, ``BatchNorm`` and
``Conv`` (pool values bit-identical; gradients and batch statistics equal up
to float reassociation, ~1e-7 relative), different programs:

* Max-pool's gradient, ``select_and_scatter``, which XLA:CPU expands into
  scatters (~100 ms for LeNet's first pool at batch 128); here it is built
  from elementwise selects over the strided slices (``max_pool``).
* BatchNorm's batch statistics and their gradients (``BatchNorm``): XLA
  fuses the per-channel sums over (N, H, W) into strided loops over the
  producer's expression, recomputing it (ResNet-18's first-stage BN at batch
  16: ~20 ms per fused sum, a third of a BAT step). Here the normalised
  input and the incoming gradient are materialised once and summed as
  matrix-vector products, with the gradient written out by hand. Likewise
  the bias gradient of a convolution with a bias (``Conv``, LeNet's).
* Convolutions (``Conv``) through ``conv.conv_general_dilated``.

``LAYERS`` bundles them for the models (``bat_jax.models.layers.Layers``);
``layers_for(config.ops)`` picks them or the stock Flax ones. On GPU/TPU the
stock ops are the fast ones: ``'auto'`` takes these on the CPU backend only.
"""

import functools
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import linear

from bat_jax.cpu.conv import conv_general_dilated
from bat_jax.models.layers import STOCK, Layers

_NHWC = ("NHWC", "HWIO", "NHWC")
# config.ops: the stock Flax layers ("xla"), these ("cpu_fast"), or by backend.
OPS = ("auto", "xla", "cpu_fast")


def max_pool(inputs, window_shape: Sequence[int], strides=None, padding="VALID"):
  """``flax.linen.max_pool`` with a cheap gradient for non-overlapping NHWC windows.

  Same values and the same gradient: each window's gradient goes to its first
  maximum in row-major order, as ``select_and_scatter`` and PyTorch do (ties
  are common: MNIST's blank background gives equal conv outputs). Anything
  but NHWC with window == strides and VALID padding goes to flax's pool.
  """
  window = tuple(window_shape)
  strides = tuple(strides or window)
  if strides != window or padding != "VALID" or inputs.ndim != 4 or len(window) != 2:
    return nn.max_pool(inputs, window, strides, padding)
  return _slice_max_pool(window)(inputs)


@functools.lru_cache(maxsize=None)
def _slice_max_pool(window: Tuple[int, int]):
  wh, ww = window

  def window_parts(x):
    h, w = x.shape[1] // wh * wh, x.shape[2] // ww * ww
    x = x[:, :h, :w, :]
    return [x[:, i::wh, j::ww, :] for i in range(wh) for j in range(ww)]

  @jax.custom_vjp
  def pool(x):
    return functools.reduce(jnp.maximum, window_parts(x))

  def pool_fwd(x):
    y = pool(x)
    return y, (x, y)

  def pool_bwd(residuals, g):
    x, y = residuals
    taken, grads = None, []
    for part in window_parts(x):  # row-major window order: the first maximum wins
      hit = part == y if taken is None else (part == y) & ~taken
      taken = hit if taken is None else taken | hit
      grads.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
    n, oh, ow, c = g.shape
    rows = [jnp.stack(grads[i * ww:(i + 1) * ww], axis=3).reshape(n, oh, ow * ww, c)
            for i in range(wh)]
    dx = jnp.stack(rows, axis=2).reshape(n, oh * wh, ow * ww, c)
    if dx.shape != x.shape:  # rows/columns the pool dropped get no gradient
      dx = jnp.pad(dx, ((0, 0), (0, x.shape[1] - dx.shape[1]),
                        (0, x.shape[2] - dx.shape[2]), (0, 0)))
    return (dx,)

  pool.defvjp(pool_fwd, pool_bwd)
  return pool


def _channel_sums(x: jax.Array) -> jax.Array:
  """Sums of ``x`` over all axes but the last, as a matrix-vector product.

  The rows of the product are ``[W * C]`` (``x``'s last two axes), so each of
  its sums runs over ``N * H`` terms and the ``W`` partial sums are added
  after: rounding error grows with ``N * H + W``, not ``N * H * W``.
  """
  width = x.shape[-2] * x.shape[-1] if x.ndim > 2 else x.shape[-1]
  rows = x.reshape(-1, width)
  partial = jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows)
  return jnp.sum(partial.reshape(-1, x.shape[-1]), axis=0)


def add_channel_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """``y + bias`` over the last axis (one dtype); the bias gradient as ``_channel_sums``."""
  if y.dtype != bias.dtype:
    raise ValueError(f"add_channel_bias: y is {y.dtype} and bias {bias.dtype}; "
                     "promote them to one dtype first.")
  return _add_channel_bias(y, bias)


@jax.custom_vjp
def _add_channel_bias(y, bias):
  return y + bias


def _add_channel_bias_forward(y, bias):
  return y + bias, None


def _add_channel_bias_backward(_, g):
  g = jax.lax.optimization_barrier(g)
  return g, _channel_sums(g.astype(jnp.float32)).astype(g.dtype)


_add_channel_bias.defvjp(_add_channel_bias_forward, _add_channel_bias_backward)


class Conv(nn.Module):
  """``flax.linen.Conv`` (NHWC, no groups or dilation): same variables, same function.

  ``kernel_size``, ``strides`` and ``padding`` are read as flax reads them
  (an int for both axes; 'SAME', 'VALID', an int or pairs of ints). The
  convolution is ``conv.conv_general_dilated`` and the bias's gradient a
  matrix-vector product of the materialised output gradient: XLA:CPU fused the
  bias gradients of the m + 1 training passes into strided per-channel loops
  (LeNet's conv1 at batch 128: ~85 ms of a BAT step).
  """
  features: int
  kernel_size: Any  # int or (kh, kw)
  strides: Any = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    kernel_shape = pair(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    dimension_numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
    padding = linear.canonicalize_padding(self.padding, 2)
    y = conv_general_dilated(x, kernel, pair(self.strides), padding,
                             dimension_numbers=dimension_numbers)
    return y if bias is None else add_channel_bias(y, bias)


def batch_norm_train(x, scale, bias, epsilon: float, axis_name: Optional[str]):
  """Training-mode BatchNorm over all axes but the last: ``(y, mean, var)``.

  The function of ``flax.linen.BatchNorm`` (float32 statistics, variance as
  ``max(0, E[x^2] - E[x]^2)``, averaged over ``axis_name`` when given); the
  sums are matrix-vector products, so values differ from flax's by rounding.
  """
  dtypes = (jnp.dtype(x.dtype), jnp.dtype(scale.dtype), jnp.dtype(bias.dtype))
  return _batch_norm_with_fast_grads(float(epsilon), axis_name, dtypes)(x, scale, bias)


@functools.lru_cache(maxsize=None)
def _batch_norm_with_fast_grads(epsilon: float, axis_name: Optional[str], dtypes):
  """``batch_norm_train`` for one setting, with its gradient written out."""
  x_dtype, scale_dtype, bias_dtype = dtypes

  def forward(x, scale, bias):
    x32 = jax.lax.optimization_barrier(x.astype(jnp.float32))
    count = x32.size // x32.shape[-1]
    moments = jnp.stack([_channel_sums(x32), _channel_sums(x32 * x32)]) / count
    if axis_name is not None:
      moments = jax.lax.pmean(moments, axis_name)
    mean, raw_var = moments[0], moments[1] - moments[0] * moments[0]
    var = jnp.maximum(0.0, raw_var)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x32, mean, inv, scale, raw_var > 0)

  def backward(residuals, cotangents):
    x32, mean, inv, scale, var_positive = residuals
    g, g_mean, g_var = cotangents
    g = jax.lax.optimization_barrier(g.astype(jnp.float32))
    centred = x32 - mean
    sum_g = _channel_sums(g)
    sum_g_xhat = _channel_sums(g * (centred * inv))
    # Cotangents of the (device-averaged) mean and variance: through y, and
    # of the outputs themselves (zero unless the running averages are differentiated).
    d_mean = g_mean - scale * inv * sum_g
    d_var = jnp.where(var_positive, g_var - 0.5 * scale * inv * inv * sum_g_xhat, 0.0)
    total = x32.size // x32.shape[-1]
    if axis_name is not None:
      d_mean, d_var = jax.lax.psum((d_mean, d_var), axis_name)
      total = total * jax.lax.psum(1, axis_name)
    dx = g * (scale * inv) + d_mean / total + centred * (2.0 * d_var / total)
    return (dx.astype(x_dtype), sum_g_xhat.astype(scale_dtype),
            sum_g.astype(bias_dtype))

  @jax.custom_vjp
  def batch_norm(x, scale, bias):
    return forward(x, scale, bias)[0]

  batch_norm.defvjp(forward, backward)
  return batch_norm


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis: same variables, same function.

  Training mode goes through ``batch_norm_train``; inference mode is flax's
  formula, op for op (bit-identical values).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, channels, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, channels, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, channels, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, channels, self.param_dtype)
    if self.use_running_average:
      y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return jnp.asarray(y, self.dtype)


# The layers of this module, for ``models.create_model(layers=...)``.
LAYERS = Layers(conv=Conv, norm=BatchNorm, max_pool=max_pool)


def layers_for(ops: str) -> Layers:
  """The layers ``ops`` names: ``LAYERS`` for 'cpu_fast', the stock Flax ones
  (``models.layers.STOCK``) for 'xla'; 'auto' is 'cpu_fast' on the CPU backend."""
  if ops not in OPS:
    raise ValueError(f"ops={ops!r} is invalid: must be one of {list(OPS)}.")
  if ops == "auto":
    ops = "cpu_fast" if jax.default_backend() == "cpu" else "xla"
  return LAYERS if ops == "cpu_fast" else STOCK
