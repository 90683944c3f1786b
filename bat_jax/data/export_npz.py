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

from absl import app, flags
import numpy as np

from bat_jax import datasets

SPLITS = ("train", "test")


def export_npz(dataset: str, data_dir: Optional[str], out: str, *,
               num_train: Optional[int] = None,
               num_test: Optional[int] = None) -> pathlib.Path:
  """Reads ``dataset``'s splits with TFDS and writes them to the .npz ``out``.

  The written file is read back through ``load_npz_split`` (shapes, dtypes
  and label range checked against the dataset) before this returns.
  """
  counts = {"train": num_train, "test": num_test}
  arrays = {}
  for split in SPLITS:
    images, labels = datasets.load_split(dataset, split, data_dir=data_dir,
                                         num_examples=counts[split])
    arrays[datasets.NPZ_IMAGE_KEY.format(split=split)] = images.astype(np.uint8)
    arrays[datasets.NPZ_LABEL_KEY.format(split=split)] = labels.astype(np.int32)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename, so a crash never leaves a half-written data file.
  partial = out.with_name(out.name + ".partial.npz")
  np.savez_compressed(partial, **arrays)
  os.replace(partial, out)
  for split in SPLITS:
    datasets.load_npz_split(str(out), split, dataset)
  return out


FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "TFDS-backed dataset of bat_jax "
                    "(datasets.DATASETS): mnist, cifar10, cifar100.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the prepared "
                    "dataset (array_record); default: TFDS's.")
flags.DEFINE_string("out", None, "The .npz to write.")
flags.DEFINE_integer("num_train", -1, "First N train examples; -1: all.")
flags.DEFINE_integer("num_test", -1, "First N test examples; -1: all.")


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("Pass --out=FILE.npz.")
  path = export_npz(FLAGS.dataset, FLAGS.data_dir, FLAGS.out,
                    num_train=FLAGS.num_train if FLAGS.num_train >= 0 else None,
                    num_test=FLAGS.num_test if FLAGS.num_test >= 0 else None)
  with np.load(path) as data:
    sizes = ", ".join(f"{k} {data[k].shape}" for k in sorted(data.files))
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
  app.run(main)
