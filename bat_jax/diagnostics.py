"""Training-time gradient diagnostics of the paper (Figures 4, 6, 7).

How each loss term's descent direction moves the margin ``M(x)``: cosines of
parameter gradients, the expected margin increase and the normalised
gradient norm (docs/ALGORITHMS.md, section 3). Pure JAX: the train step's
diagnostics probe calls it inside the compiled, device-parallel program.
"""

from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
# Guards the denominators of cosines and of the normalised gradient norm.
_TINY = 1e-12

def gradient_diagnostics(loss_terms: Mapping[str, Callable[[Any], Array]],
                         total_loss_fn: Callable[[Any], Array],
                         margin_fn: Callable[[Any], Array],
                         params: Any) -> Dict[str, Array]:
  """How each loss term's descent direction moves the margin ``M(x)``.

  All gradients are with respect to ``params`` (any pytree). With ``g_f`` the
  gradient of ``f`` and ``g_M`` that of ``margin_fn``, returns scalars:
    ``cos_{name}_margin``    cosine(-g_name, g_M) (Figure 4), also for
                             ``total``;
    ``margin_increase``      ``g_M . (-g_total)``, the first-order margin
                             gain of a unit-rate descent step (Figure 6 top);
    ``margin_increase_{name}`` the same for each term;
    ``grad_norm_ratio``      ``||g_total|| / |total|`` (equation 6, Figure 7);
    ``grad_norm_ratio_{name}`` the same for each term;
    ``margin``               the value of ``margin_fn`` (Figure 6 bottom);
    ``loss``                 the value of ``total_loss_fn``.
  One forward pass of all functions and one batched (vmapped) backward pass;
  pure JAX, so it can run inside a jitted or pmapped train step. Gradient
  dot products use full float32 precision (TPU matmuls default to bf16).
  """
  names = list(loss_terms)
  for name in names:
    if name == "total":
      raise ValueError("gradient_diagnostics: 'total' is reserved for "
                       "total_loss_fn; rename that loss term.")
  fns = [loss_terms[name] for name in names] + [total_loss_fn, margin_fn]
  total_index, margin_index = len(names), len(names) + 1

  def stacked(p):
    return jnp.stack([jnp.asarray(fn(p), jnp.float32).reshape(()) for fn in fns])

  values, vjp = jax.vjp(stacked, params)
  (grads,) = jax.vmap(vjp)(jnp.eye(len(fns), dtype=values.dtype))
  gram = _gram_matrix(grads)  # gram[i, j] = g_i . g_j
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

  def descent_vs_margin(i):
    increase = -gram[i, margin_index]
    cosine = increase / jnp.maximum(norms[i] * norms[margin_index], _TINY)
    ratio = norms[i] / jnp.maximum(jnp.abs(values[i]), _TINY)
    return increase, cosine, ratio

  out = {}
  for i, name in enumerate(names):
    increase, cosine, ratio = descent_vs_margin(i)
    out[f"cos_{name}_margin"] = cosine
    out[f"margin_increase_{name}"] = increase
    out[f"grad_norm_ratio_{name}"] = ratio
  increase, cosine, ratio = descent_vs_margin(total_index)
  out.update(cos_total_margin=cosine, margin_increase=increase,
             grad_norm_ratio=ratio, margin=values[margin_index],
             loss=values[total_index])
  return out


def _gram_matrix(stacked_grads: Any) -> Array:
  """``[K, K]`` dot products of K gradient pytrees stacked on a leading axis.

  Summed leaf by leaf, so no flattened copy of all parameters is built.
  """
  gram = None
  for leaf in jax.tree_util.tree_leaves(stacked_grads):
    flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    part = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    gram = part if gram is None else gram + part
  if gram is None:
    raise ValueError("gradient_diagnostics: params has no array leaves.")
  return gram
