"""Flax models taking NHWC images in ``[0, 1]``; normalisation is inside.

``create_model(name, num_classes, mean=..., std=..., dtype=...)`` builds any of
``MODEL_NAMES``. Every model is called as ``model.apply(variables, x,
train=...)``; models with BatchNorm (``has_batch_norm(name)``) also carry a
'batch_stats' collection, which is updated only when ``train=True`` (pass
``mutable=['batch_stats']``). ``dtype`` is the compute dtype (e.g. bfloat16);
parameters stay float32 and logits are returned as float32. ``layers``
(``layers.Layers``) gives the modules that build convolutions, BatchNorms and
max-pools: Flax's own by default, or others with the same variables.
"""

import math
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bat_jax.models.layers import STOCK, Layers
from bat_jax.models.lenet import LeNet
from bat_jax.models.resnet import (BasicBlock, PreActBlock, PreActResNet,
                                   PreActResNet18, ResNet, ResNet18)
from bat_jax.models.tiny import TinyCNN
from bat_jax.models.wide_resnet import WRN28_10, WRN34_10, WideResNet

# name -> (constructor, has BatchNorm, default keyword arguments).
_REGISTRY: Dict[str, tuple[Callable[..., nn.Module], bool, Dict[str, Any]]] = {
    "lenet": (LeNet, False, {}),
    "resnet18": (ResNet18, True, {}),
    "preact_resnet18": (PreActResNet18, True, {}),
    "wrn28_10": (WRN28_10, True, {}),
    "wrn34_10": (WRN34_10, True, {}),
    # CPU-sized models for tests and `runlocal` configs.
    "tiny_cnn": (TinyCNN, True, {}),
    "tiny_resnet": (ResNet, True, {"stage_sizes": (1, 1, 1, 1), "width": 8}),
    # WRN-10-1: the WRN-28-10 code path at CPU size (benchmark smoke runs).
    "tiny_wrn": (WideResNet, True, {"depth": 10, "widen_factor": 1}),
}
MODEL_NAMES = tuple(_REGISTRY)


def _check_name(name: str) -> None:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; the model name must be one of "
                     f"{MODEL_NAMES}.")


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
  _check_name(name)
  constructor, _, defaults = _REGISTRY[name]
  as_tuple = lambda v: None if v is None else tuple(
      float(a) for a in np.atleast_1d(v))
  return constructor(num_classes=num_classes, mean=as_tuple(mean),
                     std=as_tuple(std), dtype=dtype, layers=layers,
                     **{**defaults, **kwargs})


def has_batch_norm(name: str) -> bool:
  """Whether model ``name`` has BatchNorm, i.e. a 'batch_stats' collection."""
  _check_name(name)
  return _REGISTRY[name][1]


def count_params(params: Any) -> int:
  """The number of scalars in a parameter pytree (arrays or shape structs)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


__all__ = ["MODEL_NAMES", "BasicBlock", "LeNet", "PreActBlock",
           "PreActResNet", "PreActResNet18", "ResNet", "ResNet18", "TinyCNN",
           "WRN28_10", "WRN34_10", "WideResNet", "count_params",
           "create_model", "has_batch_norm"]
