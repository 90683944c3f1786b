"""Pieces shared by every model: in-model normalisation, PyTorch-like inits.

Models take images in ``[0, 1]`` so that epsilon is measured in pixel space;
the dataset mean/std normalisation is the first operation of the model.
"""

from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bat_jax.models import cpu_ops

Array = jax.Array

# How convolutions and max-pools compute their gradients: "xla" (the stock
# ops) or "cpu_fast" (cpu_ops.py: the same functions, faster on XLA:CPU).
# create_model(ops="auto") picks "cpu_fast" on the CPU backend, "xla" elsewhere.
OPS = ("xla", "cpu_fast")

# Convolutions: kaiming normal with fan_out, ``normal(0, sqrt(2 / (k*k*out)))``,
# the init of the WRN code of TRADES/MART/BAT and of torchvision's ResNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Dense layers: PyTorch's default ``nn.Linear`` weight init,
# ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; biases start at zero.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                     "uniform")
# PyTorch's default ``nn.Conv2d`` weight init (same bound as nn.Linear), for
# the LeNet, whose reference code keeps PyTorch's defaults.
torch_default_kernel_init = dense_kernel_init


def normalize(x: Array, mean: Optional[Sequence[float]],
              std: Optional[Sequence[float]], dtype) -> Array:
  """Returns ``(x - mean) / std`` in float32, cast to the compute ``dtype``.

  ``mean``/``std`` are per-channel sequences (or scalars); ``None`` skips that
  part, so a model built with neither sees its raw ``[0, 1]`` input.
  """
  x = jnp.asarray(x, jnp.float32)
  if mean is not None:
    x = x - jnp.asarray(mean, jnp.float32)
  if std is not None:
    x = x / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def batch_norm(train: bool, dtype, axis_name: Optional[str] = None,
               name: Optional[str] = None, ops: str = "xla") -> nn.Module:
  """BatchNorm with PyTorch's defaults (torch momentum 0.1 == flax 0.9).

  Normalises with batch statistics and updates the running averages only when
  ``train``; in inference mode it reads the running averages. ``ops='cpu_fast'``
  gives ``cpu_ops.BatchNorm``, the same function and variables.
  """
  module = cpu_ops.BatchNorm if resolve_ops(ops) == "cpu_fast" else nn.BatchNorm
  return module(use_running_average=not train, momentum=0.9,
                epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                axis_name=axis_name, name=name)


def resolve_ops(ops: str) -> str:
  """``"auto"`` -> ``"cpu_fast"`` on the CPU backend, ``"xla"`` elsewhere."""
  if ops == "auto":
    return "cpu_fast" if jax.default_backend() == "cpu" else "xla"
  if ops not in OPS:
    raise ValueError(f"ops={ops!r} is invalid: must be 'auto' or one of {list(OPS)}.")
  return ops


def conv_ops(ops: str) -> Dict[str, Any]:
  """``nn.Conv`` keyword arguments that select the ``ops`` implementation."""
  if resolve_ops(ops) == "cpu_fast":
    return {"conv_general_dilated": cpu_ops.conv_general_dilated}
  return {}


def conv_module(ops: str):
  """``nn.Conv``, or for ``ops='cpu_fast'`` ``cpu_ops.Conv`` (same variables and function)."""
  return cpu_ops.Conv if resolve_ops(ops) == "cpu_fast" else nn.Conv


def max_pool(x: Array, window: int, ops: str) -> Array:
  """Non-overlapping ``window`` x ``window`` max-pooling (stride = window)."""
  pool = cpu_ops.max_pool if resolve_ops(ops) == "cpu_fast" else nn.max_pool
  return pool(x, (window, window), strides=(window, window))


def conv(features: int, kernel: int, stride: int, dtype, name: str,
         ops: str = "xla") -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric padding (``kernel // 2``)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=kernel // 2, use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_kernel_init,
                 name=name, **conv_ops(ops))
