"""Pieces shared by every model: in-model normalisation, PyTorch-like inits, activations.

Models take images in ``[0, 1]`` so that epsilon is measured in pixel space;
the dataset mean/std normalisation is the first operation of the model. The
layer helpers take the module factory (a field of ``layers.Layers``) to build.
"""

from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

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

# The activations of a model with an ``activation`` field, by name: ReLU, and
# SiLU ``x * sigmoid(x)`` (Swish, Ramachandran et al. 2017; the WRNs of Gowal
# et al. 2020 and Rebuffi et al. 2021). Other names of the same function:
# ACTIVATION_ALIASES.
ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {"relu": nn.relu, "silu": nn.silu}
ACTIVATION_ALIASES = {"swish": "silu"}


def canonical_activation(name: str) -> str:
  """'relu', 'silu' or 'swish' (any case) -> its name in ACTIVATIONS; ValueError otherwise."""
  canonical = str(name).lower()
  canonical = ACTIVATION_ALIASES.get(canonical, canonical)
  if canonical not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; the activations are "
                     f"{list(ACTIVATIONS)} ('swish' is 'silu').")
  return canonical


def activation(name: str) -> Callable[[Array], Array]:
  """The activation function called ``name`` (see :func:`canonical_activation`)."""
  return ACTIVATIONS[canonical_activation(name)]


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


def batch_norm(norm: Callable[..., nn.Module], train: bool, dtype,
               axis_name: Optional[str] = None, name: Optional[str] = None) -> nn.Module:
  """A ``norm`` (``nn.BatchNorm``-like) with PyTorch's defaults (torch momentum
  0.1 == flax 0.9).

  Normalises with batch statistics and updates the running averages only when
  ``train``; in inference mode it reads the running averages.
  """
  return norm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
              dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name, name=name)


def max_pool(pool: Callable[..., Array], x: Array, window: int) -> Array:
  """Non-overlapping ``window`` x ``window`` max-pooling (stride = window) by ``pool``."""
  return pool(x, (window, window), strides=(window, window))


def conv(conv_module: Callable[..., nn.Module], features: int, kernel: int, stride: int,
         dtype, name: str) -> nn.Module:
  """A bias-free ``conv_module`` with PyTorch's symmetric padding (``kernel // 2``)."""
  return conv_module(features, (kernel, kernel), strides=(stride, stride),
                     padding=kernel // 2, use_bias=False, dtype=dtype,
                     param_dtype=jnp.float32, kernel_init=conv_kernel_init, name=name)
