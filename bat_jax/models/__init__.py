"""Flax models taking NHWC images in ``[0, 1]``; normalisation is inside.

``create_model(name, num_classes, mean=..., std=..., dtype=..., activation=...)``
builds any of ``MODEL_NAMES``: the models of the registry (:data:`MODELS`,
registry.py; the shipped ones are in zoo.py), to which :func:`register_model`
adds one, and any name of a registered family (``wrn{depth}_{width}``). Every
model is called as ``model.apply(variables, x, train=...)``; models with
BatchNorm (``has_batch_norm(name)``) also carry a 'batch_stats' collection,
which is updated only when ``train=True`` (pass ``mutable=['batch_stats']``).
``dtype`` is the compute dtype (e.g. bfloat16); parameters stay float32 and
logits are returned as float32. ``layers`` (``layers.Layers``) gives the
modules that build convolutions, BatchNorms and max-pools: Flax's own by
default, or others with the same variables.
"""

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bat_jax import errors
from bat_jax.models import zoo  # noqa: F401  # registers the shipped models
from bat_jax.models.common import ACTIVATIONS, canonical_activation
from bat_jax.models.layers import STOCK, Layers
from bat_jax.models.lenet import LeNet
from bat_jax.models.resnet import (BasicBlock, PreActBlock, PreActResNet,
                                   PreActResNet18, ResNet, ResNet18)
from bat_jax.models.registry import (FAMILIES, MODELS, ModelFamily, ModelSpec,
                                     RobustBenchClass, TorchTwin, activations, find, get,
                                     register_family, register_model, torch_twin)
from bat_jax.models.tiny import TinyCNN
from bat_jax.models.wide_resnet import WRN28_10, WRN34_10, WideResNet


def __getattr__(name: str):
  """``MODEL_NAMES``: the registered models' names, those registered later included."""
  if name == "MODEL_NAMES":
    return tuple(MODELS)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_model(name: str, num_classes: int, *,
                 mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None,
                 dtype: Any = jnp.float32, layers: Layers = STOCK,
                 activation: str = "relu", **kwargs) -> nn.Module:
  """Builds the model ``name`` with in-model ``(x - mean) / std`` normalisation.

  ``layers``: the conv / norm / pool factories (``layers.Layers``; Flax's by default).
  ``activation``: 'relu', 'silu' or 'swish' (= 'silu'); other than ReLU only for
  the models with an ``activation`` field (:func:`activations`), a UserError
  for the others. ``kwargs`` override the architecture's fields (e.g.
  ``width=16`` for ``tiny_resnet``, ``bn_axis_name='batch'`` for
  cross-device BatchNorm).
  """
  spec = get(name)
  try:
    activation = canonical_activation(activation)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  fields = {**spec.defaults, **kwargs}
  if activation != "relu":
    if activation not in activations(name):
      raise errors.UserError(
          f"Model {name!r} has ReLU activations only; activation={activation!r} is for "
          f"the models {[n for n in MODELS if len(activations(n)) > 1]} and "
          f"{list(FAMILIES)}.")
    fields["activation"] = activation
  as_tuple = lambda v: None if v is None else tuple(
      float(a) for a in np.atleast_1d(v))
  return spec.module(num_classes=num_classes, mean=as_tuple(mean),
                     std=as_tuple(std), dtype=dtype, layers=layers, **fields)


def has_batch_norm(name: str) -> bool:
  """Whether model ``name`` has BatchNorm, i.e. a 'batch_stats' collection."""
  return get(name).has_batch_norm


def count_params(params: Any) -> int:
  """The number of scalars in a parameter pytree (arrays or shape structs)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


__all__ = ["ACTIVATIONS", "FAMILIES", "MODELS", "MODEL_NAMES", "BasicBlock", "LeNet", "Layers",
           "ModelFamily", "ModelSpec", "PreActBlock", "PreActResNet", "PreActResNet18",
           "ResNet", "ResNet18", "RobustBenchClass", "STOCK", "TinyCNN", "TorchTwin",
           "WRN28_10", "WRN34_10", "WideResNet", "activations", "canonical_activation",
           "count_params", "create_model", "find", "get", "has_batch_norm",
           "register_family", "register_model", "torch_twin"]
