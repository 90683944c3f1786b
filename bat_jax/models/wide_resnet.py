"""Wide ResNets (Zagoruyko & Komodakis 2016) as in the TRADES/MART/BAT PyTorch code.

3x3 stem conv with 16 channels, then three groups of ``(depth - 4) / 6``
pre-activation basic blocks with widths ``16k, 32k, 64k`` (strides 1, 2, 2),
a final BN-activation, global average pooling and a dense layer with zero
bias. WRN-28-10 has about 36.5M parameters, WRN-34-10 about 46.2M and
WRN-70-16 about 266.8M. ``activation`` is every nonlinearity's: ReLU (the
default, TRADES's) or SiLU / Swish (Gowal et al. 2020; Rebuffi et al. 2021).
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


def depth_error(depth: int) -> Optional[str]:
  """Why ``depth`` is no Wide ResNet's (it must be 6n + 4, n >= 1), or None."""
  if (depth - 4) % 6 != 0 or depth < 10:
    return (f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, "
            f"70, ...); got depth={depth}")
  return None


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor``; the defaults are WRN-28-10 with ReLU."""
  num_classes: int = 10
  depth: int = 28
  widen_factor: int = 10
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)
  activation: str = "relu"  # common.ACTIVATIONS: 'relu' or 'silu'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if depth_error(self.depth):
      raise ValueError(depth_error(self.depth) + ".")
    blocks_per_group = (self.depth - 4) // 6
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.layers.conv, 16, 3, 1, self.dtype, "stem_conv")(x)
    for i, stride in enumerate((1, 2, 2)):
      for j in range(blocks_per_group):
        x = PreActBlock(16 * 2**i * self.widen_factor, stride if j == 0 else 1,
                        self.dtype, self.bn_axis_name, self.layers,
                        activation=self.activation,
                        name=f"group{i + 1}_block{j + 1}")(x, train)
    x = common.batch_norm(self.layers.norm, train, self.dtype, self.bn_axis_name,
                          name="final_bn")(x)
    x = jnp.mean(common.activation(self.activation)(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.dense_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)


class WRN28_10(WideResNet):  # pylint: disable=invalid-name
  """WRN-28-10 (~36.5M params), the paper's main CIFAR-10 model."""


class WRN34_10(WideResNet):  # pylint: disable=invalid-name
  """WRN-34-10 (~46.2M params), the TRADES/MART CIFAR-10 model."""
  depth: int = 34
