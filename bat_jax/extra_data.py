"""Extra training data (generated or pseudo-labelled images), read by index.

RST's 500K pseudo-labelled images fit in memory; DeepMind's 1M-20M generated
CIFAR images (3-60 GB) do not, on every host of a run. The trainer computes
each batch's example indices from ``(seed, step)``
(``input_pipeline.TrainBatches``) and only needs the examples at those
indices, so extra data is one small interface, :class:`ExtraData`
(``len``, ``image_shape``, ``read(indices)``), with two readers:

* :class:`InMemoryExtraData`: arrays in memory, e.g. a small .npz with
  ``image`` / ``label`` (``datasets.load_extra_npz``), as before;
* :class:`ArrayRecordExtraData`: a directory of array_record shards and an
  ``extra_data.json`` (:data:`METADATA_FILE`), streamed: only the metadata is
  read at start-up and each batch reads the records of this host's slots.

Why array_record's own ``ArrayRecordDataSource`` and not Grain or a TFDS data
source: the order is already a deterministic function of ``(seed, step)``
and the only need is random access by index, which the data source gives
(global record key -> shard and position, shards opened lazily). Grain is
not a dependency of bat_jax; its DataLoader brings its own sampler and
worker processes, duplicating what ``TrainBatches`` does, and its
random-access ``MapDataset`` over this source would add nothing to a direct
read. A TFDS data source (``tfds.data_source``,
``tfds.data_sources.ArrayRecordDataSource``) needs a prepared TFDS builder's
``DatasetInfo`` (features, splits), which a set of converted images has not.

Shard format, version 1 (``python -m bat_jax.data.convert_extra`` writes it):
``extra_data.json`` holds ``count``, ``image_shape``, ``dtype`` ('uint8'),
``num_classes``, ``label_min`` / ``label_max``, ``record_bytes``, the
array_record writer options and ``shards``, a list of ``{"file", "count"}``
in record order (record ``i`` of the set is the ``i``-th record of the shards
concatenated). Each record is :data:`LABEL_BYTES` bytes of the label
(little-endian int32) followed by the image's ``H * W * C`` bytes, uint8 in
row-major ``(H, W, C)`` order: ``4 + 3072`` bytes for CIFAR. Shards are
written with ``group_size:1`` and no compression, so that one record is one
read.
"""

import dataclasses
import json
import os
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from bat_jax import datasets, fs
from bat_jax.datasets import DataFileError, DatasetNotFoundError
from bat_jax.errors import UserError

METADATA_FILE = "extra_data.json"
FORMAT, FORMAT_VERSION = "bat_jax.extra_data", 1
LABEL_BYTES = 4  # little-endian int32, before the image bytes
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: one read each
CONVERT_COMMAND = "python -m bat_jax.data.convert_extra --input=FILE --output_dir=DIR"


def _array_record():
  """array_record's data source and reader/writer modules, imported on first use:
  a C++ extension that processes without a shard set never load."""
  from array_record.python import (  # pylint: disable=import-outside-toplevel
      array_record_data_source, array_record_module)
  return array_record_data_source, array_record_module


class ExtraData(Protocol):
  """Extra examples by index: what ``TrainBatches`` reads the extra stream from."""

  image_shape: Tuple[int, int, int]

  def __len__(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[k, H, W, C]`` and int32 labels ``[k]`` at ``indices``, in order."""


def _check_indices(indices, count: int) -> np.ndarray:
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= count):
    raise IndexError(f"extra-data indices must lie in [0, {count}); got "
                     f"[{indices.min()}, {indices.max()}].")
  return indices


class InMemoryExtraData:
  """Extra examples held as arrays (a small .npz read whole)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"extra images {images.shape} and labels {np.shape(labels)} must "
                       "be [N, H, W, C] and [N].")
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.image_shape = tuple(images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices) -> Tuple[np.ndarray, np.ndarray]:
    indices = _check_indices(indices, len(self))
    return self.images[indices], self.labels[indices]


