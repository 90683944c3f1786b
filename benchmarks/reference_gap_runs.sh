#!/bin/bash
# The reference-gap grid (benchmarks/README.md): bat_jax and the PyTorch
# reference trainer, one run at a time (2 CPU cores), seed by seed.
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
  for seed in $SEEDS; do
    for method in $METHODS; do
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
        $PY - "$OUT/logs/jax_$name.log" "$OUT/jax_$name.json" $method $eps $seed $rc \
            $(( $(date +%s) - start )) <<'PYEOF'
import json, re, sys
log, out, method, eps, seed, rc, wall = sys.argv[1:]
m = re.search(r"clean ([0-9.]+), PGD-50 ([0-9.]+)", open(log).read())
json.dump({"framework": "jax", "method": method, "eps": float(eps), "seed": int(seed),
           "clean_acc": float(m.group(1)) if m else None,
           "pgd_acc": float(m.group(2)) if m else None,
           "rc": int(rc), "total_s": int(wall)}, open(out, "w"), indent=1)
PYEOF
      fi
      if [ ! -f "$OUT/torch_$name.json" ]; then
        $PY benchmarks/reference_trainer_torch.py --method=$method --eps=$eps --seed=$seed \
          --out="$OUT/torch_$name.json" > "$OUT/logs/torch_$name.log" 2>&1
      fi
    done
  done
done
