"""What does streaming extra data from array_record shards cost in memory and time?

For each size in ``--sizes`` it writes a synthetic shard set of CIFAR-sized
images (32x32x3 uint8, random pixels, ``bat_jax.extra_data.ShardWriter``,
50,000 per shard) into a temporary folder (or ``--dir``; deleted afterwards
unless ``--keep``, and reused by a later ``--dir`` run). Then a fresh worker
process per size opens it as the trainer does (``open_extra_data``) and
times ``TrainBatches.batch(step)`` at ``--batch_size`` 512 and
``--extra_fraction`` 0.7 (358 extra + 154 base examples a step, the base
set 50,000 synthetic images) over ``--steps`` steps. Resident memory comes
from /proc/self/status: VmRSS (now) and VmHWM (peak), minus VmRSS before the
set is opened; the peak is reset there through /proc/self/clear_refs where
the kernel allows (``peak_reset`` says). Sizes up to ``--memory_max`` are also
measured read whole into memory (the .npz path), for comparison.

  python benchmarks/extra_data_stream.py                      # 200k and 2M (6.2 GB of disk)
  python benchmarks/extra_data_stream.py --sizes=20000,200000 --steps=50   # a quick check

The set was just written, so its reads are mostly served by the page cache
(as on a host whose memory holds the set); a cold disk is slower. Results:
``benchmarks/results/extra_data_stream/extra_data_stream.{json,md}`` (or
``--out_dir``) with the CPU, versions and settings, and no path of this machine.
"""

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bat_jax import extra_data, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "benchmarks", "results", "extra_data_stream")
IMAGE_SHAPE, NUM_CLASSES = (32, 32, 3), 10
EXAMPLES_PER_SHARD, CHUNK = 50_000, 10_000
MIB = 1 << 20


def memory_status() -> dict:
  """VmRSS and VmHWM of this process, in MiB."""
  values = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        values[key] = int(value.split()[0]) / 1024
  return values


def reset_peak() -> bool:
  """Resets VmHWM to the current VmRSS (Linux >= 4.0); False where not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def make_set(directory: str, count: int, seed: int = 0) -> dict:
  """Writes ``count`` random CIFAR-sized examples as a shard set (reused if there)."""
  path = os.path.join(directory, extra_data.METADATA_FILE)
  if os.path.exists(path) and extra_data.read_metadata(directory).count == count:
    return {"written_s": None, "reused": True}
  os.makedirs(directory, exist_ok=True)
  need = count * (4 + int(np.prod(IMAGE_SHAPE))) * 1.05
  if shutil.disk_usage(directory).free < need:
    sys.exit(f"not enough disk for {count} examples: {need / 1e9:.1f} GB needed.")
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  writer = extra_data.ShardWriter(directory, count, IMAGE_SHAPE,
                                  math.ceil(count / EXAMPLES_PER_SHARD), NUM_CLASSES)
  for first in range(0, count, CHUNK):
    k = min(CHUNK, count - first)
    writer.write(rng.integers(0, 256, (k,) + IMAGE_SHAPE, dtype=np.uint8),
                 rng.integers(0, NUM_CLASSES, k))
  writer.close()
  return {"written_s": round(time.perf_counter() - start, 2), "reused": False}


def measure(directory: str, reader: str, args) -> dict:
  """(In the worker.) Opens the set, times ``batch(step)``, reports memory deltas."""
  from bat_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  base = rng.integers(0, 256, (args.base_examples,) + IMAGE_SHAPE, dtype=np.uint8)
  base_labels = rng.integers(0, NUM_CLASSES, args.base_examples)
  peak_reset = reset_peak()
  before = memory_status()
  start = time.perf_counter()
  extra = extra_data.open_extra_data(directory, IMAGE_SHAPE, NUM_CLASSES)
  if reader == "memory":  # the whole set as arrays: what an .npz extra file costs
    images = np.empty((len(extra),) + IMAGE_SHAPE, np.uint8)
    labels = np.empty((len(extra),), np.int32)
    for first in range(0, len(extra), CHUNK):
      chunk = np.arange(first, min(first + CHUNK, len(extra)))
      images[chunk], labels[chunk] = extra.read(chunk)
    extra = extra_data.InMemoryExtraData(images, labels)
  open_s = time.perf_counter() - start
  batches = input_pipeline.TrainBatches(
      base, base_labels, batch_size=args.batch_size, seed=0, extra=extra,
      extra_fraction=args.extra_fraction, process_index=0,
      process_count=args.process_count, local_device_count=1)
  start = time.perf_counter()
  batches.batch(0)
  first_step_s = time.perf_counter() - start
  times = []
  for step in range(1, args.steps + 1):
    start = time.perf_counter()
    batches.batch(step)
    times.append(time.perf_counter() - start)
  after = memory_status()
  per_host = args.batch_size // args.process_count
  host_extra = int(batches.global_indices(0)[1][:per_host].sum())
  total = sum(times)
  return {
      "reader": reader, "count": len(extra), "open_s": round(open_s, 3),
      "first_step_s": round(first_step_s, 4), "steps": args.steps,
      "examples_per_s": round(per_host * args.steps / total),
      "extra_examples_per_s": round(host_extra * args.steps / total),
      "ms_per_step": {"median": round(1e3 * float(np.median(times)), 3),
                      "p90": round(1e3 * float(np.percentile(times, 90)), 3)},
      "rss_mib": {"before_open": round(before["VmRSS"], 1), "after": round(after["VmRSS"], 1),
                  "delta": round(after["VmRSS"] - before["VmRSS"], 1)},
      "peak_mib": {"after": round(after["VmHWM"], 1),
                   "delta": round(after["VmHWM"] - before["VmRSS"], 1),
                   "peak_reset": peak_reset},
  }


def run_worker(directory: str, reader: str, args) -> dict:
  """:func:`measure` in a fresh process, so that sizes do not share memory."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={directory}",
         f"--reader={reader}", f"--steps={args.steps}", f"--batch_size={args.batch_size}",
         f"--extra_fraction={args.extra_fraction}", f"--base_examples={args.base_examples}",
         f"--process_count={args.process_count}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.exit(f"the worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> dict:
  out = {"python": platform.python_version()}
  for package in ("numpy", "array_record", "jax"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = None
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=False).stdout.strip()
  out["bat_jax_commit"] = commit or None
  return out


