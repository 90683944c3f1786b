#!/usr/bin/env bash
# Prepares this checkout for benchmarks/device_suite.py on the GPU machine
# (benchmarks/README.md, "GPU suite"). Run it here, from anywhere in the
# checkout, with the bat_jax venv active; it needs PyPI and the TFDS-prepared
# MNIST in ../shared/data/tfds (or TFDS_DIR). It writes two folders that the
# run carries and that must never be committed:
#   .whl/      the wheels the GPU machine lacks (pure Python, for its Python 3.12)
#   .devdata/  mnist.npz: all 70,000 MNIST digits as uint8 (about 11 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TFDS_DIR=${TFDS_DIR:-../shared/data/tfds}

# The suite's import path on the GPU machine: bat_jax needs ml_collections
# (its other needs are there; PyYAML too). torchattacks is optional (the
# AutoAttack comparison); its needs (scipy, tqdm, torch) are there.
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    ml_collections==1.1.0 torchattacks==3.5.1

mkdir -p .devdata
"$PYTHON" -m bat_jax.data.export_npz --dataset=mnist --data_dir="$TFDS_DIR" \
    --out=.devdata/mnist.npz

ls -l .whl .devdata
for path in .whl .devdata; do
  if ! git check-ignore -q "$path/"; then
    echo "note: $path/ is not ignored by git; ignore it with" \
         "echo /$path/ >> \"\$(git rev-parse --git-common-dir)/info/exclude\"" >&2
  fi
done
