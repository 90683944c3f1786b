"""Datasets: what each one is, and reading a whole split into memory.

MNIST and CIFAR fit in memory, so a split is read once into NumPy uint8
images and int32 labels (:func:`load_split`): from TFDS (``tfds.data_source``,
array_record, no TensorFlow), or from a local ``.npz`` data file that needs no
TFDS (``config.data_file``; the MNIST subset bundled with the package is
one). :func:`load_extra_npz` reads extra pseudo-labelled data (RST). Every
.npz is read by one reader that refuses pickles and checks shapes, dtypes
and labels; :func:`npz_member` reads one array's header and streams its rows
without loading it (up-front checks, conversion). Batching lives in
``input_pipeline``; extra data too large for memory in ``extra_data``.
"""

import contextlib
import dataclasses
import pathlib
import zipfile
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from bat_jax import fs
from bat_jax.errors import UserError, did_you_mean

# The bundled first 6,000 train / 1,000 test images of MNIST (offline runs).
MNIST_SUBSET_PATH = pathlib.Path(__file__).resolve().parent / "data" / (
    "mnist_subset.npz")
# Examples decoded per `__getitems__` call when reading a TFDS split.
_READ_CHUNK = 1000


class DatasetNotFoundError(UserError):
  """A dataset is not prepared where we looked; the message says what to do."""


