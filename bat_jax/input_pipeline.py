"""Input pipeline: TFDS or a local .npz -> in-memory uint8 arrays -> host batches.

MNIST and CIFAR fit in memory, so a split is read once into NumPy
(``load_split``: from TFDS, or from a local ``.npz`` data file that needs no
TFDS at all) and every training batch is a pure function of
``(seed, step)`` (``TrainBatches``): resuming at step ``s`` yields exactly the
batch an uninterrupted run would have seen. Images stay uint8 on the host;
``to_float`` and the CIFAR augmentation (``augment``) run on device, inside
the compiled step. Evaluation (``eval_batches``) pads the last batch and
carries a mask, so every example is counted exactly once.
"""

import dataclasses
import math
import pathlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Dict[str, np.ndarray]

# The bundled first 6,000 train / 1,000 test images of MNIST (offline runs).
MNIST_SUBSET_PATH = pathlib.Path(__file__).resolve().parent / "data" / (
    "mnist_subset.npz")
# Examples decoded per `__getitems__` call when reading a TFDS split.
_READ_CHUNK = 1000


class DatasetNotFoundError(ValueError):
  """A dataset is not prepared where we looked; the message says what to do."""


# --------------------------------------------------------------------------
# Dataset descriptions.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
    tfds_name: the TFDS builder name, or None for data bundled in the package.
    num_classes: number of labels.
    image_shape: ``(H, W, C)`` of one image.
    mean, std: per-channel normalisation applied inside the model (None: none).
    augment: whether training uses random crop (pad 4) + horizontal flip.
    splits: the split names that exist.
  """
  tfds_name: Optional[str]
  num_classes: int
  image_shape: Tuple[int, int, int]
  mean: Optional[Tuple[float, ...]]
  std: Optional[Tuple[float, ...]]
  augment: bool
  splits: Tuple[str, ...] = ("train", "test")


DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), None, None, augment=False),
    "mnist_subset": DatasetInfo(None, 10, (28, 28, 1), None, None,
                                augment=False),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3),
                           (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                           augment=True),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            augment=True),
}


def get_dataset_info(dataset: str) -> DatasetInfo:
  """The ``DatasetInfo`` of ``dataset``; a ValueError names the known ones."""
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; the dataset must be one of "
                     f"{tuple(DATASETS)}.")
  return DATASETS[dataset]


# --------------------------------------------------------------------------
# Loading whole splits into memory.
# --------------------------------------------------------------------------


def load_split(dataset: str, split: str, *, data_dir: Optional[str] = None,
               num_examples: Optional[int] = None,
               data_file: Optional[str] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
  """Reads a split into memory: uint8 images ``[N, H, W, C]``, int32 labels.

  With ``data_file`` (a local .npz, see :func:`load_npz_split`) the split
  comes from that file and TFDS is not imported; ``dataset`` still names
  what it holds (classes, image shape, normalisation). Otherwise TFDS
  datasets are read with ``tfds.data_source`` (array_record, no TensorFlow)
  from ``data_dir`` (TFDS's default when None) and 'mnist_subset' comes
  from the npz bundled with the package. ``num_examples`` keeps the first N
  examples. Raises ``DatasetNotFoundError`` when the data is missing.
  """
  info = get_dataset_info(dataset)
  if num_examples is not None and num_examples < 0:
    raise ValueError(f"num_examples must be >= 0 or None; got {num_examples}.")
  if data_file:
    images, labels = load_npz_split(data_file, split, dataset)
    images, labels = images[:num_examples], labels[:num_examples]
  elif info.tfds_name is None:
    if split not in info.splits:
      raise ValueError(f"Dataset {dataset!r} has splits {info.splits}; got "
                       f"split={split!r}.")
    images, labels = _load_bundled_mnist_subset(split)
    images, labels = images[:num_examples], labels[:num_examples]
  else:
    images, labels = _read_tfds_split(info.tfds_name, split, data_dir,
                                      num_examples)
  if images.shape[1:] != info.image_shape:
    raise ValueError(f"{dataset!r} images have shape {images.shape[1:]}, "
                     f"expected {info.image_shape}.")
  return images, labels


def _load_bundled_mnist_subset(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """The MNIST subset shipped in the package (see data/make_mnist_subset.py)."""
  if not MNIST_SUBSET_PATH.exists():
    raise DatasetNotFoundError(
        f"The bundled MNIST subset {MNIST_SUBSET_PATH} is missing (an install "
        "without package data?). Regenerate it from a prepared TFDS MNIST "
        "with `python -m bat_jax.data.make_mnist_subset --data_dir=DIR`, or "
        "use dataset='mnist' with a prepared TFDS data_dir.")
  return load_npz_split(str(MNIST_SUBSET_PATH), split, "mnist_subset")


# The layout of a data file: one image and one label array per split.
NPZ_IMAGE_KEY, NPZ_LABEL_KEY = "{split}_image", "{split}_label"
_NPZ_LAYOUT = ("'<split>_image' (uint8 [N, H, W, C]) and '<split>_label' "
               "(integer [N]) per split, e.g. train_image, train_label, "
               "test_image, test_label; write one with `python -m "
               "bat_jax.data.export_npz`")


def load_npz_split(path: str, split: str, dataset: Optional[str] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """One split of a local data file: uint8 images ``[N, H, W, C]``, int32 labels.

  The .npz holds ``{split}_image`` (uint8) and ``{split}_label`` (integers)
  for each split, the layout of the bundled ``data/mnist_subset.npz``; it is
  opened with ``allow_pickle=False``. With ``dataset``, the image shape and
  the label range are checked against its ``DatasetInfo``. Every error names
  the file and what was expected.
  """
  image_key = NPZ_IMAGE_KEY.format(split=split)
  label_key = NPZ_LABEL_KEY.format(split=split)
  if not pathlib.Path(path).is_file():
    raise DatasetNotFoundError(
        f"Data file {path} does not exist; expected an .npz with "
        f"{_NPZ_LAYOUT}.")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:  # Pickled, or not NumPy data at all.
    raise ValueError(f"Could not read data file {path} as an .npz without "
                     f"pickles ({e}); expected {_NPZ_LAYOUT}.") from e
  if not hasattr(data, "files"):
    raise ValueError(f"Data file {path} holds a single array, not an .npz; "
                     f"expected {_NPZ_LAYOUT}.")
  with data:
    missing = [k for k in (image_key, label_key) if k not in data.files]
    if missing:
      raise ValueError(f"Data file {path} has no split {split!r}: it lacks "
                       f"{missing} (it has {sorted(data.files)}); expected "
                       f"{_NPZ_LAYOUT}.")
    try:
      images, labels = data[image_key], data[label_key]
    except ValueError as e:  # Object arrays need pickles: refused.
      raise ValueError(f"Data file {path} stores pickled objects in "
                       f"{image_key!r}/{label_key!r} ({e}); expected "
                       f"{_NPZ_LAYOUT}.") from e
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"Data file {path}: {image_key!r} must be uint8 [N, H, W, "
                     f"C], got {images.dtype} {images.shape}.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
    raise ValueError(f"Data file {path}: {label_key!r} must be an integer [N] "
                     f"array, got {labels.dtype} {labels.shape}.")
  if len(labels) != len(images):
    raise ValueError(f"Data file {path}: {len(images)} images in {image_key!r} "
                     f"but {len(labels)} labels in {label_key!r}.")
  if dataset is not None:
    info = get_dataset_info(dataset)
    if tuple(images.shape[1:]) != info.image_shape:
      raise ValueError(f"Data file {path}: {image_key!r} images are "
                       f"{tuple(images.shape[1:])}, but dataset {dataset!r} "
                       f"expects {info.image_shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
      raise ValueError(f"Data file {path}: {label_key!r} spans [{labels.min()}, "
                       f"{labels.max()}], but dataset {dataset!r} has "
                       f"{info.num_classes} classes: expected [0, "
                       f"{info.num_classes}).")
  return images, labels.astype(np.int32)


def _prepare_commands(name: str, data_dir: str) -> str:
  """How to prepare ``name`` in ``data_dir`` as array_record files."""
  return (
      f"On a machine with network access run\n"
      f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
      f"or\n"
      f"  python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare("
      f"file_format='array_record')\"\n"
      f"(if you prepare it on another machine, copy its {name}/ folder into "
      f"{data_dir} here, or pass the data_dir that holds it).")


def _open_tfds_source(name: str, split: str, data_dir: Optional[str]):
  """``tfds.data_source`` without downloading; a clear error if not prepared."""
  import tensorflow_datasets as tfds  # Imported lazily: it is slow to import.
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # Diagnose below; re-raise anything we can't explain.
    builder = tfds.builder(name, data_dir=data_dir)
    root = str(pathlib.Path(builder.data_dir).parent.parent)
    if not builder.is_prepared():
      raise DatasetNotFoundError(
          f"TFDS dataset {name!r} is not prepared in data_dir={root!r} "
          f"(looked for {builder.data_dir}). {_prepare_commands(name, root)}"
      ) from e
    file_format = getattr(builder.info, "file_format", None)
    if "array_record" not in str(file_format).lower():
      raise DatasetNotFoundError(
          f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
          f"{file_format}, which tfds.data_source cannot read; re-prepare it "
          f"as array_record in a fresh data_dir. "
          f"{_prepare_commands(name, root)}"
      ) from e
    raise


def _read_records(source, indices: Sequence[int]) -> list:
  """Decodes ``source[indices]`` with one batched ``__getitems__`` call.

  ``tfds.testing.mock_data`` (TFDS 4.9.10) mocks a data source whose
  ``__getitems__`` is broken (a TypeError), so fall back to item-wise reads.
  """
  try:
    return source.__getitems__(list(indices))
  except TypeError:
    return [source[i] for i in indices]


def _read_tfds_split(name: str, split: str, data_dir: Optional[str],
                     num_examples: Optional[int]
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Decodes the first ``num_examples`` (or all) examples of a TFDS split."""
  source = _open_tfds_source(name, split, data_dir)
  n = len(source) if num_examples is None else min(num_examples, len(source))
  if n == 0:
    raise ValueError(f"TFDS split {name}:{split} has no examples to read.")
  images, labels = None, np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    records = _read_records(source, range(start, min(start + _READ_CHUNK, n)))
    chunk = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    if images is None:
      images = np.empty((n,) + chunk.shape[1:], np.uint8)
    images[start:start + len(chunk)] = chunk
    labels[start:start + len(chunk)] = [int(r["label"]) for r in records]
  return images, labels


def load_extra_npz(path: str, *,
                   image_shape: Optional[Tuple[int, int, int]] = None,
                   num_classes: Optional[int] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """Reads extra (e.g. RST's 500K pseudo-labelled) data from a local .npz.

  The file must hold ``image`` (uint8 ``[N, H, W, C]``) and ``label``
  (integer ``[N]``); it is opened with ``allow_pickle=False``, so pickled
  files are refused. ``image_shape``/``num_classes`` optionally check the data
  against the dataset it extends.
  """
  expected = ("keys 'image' (uint8 [N, H, W, C]) and 'label' (integer [N]); "
              "write it with np.savez(path, image=images, label=labels)")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"Extra-data file {path} does not exist.")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:  # Pickled or not NumPy data at all.
    raise ValueError(f"Could not read extra-data file {path} as an .npz "
                     f"without pickles ({e}); expected {expected}.") from e
  if not hasattr(data, "files"):
    raise ValueError(f"Extra-data file {path} holds a single array, not an "
                     f".npz; expected {expected}.")
  with data:
    missing = [k for k in ("image", "label") if k not in data.files]
    if missing:
      raise ValueError(f"Extra-data file {path} lacks {missing} (it has "
                       f"{data.files}); expected {expected}.")
    try:
      images, labels = data["image"], data["label"]
    except ValueError as e:  # Object arrays need pickles: refused.
      raise ValueError(f"Extra-data file {path} stores pickled objects ({e}); "
                       f"expected {expected}.") from e
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"Extra-data file {path}: 'image' must be uint8 [N, H, W, "
                     f"C], got {images.dtype} {images.shape}.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
    raise ValueError(f"Extra-data file {path}: 'label' must be an integer [N] "
                     f"array, got {labels.dtype} {labels.shape}.")
  if len(labels) != len(images):
    raise ValueError(f"Extra-data file {path}: {len(images)} images but "
                     f"{len(labels)} labels.")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(f"Extra-data file {path}: images are {images.shape[1:]}, "
                     f"expected {tuple(image_shape)}.")
  if num_classes is not None and len(labels) and (
      labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"Extra-data file {path}: labels span [{labels.min()}, "
                     f"{labels.max()}], expected [0, {num_classes}).")
  return images, labels.astype(np.int32)


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
  extra_fraction)`` slots of every global batch come from the extra data, which
  runs through its own permutations (``[seed, 1, extra_epoch]``), as in RST;
  ``steps_per_epoch`` still counts passes over the base data.

  The global batch is split into ``process_count`` contiguous host slices and
  this host's slice is reshaped to ``[local_device_count, per_device, ...]``.
  The global batch does not depend on the host/device layout.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               batch_size: int, seed: int,
               extra_images: Optional[np.ndarray] = None,
               extra_labels: Optional[np.ndarray] = None,
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
    has_extra = extra_images is not None or extra_labels is not None
    if has_extra != (extra_fraction > 0):
      raise ValueError("Give extra_images and extra_labels together with "
                       "extra_fraction > 0, or none of them "
                       f"(extra_fraction={extra_fraction}).")

    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.batch_size, self.seed = batch_size, int(seed)
    self.num_extra = int(round(batch_size * extra_fraction))
    self.num_base = batch_size - self.num_extra
    if has_extra:
      if extra_images is None or extra_labels is None:
        raise ValueError("extra_images and extra_labels must both be given.")
      if len(extra_images) != len(extra_labels):
        raise ValueError(f"{len(extra_images)} extra images but "
                         f"{len(extra_labels)} extra labels.")
      if extra_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"Extra images are {extra_images.shape[1:]}, the "
                         f"training images {images.shape[1:]}.")
      if self.num_extra == 0:
        raise ValueError(f"batch_size={batch_size} * extra_fraction="
                         f"{extra_fraction} rounds to no extra example.")
      if self.num_extra > len(extra_images):
        raise ValueError(f"{self.num_extra} extra examples per batch but the "
                         f"extra set has only {len(extra_images)}.")
    self.extra_images = extra_images
    self.extra_labels = (None if extra_labels is None
                         else np.asarray(extra_labels, np.int32))
    if self.num_base > len(images):
      raise ValueError(f"batch_size={batch_size} takes {self.num_base} "
                       f"training examples per step, but there are only "
                       f"{len(images)}.")
    self._is_extra = _extra_positions(batch_size, self.num_extra)
    self._permutations = {}  # (stream, epoch) -> permutation; latest only.

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per pass over the base training data."""
    return len(self.images) // self.num_base

  @property
  def per_device_batch_size(self) -> int:
    return self.batch_size // (self.process_count * self.local_device_count)

  def _permutation(self, stream: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order of a stream (0: base, 1: extra), memoised."""
    key = (stream, epoch)
    if key not in self._permutations:
      self._permutations = {k: v for k, v in self._permutations.items()
                            if k[0] != stream}
      rng = np.random.default_rng([self.seed, stream, epoch])
      self._permutations[key] = rng.permutation(n)
    return self._permutations[key]

  def _indices(self, stream: int, step: int, per_step: int,
               n: int) -> np.ndarray:
    """The ``per_step`` example indices of a stream at global step ``step``."""
    epoch, position = divmod(step, n // per_step)
    order = self._permutation(stream, epoch, n)
    return order[position * per_step:(position + 1) * per_step]

  def global_indices(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
    """The global batch at ``step``: (example index, is-extra flag) per slot."""
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}.")
    index = np.empty((self.batch_size,), np.int64)
    index[~self._is_extra] = self._indices(0, step, self.num_base,
                                           len(self.images))
    if self.num_extra:
      index[self._is_extra] = self._indices(1, step, self.num_extra,
                                            len(self.extra_images))
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
    if is_extra.any():
      images[is_extra] = self.extra_images[index[is_extra]]
      labels[is_extra] = self.extra_labels[index[is_extra]]
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

  Yields 'image' uint8 ``[num_devices, per_device, H, W, C]``, 'label' int32
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
    batch_images = np.zeros((per_host,) + images.shape[1:], np.uint8)
    batch_labels = np.zeros((per_host,), np.int32)
    batch_images[mask] = images[index[mask]]
    batch_labels[mask] = labels[index[mask]]
    yield {"image": batch_images.reshape(shape + images.shape[1:]),
           "label": batch_labels.reshape(shape),
           "mask": mask.reshape(shape)}


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """How many batches ``eval_batches`` yields for ``num_examples``."""
  return math.ceil(num_examples / batch_size)


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
