#!/usr/bin/env bash
# Prepares this checkout for benchmarks/device_suite.py on a GPU host without
# network access that has JAX, PyTorch and their usual companions but not
# bat_jax's remaining needs (benchmarks/README.md, "GPU suite"). Run it on a
# machine with PyPI, from anywhere in the checkout, with the bat_jax venv
# active, and MNIST prepared by TFDS in TFDS_DIR
# (`tfds build mnist --data_dir=DIR --file_format=array_record`):
#   TFDS_DIR=DIR benchmarks/prepare_device_run.sh
# It writes two folders to copy along with the checkout, never to commit:
#   .whl/      pure-Python wheels for the GPU host's Python (GPU_PYTHON_VERSION, 3.12)
#   .devdata/  mnist.npz: all 70,000 MNIST digits as uint8 (about 11 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
: "${TFDS_DIR:?set TFDS_DIR=DIR, the TFDS data_dir holding mnist}"
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}

# bat_jax needs ml_collections beside what such a host has (PyYAML too).
# torchattacks is optional (the AutoAttack comparison); it needs scipy, tqdm, torch.
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
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
