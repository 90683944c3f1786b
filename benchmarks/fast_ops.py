"""Faster CPU formulations of the convolution and max-pool gradients (issue 6).

Measured on XLA:CPU (jaxlib 0.10.2, 2-core AMD EPYC, see README.md), the
LeNet/ResNet train steps spend most of their time in three places that have
nothing to do with the arithmetic:

1. The input gradient of a convolution. jax's transpose rule expresses it as
   a convolution with a reversed kernel and swapped dimension labels
   (``dim_labels=b01f_01oi->b01f``). XLA:CPU hands that form to neither
   YNNPACK nor Eigen's fast path: inside the PGD loop, LeNet's conv2 input
   gradient took ~130 ms per call instead of ~2 ms. :func:`fast_conv`
   computes it as an ordinary forward convolution of the (stride-dilated)
   output gradient with the flipped, in/out-swapped kernel materialised in
   HWIO (``optimization_barrier`` stops XLA from folding the transpose back
   into the labels).
2. Convolutions with 1-3 input channels (LeNet's conv1, the CIFAR stems): the
   input gradient has 1-3 output channels and the kernel gradient a 1-3
   deep contraction, both slow as convolutions (conv1: 28-31 ms and 23 ms);
   as matmuls with the patches they take 5 ms and 8 ms. :func:`fast_conv`
   switches to patches for ``C_in <= SMALL_CIN``.
3. ``flax.linen.max_pool``'s gradient is XLA's ``select_and_scatter``, which
   XLA:CPU expands into iota/scatter/reduce-window: 90-110 ms for LeNet's
   first pool at batch 128. :func:`slice_max_pool` (the max of the strided
   slices) has the same values and the same gradient (first maximum of each
   window), built from elementwise selects (~5-10 ms).

Everything here is numerically the same function: forward values are
bit-identical, gradients agree to ~1e-7 relative (float reassociation;
the pool's are bit-identical, ties included);
``benchmarks/check_fast_ops.py`` checks it. The benchmarks apply these to
bat_jax's models by patching flax (``bench_jax.py --conv_impl=fast
--pool_impl=slices``); the proposed bat_jax change is to pass
``conv_general_dilated=fast_ops.conv_general_dilated`` to every ``nn.Conv``
and to call ``slice_max_pool`` in the LeNet.

Also here, for the experiments of README.md: ``im2col_conv`` (every conv as
slices + one matmul), ``nchw_conv`` (PyTorch's layout) and
``custom_vjp_conv(xla_conv)`` (item 1 alone).
"""

import functools
import types

import jax
import jax.numpy as jnp

# Input channels up to which a convolution's gradients go through patches.
SMALL_CIN = 4
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def padding_pairs(padding, kernel_hw):
  """``'VALID'``/``'SAME'``/pairs -> ``((lo, hi), (lo, hi))``."""
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return ((0, 0), (0, 0))
    if padding.upper() == "SAME":  # stride 1 only (all the models need)
      return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
    raise ValueError(padding)
  return tuple(tuple(p) for p in padding)


def xla_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=DIMENSION_NUMBERS)


def _dgrad_padding(in_hw, kernel_hw, strides, out_hw, padding):
  """Padding of the input-gradient convolution (jax's conv transpose rule)."""
  pads = []
  for n, k, s, o, (lo, _) in zip(in_hw, kernel_hw, strides, out_hw, padding):
    before = k - lo - 1
    after = n + k - 1 - ((o - 1) * s + 1) - before
    pads.append((before, after))
  return pads


def _dilate(g, strides):
  """Inserts ``stride - 1`` zeros between the spatial entries of ``g``."""
  if all(s == 1 for s in strides):
    return g
  return jax.lax.pad(g, jnp.zeros((), g.dtype),
                     [(0, 0, 0)] + [(0, 0, s - 1) for s in strides] + [(0, 0, 0)])


def input_grad_as_conv(g, w, x_shape, strides, padding, conv=xla_conv):
  """``d conv(x, w) / dx`` applied to ``g``, as a forward convolution."""
  pads = _dgrad_padding(x_shape[1:3], w.shape[:2], strides, g.shape[1:3], padding)
  w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))  # HWOI -> HWIO
  w_t = jax.lax.optimization_barrier(w_t)  # keep it materialised in HWIO
  return conv(_dilate(g, strides), w_t, (1, 1), pads)