# --------------------------------------------------------------------------
# The shard format: metadata and records.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardSetInfo:
  """What ``extra_data.json`` says about a shard set (see the module docstring)."""
  count: int
  image_shape: Tuple[int, int, int]
  num_classes: int
  label_min: int
  label_max: int
  shards: Tuple[Tuple[str, int], ...]  # (file name in the directory, records)
  writer_options: str = WRITER_OPTIONS

  @property
  def record_bytes(self) -> int:
    return LABEL_BYTES + int(np.prod(self.image_shape))

  def to_json(self) -> Dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "count": self.count,
            "image_shape": list(self.image_shape), "dtype": "uint8",
            "num_classes": self.num_classes, "label_min": self.label_min,
            "label_max": self.label_max, "record_bytes": self.record_bytes,
            "record_layout": "int32 little-endian label, then the uint8 image in "
                             "row-major (H, W, C) order",
            "array_record_options": self.writer_options,
            "shards": [{"file": name, "count": count} for name, count in self.shards]}

  @classmethod
  def from_json(cls, meta: Dict, where: str) -> "ShardSetInfo":
    """Parses and checks the metadata; a DataFileError names ``where`` and the field."""
    def bad(what):
      return DataFileError(f"{where}: {what}; rewrite the set with `{CONVERT_COMMAND}`.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise bad(f"'format' is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
      raise bad(f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION} "
                "(written by another bat_jax version?)")
    try:
      shards = tuple((str(s["file"]), int(s["count"])) for s in meta["shards"])
      info = cls(int(meta["count"]), tuple(int(d) for d in meta["image_shape"]),
                 int(meta["num_classes"]), int(meta["label_min"]), int(meta["label_max"]),
                 shards, str(meta["array_record_options"]))
      record_bytes, dtype = int(meta["record_bytes"]), meta["dtype"]
    except (KeyError, TypeError, ValueError) as e:
      raise bad(f"a field is missing or malformed ({type(e).__name__}: {e})") from None
    if dtype != "uint8":
      raise bad(f"dtype is {dtype!r}; only 'uint8' images are read")
    if len(info.image_shape) != 3 or min(info.image_shape) < 1:
      raise bad(f"image_shape {list(info.image_shape)} is not [H, W, C]")
    if record_bytes != info.record_bytes:
      raise bad(f"record_bytes {record_bytes} is not 4 + H*W*C = {info.record_bytes}")
    if not shards or any(c < 1 or os.path.basename(f) != f for f, c in shards):
      raise bad("'shards' must list at least one {'file': name, 'count': >= 1}")
    if info.count != sum(c for _, c in shards):
      raise bad(f"count {info.count} is not the sum of the shards' counts "
                f"{sum(c for _, c in shards)}")
    if not 0 <= info.label_min <= info.label_max < info.num_classes:
      raise bad(f"labels [{info.label_min}, {info.label_max}] do not lie in "
                f"[0, num_classes={info.num_classes})")
    return info


def encode_records(images: np.ndarray, labels: np.ndarray) -> List[bytes]:
  """One record per example: the int32 label's 4 bytes, then the image's bytes."""
  count = len(images)
  rows = np.empty((count, LABEL_BYTES + images[0].size), np.uint8)
  rows[:, :LABEL_BYTES] = np.asarray(labels, "<i4").view(np.uint8).reshape(count, LABEL_BYTES)
  rows[:, LABEL_BYTES:] = np.asarray(images, np.uint8).reshape(count, -1)
  return [row.tobytes() for row in rows]


def decode_records(records: Sequence[bytes], image_shape: Tuple[int, ...]
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """The inverse of :func:`encode_records`: uint8 images ``[k, H, W, C]``, int32 labels."""
  record_bytes = LABEL_BYTES + int(np.prod(image_shape))
  sizes = {len(r) for r in records}
  if sizes - {record_bytes}:
    raise DataFileError(f"extra-data records of {sorted(sizes)} bytes; the metadata says "
                        f"{record_bytes} (4 + H*W*C). Rewrite the set with "
                        f"`{CONVERT_COMMAND}`.")
  rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), record_bytes)
  labels = rows[:, :LABEL_BYTES].copy().view("<i4").reshape(-1).astype(np.int32)
  return rows[:, LABEL_BYTES:].reshape((len(records),) + tuple(image_shape)), labels


