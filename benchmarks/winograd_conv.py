"""Experiment: 3x3 stride-1 convolutions as Winograd F(2x2, 3x3) on XLA:CPU.

``bat_jax/models/winograd.py`` holds the forward pass and the input gradient;
here also the weight gradient as the transposed algorithm, which is not used.

Prints, per ResNet-18 3x3 convolution at batch 16, the direct and Winograd
times of the forward pass, the input gradient and the weight gradient (with
the error against the direct one), then ResNet-18's 10 PGD iterations and one
standard train step with ``cpu_ops``' Winograd off and on. The weight gradient
through Winograd was not faster (2.3x slower on 32x32x64), so cpu_ops keeps
the direct one (benchmarks/README.md, "Speed per CPU").

  python benchmarks/winograd_conv.py
"""

import os
import sys
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_kernels import _median_seconds  # pylint: disable=g-import-not-at-top,protected-access
from bat_jax.models.winograd import (F2X2, _combine, conv3x3,  # pylint: disable=g-import-not-at-top
                                     input_grad, tile_counts, transform_input)

A_T, G = F2X2.A_T, F2X2.G


def _columns(matrix, k: int):
  return [row[k] for row in matrix]


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """``d conv3x3(x, w)/dw`` applied to ``g``: the transposed algorithm."""
  n, h, wd, c_out = g.shape
  th, tw = tile_counts(g.shape)
  gp = jnp.pad(g, ((0, 0), (0, 2 * th - h), (0, 2 * tw - wd), (0, 0)))
  parts = [[gp[:, r::2, q::2, :] for q in range(2)] for r in range(2)]
  # The output transform transposed: dM[a][b] = sum_rq A^T[r, a] A^T[q, b] g[r][q].
  rows = [[_combine(_columns(A_T, a), [parts[r][q] for r in range(2)]) for q in range(2)]
          for a in range(4)]
  dm = [_combine(_columns(A_T, b), rows[a]).reshape(n * th * tw, c_out)
        for a in range(4) for b in range(4)]
  contract_rows = (((0,), (0,)), ((), ()))
  du = [jax.lax.dot_general(v, m, contract_rows)
        for v, m in zip(transform_input(x), dm)]
  # The kernel transform transposed: dw[i][j] = sum_uv G[u, i] G[v, j] dU[u][v].
  cols = [[_combine(_columns(G, i), [du[u * 4 + v] for u in range(4)]) for v in range(4)]
          for i in range(3)]
  return jnp.stack([jnp.stack([_combine(_columns(G, j), cols[i]) for j in range(3)])
                    for i in range(3)])


# --------------------------------------------------------------------------
# The measurement.
# --------------------------------------------------------------------------

def _median_ms(fn, *args, repeats=7):
  return 1e3 * _median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def main():
  from bat_jax import util  # pylint: disable=g-import-not-at-top
  util.add_default_xla_flags()
  from bat_jax.models import cpu_ops  # pylint: disable=g-import-not-at-top
  print(util.cpu_description())
  pads = ((1, 1), (1, 1))
  direct = lambda x, w: cpu_ops._forward_conv(x, w, (1, 1), pads)  # pylint: disable=protected-access
  print("ResNet-18's 3x3 convolutions at batch 16, ms (max error relative to the largest value):")
  for size, ch in ((32, 64), (16, 128), (8, 256), (4, 512)):
    x = jax.random.normal(jax.random.PRNGKey(0), (16, size, size, ch))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, ch, ch)) * 0.05
    y, vjp = jax.vjp(direct, x, w)
    dx, dw = vjp(y)
    err = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    rows = {
        "fwd": (jax.jit(direct), jax.jit(conv3x3), (x, w), err(conv3x3(x, w), y)),
        "dx": (jax.jit(lambda g, w_: cpu_ops.input_grad_as_forward_conv(g, w_, x.shape, (1, 1), pads)),
               jax.jit(input_grad), (y, w), err(input_grad(y, w), dx)),
        "dw": (jax.jit(lambda x_, g: jax.vjp(lambda w_: direct(x_, w_), w)[1](g)[0]),
               jax.jit(weight_grad), (x, y), err(weight_grad(x, y), dw)),
    }
    cells = [f"{name} direct {_median_ms(a, *args):.2f} winograd {_median_ms(b, *args):.2f} ({e:.0e})"
             for name, (a, b, args, e) in rows.items()]
    print(f"  {size}x{size}x{ch}: " + " | ".join(cells), flush=True)
  print("ResNet-18 at batch 16, ms: 10 PGD iterations (eval mode), one standard train step:")
  results = {}
  for name, min_macs in (("direct", float("inf")), ("winograd", cpu_ops.WINOGRAD_MIN_MACS)):
    cpu_ops.WINOGRAD_MIN_MACS = min_macs  # read at trace time: each model traces anew
    results[name] = _whole_model_ms()
  for name, (pgd, train) in results.items():
    print(f"  {name}: PGD-10 {pgd:.0f}  train step {train:.0f}", flush=True)


def _whole_model_ms():
  import bench_jax  # pylint: disable=g-import-not-at-top
  bench_jax._import_jax()  # pylint: disable=protected-access
  from bat_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model("resnet18", 10)
  x = jax.random.uniform(jax.random.PRNGKey(0), (16, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  labels = jnp.arange(16) % 10

  def loss(v, z):
    logits = model.apply(v, z, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  # The weights are arguments, as in training (constants would let XLA fold
  # Winograd's kernel transform away at compile time).
  pgd = jax.jit(lambda v, z: jax.lax.fori_loop(
      0, 10, lambda i, z: z + 0.001 * jnp.sign(jax.grad(loss, 1)(v, z)), z))
  step = bench_jax.StepBench(method="standard", model="resnet18", batch=16, steps=0)
  return _median_ms(pgd, variables, x, repeats=3), 1e3 * sorted(step.time(5))[2]


if __name__ == "__main__":
  main()
