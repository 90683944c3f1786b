"""The same train steps in PyTorch, written the way the reference code does it.

This is the baseline of ``benchmarks/compare.py``: an eager model, a Python
loop of PGD steps with ``torch.autograd.grad`` (the ``torchattacks`` PGD /
TPGD), the model in ``eval()`` mode for the attack and in ``train()`` mode
for the loss, one forward pass per term (clean, adversarial, each bridge),
then ``loss.backward()`` and ``optimizer.step()``. Same shapes, same
optimiser and hyper-parameters as ``bench_jax.make_config``; the data is
already float in [0, 1] (the reference's loader does the conversion).

Runs in its own virtual environment (torch is never a bat_jax dependency):

  python3 -m venv bench_venv && bench_venv/bin/pip install torch==2.13.0 numpy
  bench_venv/bin/python benchmarks/bench_torch.py --model=lenet --batch=128 --steps=10

``--worker`` serves the same JSON-lines protocol as ``bench_jax.py``.
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import worker_protocol

METHODS = ("standard", "at", "trades", "mart", "bat")


# --------------------------------------------------------------------------
# Models (NCHW; the shapes of bat_jax.models).
# --------------------------------------------------------------------------


class LeNet(nn.Module):
  """The authors' MNIST CNN: conv32-5 / pool / conv64-5 / pool / fc1024 / fc10."""

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 5)
    self.conv2 = nn.Conv2d(32, 64, 5)
    self.fc1 = nn.Linear(4 * 4 * 64, 1024)
    self.fc2 = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = F.relu(self.fc1(x.flatten(1)))
    return self.fc2(x)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
  """kuangliu/pytorch-cifar ResNet-18 (the TRADES/MART/BAT code's)."""

  def __init__(self, num_classes=10):
    super().__init__()
    self.in_planes = 64
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    layers = []
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      for s in (stride, 1):
        layers.append(BasicBlock(self.in_planes, planes, s))
        self.in_planes = planes
    self.layers = nn.Sequential(*layers)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layers(out)
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return self.linear(out)


class WideBasic(nn.Module):
  """TRADES's WRN BasicBlock (pre-activation; the shortcut reads the activation)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal = in_planes == out_planes
    self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride,
                                                      bias=False)

  def forward(self, x):
    o = F.relu(self.bn1(x))
    y = self.conv1(o)
    y = self.conv2(F.relu(self.bn2(y)))
    return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
  def __init__(self, depth=28, widen_factor=10, num_classes=10):
    super().__init__()
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    blocks = []
    in_planes = 16
    for i, stride in enumerate((1, 2, 2)):
      for j in range(n):
        blocks.append(WideBasic(in_planes, widths[i + 1], stride if j == 0 else 1))
        in_planes = widths[i + 1]
    self.blocks = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(in_planes)
    self.fc = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    out = self.blocks(self.conv1(x))
    out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
    return self.fc(out)


MODELS = {"lenet": LeNet, "resnet18": ResNet18, "wrn28_10": WideResNet,
          "wrn34_10": lambda num_classes=10: WideResNet(34, 10, num_classes),
          # bat_jax's tiny_wrn (WRN-10-1): the WRN code path at CPU size.
          "tiny_wrn": lambda num_classes=10: WideResNet(10, 1, num_classes)}


def image_shape(model):
  return (1, 28, 28) if model == "lenet" else (3, 32, 32)


# --------------------------------------------------------------------------
# Attacks (torchattacks' PGD and TPGD) and the losses of the reference code.
# --------------------------------------------------------------------------


def pgd_ce(model, x, y, eps, alpha, steps):
  """torchattacks.PGD: uniform start, sign steps, projection, detached."""
  adv = x.clone().detach() + torch.empty_like(x).uniform_(-eps, eps)
  adv = torch.clamp(adv, 0, 1).detach()
  for _ in range(steps):
    adv.requires_grad = True
    cost = F.cross_entropy(model(adv), y)
    grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - x, min=-eps, max=eps)
    adv = torch.clamp(x + delta, min=0, max=1).detach()
  return adv


def tpgd_kl(model, x, eps, alpha, steps):
  """torchattacks.TPGD (TRADES's inner max): start x + 0.001 N(0, 1)."""
  logit_ori = model(x).detach()
  adv = x + 0.001 * torch.randn_like(x)
  adv = torch.clamp(adv, 0, 1).detach()
  for _ in range(steps):
    adv.requires_grad = True
    cost = F.kl_div(F.log_softmax(model(adv), 1), F.softmax(logit_ori, 1),
                    reduction="sum")
    grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - x, min=-eps, max=eps)
    adv = torch.clamp(x + delta, min=0, max=1).detach()
  return adv


def kl_batchmean(p_logits, q_logits):
  """KL(p || q), summed over classes, mean over the batch (gradients into both)."""
  return F.kl_div(F.log_softmax(q_logits, 1), F.softmax(p_logits, 1),
                  reduction="batchmean")


def method_loss(method, model, x, x_adv, y, beta, bridges):
  if method == "standard":
    return F.cross_entropy(model(x), y)
  if method == "at":
    return F.cross_entropy(model(x_adv), y)
  if method == "trades":
    logits = model(x)
    logits_adv = model(x_adv)
    return F.cross_entropy(logits, y) + beta * kl_batchmean(logits, logits_adv)
  if method == "mart":
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = torch.sum(F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none"),
                   dim=1)
    loss_robust = torch.sum(kl * (1.0000001 - true_probs)) / x.size(0)
    return loss_adv + beta * loss_robust
  if method == "bat":
    delta = (x_adv - x).detach()
    logits_prev = model(x)
    loss = F.cross_entropy(logits_prev, y)
    for k in range(1, bridges + 1):
      logits_k = model(x + (k / bridges) * delta)  # one forward per bridge
      loss = loss + beta * kl_batchmean(logits_prev, logits_k)
      logits_prev = logits_k
    return loss
  raise ValueError(method)


