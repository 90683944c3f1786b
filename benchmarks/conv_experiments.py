"""Convolution formulations measured that did not become bat_jax ops.

``bat_jax/models/cpu_ops.py`` holds what worked (``config.ops='cpu_fast'``).
These are kept so that the ablation rows of benchmarks/README.md can be rerun: every
convolution as im2col + one matmul, and PyTorch's NCHW/OIHW layout.
``bench_jax.py --ops=xla --conv_impl=im2col|nchw`` swaps one into every
``flax.linen.Conv`` via :func:`patch_flax_conv`.
"""

import types

import jax
import jax.numpy as jnp

from bat_jax.models import cpu_ops


def _pads(padding, lhs, rhs, strides):
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  return tuple(tuple(p) for p in padding)


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, **_):
  """Every NHWC convolution as shifted strided slices concatenated + one matmul."""
  assert feature_group_count == 1
  kh, kw, cin, cout = rhs.shape
  strides = tuple(window_strides)
  cols, _ = cpu_ops.patches(lhs, kh, kw, strides, _pads(padding, lhs, rhs, strides))
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


CONV_IMPLS = {"im2col": im2col_conv, "nchw": nchw_conv}


def patch_flax_conv(conv_impl: str) -> None:
  """Makes every ``flax.linen.Conv`` without its own conv call ``CONV_IMPLS[conv_impl]``."""
  import flax.linen.linear as linear  # pylint: disable=g-import-not-at-top
  proxy = types.ModuleType("lax_proxy")
  proxy.__dict__.update(jax.lax.__dict__)
  proxy.conv_general_dilated = CONV_IMPLS[conv_impl]
  linear.lax = proxy
