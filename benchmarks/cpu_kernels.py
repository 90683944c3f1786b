"""The kernels a ResNet-18 train step spends its time in, per XLA:CPU flag set, beside PyTorch.

For CPU speed on any x86 machine. Each XLA flag set runs in its own
process (XLA reads ``XLA_FLAGS`` once); PyTorch runs in this one. Timed: an
f32 and a bf16 GEMM (the peak), and the four 3x3 convolutions of ResNet-18 on
CIFAR-10 shapes at batch 16 (forward, input gradient, weight gradient; the
gradients as bat_jax writes them, ``bat_jax/models/cpu_ops.py``).

  python benchmarks/cpu_kernels.py --flag_sets=default,stock,onednn --out=/tmp/k.json
  python benchmarks/cpu_kernels.py --list     # the named flag sets
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Named XLA:CPU flag sets; "default" is what bat_jax's entry points set.
FLAG_SETS = {
    "default": "--xla_cpu_experimental_ynn_fusion_type=",
    "stock": "",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
    "onednn_cc": "--xla_cpu_experimental_ynn_fusion_type= "
                 "--xla_cpu_experimental_onednn_custom_call=true",
    "onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= "
                  "--xla_cpu_experimental_onednn_fusion_type=dot",
    "vec512": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_prefer_vector_width=512",
}

BATCH = 16
# (spatial size, channels) of ResNet-18's stride-1 3x3 convolutions on 32x32 inputs.
CONVS = ((32, 64), (16, 128), (8, 256), (4, 512))


def _median_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_worker(repeats: int) -> dict:
  """Runs in a process whose XLA_FLAGS were set by the driver."""
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from bat_jax.models import cpu_ops

  out = {}
  for dtype, n in (("float32", 2048), ("bfloat16", 2048)):
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    secs = _median_seconds(lambda: mm(a, a).block_until_ready(), repeats)
    out[f"gemm_{dtype}_gflops"] = 2 * n**3 / secs / 1e9
  pads = ((1, 1), (1, 1))
  conv = cpu_ops._conv_with_fast_grads((1, 1), pads)  # pylint: disable=protected-access
  for size, ch in CONVS:
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (BATCH, size, size, ch), jnp.float32)
    w = jax.random.normal(key, (3, 3, ch, ch), jnp.float32) * 0.05
    g = jnp.ones((BATCH, size, size, ch), jnp.float32)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda g_, w_: cpu_ops.input_grad_as_forward_conv(g_, w_, x.shape, (1, 1), pads))
    dw = jax.jit(lambda x_, g_: jax.vjp(lambda w_: cpu_ops._forward_conv(  # pylint: disable=protected-access
        x_, w_, (1, 1), pads), w)[1](g_)[0])
    flops = 2 * BATCH * size * size * 9 * ch * ch
    for name, fn in (("fwd", lambda: fwd(x, w).block_until_ready()),
                     ("dx", lambda: dx(g, w).block_until_ready()),
                     ("dw", lambda: dw(x, g).block_until_ready())):
      secs = _median_seconds(fn, repeats)
      out[f"conv{size}x{ch}_{name}_ms"] = secs * 1e3
      out[f"conv{size}x{ch}_{name}_gflops"] = flops / secs / 1e9
  return out


def torch_kernels(repeats: int) -> dict:
  import torch
  import torch.nn.functional as F
  out = {}
  for dtype, n in ((torch.float32, 2048), (torch.bfloat16, 2048)):
    a = torch.ones(n, n, dtype=dtype)
    secs = _median_seconds(lambda: a @ a, repeats)
    out[f"gemm_{str(dtype).split('.')[-1]}_gflops"] = 2 * n**3 / secs / 1e9
  for size, ch in CONVS:
    x = torch.randn(BATCH, ch, size, size, requires_grad=True)
    w = (torch.randn(ch, ch, 3, 3) * 0.05).requires_grad_(True)
    flops = 2 * BATCH * size * size * 9 * ch * ch

    def fwd():
      with torch.no_grad():
        F.conv2d(x, w, padding=1)

    y = F.conv2d(x, w, padding=1)
    g = torch.ones_like(y)

    def dx():
      torch.autograd.grad(y, x, g, retain_graph=True)

    def dw():
      torch.autograd.grad(y, w, g, retain_graph=True)

    for name, fn in (("fwd", fwd), ("dx", dx), ("dw", dw)):
      secs = _median_seconds(fn, repeats)
      out[f"conv{size}x{ch}_{name}_ms"] = secs * 1e3
      out[f"conv{size}x{ch}_{name}_gflops"] = flops / secs / 1e9
  return out


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--flag_sets", default="default,stock")
  parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="")
  parser.add_argument("--list", action="store_true")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.list:
    for name, value in FLAG_SETS.items():
      print(f"{name}: {value or '(none)'}")
    return
  if args.worker:
    print(json.dumps(jax_worker(args.repeats)))
    return
  results = {"cpu": cpu_name(), "cores": os.cpu_count(), "batch": BATCH, "rows": {}}
  for name in args.flag_sets.split(","):
    env = dict(os.environ, XLA_FLAGS=FLAG_SETS.get(name, name.replace(";", " ")))
    proc = subprocess.run([sys.executable, __file__, "--worker", f"--repeats={args.repeats}"],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      results["rows"][f"jax:{name}"] = {"error": proc.stderr.strip().splitlines()[-1:]}
    else:
      results["rows"][f"jax:{name}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(name, json.dumps(results["rows"][f"jax:{name}"]), flush=True)
  if args.torch:
    results["rows"]["torch"] = torch_kernels(args.repeats)
    print("torch", json.dumps(results["rows"]["torch"]), flush=True)
  keys = sorted({k for row in results["rows"].values() for k in row if k.endswith(("ms", "gflops"))})
  names = list(results["rows"])
  print("| kernel | " + " | ".join(names) + " |")
  print("|---|" + "---:|" * len(names))
  for k in keys:
    cells = [f"{results['rows'][n].get(k, float('nan')):.1f}" for n in names]
    print(f"| {k} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