def patches(x, kh, kw, strides, padding):
  """``[N, OH, OW, kh*kw*C]`` patches of NHWC ``x`` (order i, j, c), from slices."""
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, h, w, c = xp.shape
  sh, sw = strides
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  cols = [jax.lax.slice(xp, (0, i, j, 0),
                        (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                        (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1), xp.shape


def _patch_grads(x, w, g, strides, padding):
  """Both gradients through patches: ``dW = P^T g``, ``dx = col2im(g W^T)``."""
  kh, kw, cin, cout = w.shape
  n, oh, ow, _ = g.shape
  cols, (_, hp, wp, _) = patches(x, kh, kw, strides, padding)
  g2 = g.reshape(-1, cout)
  dw = jnp.dot(cols.reshape(-1, kh * kw * cin).T, g2).reshape(w.shape).astype(w.dtype)
  dcols = jnp.dot(g2, w.reshape(-1, cout).T.astype(g.dtype)).reshape(n, oh, ow, kh, kw, cin)
  sh, sw = strides
  dxp = None
  for i in range(kh):
    for j in range(kw):
      part = jax.lax.pad(dcols[:, :, :, i, j, :], jnp.zeros((), g.dtype),
                         [(0, 0, 0), (i, hp - i - ((oh - 1) * sh + 1), sh - 1),
                          (j, wp - j - ((ow - 1) * sw + 1), sw - 1), (0, 0, 0)])
      dxp = part if dxp is None else dxp + part
  (pt, _), (pl, _) = padding
  dx = dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2], :].astype(x.dtype)
  return dx, dw


@functools.lru_cache(maxsize=None)
def _conv_fn(strides, padding, small_cin_patches: bool, forward=xla_conv):
  """A ``(x, w) -> y`` NHWC x HWIO conv with the gradients described above."""

  @jax.custom_vjp
  def conv(x, w):
    return forward(x, w, strides, padding)

  def conv_fwd(x, w):
    return forward(x, w, strides, padding), (x, w)

  def conv_bwd(res, g):
    x, w = res
    if small_cin_patches and w.shape[2] <= SMALL_CIN:
      return _patch_grads(x, w, g, strides, padding)
    dx = input_grad_as_conv(g, w, x.shape, strides, padding)
    dw = jax.vjp(lambda w_: xla_conv(x, w_, strides, padding), w)[1](g)[0]
    return dx, dw

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def _as_lax_signature(make):
  """A ``lax.conv_general_dilated`` drop-in (flax ``nn.Conv``'s call) from ``make``."""

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, precision=None, **_):
    assert feature_group_count == 1, "grouped convolutions: not needed here"
    assert not lhs_dilation or all(d == 1 for d in lhs_dilation)
    assert not rhs_dilation or all(d == 1 for d in rhs_dilation)
    pads = padding_pairs(padding, rhs.shape[:2])
    return make(tuple(window_strides), pads)(lhs, rhs)

  return conv_general_dilated


# The proposed bat_jax convolution: nn.Conv(..., conv_general_dilated=fast_conv).
fast_conv = _as_lax_signature(lambda s, p: _conv_fn(s, p, True))
# Item 1 alone (no patch path for small C_in).
xla_vjp_conv = _as_lax_signature(lambda s, p: _conv_fn(s, p, False))


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, **_):
  """Every convolution as shifted strided slices concatenated + one matmul."""
  assert feature_group_count == 1
  kh, kw, cin, cout = rhs.shape
  cols, _ = patches(lhs, kh, kw, tuple(window_strides), padding_pairs(padding, (kh, kw)))
  n, oh, ow, _ = cols.shape
  out = jnp.dot(cols.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                precision=precision)
  return out.reshape(n, oh, ow, cout)


def nchw_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
              precision=None, **_):
  """The same convolution with NCHW / OIHW operands (PyTorch's layout)."""
  y = jax.lax.conv_general_dilated(
      jnp.transpose(lhs, (0, 3, 1, 2)), jnp.transpose(rhs, (3, 2, 0, 1)),
      window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
      feature_group_count=feature_group_count, precision=precision)
  return jnp.transpose(y, (0, 2, 3, 1))


CONV_IMPLS = {"im2col": im2col_conv, "nchw": nchw_conv, "xla_vjp": xla_vjp_conv,
              "fast": fast_conv}


def slice_max_pool(inputs, window_shape, strides=None, padding="VALID"):
  """Non-overlapping max pooling from strided slices, with a cheap gradient.

  Same values as flax's ``max_pool`` (``lax.reduce_window``) and the same
  gradient: each window's gradient goes to its first maximum in row-major
  order, as XLA's ``select_and_scatter`` and PyTorch's ``max_pool2d`` do
  (ties are common: MNIST's blank background gives equal positive conv1
  outputs). The gradient is built from elementwise selects and an
  interleave (stack + reshape) instead of ``select_and_scatter``. Falls back
  to flax's pool for anything but NHWC, window == strides, VALID.
  """
  strides = tuple(strides or window_shape)
  if strides != tuple(window_shape) or padding != "VALID" or inputs.ndim != 4:
    return _flax_max_pool()(inputs, window_shape, strides, padding)
  return _slice_pool(tuple(window_shape))(inputs)


@functools.lru_cache(maxsize=None)
def _slice_pool(window):
  wh, ww = window

  def parts(x):
    h, w = x.shape[1] // wh * wh, x.shape[2] // ww * ww
    x = x[:, :h, :w, :]
    return [x[:, i::wh, j::ww, :] for i in range(wh) for j in range(ww)]

  @jax.custom_vjp
  def pool(x):
    out = None
    for part in parts(x):
      out = part if out is None else jnp.maximum(out, part)
    return out

  def pool_fwd(x):
    y = pool(x)
    return y, (x, y)

  def pool_bwd(res, g):
    x, y = res
    taken = None
    grads = []
    for part in parts(x):  # row-major window order: the first maximum wins
      hit = part == y
      if taken is not None:
        hit = hit & ~taken
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


def _flax_max_pool():
  from flax.linen import pooling  # pylint: disable=g-import-not-at-top
  return pooling.max_pool


# --------------------------------------------------------------------------
# Benchmark-only: swap them into flax so that bat_jax's models use them.
# --------------------------------------------------------------------------


def patch_flax_conv(conv_impl: str) -> None:
  """Makes every ``flax.linen.Conv`` call ``CONV_IMPLS[conv_impl]``."""
  import flax.linen.linear as linear  # pylint: disable=g-import-not-at-top
  proxy = types.ModuleType("lax_proxy")
  proxy.__dict__.update(jax.lax.__dict__)
  proxy.conv_general_dilated = CONV_IMPLS[conv_impl]
  linear.lax = proxy


def patch_flax_max_pool() -> None:
  """Makes ``flax.linen.max_pool`` (what the LeNet calls) :func:`slice_max_pool`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  nn.max_pool = slice_max_pool
