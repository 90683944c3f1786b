"""Writes ``mnist_subset.npz``: the first 6,000 train / 1,000 test MNIST images.

The subset ships inside the package so that the README's quickstart runs
offline on a fresh machine (``dataset='mnist_subset'``). "First" is in TFDS's
record order (TFDS shuffles MNIST when preparing it), so all ten digits
appear. It is ``export_npz`` with fixed sizes; regenerate it from a
TFDS-prepared MNIST (array_record; `tfds build mnist --data_dir=DIR
--file_format=array_record`) with

  python -m bat_jax.data.make_mnist_subset --data_dir=DIR
"""

import pathlib

from absl import flags

from bat_jax import errors, util
from bat_jax.data import export_npz

NUM_TRAIN, NUM_TEST = 6000, 1000
OUTPUT = pathlib.Path(__file__).resolve().parent / "mnist_subset.npz"


def make_subset(data_dir: str, output: pathlib.Path = OUTPUT) -> pathlib.Path:
  """Reads the first examples of each MNIST split and saves them compressed."""
  return export_npz.export_npz("mnist", data_dir, str(output),
                               num_train=NUM_TRAIN, num_test=NUM_TEST)


flags.DEFINE_string("data_dir", None, "TFDS data_dir holding a prepared mnist/3.0.1.")
flags.DEFINE_string("output", str(OUTPUT), "Where to write the subset.")


def main(argv):
  del argv
  fv = flags.FLAGS
  if not fv.data_dir:
    raise errors.UserError("Pass --data_dir: a TFDS data_dir holding a prepared "
                           "mnist/3.0.1.")
  path = make_subset(fv.data_dir, pathlib.Path(fv.output))
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  util.run(main)
