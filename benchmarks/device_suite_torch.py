"""The PyTorch side of ``device_suite.py``: one worker process, never bat_jax.

It serves ``worker_protocol``'s JSON lines on stdin/stdout:

* ``setup`` / ``time`` / ``drop``: the reference train step of
  ``bench_torch.StepBench`` (eager, ``torch.autograd.grad`` PGD loop, one
  forward per bridge) on ``--device``;
* ``peak``: an f32 (and on CUDA bf16) GEMM; ``machine``: versions and device;
* ``aa_load``: loads bat_jax's weights of a WRN (an .npz written by the suite)
  into ``bench_torch``'s WideResNet and checks that the logits agree;
* ``aa_stage``: times one ``torchattacks`` stage of AutoAttack on those
  weights and inputs (only when ``torchattacks`` imports).

  python benchmarks/device_suite_torch.py --device=cuda   # started by device_suite.py
"""

import argparse
import time

import numpy as np
import torch

import bench_torch
import worker_protocol

try:  # Optional: the AutoAttack comparison needs it, the train step does not.
  import torchattacks
except ImportError:  # pragma: no cover - depends on the machine
  torchattacks = None

DEVICE = "cpu"
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")  # bat_jax's stage names
_AA = {}  # the loaded model and inputs of aa_load


def _sync():
  if DEVICE.startswith("cuda"):
    torch.cuda.synchronize()


def _tensor(a):
  return torch.from_numpy(np.ascontiguousarray(a))


def load_flax_wrn(net, flat):
  """Copies bat_jax WideResNet variables (``'params/...'`` keys) into ``net``.

  ``net`` is ``bench_torch.WideResNet``: conv1 -> blocks (bn1, conv1, bn2,
  conv2, shortcut) -> bn -> fc; bat_jax names them stem_conv,
  group{i}_block{j}, final_bn, fc. Conv kernels HWIO -> OIHW, dense
  ``[in, out]`` -> ``[out, in]``.
  """
  def conv(module, name):
    module.weight.copy_(_tensor(np.transpose(flat[f"params/{name}/kernel"], (3, 2, 0, 1))))

  def bn(module, name):
    module.weight.copy_(_tensor(flat[f"params/{name}/scale"]))
    module.bias.copy_(_tensor(flat[f"params/{name}/bias"]))
    module.running_mean.copy_(_tensor(flat[f"batch_stats/{name}/mean"]))
    module.running_var.copy_(_tensor(flat[f"batch_stats/{name}/var"]))

  per_group = len(net.blocks) // 3
  names = [f"group{i + 1}_block{j + 1}" for i in range(3) for j in range(per_group)]
  with torch.no_grad():
    conv(net.conv1, "stem_conv")
    for block, name in zip(net.blocks, names):
      bn(block.bn1, f"{name}/bn1")
      conv(block.conv1, f"{name}/conv1")
      bn(block.bn2, f"{name}/bn2")
      conv(block.conv2, f"{name}/conv2")
      if block.shortcut is not None:
        conv(block.shortcut, f"{name}/shortcut_conv")
    bn(net.bn, "final_bn")
    net.fc.weight.copy_(_tensor(np.asarray(flat["params/fc/kernel"]).T))
    net.fc.bias.copy_(_tensor(flat["params/fc/bias"]))
  return net


def make_stage(name, model, eps, seed, settings=None):
  """One torchattacks stage of AutoAttack; ``settings`` overrides budgets by bat_jax's names.

  ``apgd_iters``, ``n_target_classes``, ``fab_iters``, ``square_queries``;
  the default is the reference's standard budgets (100, 9, 100, 5000).
  """
  s = dict(apgd_iters=100, n_target_classes=9, fab_iters=100, square_queries=5000)
  s.update(settings or {})
  n_classes = s["n_target_classes"] + 1  # torchattacks targets n_classes - 1 classes
  if name == "apgd-ce":
    return torchattacks.APGD(model, eps=eps, steps=s["apgd_iters"], n_restarts=1,
                             loss="ce", seed=seed)
  if name == "apgd-t":
    return torchattacks.APGDT(model, eps=eps, steps=s["apgd_iters"], n_restarts=1,
                              n_classes=n_classes, seed=seed)
  if name == "fab-t":
    return torchattacks.FAB(model, eps=eps, steps=s["fab_iters"], n_restarts=1,
                            multi_targeted=True, n_classes=n_classes, seed=seed)
  if name == "square":
    return torchattacks.Square(model, eps=eps, n_queries=s["square_queries"], n_restarts=1,
                               p_init=0.8, seed=seed)
  raise ValueError(f"unknown AutoAttack stage {name!r}; expected one of {STAGES}")