def read_metadata(directory: str) -> ShardSetInfo:
  """The checked metadata of the shard set in ``directory`` (nothing else is read)."""
  where = fs.join(directory, METADATA_FILE)
  if not fs.exists(where):
    raise DatasetNotFoundError(f"{directory} is a directory without {METADATA_FILE}, so "
                               f"not a bat_jax extra-data shard set; write one with "
                               f"`{CONVERT_COMMAND}`.")
  try:
    meta = json.loads(fs.read_text(where))
  except (ValueError, UnicodeDecodeError) as e:
    raise DataFileError(f"{where} is not JSON ({e}); rewrite the set with "
                        f"`{CONVERT_COMMAND}`.") from None
  return ShardSetInfo.from_json(meta, where)


def _check_shard_files(directory: str, info: ShardSetInfo) -> None:
  """Every shard is there and, uncompressed, at least as long as its records."""
  uncompressed = "uncompressed" in info.writer_options.split(",")
  for name, count in info.shards:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise DataFileError(f"{directory}: shard {name} listed in {METADATA_FILE} is "
                          "missing; copy the whole directory, or rewrite the set with "
                          f"`{CONVERT_COMMAND}`.")
    if uncompressed and os.path.getsize(path) < count * info.record_bytes:
      raise DataFileError(f"{directory}: shard {name} has {os.path.getsize(path)} bytes, "
                          f"fewer than its {count} records of {info.record_bytes} bytes "
                          "(a truncated copy?).")


class ArrayRecordExtraData:
  """A shard set read by index with array_record's ``ArrayRecordDataSource``.

  Only the metadata is read when it opens; the shards are opened on first
  use, and each opened shard's reader holds its chunk index in memory (about
  45 bytes a record with ``group_size:1``). A batch's records are read with
  one ``__getitems__`` call (one read per shard touched, shards in parallel
  threads): reading record by record (``source[i]``) costs more the larger
  the shard (measured: 7,700 records/s from a 50,000-record shard, 57,000
  from a 5,000-record one, 150,000+ batched from either, on a 2-core EPYC).
  """

  def __init__(self, directory: str, info: Optional[ShardSetInfo] = None):
    self.directory = os.path.abspath(directory)
    self.info = info or read_metadata(self.directory)
    _check_shard_files(self.directory, self.info)
    self.image_shape = self.info.image_shape
    # "path[start:end]": the data source takes the counts as given (no file opened).
    self._source = _array_record()[0].ArrayRecordDataSource(
        [f"{os.path.join(self.directory, name)}[0:{count}]"
         for name, count in self.info.shards])
    self._ends = np.cumsum([count for _, count in self.info.shards])

  def __len__(self) -> int:
    return self.info.count

  def read(self, indices) -> Tuple[np.ndarray, np.ndarray]:
    indices = _check_indices(indices, len(self))
    if not indices.size:
      return np.empty((0,) + self.image_shape, np.uint8), np.empty((0,), np.int32)
    try:
      records = self._source.__getitems__(indices.tolist())
    except Exception as e:  # a damaged or replaced shard: say which one
      shards = sorted({self.info.shards[s][0]
                       for s in np.searchsorted(self._ends, indices, side="right")})
      raise DataFileError(f"{self.directory}: reading records of shard(s) {shards[:3]} "
                          f"failed ({type(e).__name__}: {e}); rewrite the set with "
                          f"`{CONVERT_COMMAND}`.") from e
    return decode_records(records, self.image_shape)

  def close(self) -> None:
    self._source.__exit__(None, None, None)


