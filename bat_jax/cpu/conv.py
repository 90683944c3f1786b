"""Convolution programs that XLA:CPU runs fast: ``conv_general_dilated``.

The function of ``lax.conv_general_dilated`` (most values bit-identical;
gradients and few-channel convolutions equal up to float reassociation, ~1e-7
relative), written as other programs. Measured on XLA:CPU (jaxlib 0.10.2,
docs/PERFORMANCE.md), adversarial training spends most of its time in
programs that have nothing to do with the arithmetic:

1. A convolution's input gradient, which jax writes as a convolution with
   swapped dimension labels; XLA:CPU gives that form no fast kernel (LeNet's
   conv2 inside the PGD loop: ~130 ms instead of ~2 ms). Here it is an
   ordinary forward convolution of the output gradient with the flipped,
   in/out-swapped kernel, materialised in HWIO; at stride s, one per residue
   class of the input positions with that class's taps (no zero-dilated
   gradient: ResNet-18's stride-2 input gradients 3-4x faster); for a
   'VALID' convolution, whose gradient would be mostly zero padding, one
   convolution along the width for all kernel rows (LeNet's conv2: 13 ms
   -> 7.6 ms at batch 128).
2. Convolutions with 1-4 input channels (LeNet's conv1, CIFAR stems): the
   input gradient is slow as a convolution (1-4 output channels) and fast as
   a matmul with the patches; the forward pass runs as a 1 x kw convolution
   over the kernel's rows stacked as channels.

Large 3x3 stride-1 'same' convolutions (ResNet-18's from batch 6, the
WRN-28/34-10 blocks from batch 1) may compute their forward pass, input
gradient and weight gradient as Winograd F(2x2, 3x3) or F(4x4, 3x3)
(``winograd.py``): 2.25x or 4x fewer multiplications, ~20% off ResNet-18's
PGD iteration on XLA:CPU. Which program each of the three parts takes
('direct', 'winograd', 'winograd4': ``conv_program``) comes from
``tuning.choose``: a pinned, remembered or cached measurement, measured only
inside ``tuning.measuring()``, else the fixed rule (logged once per shape):
which is faster depends on the CPU (ResNet-18's 64-channel stage gains on an
AMD EPYC, loses on an Intel Xeon). Those outputs differ from the direct
convolution by rounding (~1e-6 relative for F(2x2), ~1e-5 for F(4x4)), as do
the few-channel convolutions of point 2 (~1e-7: the same products, summed in
another order). Its output is materialised once (XLA does not copy the
output transform into each consumer).
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp

from bat_jax.cpu import tuning, winograd

Pads = Tuple[Tuple[int, int], ...]

# Input channels up to which a convolution stacks its kernel rows as channels
# (forward pass) and computes its input gradient through patches.
SMALL_CIN = 4
# Multiply-adds from which a 3x3 stride-1 'same' convolution may go through
# Winograd (ResNet-18's convolutions have 604M at batch 16): below it (the
# tests' tiny models, inference on a few images) the direct convolution is
# about as fast and compiles faster (a ResNet-18 BAT step: 16-21 s vs 35-39 s),
# and is taken without measuring.
WINOGRAD_MIN_MACS = 200_000_000
# The fixed rule, where nothing was measured (outside ``tuning.measuring()``
# without a cached choice, BAT_JAX_CPU_TUNING=off, several processes):
# Winograd from this many input channels. Its 16 matrix products contract
# over the input channels; on the Intel Xeon of docs/PERFORMANCE.md
# they ran at ~55 GFLOP/s at 64 channels against ~150 at 128-256, so ResNet-18's
# 64-channel stage lost with it (32x32x64 at batch 16: forward 7.3 ms vs 5.7).
WINOGRAD_MIN_CIN = 128
_NHWC = ("NHWC", "HWIO", "NHWC")


def _forward_conv(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def input_grad_form(x_shape, w_shape, strides, pads: Pads) -> str:
  """How ``input_grad_as_forward_conv`` computes this input gradient (see there)."""
  if any(s != 1 for s in strides):
    return "residue_classes"
  out_height = x_shape[1] + sum(pads[0]) - w_shape[0] + 1
  return "kernel_rows" if w_shape[0] > 1 and 4 * x_shape[1] >= 5 * out_height else "direct"


def input_grad_as_forward_conv(g, w, x_shape, strides, pads: Pads):
  """``d conv(x, w)/dx`` applied to ``g``, written as plain NHWC/HWIO convolutions.

  In the form ``input_grad_form`` names: 'direct', one convolution of ``g``
  with the flipped, in/out-swapped kernel; 'kernel_rows' where a fifth or more
  of that convolution's rows would be zero padding (a 'VALID' convolution's
  gradient: LeNet's conv2, 12 rows from 8; ``_input_grad_by_kernel_rows``);
  'residue_classes' at stride s: each input position gets the kernel taps of
  its residue mod s, so the s x s residue classes are s^2 stride-1
  convolutions of ``g`` with those taps (3x3 at stride 2: 1x1, 1x2, 2x1 and
  2x2), interleaved. Convolving a zero-dilated ``g`` instead would multiply
  zeros in 3/4 of a stride-2 gradient's multiply-adds.
  """
  form = input_grad_form(x_shape, w.shape, strides, pads)
  if form != "residue_classes":
    grad_pads = []
    for size, k, o, (lo, _) in zip(x_shape[1:3], w.shape[:2], g.shape[1:3], pads):
      before = k - lo - 1
      grad_pads.append((before, size + k - 1 - o - before))
    if form == "kernel_rows":
      return _input_grad_by_kernel_rows(g, w, x_shape[1], grad_pads)
    return _flipped_kernel_conv(g, w, grad_pads)
  cin = w.shape[2]
  n = g.shape[0]
  per_class = [-(-size // s) for size, s in zip(x_shape[1:3], strides)]
  plans = [[_residue_taps(r, k, s, lo, count, o) for r in range(s)]
           for k, s, (lo, _), count, o in zip(w.shape[:2], strides, pads, per_class, g.shape[1:3])]
  rows = []
  for (c1, taps1, pad1) in plans[0]:
    row = []
    for (c2, taps2, pad2) in plans[1]:
      if taps1 == 0 or taps2 == 0:  # no tap lands on this class (a 1x1 kernel's odd rows)
        row.append(jnp.zeros((n, per_class[0], per_class[1], cin), g.dtype))
        continue
      sub = w[c1::strides[0]][:taps1, c2::strides[1]][:, :taps2]
      g_padded = jax.lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), pad1 + (0,), pad2 + (0,), (0, 0, 0)])
      row.append(_flipped_kernel_conv(g_padded, sub, ((0, 0), (0, 0))))
    rows.append(jnp.stack(row, axis=3).reshape(n, per_class[0], per_class[1] * strides[1], cin))
  dx = jnp.stack(rows, axis=2).reshape(n, per_class[0] * strides[0], per_class[1] * strides[1], cin)
  return dx[:, :x_shape[1], :x_shape[2], :]


def _input_grad_by_kernel_rows(g, w, height: int, grad_pads):
  """The stride-1 input gradient without multiplying the zero rows of a padded ``g``.

  One convolution along the width computes, for every row of ``g``, what each
  of the kh kernel rows sends back (``[N, OH, W, kh, C_in]``: kh times the
  output channels, one matrix product); input row ``y`` then sums what its
  rows of ``g`` sent it through each kernel row. The sums are taken over blocks
  of input rows that receive from the same kernel rows, and concatenated.
  """
  kh, kw, cin, cout = w.shape
  n, oh = g.shape[:2]
  w_rows = jnp.transpose(jnp.flip(w, 1), (1, 3, 0, 2)).reshape(1, kw, cout, kh * cin)
  w_rows = jax.lax.optimization_barrier(w_rows)  # as in _flipped_kernel_conv
  sent = _forward_conv(g, w_rows, (1, 1), ((0, 0), tuple(grad_pads[1])))
  sent = sent.reshape(n, oh, sent.shape[2], kh, cin)
  # Input row y gets kernel row i's share of g row y + shift - i.
  shift = kh - 1 - grad_pads[0][0]
  senders = lambda y: tuple(i for i in range(kh) if 0 <= y + shift - i < oh)
  blocks, start = [], 0
  for y in range(1, height + 1):
    if y == height or senders(y) != senders(start):
      blocks.append((start, y, senders(start)))
      start = y
  pieces = []
  for y0, y1, rows in blocks:
    terms = [sent[:, y0 + shift - i:y1 + shift - i, :, i] for i in rows]
    pieces.append(functools.reduce(jnp.add, terms) if terms else
                  jnp.zeros((n, y1 - y0) + sent.shape[2:3] + (cin,), g.dtype))
  return jnp.concatenate(pieces, axis=1)


def _residue_taps(r: int, k: int, s: int, lo: int, count: int, out_size: int):
  """For the input positions ``s * p + r`` of one axis: the first tap (``c``), the
  number of taps (``c, c + s, ...``), and the padding of ``g`` that makes the
  class a 'VALID' convolution with ``count`` outputs."""
  c, offset = (r + lo) % s, (r + lo) // s
  taps = -(-(k - c) // s) if c < k else 0
  before = taps - 1 - offset
  return c, taps, (before, count + taps - 1 - out_size - before)


def _flipped_kernel_conv(g, w, grad_pads):
  """``g`` convolved (stride 1, padding ``grad_pads``) with the flipped, in/out-swapped ``w``."""
  w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
  w_t = jax.lax.optimization_barrier(w_t)  # keeps XLA from folding it back into labels
  return _forward_conv(g, w_t, (1, 1), grad_pads)


def _weight_grad(x, g, w, strides, pads: Pads):
  """``d conv(x, w)/dw`` applied to ``g``, as jax writes it (a convolution XLA:CPU runs well)."""
  w = jnp.zeros(w.shape, w.dtype)  # the value does not matter (linear in w); only its shape
  return jax.vjp(lambda w_: _forward_conv(x, w_, strides, pads), w)[1](g)[0]


def patches(x, kh: int, kw: int, strides, pads: Pads):
  """``[N, OH, OW, kh*kw*C]`` patches of NHWC ``x`` (order i, j, c) from strided slices."""
  (pt, pb), (pl, pr) = pads
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, h, w, c = xp.shape
  sh, sw = strides
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  cols = [jax.lax.slice(xp, (0, i, j, 0),
                        (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                        (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1), xp.shape


def _input_grad_by_patches(x_shape, w, g, strides, pads: Pads):
  """``dx = col2im(g W^T)``: one matrix product with the kernel, then the overlapping
  patches added back in place (few input channels: a convolution would have
  1-3 output channels)."""
  kh, kw, cin, cout = w.shape
  n, oh, ow, _ = g.shape
  (pt, pb), (pl, pr) = pads
  hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
  dcols = jnp.dot(g.reshape(-1, cout), w.reshape(-1, cout).T.astype(g.dtype))
  dcols = dcols.reshape(n, oh, ow, kh, kw, cin)
  sh, sw = strides
  dxp = None
  for i in range(kh):
    for j in range(kw):
      part = jax.lax.pad(dcols[:, :, :, i, j, :], jnp.zeros((), g.dtype),
                         [(0, 0, 0), (i, hp - i - ((oh - 1) * sh + 1), sh - 1),
                          (j, wp - j - ((ow - 1) * sw + 1), sw - 1), (0, 0, 0)])
      dxp = part if dxp is None else dxp + part
  return dxp[:, pt:pt + x_shape[1], pl:pl + x_shape[2], :]


def _rows_as_channels_conv(x, w, strides, pads: Pads):
  """A convolution with few input channels as a 1 x kw one over kh * C_in channels.

  The kh row-shifted copies of ``x`` are stacked as channels, so the kernel's
  rows become input channels: Eigen runs a 1-channel 5x5 convolution (LeNet's
  conv1) at a fraction of its speed on many channels.
  """
  kh, kw, cin, cout = w.shape
  (pt, pb), (pl, pr) = pads
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (pt, pb, 0), (0, 0, 0), (0, 0, 0)])
  sh, sw = strides
  oh = (xp.shape[1] - kh) // sh + 1
  rows = [jax.lax.slice_in_dim(xp, i, i + (oh - 1) * sh + 1, sh, axis=1) for i in range(kh)]
  w_rows = jnp.transpose(w, (1, 0, 2, 3)).reshape(1, kw, kh * cin, cout)
  return _forward_conv(jnp.concatenate(rows, axis=-1), w_rows, (1, sw), ((0, 0), (pl, pr)))


def winograd_eligible(x, w, strides, pads: Pads) -> bool:
  """Whether Winograd is a candidate for the convolution of ``x`` by ``w``.

  3x3 stride-1 'same', more than ``SMALL_CIN`` input channels, at least
  ``WINOGRAD_MIN_MACS`` multiply-adds, float32 only (its transforms would add
  bfloat16 rounding).
  """
  kh, kw, cin, cout = w.shape
  macs = x.shape[0] * x.shape[1] * x.shape[2] * kh * kw * cin * cout
  return (tuple(strides) == (1, 1) and tuple(pads) == ((1, 1), (1, 1))
          and (kh, kw) == (3, 3) and cin > SMALL_CIN and macs >= WINOGRAD_MIN_MACS
          and x.dtype == jnp.float32 and w.dtype == jnp.float32)


# The programs a Winograd-eligible convolution can take, by the names that
# ``tuning`` measures, logs, caches and pins ("winograd" is F(2x2, 3x3)).
WINOGRAD_TILINGS = {"winograd": winograd.F2X2, "winograd4": winograd.F4X4}


def conv_program(x, w, strides, pads: Pads, part: str = "forward") -> str:
  """The program of ``part`` ('forward', 'input_grad', 'weight_grad') of this convolution.

  For Winograd-eligible convolutions 'direct' or a key of ``WINOGRAD_TILINGS``,
  measured on this machine (``tuning.choose``: pinned, remembered, cached per
  machine, or timed inside ``tuning.measuring()``; logged); otherwise the
  fixed rule: F(2x2, 3x3) from ``WINOGRAD_MIN_CIN`` input channels for the
  forward pass and the input gradient, the direct form for the weight gradient. For the others, what
  the shapes decide (``program_by_shape``), logged once per shape.
  """
  if not winograd_eligible(x, w, strides, pads):
    program = program_by_shape(x.shape, w.shape, strides, pads, part)
    return tuning.note(f"conv {tuple(x.shape)} * {tuple(w.shape)} strides "
                       f"{tuple(strides)} pads {tuple(pads)} {part}", program)
  default = "winograd" if w.shape[2] >= WINOGRAD_MIN_CIN else "direct"
  x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  w_spec = jax.ShapeDtypeStruct(w.shape, w.dtype)
  g_spec = jax.ShapeDtypeStruct(x.shape[:3] + (w.shape[3],), x.dtype)
  if part == "forward":
    direct = lambda x_, w_: _forward_conv(x_, w_, strides, pads)
    winograd_part, specs = winograd.conv3x3, (x_spec, w_spec)
  elif part == "input_grad":
    direct = lambda g_, w_: input_grad_as_forward_conv(g_, w_, x.shape, strides, pads)
    winograd_part, specs = winograd.input_grad, (g_spec, w_spec)
  elif part == "weight_grad":
    direct = lambda x_, g_: _weight_grad(x_, g_, w_spec, strides, pads)
    winograd_part, specs, default = winograd.weight_grad, (x_spec, g_spec), "direct"
  else:
    raise ValueError(f"part={part!r}: must be 'forward', 'input_grad' or 'weight_grad'")
  candidates = {"direct": (direct, specs)}
  for name, tiling in WINOGRAD_TILINGS.items():
    candidates[name] = (functools.partial(winograd_part, t=tiling), specs)
  key = f"conv {tuple(x.shape)} * {tuple(w.shape)} {part}"
  return tuning.choose(key, candidates, default)


def program_by_shape(x_shape, w_shape, strides, pads: Pads, part: str) -> str:
  """The program of a convolution that is not measured, from its shapes alone.

  forward: 'kernel_rows_as_channels' (up to ``SMALL_CIN`` input channels,
  ``_rows_as_channels_conv``) or 'direct'; input_grad: 'patches' (few input
  channels, ``_input_grad_by_patches``), else ``input_grad_form``'s
  'residue_classes', 'kernel_rows' or 'direct'; weight_grad: 'direct'.
  """
  few_channels = w_shape[2] <= SMALL_CIN
  if part == "forward":
    return "kernel_rows_as_channels" if few_channels and w_shape[0] > 1 else "direct"
  if part == "input_grad":
    return "patches" if few_channels else input_grad_form(x_shape, w_shape, strides, pads)
  if part == "weight_grad":
    return "direct"
  raise ValueError(f"part={part!r}: must be 'forward', 'input_grad' or 'weight_grad'")


@functools.lru_cache(maxsize=None)
def _conv_with_fast_grads(strides: Tuple[int, int], pads: Pads):
  """An NHWC x HWIO ``(x, w) -> y`` convolution with the gradients described above."""

  @jax.custom_vjp
  def conv(x, w):
    program = conv_program(x, w, strides, pads)
    if program in WINOGRAD_TILINGS:
      return winograd.conv3x3(x, w, WINOGRAD_TILINGS[program])
    if program == "kernel_rows_as_channels":
      return _rows_as_channels_conv(x, w, strides, pads)
    return _forward_conv(x, w, strides, pads)

  def conv_fwd(x, w):
    return conv(x, w), (x, w)

  def conv_bwd(residuals, g):
    x, w = residuals
    program = conv_program(x, w, strides, pads, "input_grad")
    if program in WINOGRAD_TILINGS:
      dx = winograd.input_grad(g, w, WINOGRAD_TILINGS[program])
    elif program == "patches":
      dx = _input_grad_by_patches(x.shape, w, g, strides, pads).astype(x.dtype)
    else:  # 'direct', 'residue_classes', 'kernel_rows'
      dx = input_grad_as_forward_conv(g, w, x.shape, strides, pads)
    program = conv_program(x, w, strides, pads, "weight_grad")
    if program in WINOGRAD_TILINGS:
      dw = winograd.weight_grad(x, g, WINOGRAD_TILINGS[program])
    else:
      dw = _weight_grad(x, g, w, strides, pads)
    return dx, dw

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """Drop-in ``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``.

  2-D NHWC/HWIO convolutions without dilation or groups (every conv of our
  models) get the fast gradients; anything else goes to ``lax`` unchanged.
  """
  plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and dimension_numbers ==
           jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _conv_with_fast_grads(strides, pads)(lhs, rhs)
