"""Cross-checks bat_jax's AutoAttack against an independent PyTorch port of it.

Runs in the benchmark venv (torch + ``torchattacks``, never a bat_jax
dependency). ``autoattack_timing.py --out=R.json`` leaves ``R_flags.npz``:
the test images, labels and bat_jax's per-example robust flags after each
stage of AutoAttack "standard". This script loads the same LeNet weights into
an equivalent PyTorch module, checks that it classifies the clean images as
the JAX model did, then runs torchattacks' APGD-CE, APGD-T, FAB-T and Square
with the reference's standard budgets (100 iterations, 9 target classes,
5000 queries; torchattacks' own ``AutoAttack`` wrapper uses 10 iterations),
each stage on the examples still robust, and compares robust accuracies
stage by stage and example by example.

  bench_venv/bin/pip install torchattacks==3.5.1
  bench_venv/bin/python benchmarks/torch_autoattack_check.py \\
      --flags=benchmarks/results/autoattack_lenet_1000_flags.npz \\
      --weights=/tmp/bat_jax_lenet_at.pkl --out=benchmarks/results/autoattack_torch_check.json
"""

import argparse
import json
import pickle
import time

import numpy as np
import torch
import torchattacks
from torch import nn

STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")


class TorchLeNet(nn.Module):
  """bat_jax.models.LeNet in PyTorch (NCHW input, NHWC flatten as the JAX model)."""

  def __init__(self):
    super().__init__()
    self.conv1, self.conv2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 5)
    self.fc1, self.fc2 = nn.Linear(4 * 4 * 64, 1024), nn.Linear(1024, 10)

  def forward(self, x):
    x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
    x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return self.fc2(torch.relu(self.fc1(x)))

  def load_flax(self, params):
    """Flax HWIO conv kernels and [in, out] dense kernels -> PyTorch layouts."""
    p = params["params"] if "params" in params else params
    with torch.no_grad():
      for name in ("conv1", "conv2"):
        getattr(self, name).weight.copy_(torch.from_numpy(
            np.ascontiguousarray(np.transpose(p[name]["kernel"], (3, 2, 0, 1)))))
        getattr(self, name).bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
      for name in ("fc1", "fc2"):
        getattr(self, name).weight.copy_(torch.from_numpy(
            np.ascontiguousarray(np.asarray(p[name]["kernel"]).T)))
        getattr(self, name).bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
    return self


def make_stage(name, model, eps, seed, settings=None):
  """One torchattacks stage; ``settings`` overrides budgets by bat_jax's names.

  ``apgd_iters``, ``n_target_classes``, ``fab_iters``, ``square_queries``;
  the default is the reference's standard budgets (100, 9, 100, 5000).
  """
  s = dict(apgd_iters=100, n_target_classes=9, fab_iters=100, square_queries=5000)
  s.update(settings or {})
  n_classes = s["n_target_classes"] + 1  # torchattacks targets n_classes - 1 classes
  if name == "apgd_ce":
    return torchattacks.APGD(model, eps=eps, steps=s["apgd_iters"], n_restarts=1,
                             loss="ce", seed=seed)
  if name == "apgd_t":
    return torchattacks.APGDT(model, eps=eps, steps=s["apgd_iters"], n_restarts=1,
                              n_classes=n_classes, seed=seed)
  if name == "fab_t":
    return torchattacks.FAB(model, eps=eps, steps=s["fab_iters"], n_restarts=1,
                            multi_targeted=True, n_classes=n_classes, seed=seed)
  return torchattacks.Square(model, eps=eps, n_queries=s["square_queries"], n_restarts=1,
                             p_init=0.8, seed=seed)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--flags", required=True, help="autoattack_timing.py's _flags.npz")
  parser.add_argument("--weights", default="/tmp/bat_jax_lenet_at.pkl")
  parser.add_argument("--eps", type=float, default=0.3)
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)

  data = np.load(args.flags)
  x = torch.from_numpy(np.transpose(data["x"], (0, 3, 1, 2)).copy())
  y = torch.from_numpy(data["y"].astype(np.int64))
  with open(args.weights, "rb") as f:
    model = TorchLeNet().load_flax(pickle.load(f)).eval()

  with torch.no_grad():
    robust = (model(x).argmax(1) == y).numpy()
  report = {"n": len(y), "eps": args.eps, "torchattacks": torchattacks.__version__,
            "clean": {"torch": float(robust.mean()), "jax": float(data["clean"].mean()),
                      "agree": float((robust == data["clean"]).mean())}, "stages": []}
  print(f"clean: torch {robust.mean():.2%}  jax {data['clean'].mean():.2%}  "
        f"per-example agreement {report['clean']['agree']:.2%}", flush=True)
  for name in STAGES:
    attack = make_stage(name, model, args.eps, args.seed)
    idx = np.flatnonzero(robust)
    start = time.time()
    for i in range(0, len(idx), args.batch_size):
      chunk = idx[i:i + args.batch_size]
      x_adv = attack(x[chunk], y[chunk]).detach()
      assert float((x_adv - x[chunk]).abs().max()) <= args.eps + 1e-6
      with torch.no_grad():
        robust[chunk] = (model(x_adv).argmax(1) == y[chunk]).numpy()
    seconds = time.time() - start
    jax_flags = data[name]
    row = {"attack": name, "attacked": int(len(idx)), "seconds": seconds,
           "torch_robust": float(robust.mean()), "jax_robust": float(jax_flags.mean()),
           "both_robust": int((robust & jax_flags).sum()),
           "only_torch_robust": int((robust & ~jax_flags).sum()),
           "only_jax_robust": int((~robust & jax_flags).sum())}
    report["stages"].append(row)
    print(f"{name:8s} attacked {len(idx):4d}  robust: torch {row['torch_robust']:.2%}  "
          f"jax {row['jax_robust']:.2%}  (only torch {row['only_torch_robust']}, only jax "
          f"{row['only_jax_robust']})  {seconds:.0f} s", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
