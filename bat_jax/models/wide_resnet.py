"""Wide ResNets (Zagoruyko & Komodakis) as in the TRADES/MART/BAT PyTorch code.

3x3 stem conv with 16 channels, then three groups of ``(depth - 4) / 6``
pre-activation basic blocks with widths ``16k, 32k, 64k`` (strides 1, 2, 2),
a final BN-ReLU, global average pooling and a dense layer. WRN-28-10 has about
36.5M parameters and WRN-34-10 about 46.2M.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bat_jax.models import common


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric padding (``kernel // 2``)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=kernel // 2, use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=common.conv_kernel_init,
                 name=name)


class WideBasicBlock(nn.Module):
  """The TRADES ``BasicBlock``: BN-ReLU-conv-BN-ReLU-conv plus a shortcut.

  When the width or stride changes, the 1x1 projection shortcut reads the
  pre-activated input (``relu(bn1(x))``), otherwise the shortcut is ``x``.
  """
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: common.batch_norm(train, self.dtype, self.bn_axis_name,
                                        name=name)
    y = nn.relu(bn("bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, self.dtype,
                       "shortcut_conv")(y)
    else:
      shortcut = x
    y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(y)
    y = nn.relu(bn("bn2")(y))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor``; the defaults are WRN-28-10."""
  num_classes: int = 10
  depth: int = 28
  widen_factor: int = 10
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 "
                       f"(e.g. 28 or 34); got depth={self.depth}.")
    blocks_per_group = (self.depth - 4) // 6
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = _conv(16, 3, 1, self.dtype, "stem_conv")(x)
    for i, stride in enumerate((1, 2, 2)):
      for j in range(blocks_per_group):
        x = WideBasicBlock(16 * 2**i * self.widen_factor,
                           stride if j == 0 else 1, self.dtype,
                           self.bn_axis_name,
                           name=f"group{i + 1}_block{j + 1}")(x, train)
    x = common.batch_norm(train, self.dtype, self.bn_axis_name,
                          name="final_bn")(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.dense_kernel_init,
                 bias_init=nn.initializers.zeros, name="fc")(x)
    return x.astype(jnp.float32)
