"""Shared by the tests: a plain-JAX MLP, the bundled real MNIST digits, and a
small MNIST written in TFDS's own format (what `tfds build mnist` prepares)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from bat_jax import datasets


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


def load_mnist(split, n):
  """The first ``n`` bundled real digits of ``split``: float images in [0, 1], labels."""
  images, labels = datasets.load_split("mnist_subset", split, num_examples=n)
  return jnp.asarray(images.astype(np.float32) / 255.0), jnp.asarray(labels)


class _MnistFromArrays(tfds_mnist.MNIST, skip_registration=True):
  """TFDS's MNIST builder fed from arrays instead of the download.

  It keeps the builder's name, version, features and file layout, so the files
  it writes are those `tfds build mnist --file_format=array_record` writes
  (records shuffled by TFDS as there), only with fewer digits.
  """
  name = "mnist"

  def __init__(self, splits, **kwargs):
    self._arrays = splits
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._examples(*arrays) for split, arrays in self._arrays.items()}

  def _examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      # A PIL image: TFDS encodes it to PNG without TensorFlow.
      yield i, {"image": Image.fromarray(image[..., 0]), "label": int(label)}


def write_tfds_mnist(data_dir, num_train, num_test):
  """Prepares ``mnist`` (array_record) in ``data_dir`` from the first bundled
  digits of each split; returns ``{split: (images, labels)}`` as written."""
  splits = {split: datasets.load_split("mnist_subset", split, num_examples=n)
            for split, n in (("train", num_train), ("test", num_test))}
  builder = _MnistFromArrays(splits, data_dir=str(data_dir),
                             file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert (pathlib.Path(data_dir) / "mnist" / str(builder.version)).is_dir()
  return splits


def as_written_order(images, labels, written):
  """Indices into ``written`` (images, labels) of each read example: TFDS
  stores records in its own shuffled order. Fails on an unknown example."""
  index = {(img.tobytes(), int(lab)): i
           for i, (img, lab) in enumerate(zip(*written))}
  return np.array([index[(img.tobytes(), int(lab))]
                   for img, lab in zip(images, labels)])
