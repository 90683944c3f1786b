#!/usr/bin/env bash
# The speed measurement on the CPU at hand, as one command: the BAT step
# (PGD-10, m = 2) of LeNet at batch 128 and of ResNet-18 at batch 16 and 32,
# each beside the PyTorch reference step (compare.py: worker processes,
# alternating rounds), then the quickstart's time and accuracies.
#
#   BENCH_TORCH_PYTHON=.venv/bin/python benchmarks/cpu_speed_check.sh [OUT_DIR]
#
# Run it from the checkout with the bat_jax venv active, on a quiet machine
# (about 10 minutes on a 2-core AMD EPYC, the first ResNet-18 traces included:
# bat_jax.cpu measures its Winograd choices once per machine). OUT_DIR defaults to
# benchmarks/results/<vendor>_f<family>_m<model>/ (from /proc/cpuinfo), which
# receives lenet_b128.json, resnet18_b16.json, resnet18_b32.json, their
# tables (tables.md), quickstart.log, lscpu.txt and cpu_ops_choices.json
# (what bat_jax.cpu chose and measured here). VARIANTS (default
# "torch,jax") adds bat_jax variants to every comparison, e.g. "torch,jax,jax+stock".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VARIANTS=${VARIANTS:-torch,jax}

cpu_field() { sed -n "s/^$1[[:space:]]*: //p" /proc/cpuinfo | head -1; }
OUT=${1:-benchmarks/results/$(cpu_field vendor_id)_f$(cpu_field "cpu family")_m$(cpu_field model)}
mkdir -p "$OUT"
lscpu > "$OUT/lscpu.txt"
echo "cpu_speed_check: $(cpu_field 'model name'), $(nproc) cores -> $OUT"

compare() {  # name model batch rounds iters
  "$PYTHON" benchmarks/compare.py --model="$2" --batch="$3" --steps=10 --bridges=2 \
      --methods=bat --rounds="$4" --iters="$5" --variants="$VARIANTS" \
      --out="$OUT/$1.json" --markdown="$OUT/tables.md"
}
compare lenet_b128 lenet 128 6 3
compare resnet18_b16 resnet18 16 4 2
compare resnet18_b32 resnet18 32 4 1
cp "${BAT_JAX_CACHE_DIR:-$HOME/.cache/bat_jax}/cpu_ops_choices.json" "$OUT/" || true

start=$(date +%s)
"$PYTHON" -m bat_jax.main --config=configs/quickstart.py \
    --workdir="$(mktemp -d)/quickstart" 2>&1 | tee "$OUT/quickstart.log" | tail -3
echo "quickstart: $(( $(date +%s) - start )) s" | tee -a "$OUT/quickstart.log"
