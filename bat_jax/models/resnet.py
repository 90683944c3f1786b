"""CIFAR ResNet-18 and PreAct ResNet-18 (3x3 stem, no max-pool), resizable.

``ResNet`` is the standard post-activation ResNet with BasicBlocks (the
``kuangliu/pytorch-cifar`` layout used by the TRADES/MART/BAT code);
``PreActResNet`` is the pre-activation variant (He et al. 2016), with a final
BN-ReLU before pooling as in Rice et al.'s robust-overfitting code.
``stage_sizes`` and ``width`` shrink either for CPU tests: widths are
``width * 2**i`` for stage ``i``, the first stage at stride 1, the others 2.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bat_jax.models import common
from bat_jax.models.layers import STOCK, Layers


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) shortcut."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: common.batch_norm(self.layers.norm, train, self.dtype,
                                        self.bn_axis_name, name=name)
    conv = lambda kernel, stride, name: common.conv(
        self.layers.conv, self.features, kernel, stride, self.dtype, name)
    y = conv(3, self.stride, "conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv(3, 1, "conv2")(y)
    y = bn("bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(1, self.stride, "shortcut_conv")(x)
      x = bn("shortcut_bn")(x)
    return nn.relu(y + x)


class PreActBlock(nn.Module):
  """BN-ReLU-conv-BN-ReLU-conv; the projection shortcut reads the activation.

  ``activation`` names both nonlinearities (``common.ACTIVATIONS``: 'relu', 'silu').
  """
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: common.batch_norm(self.layers.norm, train, self.dtype,
                                        self.bn_axis_name, name=name)
    conv = lambda kernel, stride, name: common.conv(
        self.layers.conv, self.features, kernel, stride, self.dtype, name)
    act = common.activation(self.activation)
    y = act(bn("bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(1, self.stride, "shortcut_conv")(y)
    else:
      shortcut = x
    y = conv(3, self.stride, "conv1")(y)
    y = act(bn("bn2")(y))
    y = conv(3, 1, "conv2")(y)
    return y + shortcut


class ResNet(nn.Module):
  """Post-activation CIFAR ResNet; the defaults give ResNet-18 (~11.2M)."""
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.layers.conv, self.width, 3, 1, self.dtype, "stem_conv")(x)
    x = common.batch_norm(self.layers.norm, train, self.dtype, self.bn_axis_name,
                          name="stem_bn")(x)
    x = nn.relu(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, stride, self.dtype, self.bn_axis_name,
                       self.layers, name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.dense_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)


class PreActResNet(nn.Module):
  """Pre-activation CIFAR ResNet; the defaults are PreAct ResNet-18.

  ``final_norm=False`` drops the BN-ReLU before pooling, giving the
  ``kuangliu/pytorch-cifar`` variant that the authors' code copies.
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  final_norm: bool = True
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: Layers = STOCK  # conv / norm / pool factories (models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.layers.conv, self.width, 3, 1, self.dtype, "stem_conv")(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = PreActBlock(self.width * 2**i, stride, self.dtype,
                        self.bn_axis_name, self.layers,
                        name=f"stage{i + 1}_block{j + 1}")(x, train)
    if self.final_norm:
      x = nn.relu(common.batch_norm(self.layers.norm, train, self.dtype,
                                    self.bn_axis_name, name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.dense_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)


class ResNet18(ResNet):
  """ResNet-18 for CIFAR: BasicBlocks [2, 2, 2, 2], widths 64..512."""


class PreActResNet18(PreActResNet):
  """PreAct ResNet-18 for CIFAR: PreActBlocks [2, 2, 2, 2], widths 64..512."""
