"""Writes ``mnist_subset.npz``: the first 6,000 train / 1,000 test MNIST images.

The subset ships inside the package so that the README's quickstart runs
offline on a fresh machine (``dataset='mnist_subset'``). "First" is in TFDS's
record order (TFDS shuffles MNIST when preparing it), so all ten digits
appear. Regenerate it from a TFDS-prepared MNIST (array_record) with

  python -m bat_jax.data.make_mnist_subset --data_dir=../shared/data/tfds
"""

import argparse
import pathlib

import numpy as np

from bat_jax import datasets

NUM_TRAIN, NUM_TEST = 6000, 1000
OUTPUT = pathlib.Path(__file__).resolve().parent / "mnist_subset.npz"


def make_subset(data_dir: str, output: pathlib.Path = OUTPUT) -> pathlib.Path:
  """Reads the first examples of each MNIST split and saves them compressed."""
  arrays = {}
  for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images, labels = datasets.load_split("mnist", split, data_dir=data_dir,
                                         num_examples=n)
    arrays[f"{split}_image"] = images.astype(np.uint8)
    arrays[f"{split}_label"] = labels.astype(np.int32)
  np.savez_compressed(output, **arrays)
  return output


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="TFDS data_dir holding a prepared mnist/3.0.1.")
  parser.add_argument("--output", default=str(OUTPUT))
  args = parser.parse_args()
  path = make_subset(args.data_dir, pathlib.Path(args.output))
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