def markdown(report: dict) -> str:
  settings = report["settings"]
  lines = [
      "# Extra data streamed from array_record shards",
      "",
      f"CPU: {report['machine']['cpu']}; " + ", ".join(
          f"{k} {v}" for k, v in report["versions"].items() if v) + ".",
      f"`TrainBatches.batch(step)` at batch {settings['batch_size']}, extra_fraction "
      f"{settings['extra_fraction']}, {settings['steps']} steps, host 0 of "
      f"{settings['process_count']}; synthetic {settings['image_shape']} uint8 images, "
      f"{settings['examples_per_shard']} per shard; memory from /proc/self/status "
      "minus VmRSS before the set is opened (page cache not included).",
      "",
      "| extra images | reader | set on disk | open (s) | examples/s | ms/step (median, p90) "
      "| RSS delta (MiB) | peak delta (MiB) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in report["results"]:
    lines.append(
        f"| {r['count']:,} | {r['reader']} | {r['set_gb']:.2f} GB | {r['open_s']} | "
        f"{r['examples_per_s']:,} | {r['ms_per_step']['median']}, {r['ms_per_step']['p90']} "
        f"| {r['rss_mib']['delta']} | {r['peak_mib']['delta']}"
        + ("" if r["peak_mib"]["peak_reset"] else " (peak not reset)") + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="200000,2000000",
                      help="Extra set sizes (comma-separated).")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=512)
  parser.add_argument("--extra_fraction", type=float, default=0.7)
  parser.add_argument("--base_examples", type=int, default=50_000)
  parser.add_argument("--process_count", type=int, default=1,
                      help="Measure host 0's share of a run on this many hosts.")
  parser.add_argument("--memory_max", type=int, default=200_000,
                      help="Also measure sets up to this size read whole into memory.")
  parser.add_argument("--dir", default=None, help="Where to write the sets (default: a "
                      "temporary folder).")
  parser.add_argument("--keep", action="store_true", help="Keep the sets afterwards.")
  parser.add_argument("--out_dir", default=OUT_DIR)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--reader", default="shards", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(measure(args.worker, args.reader, args)))
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  root = args.dir or tempfile.mkdtemp(prefix="extra_data_stream_")
  used, results = [], []
  try:
    for count in sizes:
      directory = os.path.join(root, f"set_{count}")
      used.append(directory)
      made = make_set(directory, count)
      set_gb = sum(os.path.getsize(os.path.join(directory, name))
                   for name in os.listdir(directory)) / 1e9
      for reader in ["shards"] + (["memory"] if count <= args.memory_max else []):
        result = run_worker(directory, reader, args)
        results.append({**result, "set_gb": round(set_gb, 3), **made})
        print(json.dumps(results[-1]), flush=True)
  finally:
    if not args.keep:
      for directory in used:
        shutil.rmtree(directory, ignore_errors=True)
      if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
  report = {"machine": {"cpu": machine.cpu_description(), "system": platform.system()},
            "versions": versions(),
            "settings": {"sizes": sizes, "steps": args.steps, "batch_size": args.batch_size,
                         "extra_fraction": args.extra_fraction,
                         "base_examples": args.base_examples,
                         "process_count": args.process_count, "memory_max": args.memory_max,
                         "image_shape": list(IMAGE_SHAPE),
                         "examples_per_shard": EXAMPLES_PER_SHARD},
            "results": results}
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "extra_data_stream.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out_dir, "extra_data_stream.md"), "w") as f:
    f.write(markdown(report))
  print(markdown(report))


if __name__ == "__main__":
  main()
