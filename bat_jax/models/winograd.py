"""3x3 stride-1 'same' convolutions as Winograd F(2x2, 3x3): 2.25x fewer multiplications.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). Each
2x2 block of outputs comes from its 4x4 input tile ``d`` as
``A^T [(G w G^T) * (B^T d B)] A``; summed over input channels, the product over
the 16 tile positions is 16 matrix products ``[tiles, C_in] x [C_in, C_out]``
(4 multiplications per output and channel pair instead of 9). The transforms
are sums and differences that XLA fuses into a few memory passes.

``cpu_ops`` uses it on XLA:CPU for the forward pass and the input gradient of
large 3x3 convolutions: the passes of a PGD iteration (measured in
benchmarks/README.md, "Speed per CPU"). Float32 results differ from a direct
convolution by rounding only (~1e-6 relative; tests/test_cpu_ops.py checks
them against float64).
"""

from typing import List, Sequence

import jax
import jax.numpy as jnp

# The F(2x2, 3x3) matrices: input transform B^T (4x4), kernel transform G
# (4x3), output transform A^T (2x4).
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(coefs: Sequence[float], parts: Sequence[jax.Array]) -> jax.Array:
  """``sum(c * p)`` over the nonzero coefficients, without multiplying by +-1."""
  out = None
  for c, p in zip(coefs, parts):
    if c == 0:
      continue
    term = p if c == 1 else -p if c == -1 else p * jnp.asarray(c, p.dtype)
    out = term if out is None else out + term
  return out


def transform_kernel(w: jax.Array) -> List[jax.Array]:
  """HWIO ``[3, 3, C_in, C_out]`` -> the 16 ``[C_in, C_out]`` slabs of ``G w G^T``."""
  rows = [[_combine(G[u], [w[i, j] for i in range(3)]) for j in range(3)]
          for u in range(4)]
  return [_combine(G[v], rows[u]) for u in range(4) for v in range(4)]


def _tile_counts(x_shape) -> tuple:
  return -(-x_shape[1] // 2), -(-x_shape[2] // 2)  # ceil: odd sizes get a pad row


def transform_input(x: jax.Array) -> List[jax.Array]:
  """NHWC ``x`` -> the 16 ``[N * tiles_h * tiles_w, C]`` slabs of ``B^T d B``."""
  n, h, w, c = x.shape
  th, tw = _tile_counts(x.shape)
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  d = [[xp[:, i:i + 2 * th:2, j:j + 2 * tw:2, :] for j in range(4)] for i in range(4)]
  rows = [[_combine(B_T[u], [d[i][j] for i in range(4)]) for j in range(4)]
          for u in range(4)]
  return [_combine(B_T[v], rows[u]).reshape(n * th * tw, c)
          for u in range(4) for v in range(4)]


def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))`` in NHWC/HWIO."""
  return _from_transformed(x, transform_kernel(w), contract_dim=0)


def input_grad(g: jax.Array, w: jax.Array) -> jax.Array:
  """``d conv3x3(x, w)/dx`` applied to ``g``: the flipped, in/out-swapped kernel.

  Flipping a 3-tap kernel swaps rows 0 and 3 of ``G w G^T`` (``G J = P G``),
  and the in/out swap is a transposed matrix product, so the forward pass's
  transformed kernel serves (no transposed copy of the kernel is made).
  """
  u = transform_kernel(w)
  flip = (3, 1, 2, 0)
  return _from_transformed(g, [u[flip[k // 4] * 4 + flip[k % 4]] for k in range(16)],
                           contract_dim=1)


def _from_transformed(x, u, contract_dim: int):
  """The convolution of ``x`` with the kernel whose transformed slabs are ``u``."""
  n, h, wd, _ = x.shape
  th, tw = _tile_counts(x.shape)
  dims = (((1,), (contract_dim,)), ((), ()))
  m = [jax.lax.dot_general(v, u_k, dims).reshape(n, th, tw, -1)
       for v, u_k in zip(transform_input(x), u)]
  rows = [[_combine(A_T[r], [m[a * 4 + b] for a in range(4)]) for b in range(4)]
          for r in range(2)]
  out = [[_combine(A_T[q], rows[r]) for q in range(2)] for r in range(2)]
  # out[r][q] holds the outputs at (2 i + r, 2 j + q): interleave them.
  y = jnp.stack([jnp.stack(out[r], axis=3).reshape(n, th, 2 * tw, -1) for r in range(2)],
                axis=2).reshape(n, 2 * th, 2 * tw, -1)
  # Materialised once: fused into its consumers (BatchNorm's sums, the
  # residual adds), the output transform would be recomputed by each of them.
  return jax.lax.optimization_barrier(y[:, :h, :wd, :])
