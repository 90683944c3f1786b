"""A bat_jax-trained LeNet evaluated by the PyTorch reference trainer's evaluation.

Part of the reference-gap study (benchmarks/README.md): if PyTorch's clean and
PGD-50 accuracy of bat_jax's final weights match bat_jax's own numbers, the
evaluation is not where the two frameworks differ, and a gap in the tables is
one of the trained models. The weights are copied as in
``reference_step_check.py``; PGD-50 is run with several seeds (its uniform
start is random) to show the evaluation's own spread.

  python benchmarks/reference_eval_check.py --workdirs=/tmp/refgap/jax_trades_eps0.3_s0 \\
      --out=benchmarks/results/reference_gap/eval_check.json
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
# pylint: disable=g-import-not-at-top,wrong-import-position
from bat_jax import train
import reference_step_check as check
import reference_trainer_torch as ref
# pylint: enable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdirs", required=True, help="comma-separated bat_jax workdirs")
  p.add_argument("--eval_seeds", default="1,2,3")
  p.add_argument("--out", default="")
  args = p.parse_args()
  torch.set_num_threads(2)
  _, _, x_test, y_test = ref.load_npz(ref.DEFAULT_DATA)
  results = []
  for workdir in args.workdirs.split(","):
    restored = train.restore_model(workdir, "last")
    c = restored.config
    net = ref.LeNet()
    check.load_into_torch(net, restored.variables["params"])
    runs = []
    for seed in (int(s) for s in args.eval_seeds.split(",")):
      clean, robust = ref.evaluate(net, x_test, y_test, c.eps, c.eval_attack_step_size,
                                   c.eval_attack_steps, seed=seed)
      runs.append({"eval_seed": seed, "clean_acc": clean, "pgd_acc": robust})
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    final = [m for m in metrics if "eval/pgd_acc" in m][-1]
    row = {"workdir": workdir, "method": c.method, "eps": c.eps, "seed": c.seed,
           "bat_jax_clean_acc": final["eval/clean_acc"], "bat_jax_pgd_acc": final["eval/pgd_acc"],
           "torch_eval": runs,
           "torch_pgd_acc_mean": float(np.mean([r["pgd_acc"] for r in runs]))}
    results.append(row)
    print(f"{workdir}: bat_jax clean {100 * row['bat_jax_clean_acc']:.1f} PGD-"
          f"{c.eval_attack_steps} {100 * row['bat_jax_pgd_acc']:.1f} | PyTorch eval clean "
          f"{100 * runs[0]['clean_acc']:.1f} PGD " +
          ", ".join(f"{100 * r['pgd_acc']:.1f}" for r in runs), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
