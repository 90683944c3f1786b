"""Adversarial weight perturbation (AWP; Wu, Xia, Wang 2020), as the authors' code computes it.

Their ``utils_awp.py`` lets a proxy copy of the model take one SGD step on the
negated training loss and keeps, for each parameter whose name holds
'weight' and that has more than one dimension (conv and linear kernels), the
step rescaled to the layer's norm: ``||w|| / (||diff|| + 1e-20) * diff``. The
model is moved by ``gamma`` times that, updated, and moved back. The proxy's
step ``lr * grad`` is along the gradient, and its learning rate cancels in the
rescaling, so per kernel the perturbation is
``gamma * ||w|| * g / (||g|| + 1e-20)``, ``g`` the loss's gradient. Flax names
those kernels 'kernel'; biases and BatchNorm's scale and bias stay put.
docs/ALGORITHMS.md, section 6.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

# The reference's guard against a zero step (``EPS`` in ``utils_awp.py``).
EPS = 1e-20


def is_perturbed(path, leaf) -> bool:
  """Whether AWP moves this parameter: a kernel (conv or dense) with ndim > 1."""
  last = path[-1] if path else None
  name = getattr(last, "key", getattr(last, "name", None))
  return name == "kernel" and jnp.ndim(leaf) > 1


def perturbation(params: Any, grads: Any, gamma: float) -> Any:
  """``gamma * ||w|| * g / (||g|| + EPS)`` per kernel, zeros elsewhere (a tree like ``params``).

  ``grads`` is the training loss's gradient at ``params`` (over the global
  batch); norms are over each whole kernel (Frobenius).
  """
  def leaf(path, w, g):
    if not is_perturbed(path, w):
      return jnp.zeros_like(w)
    return gamma * jnp.linalg.norm(w) / (jnp.linalg.norm(g) + EPS) * g

  return jax.tree_util.tree_map_with_path(leaf, params, grads)


def zeros(params: Any) -> Any:
  """No perturbation: the tree :func:`perturbation` returns before AWP starts."""
  return jax.tree_util.tree_map(jnp.zeros_like, params)


def add(params: Any, perturbation_tree: Any) -> Any:
  """The perturbed weights ``w + v``."""
  return jax.tree_util.tree_map(jnp.add, params, perturbation_tree)


def start_step(warmup_epochs: int, steps_per_epoch: Optional[int]) -> int:
  """The first step with AWP: the first step of epoch ``warmup_epochs`` (counted from 0)."""
  if warmup_epochs <= 0:
    return 0
  if steps_per_epoch is None:
    raise ValueError("an AWP warm-up in epochs needs the run's steps_per_epoch.")
  return int(warmup_epochs * steps_per_epoch)