class StepBench:
  """One train step of ``method``: attack in eval(), loss in train(), update."""

  def __init__(self, method="bat", model="lenet", batch=128, steps=10, bridges=2,
               dtype="float32", fused=False, channels_last=False, seed=0,
               device="cpu"):
    del fused  # PyTorch reference: always one forward per term.
    torch.manual_seed(seed)
    self.case = dict(framework="torch", method=method, model=model, batch=batch,
                     steps=steps if method != "standard" else 0,
                     bridges=bridges if method == "bat" else 0, dtype=dtype,
                     fused=False, channels_last=channels_last)
    self.method, self.steps, self.bridges = method, steps, bridges
    self.net = MODELS[model]()
    mnist = model == "lenet"
    self.eps, self.alpha = (0.3, 0.02) if mnist else (8 / 255, 2 / 255)
    self.beta = 5.0
    self.attack = "kl" if method == "trades" else "ce"
    if mnist:
      self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
    else:
      self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9,
                                 weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch,) + image_shape(model), np.uint8)
    self.x = torch.from_numpy(images.astype(np.float32) / 255.0)
    self.y = torch.from_numpy(rng.integers(0, 10, (batch,)).astype(np.int64))
    self.device = device
    if device.startswith("cuda"):
      torch.cuda.reset_peak_memory_stats()  # the memory column is per case
    self.net, self.x, self.y = self.net.to(device), self.x.to(device), self.y.to(device)
    self.autocast = dtype == "bfloat16"
    if channels_last:
      self.net = self.net.to(memory_format=torch.channels_last)
      self.x = self.x.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    self.warmup(2)
    self.compile_s = time.perf_counter() - t0  # first steps (no compilation in eager)

  def step(self):
    with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.autocast):
      x, y = self.x, self.y
      if self.method == "standard":
        x_adv = x
      else:
        self.net.eval()
        if self.attack == "kl":
          x_adv = tpgd_kl(self.net, x, self.eps, self.alpha, self.steps)
        else:
          x_adv = pgd_ce(self.net, x, y, self.eps, self.alpha, self.steps)
      self.net.train()
      loss = method_loss(self.method, self.net, x, x_adv, y, self.beta, self.bridges)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return float(loss.detach())

  def run_once(self) -> float:
    t = time.perf_counter()
    self.step()
    return time.perf_counter() - t

  def warmup(self, n=2):
    for _ in range(n):
      self.step()

  def time(self, n):
    return [self.run_once() for _ in range(n)]

  def info(self):
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if self.device.startswith("cuda"):
      memory["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return dict(self.case, compile_s=self.compile_s, flops=None, memory=memory)


def pgd50_bench(model="lenet", batch=128, repeats=3, device=None):
  """PGD^50 (1 restart) evaluation throughput, model in eval()."""
  device = device or DEVICE
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  torch.manual_seed(0)
  net = MODELS[model]().eval().to(device)
  eps, alpha = (0.3, 0.01) if model == "lenet" else (8 / 255, 2 / 255)
  x = torch.rand((batch,) + image_shape(model), device=device)
  y = torch.randint(0, 10, (batch,), device=device)
  pgd_ce(net, x, y, eps, alpha, 2)
  sync()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    pgd_ce(net, x, y, eps, alpha, 50)
    sync()
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return dict(framework="torch", eval="pgd50", model=model, batch=batch,
              budget="50 steps, 1 restart", median_s=med, examples_per_s=batch / med)


def matmul_peak(n=2048, repeats=5, device="cpu", dtype="float32"):
  a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  a @ b
  sync()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    a @ b
    sync()
    times.append(time.perf_counter() - t)
  return {"n": n, "dtype": dtype, "best_gflops": 2 * n**3 / min(times) / 1e9,
          "median_gflops": 2 * n**3 / statistics.median(times) / 1e9}


def machine_info():
  return {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "mkldnn": torch.backends.mkldnn.is_available(),
          "loadavg": os.getloadavg()}


DEVICE = "cpu"


def worker() -> None:
  """JSON-lines server for compare.py (worker_protocol.py)."""
  worker_protocol.serve(lambda case: StepBench(**dict(case, device=DEVICE)), {
      "peak": lambda req: {"peak": matmul_peak(
          req.get("n", 2048 if DEVICE == "cpu" else 8192), device=DEVICE)},
      "pgd50": lambda req: {"result": pgd50_bench(**req["case"])},
      "machine": lambda req: {"machine": machine_info()},
  })


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--model", default="lenet")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--bridges", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--channels_last", action="store_true")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--threads", type=int, default=0, help="0: leave torch's default")
  p.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs)")
  p.add_argument("--out", default="")
  p.add_argument("--worker", action="store_true")
  args = p.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  global DEVICE
  DEVICE = args.device
  if args.device != "cpu":
    torch.backends.cudnn.benchmark = True  # fastest cuDNN algorithms for fixed shapes
  if args.worker:
    return worker()
  rows = []
  print(json.dumps(machine_info()))
  for method in args.methods.split(","):
    b = StepBench(method, args.model, args.batch, args.steps, args.bridges, args.dtype,
                  channels_last=args.channels_last, device=args.device)
    if args.device != "cpu":
      torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
      t = time.perf_counter()
      b.step()  # float(loss) synchronises
      times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rows.append(dict(b.info(), median_s=med, examples_per_s=args.batch / med))
    print(f"{method:9s} {args.model} B={args.batch} K={args.steps} m={args.bridges}: "
          f"{1e3 * med:.1f} ms/step, {args.batch / med:.1f} ex/s", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": machine_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
