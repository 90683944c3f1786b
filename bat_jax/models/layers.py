"""The layers a model builds its convolutions, normalisations and pools from.

Every model takes one ``layers: Layers`` field and creates these three kinds
of layer only through it, so another implementation of the same functions
(with the same variables) can be put in without touching the models; the
default, ``STOCK``, is Flax's own.
"""

import dataclasses
from typing import Any, Callable

from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class Layers:
  """Module factories: ``conv`` takes ``nn.Conv``'s arguments and makes its
  variables, ``norm`` ``nn.BatchNorm``'s, and ``max_pool`` is called as
  ``nn.max_pool(x, window_shape, strides=...)``."""
  conv: Callable[..., nn.Module] = nn.Conv
  norm: Callable[..., nn.Module] = nn.BatchNorm
  max_pool: Callable[..., Any] = nn.max_pool


# Flax's layers.
STOCK = Layers()
