"""Converts extra training data into array_record shards that training streams.

  python -m bat_jax.data.convert_extra --input=FILE --output_dir=DIR \\
      [--num_shards=N | --examples_per_shard=K] [--num_classes=C] [--overwrite]
  python -m bat_jax.main ... --config.extra_data_path=DIR

Inputs (by the file's suffix):

* ``.npz`` with uint8 ``image`` ``[N, H, W, C]`` and integer ``label``
  ``[N]`` (the extra .npz bat_jax reads; DeepMind's generated CIFAR sets):
  streamed in chunks of rows from the zip members (``datasets.npz_member``),
  never loaded whole;
* ``.pickle`` / ``.pkl`` in RST's layout (``ti_500K_pseudo_labeled.pickle``):
  a dict with uint8 ``data`` ``[N, 32, 32, 3]`` and ``extrapolated_targets``
  ``[N]``. A pickle cannot be read in parts: it is loaded whole (1.5 GB for
  RST's 500K images). Only NumPy arrays, lists and numbers are unpickled, so
  the file cannot run code here.

``DIR`` receives ``extra-SSSSS-of-NNNNN.array_record`` shards and, last,
``extra_data.json`` (the format: ``bat_jax/extra_data.py``); record ``i`` is
example ``i`` of the input, so a run switching between the .npz and its
shards sees the same batches. ``--num_classes`` defaults to the largest
label + 1. An existing non-empty ``DIR`` is refused unless ``--overwrite``,
which replaces a previous shard set (and nothing else) there.
"""

import math
import os
import pickle
import zipfile
import zlib
from typing import Iterator, Optional, Tuple

from absl import flags
import numpy as np

from bat_jax import datasets, errors, extra_data, fs, util
from bat_jax.datasets import DataFileError

CHUNK = 8192  # examples read and written at a time (25 MB of CIFAR images)
DEFAULT_EXAMPLES_PER_SHARD = 50_000  # ~150 MB of CIFAR-sized records per shard
PICKLE_SUFFIXES = (".pickle", ".pkl")
RST_IMAGES, RST_LABELS = "data", "extrapolated_targets"

Chunks = Iterator[Tuple[np.ndarray, np.ndarray]]


def npz_chunks(path: str, chunk: int = CHUNK) -> Tuple[int, Tuple[int, ...], Chunks]:
  """``(count, image_shape, chunks)`` of an extra .npz, its rows streamed."""
  shape = datasets.npz_image_shape(path, "image", "label", "Input")
  with datasets.npz_member(path, "label", "Input") as (label_shape, label_dtype, _):
    count = label_shape[0]

  def chunks():
    with datasets.npz_member(path, "image", "Input") as (_, _, images), \
        datasets.npz_member(path, "label", "Input") as (_, _, labels):
      row_bytes = int(np.prod(shape))
      for start in range(0, count, chunk):
        k = min(chunk, count - start)
        x = _read_exactly(images, k * row_bytes, path)
        y = _read_exactly(labels, k * label_dtype.itemsize, path)
        yield (np.frombuffer(x, np.uint8).reshape((k,) + shape),
               np.frombuffer(y, label_dtype))

  return count, shape, chunks()


def _read_exactly(stream, size: int, path: str) -> bytes:
  try:
    data = stream.read(size)
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged member
    raise DataFileError(f"Input {path} cannot be read ({e}).") from None
  if len(data) != size:
    raise DataFileError(f"Input {path} ends early (a truncated file?).")
  return data


