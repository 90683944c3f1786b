"""Where a compiled train step spends its time: XLA ops grouped by kind and shape.

Compiles the step as ``bench_jax.py`` does, traces a few steps with
``jax.profiler`` (a Perfetto trace), and adds up each XLA op's time per step,
grouped by its kind (``dot_general``, ``add_bitcast_fusion``, ...) and output
shape, read from the compiled HLO. This is how it shows BatchNorm's
fused channel sums taking a third of the ResNet-18 BAT step.

  python benchmarks/profile_step.py --model=resnet18 --batch=16 --steps=10 --bridges=2

Caveat (XLA:CPU, jaxlib 0.10.2): Eigen convolutions run asynchronously on the
intra-op thread pool, so their time is not in the per-op sums; it shows as
the difference between the step's wall time and the sum of the ops.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_jax  # pylint: disable=g-import-not-at-top


def op_shapes(hlo_text: str) -> dict:
  """``{instruction name: (output shape, opcode)}`` from compiled HLO text."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\(", line)
    if m:
      shapes.setdefault(m.group(1), (m.group(2), m.group(3)))
  return shapes


def op_times(trace_dir: str) -> collections.Counter:
  """Total microseconds per trace event name (complete events only)."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      totals[e["name"]] += e.get("dur", 0)
  return totals


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--method", default="bat")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--bridges", type=int, default=2)
  p.add_argument("--traced_steps", type=int, default=2)
  p.add_argument("--top", type=int, default=30)
  args = p.parse_args()
  bench_jax._import_jax()  # pylint: disable=protected-access
  jax = bench_jax.jax
  bench = bench_jax.StepBench(method=args.method, model=args.model, batch=args.batch,
                              steps=args.steps, bridges=args.bridges)
  untraced = bench.time(3)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    traced = bench.time(args.traced_steps)
    jax.profiler.stop_trace()
    totals = op_times(trace_dir)
  shapes = op_shapes(bench.compiled.as_text())
  per_step = 1e-3 / args.traced_steps  # microseconds in total -> ms per step
  grouped, counts = collections.Counter(), collections.Counter()
  for name, us in totals.items():
    if name in shapes:
      key = (re.sub(r"\.\d+$", "", name), shapes[name][0])
      grouped[key] += us * per_step
      counts[key] += 1
  print(f"{args.method} {args.model} batch {args.batch} K={args.steps} m={args.bridges}: "
        f"step {min(untraced) * 1e3:.0f} ms untraced (best of 3), "
        f"{sum(traced) / len(traced) * 1e3:.0f} ms traced; XLA ops sum to "
        f"{sum(grouped.values()):.0f} ms per step (the rest: asynchronous convolutions, "
        f"the executor)")
  print(f"{'ms/step':>9} {'instrs':>6}  kind, output shape")
  for (kind, shape), ms in grouped.most_common(args.top):
    print(f"{ms:9.1f} {counts[(kind, shape)]:6d}  {kind} {shape}")


if __name__ == "__main__":
  main()