class ShardWriter:
  """Writes examples, in order, into ``num_shards`` shards and the metadata last.

  The metadata, written when :meth:`close` is called, is what makes the
  directory a shard set: an interrupted conversion leaves none.
  """

  def __init__(self, directory: str, count: int, image_shape: Tuple[int, int, int],
               num_shards: int, num_classes: Optional[int] = None):
    if not 1 <= num_shards <= count:
      raise UserError(f"{num_shards} shards for {count} examples: need 1 to {count}.")
    self.directory, self.count = directory, count
    self.image_shape, self.num_classes = tuple(image_shape), num_classes
    counts = [count // num_shards + (i < count % num_shards) for i in range(num_shards)]
    self.shards = tuple((f"extra-{i:05d}-of-{num_shards:05d}.array_record", c)
                        for i, c in enumerate(counts))
    self._shard, self._left, self._writer = -1, 0, None
    self._written, self._min, self._max = 0, None, None

  def write(self, images: np.ndarray, labels: np.ndarray) -> None:
    """Appends a chunk: uint8 images ``[k, H, W, C]`` and integer labels ``[k]``."""
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f"chunk {images.dtype} {images.shape[1:]}, expected uint8 "
                       f"{self.image_shape}.")
    labels = np.asarray(labels)
    if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{len(images)} images need as many integer labels; got "
                       f"{labels.dtype} {labels.shape}.")
    if self._written + len(images) > self.count:
      raise ValueError(f"more than the {self.count} examples announced.")
    if not len(labels):
      return
    low, high = int(labels.min()), int(labels.max())
    limit = self.num_classes or np.iinfo(np.int32).max
    if low < 0 or high >= limit:
      raise DataFileError(f"labels of examples {self._written} to "
                          f"{self._written + len(labels) - 1} span [{low}, {high}]; labels "
                          f"must be class indices in [0, {limit}).")
    self._min = low if self._min is None else min(self._min, low)
    self._max = high if self._max is None else max(self._max, high)
    for record in encode_records(images, labels):
      if self._left == 0:
        self._next_shard()
      self._writer.write(record)
      self._left -= 1
    self._written += len(images)

  def _next_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    self._shard += 1
    name, self._left = self.shards[self._shard]
    self._writer = _array_record()[1].ArrayRecordWriter(
        os.path.join(self.directory, name), WRITER_OPTIONS)

  def close(self) -> ShardSetInfo:
    """Closes the last shard, checks every shard's count, then writes the metadata."""
    if self._written != self.count:
      raise ValueError(f"wrote {self._written} of the {self.count} examples announced.")
    self._writer.close()
    for name, count in self.shards:
      reader = _array_record()[1].ArrayRecordReader(os.path.join(self.directory, name))
      if reader.num_records() != count:
        raise DataFileError(f"shard {name} holds {reader.num_records()} records, not {count}.")
      reader.close()
    info = ShardSetInfo(self.count, self.image_shape, self.num_classes or self._max + 1,
                        self._min, self._max, self.shards)
    fs.write_json(os.path.join(self.directory, METADATA_FILE), info.to_json(), indent=1)
    return info


# --------------------------------------------------------------------------
# config.extra_data_path: an .npz (in memory) or a shard set (streamed).
# --------------------------------------------------------------------------


def check_extra_data(path: str, image_shape: Tuple[int, ...], num_classes: int,
                     what: str = "config.extra_data_path") -> None:
  """Refuses extra data that does not fit the dataset, reading only metadata or headers.

  A shard set's metadata (shape, label range, shards present) or an .npz's
  array headers; each UserError names ``what`` and the fix. Runs before a
  workdir is claimed.
  """
  if not path or not fs.exists(path):
    raise DatasetNotFoundError(f"{what}={path!r} does not exist; give an .npz with "
                               "'image' and 'label' or a directory of array_record "
                               f"shards (`{CONVERT_COMMAND}`).")
  if fs.is_dir(path):
    if fs.is_remote(path):
      raise UserError(f"{what}={path}: shard sets are streamed from a local or mounted "
                      "filesystem only; copy the shard directory to a local disk (or "
                      "mount the bucket, e.g. with gcsfuse) and give that path.")
    info = read_metadata(path)
    _check_shard_files(path, info)
    shape, labels = info.image_shape, (info.label_min, info.label_max)
  else:
    shape, labels = datasets.npz_image_shape(path, "image", "label", "Extra-data file"), None
  if tuple(shape) != tuple(image_shape):
    raise DataFileError(f"{what}={path}: extra images are {tuple(shape)}, but the dataset "
                        f"expects {tuple(image_shape)}.")
  if labels is not None and not 0 <= labels[0] <= labels[1] < num_classes:
    raise DataFileError(f"{what}={path}: labels span [{labels[0]}, {labels[1]}] (from "
                        f"{METADATA_FILE}), outside the dataset's [0, {num_classes - 1}].")


def open_extra_data(path: str, image_shape: Tuple[int, ...], num_classes: int,
                    what: str = "config.extra_data_path") -> ExtraData:
  """The extra data at ``path``: an .npz read into memory or a shard set, streamed."""
  check_extra_data(path, image_shape, num_classes, what)
  if fs.is_dir(path):
    return ArrayRecordExtraData(path)
  images, labels = datasets.load_extra_npz(path, image_shape=tuple(image_shape),
                                           num_classes=num_classes)
  return InMemoryExtraData(images, labels)
