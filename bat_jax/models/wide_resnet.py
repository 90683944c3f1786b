"""Wide ResNets (Zagoruyko & Komodakis) as in the TRADES/MART/BAT PyTorch code.

3x3 stem conv with 16 channels, then three groups of ``(depth - 4) / 6``
pre-activation basic blocks with widths ``16k, 32k, 64k`` (strides 1, 2, 2),
a final BN-ReLU, global average pooling and a dense layer with zero bias.
WRN-28-10 has about 36.5M parameters and WRN-34-10 about 46.2M.
TRADES's WRN ``BasicBlock`` computes exactly ``resnet.PreActBlock`` (the
projection shortcut reads the pre-activated input), so it is reused here.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bat_jax.models import common
from bat_jax.models.layers import STOCK, Layers
from bat_jax.models.resnet import PreActBlock


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor``; the defaults are WRN-28-10."""
  num_classes: int = 10
  depth: int = 28
  widen_factor: int = 10
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 "
                       f"(e.g. 28 or 34); got depth={self.depth}.")
    blocks_per_group = (self.depth - 4) // 6
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.layers.conv, 16, 3, 1, self.dtype, "stem_conv")(x)
    for i, stride in enumerate((1, 2, 2)):
      for j in range(blocks_per_group):
        x = PreActBlock(16 * 2**i * self.widen_factor, stride if j == 0 else 1,
                        self.dtype, self.bn_axis_name, self.layers,
                        name=f"group{i + 1}_block{j + 1}")(x, train)
    x = common.batch_norm(self.layers.norm, train, self.dtype, self.bn_axis_name,
                          name="final_bn")(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.dense_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)


class WRN28_10(WideResNet):  # pylint: disable=invalid-name
  """WRN-28-10 (~36.5M params), the paper's main CIFAR-10 model."""


class WRN34_10(WideResNet):  # pylint: disable=invalid-name
  """WRN-34-10 (~46.2M params), the TRADES/MART CIFAR-10 model."""
  depth: int = 34
