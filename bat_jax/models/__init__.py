"""Flax models taking NHWC images in ``[0, 1]``; normalisation is inside.

``create_model(name, num_classes, mean=..., std=..., dtype=...)`` builds any of
``MODEL_NAMES``: the models of the registry (:data:`MODELS`, registry.py; the
shipped ones are in zoo.py), to which :func:`register_model` adds one. Every
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

from bat_jax.models import zoo  # noqa: F401  # registers the shipped models
from bat_jax.models.layers import STOCK, Layers
from bat_jax.models.lenet import LeNet
from bat_jax.models.resnet import (BasicBlock, PreActBlock, PreActResNet,
                                   PreActResNet18, ResNet, ResNet18)
from bat_jax.models.registry import (MODELS, ModelSpec, RobustBenchClass, TorchTwin,
                                     get, register_model, torch_twin)
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
                 **kwargs) -> nn.Module:
  """Builds the model ``name`` with in-model ``(x - mean) / std`` normalisation.

  ``layers``: the conv / norm / pool factories (``layers.Layers``; Flax's by default).
  ``kwargs`` override the architecture's fields (e.g. ``width=16`` for
  ``tiny_resnet``, ``bn_axis_name='batch'`` for cross-device BatchNorm).
  """
  spec = get(name)
  as_tuple = lambda v: None if v is None else tuple(
      float(a) for a in np.atleast_1d(v))
  return spec.module(num_classes=num_classes, mean=as_tuple(mean),
                     std=as_tuple(std), dtype=dtype, layers=layers,
                     **{**spec.defaults, **kwargs})


def has_batch_norm(name: str) -> bool:
  """Whether model ``name`` has BatchNorm, i.e. a 'batch_stats' collection."""
  return get(name).has_batch_norm


def count_params(params: Any) -> int:
  """The number of scalars in a parameter pytree (arrays or shape structs)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


__all__ = ["MODELS", "MODEL_NAMES", "BasicBlock", "LeNet", "Layers", "ModelSpec", "PreActBlock",
           "PreActResNet", "PreActResNet18", "ResNet", "ResNet18", "RobustBenchClass", "STOCK",
           "TinyCNN", "TorchTwin", "WRN28_10", "WRN34_10", "WideResNet", "count_params",
           "create_model", "get", "has_batch_norm", "register_model", "torch_twin"]
