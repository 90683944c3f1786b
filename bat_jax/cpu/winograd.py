"""3x3 stride-1 'same' convolutions as Winograd F(2x2, 3x3) or F(4x4, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). Each
m x m block of outputs comes from its (m + 2) x (m + 2) input tile ``d`` as
``A^T [(G w G^T) * (B^T d B)] A``; summed over input channels, the product over
the (m + 2)^2 tile positions is that many matrix products ``[tiles, C_in] x
[C_in, C_out]``. Per output and channel pair that is 4 multiplications for
F(2x2) and 2.25 for F(4x4), instead of 9; the transformed input is 4x and 2.25x
the input's size. The transforms are sums and scaled differences that XLA
fuses into a few memory passes.

``conv`` uses them on XLA:CPU for the forward pass and the input gradient of
large 3x3 convolutions (the passes of a PGD iteration), and for the weight
gradient of the training passes. Which of direct, F(2x2)
and F(4x4) is fastest depends on the CPU and the shapes, so it is measured
(``tuning``; docs/PERFORMANCE.md). Float32 results differ
from a direct convolution by rounding only, larger for F(4x4) whose transforms
have coefficients up to 8 (max error against float64 ~3e-7 of the largest
output for F(2x2), ~5e-6 for F(4x4); tests/test_cpu_ops.py checks both).
"""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

Matrix = Tuple[Tuple[float, ...], ...]


@dataclasses.dataclass(frozen=True)
class Tiling:
  """The matrices of F(m x m, 3x3): input transform ``B_T`` ((m+2) x (m+2)),
  kernel transform ``G`` ((m+2) x 3), output transform ``A_T`` (m x (m+2)).

  ``flip``: where flipping the 3 taps permutes the rows of ``G`` (``G J = P G``),
  the permutation; then the flipped kernel's transform is the kernel's, rows
  permuted, and the input gradient shares the forward pass's. None otherwise.
  """
  m: int
  B_T: Matrix
  G: Matrix
  A_T: Matrix
  flip: Optional[Tuple[int, ...]] = None

  @property
  def alpha(self) -> int:  # the input tile's side
    return self.m + 2


# Interpolation points 0, 1, -1 (and infinity).
F2X2 = Tiling(
    m=2,
    B_T=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    G=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    A_T=((1, 1, 1, 0), (0, 1, -1, -1)),
    flip=(3, 1, 2, 0))
# Interpolation points 0, 1, -1, 2, -2 (and infinity); flipping maps 2 to 1/2.
F4X4 = Tiling(
    m=4,
    B_T=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
    G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
    A_T=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
         (0, 1, -1, 8, -8, 1)))


def _combine(coefs: Sequence[float], parts: Sequence[jax.Array]) -> jax.Array:
  """``sum(c * p)`` over the nonzero coefficients, without multiplying by +-1."""
  out = None
  for c, p in zip(coefs, parts):
    if c == 0:
      continue
    term = p if c == 1 else -p if c == -1 else p * jnp.asarray(c, p.dtype)
    out = term if out is None else out + term
  return out


def transform_kernel(w: jax.Array, t: Tiling = F2X2) -> List[jax.Array]:
  """HWIO ``[3, 3, C_in, C_out]`` -> the alpha^2 ``[C_in, C_out]`` slabs of ``G w G^T``."""
  rows = [[_combine(t.G[u], [w[i, j] for i in range(3)]) for j in range(3)]
          for u in range(t.alpha)]
  return [_combine(t.G[v], rows[u]) for u in range(t.alpha) for v in range(t.alpha)]