class _ArraysOnly(pickle.Unpickler):
  """Unpickles NumPy arrays, dicts, lists and numbers; refuses any other class.

  ``_codecs.encode`` makes bytes from text in protocol 2 pickles.
  """

  ALLOWED = {("_codecs", "encode"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
             ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module, name):
    module = module.replace("numpy.core.", "numpy._core.")  # pickled by NumPy 1.x
    if (module, name) not in self.ALLOWED:
      raise DataFileError(f"the pickle refers to {module}.{name}; only NumPy arrays, "
                          "lists and numbers are read from a pickle.")
    return super().find_class(module, name)


def load_rst_pickle(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """Images and labels of a pickle in RST's layout, loaded whole."""
  try:
    with fs.path(path).open("rb") as f:
      data = _ArraysOnly(f).load()
  except DataFileError as e:
    raise DataFileError(f"Input {path}: {e}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise DataFileError(f"Input {path} is not a readable pickle ({e}).") from None
  if not isinstance(data, dict) or not {RST_IMAGES, RST_LABELS} <= set(data):
    keys = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise DataFileError(f"Input {path} holds {keys}; RST's layout is a dict with "
                        f"{RST_IMAGES!r} (uint8 [N, H, W, C]) and {RST_LABELS!r} ([N]).")
  images, labels = np.asarray(data[RST_IMAGES]), np.asarray(data[RST_LABELS])
  if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
    raise DataFileError(f"Input {path}: {RST_IMAGES!r} must be uint8 [N, H, W, C], got "
                        f"{images.dtype} {images.shape}.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
    raise DataFileError(f"Input {path}: {RST_LABELS!r} must be {len(images)} integer "
                        f"labels, got {labels.dtype} {labels.shape}.")
  return images, labels


def pickle_chunks(path: str, chunk: int = CHUNK) -> Tuple[int, Tuple[int, ...], Chunks]:
  """``(count, image_shape, chunks)`` of an RST pickle (held whole in memory)."""
  images, labels = load_rst_pickle(path)
  chunks = ((images[s:s + chunk], labels[s:s + chunk]) for s in range(0, len(images), chunk))
  return len(images), images.shape[1:], chunks


def prepare_output_dir(directory: str, overwrite: bool) -> None:
  """Makes ``directory``; refuses one in use, or with --overwrite removes an old set."""
  names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  if not names:
    fs.makedirs(directory)
    return
  if not overwrite:
    raise errors.UserError(f"--output_dir={directory} is not empty ({len(names)} files); "
                           "give a new folder, or pass --overwrite to replace the shard "
                           "set in it.")
  others = [n for n in names if n != extra_data.METADATA_FILE
            and not n.endswith(".array_record")]
  if others:
    raise errors.UserError(f"--output_dir={directory} holds files of no shard set "
                           f"({others[:3]}); --overwrite replaces only a shard set. Give "
                           "another folder.")
  for name in [extra_data.METADATA_FILE] + names:  # the metadata first: no half set
    if os.path.exists(os.path.join(directory, name)):
      os.remove(os.path.join(directory, name))


def shard_count(count: int, num_shards: int = 0, examples_per_shard: int = 0) -> int:
  """How many shards: ``num_shards``, or enough of ``examples_per_shard``."""
  if num_shards:
    return min(num_shards, count)
  return math.ceil(count / (examples_per_shard or DEFAULT_EXAMPLES_PER_SHARD))


def convert(input_path: str, output_dir: str, *, num_shards: int = 0,
            examples_per_shard: int = 0, num_classes: Optional[int] = None,
            overwrite: bool = False, chunk: int = CHUNK) -> extra_data.ShardSetInfo:
  """Writes the examples of ``input_path`` (.npz or RST pickle) as a shard set."""
  is_pickle = input_path.endswith(PICKLE_SUFFIXES)
  count, shape, chunks = (pickle_chunks if is_pickle else npz_chunks)(input_path, chunk)
  prepare_output_dir(output_dir, overwrite)
  writer = extra_data.ShardWriter(output_dir, count, tuple(shape),
                                  shard_count(count, num_shards, examples_per_shard),
                                  num_classes)
  with fs.writing(output_dir):
    for images, labels in chunks:
      writer.write(images, labels)
    return writer.close()


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("input", None, "An .npz with 'image'/'label', or RST's .pickle "
                      "('data'/'extrapolated_targets').", **fv)
  flags.DEFINE_string("output_dir", None, "The folder to write the shard set into "
                      "(new or empty).", **fv)
  flags.DEFINE_integer("num_shards", 0, "Number of shards (0: from "
                       "--examples_per_shard).", **fv)
  flags.DEFINE_integer("examples_per_shard", 0, "Examples per shard (0: "
                       f"{DEFAULT_EXAMPLES_PER_SHARD}).", **fv)
  flags.DEFINE_integer("num_classes", 0, "Classes the labels index (0: largest label "
                       "+ 1).", **fv)
  flags.DEFINE_bool("overwrite", False, "Replace a shard set already in --output_dir.", **fv)


def check_flags(fv: flags.FlagValues) -> None:
  """Refuses bad flags before any data is read or written."""
  if not fv.input or not fv.output_dir:
    raise errors.UserError("Pass --input=FILE (.npz or .pickle) and --output_dir=DIR.")
  if not fs.exists(fv.input) or fs.is_dir(fv.input):
    raise errors.UserError(f"--input={fv.input} is not a file.")
  if not fv.input.endswith((".npz",) + PICKLE_SUFFIXES):
    raise errors.UserError(f"--input={fv.input}: give an .npz ('image', 'label') or an "
                           "RST .pickle ('data', 'extrapolated_targets').")
  if fs.is_remote(fv.output_dir):
    raise errors.UserError(f"--output_dir={fv.output_dir}: the converter writes to a "
                           "local or mounted filesystem; write locally and copy the folder.")
  errors.output_dir("--output_dir", fv.output_dir)
  if fv.num_shards and fv.examples_per_shard:
    raise errors.UserError("Give --num_shards or --examples_per_shard, not both.")
  for flag in ("num_shards", "examples_per_shard", "num_classes"):
    errors.at_least(f"--{flag}", fv[flag].value, 0)
  if os.path.isdir(fv.output_dir) and os.listdir(fv.output_dir) and not fv.overwrite:
    prepare_output_dir(fv.output_dir, overwrite=False)  # raises, naming the folder


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  check_flags(FLAGS)
  info = convert(FLAGS.input, FLAGS.output_dir, num_shards=FLAGS.num_shards,
                 examples_per_shard=FLAGS.examples_per_shard,
                 num_classes=FLAGS.num_classes or None, overwrite=FLAGS.overwrite)
  print(f"wrote {info.count} examples {list(info.image_shape)} (labels "
        f"{info.label_min}..{info.label_max}, {info.num_classes} classes) in "
        f"{len(info.shards)} shards to {FLAGS.output_dir}; train with "
        f"--config.extra_data_path={FLAGS.output_dir}")


if __name__ == "__main__":
  define_flags()
  util.run(main)