class DataFileError(UserError):
  """A local data file (.npz) is not what bat_jax reads; the message says why."""

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
    splits: the split names that exist.
  """
  tfds_name: Optional[str]
  num_classes: int
  image_shape: Tuple[int, int, int]
  mean: Optional[Tuple[float, ...]]
  std: Optional[Tuple[float, ...]]
  splits: Tuple[str, ...] = ("train", "test")


DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), None, None),
    "mnist_subset": DatasetInfo(None, 10, (28, 28, 1), None, None),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3),
                           (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def get_dataset_info(dataset: str) -> DatasetInfo:
  """The ``DatasetInfo`` of ``dataset``; a UserError names the known ones."""
  if dataset not in DATASETS:
    raise UserError(f"Unknown dataset {dataset!r}{did_you_mean(dataset, DATASETS)}; "
                    f"the dataset must be one of {tuple(DATASETS)}.")
  return DATASETS[dataset]


def check_available(dataset: str, *, data_dir: Optional[str] = None,
                    data_file: Optional[str] = None) -> None:
  """Refuses (DatasetNotFoundError) a data set that is not there, without reading it.

  Lets an entry point stop before it writes anything: the TFDS splits are
  opened (not decoded), a data file or the bundled subset must exist.
  """
  info = get_dataset_info(dataset)
  if data_file:
    if not fs.exists(data_file) or fs.is_dir(data_file):
      raise DatasetNotFoundError(f"data file {data_file} does not exist.")
  elif info.tfds_name is None:
    if not MNIST_SUBSET_PATH.exists():
      _load_bundled_mnist_subset("test")  # raises with the way to make it
  else:
    for split in info.splits:
      _open_tfds_source(info.tfds_name, split, data_dir)


def check_labels(labels: np.ndarray, num_classes: Optional[int], source: str) -> None:
  """Refuses labels outside ``[0, num_classes)`` (``num_classes`` None: only < 0).

  A label of -1 or 10 in a 10-class data set would silently count as a
  wrong prediction; the error names ``source``, how many labels are out of
  range, the first few (index: label) and the valid range.
  """
  labels = np.asarray(labels)
  bad = labels < 0
  if num_classes is not None:
    bad |= labels >= num_classes
  if not np.any(bad):
    return
  where = np.flatnonzero(bad)
  shown = ", ".join(f"#{i}: {int(labels[i])}" for i in where[:5])
  more = f" and {len(where) - 5} more" if len(where) > 5 else ""
  valid = (f"[0, {num_classes - 1}] ({num_classes} classes)" if num_classes is not None
           else "non-negative class indices")
  raise DataFileError(f"{source}: {len(where)} of {len(labels)} labels are out of "
                      f"range ({shown}{more}); labels must be {valid}.")


# --------------------------------------------------------------------------
# Loading whole splits into memory.
# --------------------------------------------------------------------------


def load_split(dataset: str, split: str, *, data_dir: Optional[str] = None,
               num_examples: Optional[int] = None, data_file: Optional[str] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
  """Reads a split into memory: uint8 images ``[N, H, W, C]``, int32 labels.

  With ``data_file`` (a local .npz, :func:`load_npz_split`) the split comes
  from that file and TFDS is not imported; ``dataset`` still names what it
  holds (classes, image shape, normalisation). Otherwise TFDS datasets are
  read with ``tfds.data_source`` (array_record, no TensorFlow) from
  ``data_dir`` (TFDS's default when None) and 'mnist_subset' comes from the
  npz bundled with the package. ``num_examples`` keeps the first N examples.
  Raises ``DatasetNotFoundError`` when the data is missing.
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
    check_labels(labels, info.num_classes, f"TFDS {info.tfds_name}:{split}")
  if images.shape[1:] != info.image_shape:
    raise ValueError(f"{dataset!r} images have shape {images.shape[1:]}, "
                     f"expected {info.image_shape}.")
  return images, labels


def split_size(dataset: str, split: str, *, data_dir: Optional[str] = None,
               data_file: Optional[str] = None) -> int:
  """How many examples a split holds (a TFDS split is opened, not decoded)."""
  info = get_dataset_info(dataset)
  if data_file or info.tfds_name is None:
    return len(load_split(dataset, split, data_file=data_file)[1])
  return len(_open_tfds_source(info.tfds_name, split, data_dir))


def _load_bundled_mnist_subset(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """The MNIST subset shipped in the package (see data/make_mnist_subset.py)."""
  if not MNIST_SUBSET_PATH.exists():
    raise DatasetNotFoundError(
        f"The bundled MNIST subset {MNIST_SUBSET_PATH} is missing (an install "
        "without package data?). Regenerate it from a prepared TFDS MNIST "
        "with `python -m bat_jax.data.make_mnist_subset --data_dir=DIR`, or "
        "use dataset='mnist' with a prepared TFDS data_dir.")
  return load_npz_split(str(MNIST_SUBSET_PATH), split, "mnist_subset")


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


# Data files: one .npz holds images and labels under these keys, per split
# (``config.data_file``, the bundled subset) or once (extra data).
NPZ_IMAGE_KEY, NPZ_LABEL_KEY = "{split}_image", "{split}_label"
_SPLITS_LAYOUT = ("'<split>_image' (uint8 [N, H, W, C]) and '<split>_label' (integer "
                  "[N]) per split, e.g. train_image, train_label, test_image, "
                  "test_label; write one with `python -m bat_jax.data.export_npz`")
_EXTRA_LAYOUT = ("keys 'image' (uint8 [N, H, W, C]) and 'label' (integer [N]); "
                 "write it with np.savez(path, image=images, label=labels)")


def load_npz_split(path: str, split: str, dataset: Optional[str] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """One split of a local data file: uint8 images ``[N, H, W, C]``, int32 labels.

  The .npz holds ``{split}_image`` and ``{split}_label`` for each split, the
  layout of the bundled ``data/mnist_subset.npz``. With ``dataset``, the
  image shape and the label range are checked against its ``DatasetInfo``.
  """
  info = get_dataset_info(dataset) if dataset is not None else None
  return _read_npz(path, NPZ_IMAGE_KEY.format(split=split),
                   NPZ_LABEL_KEY.format(split=split), _SPLITS_LAYOUT, "Data file",
                   info, split=split)


def load_extra_npz(path: str, *, image_shape: Optional[Tuple[int, int, int]] = None,
                   num_classes: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Extra (e.g. RST's 500K pseudo-labelled) data from a local .npz.

  The file holds ``image`` (uint8 ``[N, H, W, C]``) and ``label`` (integer
  ``[N]``). ``image_shape`` / ``num_classes`` check it against the dataset
  it extends.
  """
  info = None
  if image_shape is not None or num_classes is not None:
    info = DatasetInfo(None, num_classes, image_shape, None, None)
  return _read_npz(path, "image", "label", _EXTRA_LAYOUT, "Extra-data file", info)


def _read_npz(path: str, image_key: str, label_key: str, layout: str, what: str,
              info: Optional[DatasetInfo], split: Optional[str] = None
              ) -> Tuple[np.ndarray, np.ndarray]:
  """Images and labels of an .npz, opened without pickles and checked.

  Every error names the file, what was wrong and the layout expected.
  """
  if not fs.exists(path) or fs.is_dir(path):
    raise DatasetNotFoundError(f"{what} {path} does not exist; expected an .npz with "
                               f"{layout}.")
  try:
    data = fs.load_npz(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # Pickled, empty, not NumPy.
    raise DataFileError(f"Could not read {what.lower()} {path} as an .npz without "
                        f"pickles ({e}); expected {layout}.") from e
  if not hasattr(data, "files"):
    raise DataFileError(f"{what} {path} holds a single array, not an .npz; expected "
                        f"{layout}.")
  with data:
    missing = [k for k in (image_key, label_key) if k not in data.files]
    if missing:
      has_split = f" has no split {split!r}: it" if split else ""
      raise DataFileError(f"{what} {path}{has_split} lacks {missing} (it has "
                          f"{sorted(data.files)}); expected {layout}.")
    try:
      images, labels = data[image_key], data[label_key]
    except ValueError as e:  # Object arrays need pickles: refused.
      raise DataFileError(f"{what} {path} stores pickled objects in {image_key!r}/"
                          f"{label_key!r} ({e}); expected {layout}.") from e
  if images.dtype != np.uint8 or images.ndim != 4:
    raise DataFileError(f"{what} {path}: {image_key!r} must be uint8 [N, H, W, C], got "
                        f"{images.dtype} {images.shape}.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
    raise DataFileError(f"{what} {path}: {label_key!r} must be an integer [N] array, "
                        f"got {labels.dtype} {labels.shape}.")
  if not len(images):
    raise DataFileError(f"{what} {path}: {image_key!r} holds no examples.")
  if len(labels) != len(images):
    raise DataFileError(f"{what} {path}: {len(images)} images in {image_key!r} but "
                        f"{len(labels)} labels in {label_key!r}.")
  if info is not None and info.image_shape is not None and (
      tuple(images.shape[1:]) != tuple(info.image_shape)):
    raise DataFileError(f"{what} {path}: {image_key!r} images are "
                        f"{tuple(images.shape[1:])}, but the dataset expects "
                        f"{tuple(info.image_shape)}.")
  check_labels(labels, info.num_classes if info is not None else None,
               f"{what} {path}: {label_key!r}")
  return images, labels.astype(np.int32)


# --------------------------------------------------------------------------
# An .npz array's header and rows, without loading the array.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def npz_member(path: str, key: str, what: str = "File"
               ) -> Iterator[Tuple[Tuple[int, ...], np.dtype, object]]:
  """``(shape, dtype, stream)`` of the array ``key`` in the .npz ``path``.

  Only the member's .npy header is read; ``stream`` is positioned at the
  data, whose rows (``shape[1:]``, C order) follow one another, so a caller
  reads ``k`` rows as ``stream.read(k * row_bytes)``. Pickled (object) and
  Fortran-ordered arrays are refused with a DataFileError naming ``path``.
  """
  with contextlib.ExitStack() as files:
    try:
      archive = files.enter_context(zipfile.ZipFile(files.enter_context(
          fs.path(path).open("rb"))))
      names = [n[:-len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
      if key not in names:
        raise DataFileError(f"{what} {path} has no array {key!r} (it has {sorted(names)}).")
      stream = files.enter_context(archive.open(key + ".npy"))
      version = np.lib.format.read_magic(stream)
      if version not in ((1, 0), (2, 0)):
        raise DataFileError(f"{what} {path}: {key!r} is a version {version} .npy; "
                            "re-save it with np.savez.")
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran_order, dtype = read_header(stream)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not a zip, truncated
      if isinstance(e, UserError):
        raise
      raise DataFileError(f"Could not read {what.lower()} {path} as an .npz ({e}).") from e
    if dtype.hasobject:
      raise DataFileError(f"{what} {path} stores pickled objects in {key!r}; expected a "
                          "numeric array.")
    if fortran_order and len(shape) > 1:
      raise DataFileError(f"{what} {path}: {key!r} is stored in Fortran order; re-save "
                          "it with np.ascontiguousarray.")
    yield tuple(shape), dtype, stream


def npz_image_shape(path: str, image_key: str, label_key: str,
                    what: str = "File") -> Tuple[int, ...]:
  """``(H, W, C)`` of an .npz's images, its headers checked: uint8 ``[N, H, W, C]``
  images and as many integer labels, read without loading either array."""
  with npz_member(path, image_key, what) as (shape, dtype, _):
    if dtype != np.uint8 or len(shape) != 4 or not shape[0]:
      raise DataFileError(f"{what} {path}: {image_key!r} must be uint8 [N, H, W, C] with "
                          f"N > 0, got {dtype} {shape}.")
  with npz_member(path, label_key, what) as (label_shape, label_dtype, _):
    if not np.issubdtype(label_dtype, np.integer) or label_shape != shape[:1]:
      raise DataFileError(f"{what} {path}: {label_key!r} must be {shape[0]} integer "
                          f"labels, got {label_dtype} {label_shape}.")
  return shape[1:]
