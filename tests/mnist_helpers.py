"""Shared by the attack tests: a plain-JAX MLP and real MNIST from TFDS."""

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds


def mlp_init(key, sizes=(784, 128, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [(jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), jnp.zeros(b))
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return h @ w + b


def load_mnist(data_dir, split, n):
  """The first ``n`` examples of ``split`` as float images in [0, 1] and labels."""
  src = tfds.data_source("mnist", split=split, data_dir=data_dir)
  rows = src.__getitems__(list(range(n)))
  x = np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0
  y = np.array([r["label"] for r in rows], np.int32)
  return jnp.asarray(x), jnp.asarray(y)
