"""The paper's MNIST CNN ("LeNet" in the authors' code).

conv 32 5x5 (valid) -> ReLU -> max-pool 2 -> conv 64 5x5 (valid) -> ReLU ->
max-pool 2 -> flatten (4*4*64) -> dense 1024 -> ReLU -> dense ``num_classes``.
No BatchNorm, so the module has only a 'params' collection. With valid
padding this has 1,111,946 parameters (~10 MFLOP per forward pass); the
"about 3.3M" once quoted for it is Madry et al.'s variant with 'SAME'
padding (a 7*7*64 flatten), which is not what the authors' code trains.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bat_jax.models import common
from bat_jax.models.layers import STOCK, Layers


class LeNet(nn.Module):
  """The MNIST CNN of docs/ALGORITHMS.md section 4, taking NHWC images in ``[0, 1]``.

  Weights use PyTorch's default init (what the reference code trains from);
  biases start at zero. The flatten is in NHWC order, so weights ported from
  PyTorch (NCHW flatten) need their first dense kernel permuted.
  """
  num_classes: int = 10
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No BatchNorm or dropout: train and eval are the same function.
    layer = dict(dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.torch_default_kernel_init)
    conv = self.layers.conv
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = conv(32, (5, 5), padding="VALID", name="conv1", **layer)(x)
    x = common.max_pool(self.layers.max_pool, nn.relu(x), 2)
    x = conv(64, (5, 5), padding="VALID", name="conv2", **layer)(x)
    x = common.max_pool(self.layers.max_pool, nn.relu(x), 2)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(1024, name="fc1", **layer)(x))
    x = nn.Dense(self.num_classes, name="fc2", **layer)(x)
    return x.astype(jnp.float32)
