"""Checks that benchmarks/fast_ops.py computes the same functions as XLA's ops.

Forward values and gradients of ``fast_conv`` / ``xla_vjp_conv`` /
``im2col_conv`` against ``lax.conv_general_dilated`` on the conv shapes of
the models (5x5 valid, 3x3 pad 1 at strides 1 and 2, 1x1 stride 2, 1 and 3
input channels), and of ``slice_max_pool`` after a ReLU against flax's
``max_pool``; then the gradient of a whole LeNet and ResNet with both
swapped in. Prints the worst relative error; exits 1 above 1e-5.

  python benchmarks/check_fast_ops.py
"""

import sys

import jax
import jax.numpy as jnp
from flax import linen as nn

import fast_ops

SHAPES = [  # (x shape, w shape, strides, padding)
    ((4, 28, 28, 1), (5, 5, 1, 32), (1, 1), "VALID"),
    ((4, 12, 12, 32), (5, 5, 32, 64), (1, 1), "VALID"),
    ((4, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1))),
    ((4, 31, 31, 3), (3, 3, 3, 16), (2, 2), ((1, 1), (1, 1))),
    ((4, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),
    ((4, 32, 32, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),
    ((4, 16, 16, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
]


def rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))


def main():
  worst = 0.0
  key = jax.random.PRNGKey(0)
  for xs, ws, s, p in SHAPES:
    x = jax.random.normal(key, xs)
    w = jax.random.normal(jax.random.PRNGKey(1), ws)
    ref = lambda x, w: jax.lax.conv_general_dilated(
        x, w, s, p, dimension_numbers=fast_ops.DIMENSION_NUMBERS)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    g_ref = jax.grad(loss(ref), (0, 1))(x, w)
    for name, impl in fast_ops.CONV_IMPLS.items():
      f = lambda x, w: impl(x, w, s, p)
      errs = [rel(ref(x, w), jax.jit(f)(x, w))]
      errs += [rel(a, b) for a, b in zip(g_ref, jax.jit(jax.grad(loss(f), (0, 1)))(x, w))]
      worst = max(worst, *errs)
      print(f"{name:8s} x{xs} w{ws} s{s}: rel err y {errs[0]:.1e} dx {errs[1]:.1e} "
            f"dw {errs[2]:.1e}")
  for shape in ((128, 24, 24, 32), (128, 8, 8, 64), (4, 9, 9, 3)):
    x = jax.random.normal(key, shape)
    x = jnp.where(x > 1.0, 0.5, x)  # many exact ties among positive values
    pool_ref = lambda x: nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2))
    pool = lambda x: fast_ops.slice_max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2))
    g = jax.random.normal(key, pool_ref(x).shape)
    e = [rel(pool_ref(x), pool(x)),
         rel(jax.vjp(pool_ref, x)[1](g)[0], jax.vjp(pool, x)[1](g)[0])]
    worst = max(worst, *e)
    print(f"max pool after ReLU {shape}, with ties: rel err y {e[0]:.1e} dx {e[1]:.1e}")
  # Whole models, with fast_ops swapped into flax as bench_jax does.
  from bat_jax import models  # pylint: disable=g-import-not-at-top
  cases = [("lenet", (8, 28, 28, 1)), ("tiny_resnet", (8, 32, 32, 3))]
  outs = {}
  for patched in (False, True):
    if patched:
      fast_ops.patch_flax_conv("fast")
      fast_ops.patch_flax_max_pool()
    for name, shape in cases:
      m = models.create_model(name, 10)
      x = jax.random.uniform(key, shape)
      x = jnp.where(x < 0.5, 0.0, x)  # blank regions: ties in the pools
      v = m.init(jax.random.PRNGKey(2), x)
      f = lambda v, x: jnp.sum(jax.nn.log_softmax(m.apply(v, x))[:, 0])
      outs[(name, patched)] = jax.jit(jax.grad(f, (0, 1)))(v, x)
  for name, _ in cases:
    a = jax.tree_util.tree_leaves(outs[(name, False)])
    b = jax.tree_util.tree_leaves(outs[(name, True)])
    e = max(rel(u, w) for u, w in zip(a, b))
    worst = max(worst, e)
    print(f"{name}: params + input gradient, worst rel err {e:.1e}")
  print(f"worst relative error {worst:.1e}")
  return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