def aa_load(req):
  """Builds the model from the suite's .npz; returns how well the logits agree."""
  with np.load(req["path"]) as data:
    flat = {k: data[k] for k in data.files}
  net = bench_torch.MODELS[req["model"]]()
  net = load_flax_wrn(net, flat).eval().to(DEVICE)
  x = _tensor(np.transpose(flat["inputs/image"], (0, 3, 1, 2)).astype(np.float32) / 255.0)
  y = _tensor(flat["inputs/label"].astype(np.int64))
  x, y = x.to(DEVICE), y.to(DEVICE)
  ref = flat["inputs/jax_logits"]
  with torch.no_grad():
    logits = net(x[:len(ref)]).float().cpu().numpy()
  _AA.update(net=net, x=x, y=y)
  return {"logit_max_abs_diff": float(np.max(np.abs(logits - ref))),
          "logit_scale": float(np.max(np.abs(ref))),
          "prediction_agreement": float(np.mean(logits.argmax(1) == ref.argmax(1))),
          "torchattacks": None if torchattacks is None else torchattacks.__version__}


def aa_stage(req):
  """Times torchattacks' ``req['stage']`` on the first ``req['n']`` loaded inputs.

  Every input is attacked (the labels are the model's predictions); returns
  the seconds (a warm-up on 2 inputs first) and the fraction still robust.
  """
  if torchattacks is None:
    raise RuntimeError("torchattacks is not installed")
  net, n = _AA["net"], req["n"]
  x, y = _AA["x"][:n], _AA["y"][:n]
  make = lambda settings: make_stage(req["stage"], net, req["eps"], req.get("seed", 0),
                                    settings)
  warm = dict(req["settings"], apgd_iters=1, fab_iters=1, square_queries=1)
  make(warm)(x[:2], y[:2])
  _sync()
  start = time.perf_counter()
  x_adv = make(req["settings"])(x, y)
  _sync()
  seconds = time.perf_counter() - start
  with torch.no_grad():
    robust = (net(x_adv).argmax(1) == y).float().mean().item()
  return {"seconds": seconds, "robust": robust, "n": int(n),
          "max_perturbation": float((x_adv - x).abs().max())}


def peak(req):
  """Best-of-5 GEMM GFLOP/s: f32 (and bf16 on CUDA) at n^3, n = 8192 on CUDA."""
  n = req.get("n", 8192 if DEVICE.startswith("cuda") else 2048)
  out = {"f32": bench_torch.matmul_peak(n, device=DEVICE)}
  if DEVICE.startswith("cuda"):
    out["bf16"] = bench_torch.matmul_peak(n, device=DEVICE, dtype="bfloat16")
  return {"peak": out}


def machine(req):
  del req
  info = dict(bench_torch.machine_info(), device=DEVICE,
              torchattacks=None if torchattacks is None else torchattacks.__version__,
              cudnn_benchmark=torch.backends.cudnn.benchmark,
              matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
              cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
  if DEVICE.startswith("cuda"):
    info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version())
  return {"machine": info}


def main():
  global DEVICE
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  p.add_argument("--threads", type=int, default=0, help="0: leave torch's default")
  args = p.parse_args()
  DEVICE = args.device
  if args.threads:
    torch.set_num_threads(args.threads)
  if DEVICE.startswith("cuda"):
    torch.backends.cudnn.benchmark = True
  bench_torch.DEVICE = DEVICE
  worker_protocol.serve(lambda case: bench_torch.StepBench(**dict(case, device=DEVICE)), {
      "peak": peak, "machine": machine, "aa_load": aa_load, "aa_stage": aa_stage})


if __name__ == "__main__":
  main()
