"""A tiny BatchNorm CNN for fast CPU tests and ``runlocal`` configs."""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bat_jax.models import common
from bat_jax.models.layers import STOCK, Layers


class TinyCNN(nn.Module):
  """conv 3x3 -> BN -> ReLU -> conv 3x3 stride 2 -> BN -> ReLU -> pool -> dense.

  Small enough to compile and run in well under a second on a CPU, yet it has
  BatchNorm, so tests exercise the 'batch_stats' collection like the big nets.
  """
  num_classes: int = 10
  width: int = 8
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = dict(use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=common.conv_kernel_init)
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = self.layers.conv(self.width, (3, 3), name="conv1", **conv)(x)
    x = nn.relu(common.batch_norm(self.layers.norm, train, self.dtype,
                                  self.bn_axis_name, name="bn1")(x))
    x = self.layers.conv(2 * self.width, (3, 3), strides=(2, 2), name="conv2", **conv)(x)
    x = nn.relu(common.batch_norm(self.layers.norm, train, self.dtype,
                                  self.bn_axis_name, name="bn2")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.dense_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)