def tile_counts(x_shape, t: Tiling = F2X2) -> Tuple[int, int]:
  return -(-x_shape[1] // t.m), -(-x_shape[2] // t.m)  # ceil: other sizes get pad rows


def transform_input(x: jax.Array, t: Tiling = F2X2) -> List[jax.Array]:
  """NHWC ``x`` -> the alpha^2 ``[N * tiles_h * tiles_w, C]`` slabs of ``B^T d B``."""
  n, h, w, c = x.shape
  th, tw = tile_counts(x.shape, t)
  xp = jnp.pad(x, ((0, 0), (1, t.m * th + 1 - h), (1, t.m * tw + 1 - w), (0, 0)))
  d = [[xp[:, i:i + t.m * th:t.m, j:j + t.m * tw:t.m, :] for j in range(t.alpha)]
       for i in range(t.alpha)]
  rows = [[_combine(t.B_T[u], [d[i][j] for i in range(t.alpha)]) for j in range(t.alpha)]
          for u in range(t.alpha)]
  return [_combine(t.B_T[v], rows[u]).reshape(n * th * tw, c)
          for u in range(t.alpha) for v in range(t.alpha)]


def conv3x3(x: jax.Array, w: jax.Array, t: Tiling = F2X2) -> jax.Array:
  """``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))`` in NHWC/HWIO."""
  return _from_transformed(x, transform_kernel(w, t), t, contract_dim=0)


def input_grad(g: jax.Array, w: jax.Array, t: Tiling = F2X2) -> jax.Array:
  """``d conv3x3(x, w)/dx`` applied to ``g``: the flipped, in/out-swapped kernel.

  The in/out swap is a transposed matrix product with the flipped kernel's
  slabs, so no transposed copy of the kernel is made. For F(2x2) those slabs
  are the forward pass's, reordered (``Tiling.flip``), so the two passes share
  one kernel transform.
  """
  if t.flip is None:
    return _from_transformed(g, transform_kernel(w[::-1, ::-1], t), t, contract_dim=1)
  u = transform_kernel(w, t)
  a = t.alpha
  return _from_transformed(g, [u[t.flip[k // a] * a + t.flip[k % a]] for k in range(a * a)],
                           t, contract_dim=1)


def weight_grad(x: jax.Array, g: jax.Array, t: Tiling = F2X2) -> jax.Array:
  """``d <conv3x3(x, w), g>/dw``: the HWIO ``[3, 3, C_in, C_out]`` kernel gradient.

  The transpose of the forward pass: each tile's output gradient is taken back
  through the output transform (``A g A^T``), multiplied position by position
  with the transformed input tiles and summed over the tiles (alpha^2 matrix
  products ``[C_in, tiles] x [tiles, C_out]``), and taken back through the
  kernel transform (``G^T M G``). Unlike the direct form, no transposed copy of
  ``x`` is made.
  """
  n, h, wd, _ = x.shape
  th, tw = tile_counts(x.shape, t)
  m, a = t.m, t.alpha
  gp = jnp.pad(g, ((0, 0), (0, m * th - h), (0, m * tw - wd), (0, 0)))
  blocks = [[gp[:, r::m, q::m, :] for q in range(m)] for r in range(m)]  # g at (m i + r, m j + q)
  a_col = [[t.A_T[r][u] for r in range(m)] for u in range(a)]
  rows = [[_combine(a_col[u], [blocks[r][q] for r in range(m)]) for q in range(m)]
          for u in range(a)]
  g_slabs = [_combine(a_col[v], rows[u]).reshape(n * th * tw, -1)
             for u in range(a) for v in range(a)]
  dims = (((0,), (0,)), ((), ()))
  prods = [jax.lax.dot_general(v, gs, dims) for v, gs in zip(transform_input(x, t), g_slabs)]
  g_col = [[t.G[u][i] for u in range(a)] for i in range(3)]
  taps = [[_combine(g_col[i], [prods[u * a + v] for u in range(a)]) for v in range(a)]
          for i in range(3)]
  return jnp.stack([jnp.stack([_combine(g_col[j], taps[i]) for j in range(3)])
                    for i in range(3)])


def _from_transformed(x, u, t: Tiling, contract_dim: int):
  """The convolution of ``x`` with the kernel whose transformed slabs are ``u``."""
  n, h, wd, _ = x.shape
  th, tw = tile_counts(x.shape, t)
  a = t.alpha
  dims = (((1,), (contract_dim,)), ((), ()))
  prods = [jax.lax.dot_general(v, u_k, dims).reshape(n, th, tw, -1)
           for v, u_k in zip(transform_input(x, t), u)]
  rows = [[_combine(t.A_T[r], [prods[i * a + j] for i in range(a)]) for j in range(a)]
          for r in range(t.m)]
  out = [[_combine(t.A_T[q], rows[r]) for q in range(t.m)] for r in range(t.m)]
  # out[r][q] holds the outputs at (m i + r, m j + q): interleave them.
  y = jnp.stack([jnp.stack(out[r], axis=3).reshape(n, th, t.m * tw, -1)
                 for r in range(t.m)], axis=2).reshape(n, t.m * th, t.m * tw, -1)
  # Meant to materialise the output once, so that its consumers (BatchNorm's
  # sums, the residual adds) do not each recompute the output transform. XLA:CPU
  # (jaxlib 0.10.2) keeps it materialised with or without the barrier (checked:
  # the same fusions either way), and strips barriers before fusing.
  return jax.lax.optimization_barrier(y[:, :h, :wd, :])
