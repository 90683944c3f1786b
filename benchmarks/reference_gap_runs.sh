#!/bin/bash
# The reference-gap grid (benchmarks/README.md): bat_jax and the PyTorch
# reference trainer, one run at a time (2 CPU cores), each cell's seeds in
# turn (bat_jax then PyTorch per seed); runs whose JSON exists are skipped.
#   benchmarks/reference_gap_runs.sh "trades at" "0.3" "0 1 2"
# Logs and results: benchmarks/results/reference_gap/ (bat_jax workdirs under $WORKROOT).
set -u
METHODS=${1:-"trades at"}; EPSS=${2:-"0.3"}; SEEDS=${3:-"0 1 2"}
OUT=benchmarks/results/reference_gap
WORKROOT=${WORKROOT:-/tmp/refgap}
PY=${PY:-python}
mkdir -p "$OUT/logs" "$WORKROOT"
for eps in $EPSS; do
  step=$($PY -c "print(round(0.8 * $eps / 20, 6))")
  for method in $METHODS; do
    for seed in $SEEDS; do
      name=${method}_eps${eps}_s${seed}
      if [ ! -f "$OUT/jax_$name.json" ]; then
        start=$(date +%s)
        $PY -m bat_jax.main --config=configs/quickstart.py --workdir="$WORKROOT/jax_$name" \
          --config.num_epochs=10 --config.schedule=step --config.lr_decay_epochs="(6,8)" \
          --config.attack_steps=20 --config.attack_step_size=$step --config.eps=$eps \
          --config.method=$method --config.seed=$seed --config.eval_attack_steps=50 \
          --config.eval_attack_step_size=0.01 --config.num_eval_examples=1000 \
          --config.eval_every_epochs=10 > "$OUT/logs/jax_$name.log" 2>&1
        rc=$?
        $PY benchmarks/reference_gap.py --from_log="$OUT/logs/jax_$name.log" \
          --rc=$rc --total_s=$(( $(date +%s) - start )) --out="$OUT/jax_$name.json"
      fi
      if [ ! -f "$OUT/torch_$name.json" ]; then
        $PY benchmarks/reference_trainer_torch.py --method=$method --eps=$eps --seed=$seed \
          --out="$OUT/torch_$name.json" > "$OUT/logs/torch_$name.log" 2>&1
      fi
    done
  done
done
