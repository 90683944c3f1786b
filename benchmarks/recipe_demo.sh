#!/usr/bin/env bash
# BAT with the modern-recipe options at CPU scale: plain, with weight averaging
# (EMA) and with adversarial weight perturbation (AWP), 3 seeds each, on the
# 6,000 MNIST digits bundled with the package (configs/quickstart.py: LeNet,
# eps 0.3, 4 epochs), each evaluated with PGD-50 x 10 restarts on the 1,000
# bundled test digits. Writes ROOT/table_<variant>.md (mean +- std over seeds).
#
#   benchmarks/recipe_demo.sh [ROOT] [VARIANT ...]   (variants: bat bat_ema bat_awp)
#
# About an hour on 2 CPU cores for the three variants.
set -euo pipefail
root=${1:-runs/recipe_demo}
shift || true
variants=("${@:-bat bat_ema bat_awp}")
read -r -a variants <<< "${variants[*]}"
seeds=(0 1 2)
# The sanity checks (4 more PGD-50 x 10 runs on 200 digits, about 9 minutes
# each on 2 cores) on the first seed of each variant only.
sanity_examples=200

settings() {  # the variant's config overrides, and the checkpoints it reports
  case $1 in
    bat) echo "last|" ;;
    bat_ema) echo "last,ema|--config.ema_decay=0.99" ;;
    bat_awp) echo "last|--config.awp_gamma=0.005" ;;
    *) echo "unknown variant $1 (bat, bat_ema, bat_awp)" >&2; exit 2 ;;
  esac
}

for variant in "${variants[@]}"; do
  IFS='|' read -r which overrides <<< "$(settings "$variant")"
  workdirs=()
  for seed in "${seeds[@]}"; do
    workdir=$root/${variant}_seed$seed
    sanity=$([ "$seed" = "${seeds[0]}" ] && echo $sanity_examples || echo 0)
    # shellcheck disable=SC2086  # the overrides are separate flags
    python -m bat_jax.main --config=configs/quickstart.py --config.seed="$seed" \
        $overrides --workdir="$workdir"
    python -m bat_jax.evaluate --workdir="$workdir" --which="$which" \
        --attacks=clean,pgd --pgd_steps=50 --pgd_restarts=10 --sanity_examples="$sanity"
    workdirs+=("$workdir")
  done
  python -m bat_jax.evaluate --aggregate --workdirs="$(IFS=,; echo "${workdirs[*]}")" \
      --which="$which" --out="$root/table_$variant.md"
done
