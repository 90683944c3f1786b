"""Exports a TFDS-prepared dataset to a local .npz data file (``config.data_file``).

The file holds ``train_image`` / ``test_image`` (uint8 ``[N, H, W, C]``) and
``train_label`` / ``test_label`` (int32 ``[N]``), compressed: the layout that
``bat_jax.datasets.load_npz_split`` reads and that the bundled
``mnist_subset.npz`` has. Training from such a file needs no TFDS (a machine
without it, or your own data in the same layout):

  tfds build mnist --data_dir=DIR --file_format=array_record   # once, downloads
  python -m bat_jax.data.export_npz --dataset=mnist --data_dir=DIR \\
      --out=mnist.npz                              # all 70,000 digits, ~11 MB
  python -m bat_jax.main --config=configs/mnist.py --config.data_file=mnist.npz ...

``--num_train`` / ``--num_test`` keep the first N examples of each split (in
TFDS's record order); -1 keeps them all.
"""

import os
import pathlib
from typing import Optional

from absl import flags
import numpy as np

from bat_jax import datasets, errors, fs, util

SPLITS = ("train", "test")


def export_npz(dataset: str, data_dir: Optional[str], out: str, *,
               num_train: Optional[int] = None,
               num_test: Optional[int] = None) -> pathlib.Path:
  """Reads ``dataset``'s splits with TFDS and writes them to the .npz ``out``.

  The written file is read back through ``load_npz_split`` (shapes, dtypes
  and label range checked against the dataset) before this returns.
  """
  out = pathlib.Path(out)
  fs.check_writable(out.parent, "folder of --out")
  counts = {"train": num_train, "test": num_test}
  arrays = {}
  for split in SPLITS:
    images, labels = datasets.load_split(dataset, split, data_dir=data_dir,
                                         num_examples=counts[split])
    arrays[datasets.NPZ_IMAGE_KEY.format(split=split)] = images.astype(np.uint8)
    arrays[datasets.NPZ_LABEL_KEY.format(split=split)] = labels.astype(np.int32)
  # Write then rename, so a crash never leaves a half-written data file.
  partial = out.with_name(out.name + ".partial.npz")
  try:
    with fs.writing(out):
      np.savez_compressed(partial, **arrays)
      os.replace(partial, out)
  finally:
    if partial.exists():
      partial.unlink()  # a full disk: no partial file left taking space
  for split in SPLITS:
    datasets.load_npz_split(str(out), split, dataset)
  return out


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("dataset", "mnist", "TFDS-backed dataset of bat_jax "
                      "(datasets.DATASETS): mnist, cifar10, cifar100.", **fv)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the prepared "
                      "dataset (array_record); default: TFDS's.", **fv)
  flags.DEFINE_string("out", None, "The .npz to write.", **fv)
  flags.DEFINE_integer("num_train", -1, "First N train examples; -1: all.", **fv)
  flags.DEFINE_integer("num_test", -1, "First N test examples; -1: all.", **fv)


def check_flags(fv: flags.FlagValues) -> None:
  """Refuses a bad data set, count or output path before TFDS is read."""
  errors.choose("--dataset", fv.dataset,
                [name for name, info in datasets.DATASETS.items() if info.tfds_name])
  for flag in ("num_train", "num_test"):
    errors.count_or_all(f"--{flag}", fv[flag].value)
  if not fv.out:
    raise errors.UserError("Pass --out=FILE.npz.")
  errors.output_file("--out", fv.out)
  datasets.check_available(fv.dataset, data_dir=fv.data_dir)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  check_flags(FLAGS)
  path = export_npz(FLAGS.dataset, FLAGS.data_dir, FLAGS.out,
                    num_train=FLAGS.num_train if FLAGS.num_train >= 0 else None,
                    num_test=FLAGS.num_test if FLAGS.num_test >= 0 else None)
  with np.load(path) as data:
    sizes = ", ".join(f"{k} {data[k].shape}" for k in sorted(data.files))
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
  define_flags()
  util.run(main)
