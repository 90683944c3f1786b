"""Input pipeline: deterministic host batches from uint8 arrays and extra data.

A split is read once into NumPy (``bat_jax.datasets.load_split``) and every
training batch is a pure function of ``(seed, step)`` (``TrainBatches``):
resuming at step ``s`` yields exactly the batch an uninterrupted run would
have seen. Extra data (``bat_jax.extra_data``: in memory or streamed from
array_record shards) is read by index, in the order of a keyed permutation
computed in O(1) memory (``KeyedPermutation``), and each host reads only the
extra examples of its own slots. Images stay uint8 on the host; ``to_float``
and the CIFAR augmentation (``augment``) run on device, inside the compiled
step.
Evaluation (``eval_batches``) pads the last batch and carries a mask, so every
example is counted exactly once.
"""

from typing import Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import extra_data as extra_data_lib

Batch = Dict[str, np.ndarray]


# --------------------------------------------------------------------------
# The extra stream's order: a keyed permutation of [0, n) in O(1) memory.
# --------------------------------------------------------------------------


def _mix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective avalanche of uint64 words (wraps mod 2^64)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


class KeyedPermutation:
  """A pseudo-random bijection of ``[0, n)`` chosen by ``key``, as a function.

  ``perm(positions)`` gives the indices at those positions of the order,
  in O(len(positions)) time and memory whatever ``n`` (20M extra images
  need no 160 MB ``np.random.permutation``). A balanced Feistel network of
  :attr:`ROUNDS` rounds, whose round function mixes the right half with a
  round key (``_mix64``), is a bijection of the ``2b``-bit words, ``2^2b``
  the smallest even power of two ``>= n`` (so ``< 4n``); cycle-walking
  (encrypting again while the result is ``>= n``) restricts it to
  ``[0, n)``. The round keys come from ``np.random.default_rng(key)``.
  """

  ROUNDS = 6

  def __init__(self, n: int, key: Sequence[int]):
    if n < 1:
      raise ValueError(f"a permutation of [0, n) needs n >= 1; got {n}.")
    self.n = int(n)
    bits = max(2, (self.n - 1).bit_length())
    self._half = np.uint64((bits + 1) // 2)
    self._mask = np.uint64((1 << int(self._half)) - 1)
    self._round_keys = np.random.default_rng(key).integers(
        0, np.iinfo(np.uint64).max, size=self.ROUNDS, dtype=np.uint64, endpoint=True)

  def _encrypt(self, words: np.ndarray) -> np.ndarray:
    left, right = words >> self._half, words & self._mask
    for round_key in self._round_keys:
      left, right = right, left ^ (_mix64(right ^ round_key) & self._mask)
    return (left << self._half) | right

  def __call__(self, positions) -> np.ndarray:
    positions = np.asarray(positions, np.int64).reshape(-1)
    if positions.size and (positions.min() < 0 or positions.max() >= self.n):
      raise IndexError(f"positions must lie in [0, {self.n}).")
    out = self._encrypt(positions.astype(np.uint64))
    outside = np.flatnonzero(out >= self.n)
    while outside.size:  # ends: x's cycle under the bijection returns to x < n
      out[outside] = self._encrypt(out[outside])
      outside = outside[out[outside] >= self.n]
    return out.astype(np.int64)


# --------------------------------------------------------------------------
# Training batches: a pure function of (seed, step).
# --------------------------------------------------------------------------


def _extra_positions(batch_size: int, num_extra: int) -> np.ndarray:
  """Which of the global batch's slots hold extra data, spread evenly.

  Slot ``i`` is extra iff ``floor((i+1)k/B) > floor(ik/B)``: exactly ``k``
  slots, evenly spaced, so every device's contiguous slice gets (nearly) the
  same share however the batch is split across hosts and devices.
  """
  i = np.arange(batch_size)
  return (i + 1) * num_extra // batch_size > i * num_extra // batch_size


class TrainBatches:
  """The host-local training batch for any step, as a pure function of the seed.

  Each epoch visits the (base) training set in the order of a permutation
  drawn from ``np.random.default_rng([seed, 0, epoch])`` and drops the last
  partial batch. With ``extra_fraction > 0``, ``round(batch_size *
  extra_fraction)`` slots of every global batch come from the extra data
  (``extra``, a ``bat_jax.extra_data.ExtraData``: arrays in memory or
  streamed shards), which runs through its own
  permutations, as in RST: epoch ``e`` of the extra stream visits it in the
  order of ``KeyedPermutation(len(extra), [seed, 1, e])``; ``steps_per_epoch``
  still counts passes over the base data.

  The global batch is split into ``process_count`` contiguous host slices and
  this host's slice is reshaped to ``[local_device_count, per_device, ...]``.
  The global batch does not depend on the host/device layout; a host reads
  only the extra examples of its own slots.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               batch_size: int, seed: int,
               extra: Optional[extra_data_lib.ExtraData] = None,
               extra_fraction: float = 0.0,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               local_device_count: Optional[int] = None):
    self.process_index = (jax.process_index() if process_index is None
                          else process_index)
    self.process_count = (jax.process_count() if process_count is None
                          else process_count)
    self.local_device_count = (jax.local_device_count()
                               if local_device_count is None
                               else local_device_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} must lie in "
                       f"[0, process_count={self.process_count}).")
    num_shards = self.process_count * self.local_device_count
    if batch_size <= 0 or batch_size % num_shards:
      raise ValueError(
          f"batch_size={batch_size} (the global batch) must be a positive "
          f"multiple of process_count * local_device_count = "
          f"{self.process_count} * {self.local_device_count} = {num_shards}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    if not 0.0 <= extra_fraction < 1.0:
      raise ValueError(
          f"extra_fraction must be in [0, 1); got {extra_fraction}.")
    if (extra is not None) != (extra_fraction > 0):
      raise ValueError("Give extra data together with extra_fraction > 0, or "
                       f"neither (extra_fraction={extra_fraction}).")

    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.batch_size, self.seed = batch_size, int(seed)
    self.num_extra = int(round(batch_size * extra_fraction))
    self.num_base = batch_size - self.num_extra
    if extra is not None:
      if tuple(extra.image_shape) != tuple(images.shape[1:]):
        raise ValueError(f"Extra images are {tuple(extra.image_shape)}, the "
                         f"training images {images.shape[1:]}.")
      if self.num_extra == 0:
        raise ValueError(f"batch_size={batch_size} * extra_fraction="
                         f"{extra_fraction} rounds to no extra example.")
      if self.num_extra > len(extra):
        raise ValueError(f"{self.num_extra} extra examples per batch but the "
                         f"extra set has only {len(extra)}.")
    self.extra = extra
    if self.num_base > len(images):
      raise ValueError(f"batch_size={batch_size} takes {self.num_base} "
                       f"training examples per step, but there are only "
                       f"{len(images)}.")
    self._is_extra = _extra_positions(batch_size, self.num_extra)
    self._base_order = (None, None)  # (epoch, permutation of the base data)
    self._extra_order = (None, None)  # (epoch, KeyedPermutation of the extra data)

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per pass over the base training data."""
    return len(self.images) // self.num_base

  @property
  def per_device_batch_size(self) -> int:
    return self.batch_size // (self.process_count * self.local_device_count)

  def _base_indices(self, step: int) -> np.ndarray:
    """The base examples of the global batch at ``step`` (epoch order memoised)."""
    epoch, position = divmod(step, len(self.images) // self.num_base)
    if self._base_order[0] != epoch:
      rng = np.random.default_rng([self.seed, 0, epoch])
      self._base_order = (epoch, rng.permutation(len(self.images)))
    order = self._base_order[1]
    return order[position * self.num_base:(position + 1) * self.num_base]

  def _extra_indices(self, step: int) -> np.ndarray:
    """The extra examples of the global batch at ``step``: positions of a keyed order."""
    epoch, position = divmod(step, len(self.extra) // self.num_extra)
    if self._extra_order[0] != epoch:
      self._extra_order = (epoch, KeyedPermutation(len(self.extra), [self.seed, 1, epoch]))
    first = position * self.num_extra
    return self._extra_order[1](np.arange(first, first + self.num_extra))

  def global_indices(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
    """The global batch at ``step``: (example index, is-extra flag) per slot."""
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}.")
    index = np.empty((self.batch_size,), np.int64)
    index[~self._is_extra] = self._base_indices(step)
    if self.num_extra:
      index[self._is_extra] = self._extra_indices(step)
    return index, self._is_extra

  def batch(self, step: int) -> Batch:
    """This host's share of the global batch at ``step``.

    Returns 'image' uint8 ``[local_devices, per_device, H, W, C]`` and
    'label' int32 ``[local_devices, per_device]``.
    """
    index, is_extra = self.global_indices(step)
    per_host = self.batch_size // self.process_count
    local = slice(self.process_index * per_host,
                  (self.process_index + 1) * per_host)
    index, is_extra = index[local], is_extra[local]
    images = np.empty((per_host,) + self.images.shape[1:], np.uint8)
    labels = np.empty((per_host,), np.int32)
    images[~is_extra] = self.images[index[~is_extra]]
    labels[~is_extra] = self.labels[index[~is_extra]]
    if is_extra.any():  # this host's extra slots only
      images[is_extra], labels[is_extra] = self.extra.read(index[is_extra])
    shape = (self.local_device_count, self.per_device_batch_size)
    return {"image": images.reshape(shape + images.shape[1:]),
            "label": labels.reshape(shape)}

  def batches(self, start_step: int = 0,
              num_steps: Optional[int] = None) -> Iterator[Batch]:
    """Yields ``batch(step)`` for ``step = start_step, start_step + 1, ...``."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[Batch]:
    return self.batches()


# --------------------------------------------------------------------------
# Evaluation batches: every example exactly once.
# --------------------------------------------------------------------------


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 num_devices: int = 1, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Iterates a whole split in order, padding the last batch with zeros.

  Yields 'image' ``[num_devices, per_device, H, W, C]`` (the dtype of
  ``images``, uint8 for a data set), 'label' int32
  and a boolean 'mask' (False on padding), both ``[num_devices, per_device]``.
  ``batch_size`` is global; with several hosts, pass ``process_index`` and
  ``process_count`` to get this host's contiguous share of each batch (every
  host yields the same number of batches, as collectives need).
  """
  if batch_size <= 0 or batch_size % (num_devices * process_count):
    raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of num_devices * "
        f"process_count = {num_devices} * {process_count}.")
  n = len(images)
  per_host = batch_size // process_count
  shape = (num_devices, per_host // num_devices)
  for start in range(0, n, batch_size):
    first = start + process_index * per_host
    index = np.arange(first, first + per_host)
    mask = index < n
    batch_images = np.zeros((per_host,) + images.shape[1:], images.dtype)
    batch_labels = np.zeros((per_host,), np.int32)
    batch_images[mask] = images[index[mask]]
    batch_labels[mask] = labels[index[mask]]
    yield {"image": batch_images.reshape(shape + images.shape[1:]),
           "label": batch_labels.reshape(shape),
           "mask": mask.reshape(shape)}


# --------------------------------------------------------------------------
# On-device preprocessing (called inside the compiled step).
# --------------------------------------------------------------------------


def to_float(images: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 images -> ``dtype`` in ``[0, 1]``."""
  return jnp.asarray(images, dtype) / 255.0


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4,
            flip: bool = True) -> jax.Array:
  """Per-example random crop with ``pad``-pixel zero padding + horizontal flip.

  ``images`` is ``[B, H, W, C]`` (float in ``[0, 1]``; any dtype works); each
  example gets its own crop offset in ``[0, 2*pad]^2`` and a fair coin for the
  flip. Pure and jit-able, so the trainer runs it inside the step.
  """
  height, width, channels = images.shape[1:]

  def augment_one(key, image):
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0),
                                  (height, width, channels))
    if flip:
      image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    return image

  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_one)(keys, images)
