"""Tables of the reference-gap study: bat_jax vs the PyTorch reference trainer, mean ± std over seeds.

Reads the per-run JSON files that ``reference_gap_runs.sh`` writes
(``{jax,torch}_{method}_eps{eps}_s{seed}.json``; other frameworks' labels,
e.g. ``jax-prefix``, are tabulated too) and writes ``summary.json`` and
``summary.md`` next to them: per cell clean and PGD-50 accuracy in %, mean ±
sample std (n seeds), and for each pair the difference of the means, the
pooled std ``sqrt((s1^2 + s2^2) / 2)``, their ratio and Welch's t-test p-value.

  python benchmarks/reference_gap.py --dir=benchmarks/results/reference_gap

``--from_log`` instead turns one bat_jax run's log (its final printed line)
into such a JSON file.
"""

import argparse
import glob
import json
import math
import os
import re

import numpy as np

NAME = re.compile(r"^(?P<fw>[a-z-]+)_(?P<method>[a-z]+)_eps(?P<eps>[0-9.]+)_s(?P<seed>\d+)\.json$")
METRICS = ("clean_acc", "pgd_acc")


def load_runs(directory):
  runs = []
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    m = NAME.match(os.path.basename(path))
    if not m:
      continue
    with open(path) as f:
      r = json.load(f)
    if r.get("clean_acc") is None:
      continue
    runs.append(dict(framework=m["fw"], method=m["method"], eps=float(m["eps"]),
                     seed=int(m["seed"]), clean_acc=100 * r["clean_acc"],
                     pgd_acc=100 * r["pgd_acc"], total_s=r.get("total_s")))
  return runs


def welch_p(a, b):
  """Two-sided p-value of Welch's t-test (None without scipy or with n < 2)."""
  if len(a) < 2 or len(b) < 2:
    return None
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if np.std(a) == 0 and np.std(b) == 0:
    return None
  return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarise(runs):
  cells = {}
  for r in runs:
    cells.setdefault((r["method"], r["eps"], r["framework"]), []).append(r)
  table = []
  for (method, eps, fw), rs in sorted(cells.items()):
    row = {"method": method, "eps": eps, "framework": fw, "n": len(rs),
           "seeds": sorted(r["seed"] for r in rs),
           "mean_run_s": float(np.mean([r["total_s"] for r in rs if r["total_s"]]))
           if any(r["total_s"] for r in rs) else None}
    for k in METRICS:
      v = np.array([r[k] for r in rs])
      row[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                "values": v.tolist()}
    table.append(row)
  comparisons = []
  for method, eps in sorted({(m, e) for m, e, _ in cells}):
    jax_runs, torch_runs = cells.get((method, eps, "jax")), cells.get((method, eps, "torch"))
    if not jax_runs or not torch_runs:
      continue
    comp = {"method": method, "eps": eps, "n_jax": len(jax_runs), "n_torch": len(torch_runs)}
    for k in METRICS:
      a = np.array([r[k] for r in jax_runs])
      b = np.array([r[k] for r in torch_runs])
      diff = float(a.mean() - b.mean())
      pooled = (math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
                if len(a) > 1 and len(b) > 1 else None)
      comp[k] = {"jax_minus_torch": diff, "pooled_std": pooled,
                 "diff_over_pooled_std": diff / pooled if pooled else None,
                 "welch_p": welch_p(a, b)}
    comparisons.append(comp)
  return {"cells": table, "comparisons": comparisons}


def fmt(cell):
  if cell["std"] is None:
    return f"{cell['mean']:.1f}"
  return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def markdown(summary):
  lines = ["| method | eps | framework | n | clean % | PGD-50 % | run s (mean) |",
           "|---|---:|---|---:|---:|---:|---:|"]
  for r in summary["cells"]:
    run_s = f"{r['mean_run_s']:.0f}" if r["mean_run_s"] else "-"
    lines.append(f"| {r['method']} | {r['eps']:g} | {r['framework']} | {r['n']} | "
                 f"{fmt(r['clean_acc'])} | {fmt(r['pgd_acc'])} | {run_s} |")
  lines += ["", "| method | eps | n (jax / torch) | clean: jax − torch (pooled std, ratio, p) | "
            "PGD-50: jax − torch (pooled std, ratio, p) |", "|---|---:|---:|---|---|"]
  for c in summary["comparisons"]:
    parts = []
    for k in METRICS:
      d = c[k]
      extra = (f" ({d['pooled_std']:.1f}, {d['diff_over_pooled_std']:+.1f}, "
               f"{d['welch_p']:.2f})" if d["pooled_std"] and d["welch_p"] is not None else "")
      parts.append(f"{d['jax_minus_torch']:+.1f}{extra}")
    lines.append(f"| {c['method']} | {c['eps']:g} | {c['n_jax']} / {c['n_torch']} | "
                 f"{parts[0]} | {parts[1]} |")
  return "\n".join(lines) + "\n"


def run_from_log(log_path, out, rc=0, total_s=None):
  """One bat_jax run's JSON from its log: `.../jax_{method}_eps{eps}_s{seed}.log`."""
  with open(log_path) as f:
    text = f.read()
  name = NAME.match(os.path.basename(log_path)[:-len(".log")] + ".json")
  final = re.search(r"clean ([0-9.]+), PGD-50 ([0-9.]+)", text)
  if total_s is None:  # first to last absl timestamp
    stamps = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in
              re.findall(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+)", text, re.M)]
    total_s = (stamps[-1] - stamps[0]) % 86400 if stamps else None
  run = {"framework": name["fw"], "method": name["method"], "eps": float(name["eps"]),
         "seed": int(name["seed"]), "clean_acc": float(final[1]) if final else None,
         "pgd_acc": float(final[2]) if final else None, "rc": rc, "total_s": total_s}
  with open(out, "w") as f:
    json.dump(run, f, indent=1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "reference_gap"))
  p.add_argument("--from_log", default="", help="a bat_jax run's log -> --out JSON")
  p.add_argument("--rc", type=int, default=0)
  p.add_argument("--total_s", type=float, default=None)
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.from_log:
    return run_from_log(args.from_log, args.out, args.rc, args.total_s)
  summary = summarise(load_runs(args.dir))
  with open(os.path.join(args.dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  text = markdown(summary)
  with open(os.path.join(args.dir, "summary.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
