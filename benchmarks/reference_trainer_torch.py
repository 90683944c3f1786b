"""AT / TRADES / BAT on the bundled 6,000 MNIST digits, with the reference code's semantics.

The PyTorch side of the reference-gap study (benchmarks/README.md):
an independent trainer written from docs/ALGORITHMS.md sections 1, 2 and 4, the way the
authors' PyTorch code does it, that never imports bat_jax. It reads the same
data as bat_jax's `mnist_subset` (bat_jax/data/mnist_subset.npz, with NumPy),
trains the LeNet and prints clean and PGD-50 accuracy on the 1,000 test digits.

  * Model: LeNet with PyTorch's default init (weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bat_jax uses the same weight init but
    zero biases: --bias_init=zero).
  * Attacks (torchattacks semantics), model.eval(): AT and BAT use PGD-CE with
    a uniform start; TRADES (and BAT with --bat_attack=kl) use TPGD: KL
    objective, start clip(x + 0.001 N(0, 1), 0, 1).
  * Loss, model.train(): AT CE(f(x*)); TRADES CE(f(x)) + beta KL(p(x)||p(x*))
    (batchmean, no stop-gradient on the target); BAT CE(f(x)) + beta
    sum_k KL(p(g(k/m))||p(g((k+1)/m))), one forward pass per bridge.
  * Adam (lr 1e-3), MultiStepLR (gamma 0.1) stepped once per epoch.
  * Batches: a fresh permutation per epoch (torch.Generator seeded with
    --seed); the last partial batch is kept as the reference's DataLoader does
    (6,000 = 46 * 128 + 112: 47 steps per epoch); --drop_last drops it as
    bat_jax does (46 steps).
  * Evaluation, model.eval(): clean accuracy and PGD-CE (uniform start, one
    restart, --eval_steps, --eval_step_size) on the 1,000 test digits.

Run in any venv with torch and numpy (pin torch==2.13.0 for a CPU wheel):

  python benchmarks/reference_trainer_torch.py --method=trades --eps=0.3 --seed=0 \\
      --out=benchmarks/results/reference_gap/torch_trades_eps0.3_s0.json
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

# The LeNet the speed benchmarks time: conv32-5 / pool / conv64-5 / pool / fc1024 / fc10.
from bench_torch import LeNet

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                            "bat_jax", "data", "mnist_subset.npz")
TPGD_SCALE = 0.001


# --------------------------------------------------------------------------
# Attacks (torchattacks' PGD and TPGD).
# --------------------------------------------------------------------------


def uniform_start(x, eps):
  return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)


def tpgd_start(x):
  return torch.clamp(x + TPGD_SCALE * torch.randn_like(x), 0, 1)


def pgd(model, x, y, eps, alpha, steps, objective="ce", x0=None):
  """Sign-gradient ascent on CE or KL(p(x)||p(x_t)), projected on the eps-ball and [0, 1].

  ``x0`` (optional) is the start; by default uniform for CE, TPGD's for KL.
  """
  x = x.detach()
  if objective == "kl":
    target = F.softmax(model(x), dim=1).detach()
  if x0 is None:
    x0 = tpgd_start(x) if objective == "kl" else uniform_start(x, eps)
  adv = x0.detach()
  for _ in range(steps):
    adv.requires_grad_(True)
    logits = model(adv)
    if objective == "kl":
      cost = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")
    else:
      cost = F.cross_entropy(logits, y)
    grad, = torch.autograd.grad(cost, adv)
    adv = adv.detach() + alpha * grad.sign()
    adv = torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0, 1).detach()
  return adv


# --------------------------------------------------------------------------
# Losses (gradients flow into every KL target, as in the reference).
# --------------------------------------------------------------------------


def kl_batchmean(p_logits, q_logits):
  """KL(softmax(p) || softmax(q)), summed over classes, mean over the batch."""
  return F.kl_div(F.log_softmax(q_logits, dim=1), F.softmax(p_logits, dim=1),
                  reduction="batchmean")


def method_loss(method, model, x, x_adv, y, beta, bridges):
  if method == "at":
    return F.cross_entropy(model(x_adv), y)
  if method == "trades":
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * kl_batchmean(logits, model(x_adv))
  if method == "bat":
    delta = (x_adv - x).detach()
    prev = model(x)
    loss = F.cross_entropy(prev, y)
    for k in range(1, bridges + 1):
      point = x_adv if k == bridges else x + (k / bridges) * delta
      logits = model(point)
      loss = loss + beta * kl_batchmean(prev, logits)
      prev = logits
    return loss
  raise ValueError(f"unknown method {method!r}")


def attack_objective(method, bat_attack="ce"):
  return {"at": "ce", "trades": "kl", "bat": bat_attack}[method]


# --------------------------------------------------------------------------
# Data, training, evaluation.
# --------------------------------------------------------------------------


def load_npz(path):
  """uint8 NHWC -> float NCHW in [0, 1]; int64 labels."""
  d = np.load(path)
  to_x = lambda a: torch.from_numpy(a.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
  to_y = lambda a: torch.from_numpy(a.astype(np.int64))
  return (to_x(d["train_image"]), to_y(d["train_label"]),
          to_x(d["test_image"]), to_y(d["test_label"]))


def evaluate(model, x, y, eps, alpha, steps, batch=500, seed=0):
  """Clean and PGD-CE (uniform start, 1 restart) accuracy, model.eval()."""
  model.eval()
  torch.manual_seed(seed)
  clean = robust = 0
  for i in range(0, len(x), batch):
    xb, yb = x[i:i + batch], y[i:i + batch]
    with torch.no_grad():
      clean += int((model(xb).argmax(1) == yb).sum())
    adv = pgd(model, xb, yb, eps, alpha, steps, "ce")
    with torch.no_grad():
      robust += int((model(adv).argmax(1) == yb).sum())
  return clean / len(x), robust / len(x)


def train(args):
  torch.manual_seed(args.seed)
  x_train, y_train, x_test, y_test = load_npz(args.data)
  model = LeNet()
  if args.bias_init == "zero":  # bat_jax's LeNet init (weights as PyTorch's)
    with torch.no_grad():
      for module in (model.conv1, model.conv2, model.fc1, model.fc2):
        module.bias.zero_()
  opt = torch.optim.Adam(model.parameters(), lr=args.lr)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=0.1)
  order = torch.Generator().manual_seed(args.seed)
  objective = attack_objective(args.method, args.bat_attack)
  step_size = args.attack_step_size or 0.8 * args.eps / args.attack_steps
  history, t0 = [], time.time()
  for epoch in range(args.epochs):
    perm = torch.randperm(len(x_train), generator=order)
    stop = len(perm) - len(perm) % args.batch if args.drop_last else len(perm)
    losses = []
    for i in range(0, stop, args.batch):
      idx = perm[i:i + args.batch]
      x, y = x_train[idx], y_train[idx]
      model.eval()
      x_adv = pgd(model, x, y, args.eps, step_size, args.attack_steps, objective)
      model.train()
      loss = method_loss(args.method, model, x, x_adv, y, args.beta, args.bridges)
      opt.zero_grad()
      loss.backward()
      opt.step()
      losses.append(float(loss.detach()))
    sched.step()
    history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                    "steps": len(losses), "lr": opt.param_groups[0]["lr"],
                    "elapsed_s": time.time() - t0})
    print(f"epoch {epoch + 1}/{args.epochs}: loss {history[-1]['loss']:.4f} "
          f"({len(losses)} steps, {time.time() - t0:.0f}s)", flush=True)
  train_s = time.time() - t0
  clean, robust = evaluate(model, x_test, y_test, args.eps, args.eval_step_size,
                           args.eval_steps, seed=args.seed + 1)
  result = {"framework": "torch", "method": args.method, "eps": args.eps,
            "seed": args.seed, "clean_acc": clean, "pgd_acc": robust,
            "attack_objective": objective, "attack_step_size": step_size,
            "train_s": train_s, "total_s": time.time() - t0, "history": history,
            "args": vars(args), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
  print(f"Final test accuracy on {len(x_test)} examples: clean {clean:.4f}, "
        f"PGD-{args.eval_steps} {robust:.4f} (eps={args.eps:g}, method={args.method})",
        flush=True)
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", default="trades", choices=("at", "trades", "bat"))
  p.add_argument("--eps", type=float, default=0.3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")],
                 default=[6, 8])
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--drop_last", action="store_true",
                 help="drop the last partial batch (bat_jax); default keeps it (reference)")
  p.add_argument("--attack_steps", type=int, default=20)
  p.add_argument("--attack_step_size", type=float, default=0.0,
                 help="0: 0.8 * eps / attack_steps")
  p.add_argument("--bias_init", default="torch", choices=("torch", "zero"),
                 help="torch: PyTorch's default U(-1/sqrt(fan_in), ..); zero: bat_jax's")
  p.add_argument("--bat_attack", default="ce", choices=("ce", "kl"))
  p.add_argument("--beta", type=float, default=5.0)
  p.add_argument("--bridges", type=int, default=2)
  p.add_argument("--eval_steps", type=int, default=50)
  p.add_argument("--eval_step_size", type=float, default=0.01)
  p.add_argument("--data", default=DEFAULT_DATA)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  result = train(args)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
