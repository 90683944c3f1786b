"""bat_jax vs the PyTorch reference, side by side, interleaved: the ratio table.

Each framework runs in its own process and virtual environment
(``bench_jax.py --worker`` in the bat_jax venv, ``bench_torch.py --worker`` in
a venv with torch). The driver sets every case up in every worker (JAX
compiles; PyTorch runs two warm-up steps), then runs ``--rounds`` rounds; in
each round every case is timed ``--iters`` steps in every worker, one worker
at a time, alternating the order from round to round. So all variants see
the same machine load, and the ratio of each round's medians is a paired
comparison; the table reports the median over rounds of those ratios.

  # the headline tables (see README.md)
  python benchmarks/compare.py --model=lenet --batch=128 --steps=10 --bridges=2
  python benchmarks/compare.py --model=resnet18 --batch=16 --steps=10 --bridges=2
  # cost vs K (method at) and vs m (method bat), both frameworks
  python benchmarks/compare.py --suite=k_sweep --model=lenet --methods=at
  python benchmarks/compare.py --suite=m_sweep --model=lenet
  # PGD^50 throughput (and AutoAttack in JAX, small budgets)
  python benchmarks/compare.py --suite=eval --model=lenet
  # JAX variants: stock JAX, XLA flags, fused forward, bf16
  python benchmarks/compare.py --variants='torch,jax,jax+stock,jax+fused,jax+onednn' ...

A variant is ``torch``, ``torch+t1`` (1 thread), ``torch+cl`` (channels_last),
``torch+bf16``, ``torch+cuda`` (GPU), or ``jax`` (bat_jax as it runs by default:
``config.ops='auto'``, ``util.add_default_xla_flags()``) with any of
``+xla_ops`` (``config.ops='xla'``), ``+stock_flags`` (no default XLA flags),
``+stock`` (both: stock JAX), ``+fused`` (``config.fused_forward``), ``+bf16``
(``config.dtype``), ``+nodonate``, the XLA:CPU flag sets ``+onednn``, ``+xnnpack``,
``+noeigen``, ``+fastmath``, ``+nothunk``, ``+onednn_cc``, ``+onednn_dot``,
``+vec512``, ``+prec_bf16`` (JAX's default matmul precision), or
``+flags=<XLA flags, ';'-separated>``; either framework takes ``+pin=<cpus>``
(``taskset -c``: the process sees only those cores, so XLA sizes its thread
pool to them). Every variant is a setting a user can make; to time older
code, run compare.py at an older commit.
"""

import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("standard", "at", "trades", "mart", "bat")

# Named XLA:CPU flag sets, the variants ``jax+<name>``.
XLA_FLAG_SETS = {
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "noeigen": "--xla_cpu_multi_thread_eigen=false",
    "fastmath": "--xla_cpu_enable_fast_math=true",
    "nothunk": "--xla_cpu_use_thunk_runtime=false",
    "onednn_cc": "--xla_cpu_experimental_onednn_custom_call=true",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "vec512": "--xla_cpu_prefer_vector_width=512",
}


def parse_variant(name: str) -> dict:
  """``'jax+fused+onednn'`` -> worker settings and case overrides."""
  parts = name.split("+")
  fw, mods = parts[0], parts[1:]
  v = {"name": name, "framework": fw, "case": {}, "worker": {}}
  flags = []
  for mod in mods:
    if mod == "fused":
      v["case"]["fused"] = True
    elif mod == "bf16":
      v["case"]["dtype"] = "bfloat16"
    elif fw == "jax" and mod == "nodonate":
      v["case"]["donate"] = False
    elif fw == "torch" and mod.startswith("t") and mod[1:].isdigit():
      v["worker"]["threads"] = int(mod[1:])
    elif fw == "torch" and mod == "cl":
      v["case"]["channels_last"] = True
    elif fw == "torch" and mod == "cuda":
      v["worker"]["device"] = "cuda"
    elif fw == "jax" and mod in ("xla_ops", "stock"):
      v["case"]["ops"] = "xla"
      if mod == "stock":
        v["worker"]["stock_xla_flags"] = True
    elif fw == "jax" and mod == "stock_flags":
      v["worker"]["stock_xla_flags"] = True
    elif fw == "jax" and mod in XLA_FLAG_SETS:
      flags.append(XLA_FLAG_SETS[mod])
    elif fw == "jax" and mod.startswith("flags="):
      flags.extend(mod[len("flags="):].split(";"))
    elif mod.startswith("pin="):  # taskset -c <cpus>: the worker sees only those cores
      v["worker"]["pin"] = mod[len("pin="):]
    elif fw == "jax" and mod == "prec_bf16":
      v["worker"]["matmul_precision"] = "bfloat16"
    else:
      raise ValueError(f"unknown variant modifier {mod!r} in {name!r}")
  if flags:
    v["worker"]["xla_flags"] = " ".join(flags)
  if fw not in ("jax", "torch"):
    raise ValueError(f"variant {name!r} must start with jax or torch")
  return v


class Worker:
  """A benchmark worker process speaking JSON lines."""

  def __init__(self, framework, settings, args):
    if framework == "jax":
      cmd = [args.jax_python, os.path.join(HERE, "bench_jax.py"), "--worker"]
      for k in ("xla_flags", "matmul_precision"):
        if settings.get(k):
          cmd.append(f"--{k}={settings[k]}")
      if settings.get("stock_xla_flags"):
        cmd.append("--stock_xla_flags")
    else:
      cmd = [args.torch_python, os.path.join(HERE, "bench_torch.py"), "--worker",
             f"--threads={settings.get('threads', args.torch_threads)}",
             f"--device={settings.get('device', 'cpu')}"]
    if settings.get("pin"):
      cmd = ["taskset", "-c", settings["pin"]] + cmd
    self._start(cmd, os.path.join(args.log_dir, "worker_%d.log" % id(self)))

  def _start(self, cmd, log_path):
    self.cmd = cmd
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.log, text=True)
    self.next_id = 0

  def call(self, timeout=None, **req):
    """Sends ``req`` and waits for the reply (at most ``timeout`` seconds if given)."""
    if self.proc.poll() is not None:
      raise RuntimeError(f"worker {self.cmd} exited ({self.proc.returncode}); see "
                         f"{self.log.name}")
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    if timeout is not None:
      ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 1))
      if not ready:
        self.proc.kill()
        raise TimeoutError(f"worker {self.cmd} gave no reply to {req['cmd']} in "
                           f"{timeout:.0f} s")
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.cmd} died; see {self.log.name}")
    reply = json.loads(line)
    if not reply.get("ok"):
      raise RuntimeError(f"{self.cmd}: {reply.get('error')}\n{reply.get('traceback', '')}")
    return reply

  def close(self):
    try:
      self.call(cmd="quit")
    except Exception:  # pylint: disable=broad-except
      pass
    self.proc.wait(timeout=30)
    self.log.close()


def make_cases(args):
  base = dict(model=args.model, batch=args.batch, steps=args.steps,
              bridges=args.bridges)
  methods = args.methods.split(",")
  if args.suite == "methods":
    return [dict(base, method=m) for m in methods]
  if args.suite == "k_sweep":
    return [dict(base, method=methods[0] if methods[0] != "standard" else "at", steps=k)
            for k in map(int, args.k_values.split(","))]
  if args.suite == "m_sweep":
    return [dict(base, method="bat", bridges=m) for m in map(int, args.m_values.split(","))]
  raise ValueError(args.suite)


def case_key(case):
  c = dict(case)
  if c["method"] == "standard":
    c["steps"] = 0
  if c["method"] != "bat":
    c["bridges"] = 0
  return f"{c['method']} K={c['steps']} m={c['bridges']}"


def run_steps(args, variants, workers):
  cases = make_cases(args)
  results = {}  # (case_key, variant) -> {"info", "rounds": [[times]]}
  for case in cases:
    for v in variants:
      w = workers[v["wkey"]]
      wid = f"{case_key(case)}|{v['name']}"
      t0 = time.time()
      info = w.call(cmd="setup", id=wid, case=dict(case, **v["case"]))["info"]
      results[(case_key(case), v["name"])] = {"info": info, "rounds": [], "id": wid,
                                              "wkey": v["wkey"]}
      print(f"setup {wid:40s} {time.time() - t0:6.1f} s", flush=True)
  loads = []
  for r in range(args.rounds):
    order = variants if r % 2 == 0 else variants[::-1]
    for case in cases:
      for v in order:
        res = results[(case_key(case), v["name"])]
        times = workers[v["wkey"]].call(cmd="time", id=res["id"], n=args.iters)["times"]
        res["rounds"].append(times)
    loads.append(os.getloadavg())
    summary = "  ".join(
        f"{v['name']}={1e3 * statistics.median(results[(case_key(c), v['name'])]['rounds'][-1]):.0f}"
        for c in cases[:1] for v in variants)
    print(f"round {r + 1}/{args.rounds} load {loads[-1][0]:.2f}  ({case_key(cases[0])}: "
          f"{summary} ms)", flush=True)
  # Free the compiled steps before the next suite.
  for res in results.values():
    workers[res["wkey"]].call(cmd="drop", id=res["id"])
  return cases, results, loads


def summarize(args, cases, variants, results, peak):
  baseline = args.baseline
  rows = []
  for case in cases:
    key = case_key(case)
    # The step's arithmetic: XLA's count for stock ops when a variant has them
    # (ops='cpu_fast' adds multiplications by the zeros of dilated gradients).
    jax_infos = [(v, results[(key, v["name"])]["info"]) for v in variants
                 if v["framework"] == "jax" and results[(key, v["name"])]["info"].get("flops")]
    jax_infos.sort(key=lambda vi: vi[0]["case"].get("ops") != "xla")
    flops = jax_infos[0][1]["flops"] if jax_infos else None
    base_rounds = [statistics.median(t) for t in results[(key, baseline)]["rounds"]]
    for v in variants:
      res = results[(key, v["name"])]
      per_round = [statistics.median(t) for t in res["rounds"]]
      all_times = [t for ts in res["rounds"] for t in ts]
      med = statistics.median(all_times)
      ratios = [a / b for a, b in zip(per_round, base_rounds)]
      info = res["info"]
      row = dict(case=key, variant=v["name"], framework=v["framework"],
                 model=case["model"], batch=case["batch"], median_s=med,
                 min_s=min(all_times), n=len(all_times),
                 round_medians_s=per_round, examples_per_s=case["batch"] / med,
                 ratio_to_baseline=statistics.median(ratios), ratio_rounds=ratios,
                 baseline=baseline, compile_s=info.get("compile_s"),
                 memory=info.get("memory"), flops=flops,
                 own_flops=info.get("flops"))
      if flops:
        row["gflops_per_s"] = flops / med / 1e9
        row["fraction_of_peak"] = row["gflops_per_s"] / peak if peak else None
      rows.append(row)
  return rows


# Arguments that name files on the measuring machine: left out of the JSON.
PATH_ARGS = ("jax_python", "torch_python", "out", "markdown", "log_dir", "render")


def markdown_table(rows, baseline):
  out = [f"| case | variant | ms/step (median) | ex/s | time / {baseline} | GFLOP/step "
         "| GFLOP/s | % of peak | compile s | memory MB |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    mem = r.get("memory") or {}
    mem_mb = (mem.get("xla_temp_mb", 0) + mem.get("xla_args_mb", 0) + mem.get("xla_out_mb", 0)
              - mem.get("xla_alias_mb", 0)) if "xla_temp_mb" in mem else mem.get("peak_rss_mb")
    mem_s = f"{mem_mb:.0f}" + ("" if "xla_temp_mb" in mem else " (RSS)") if mem_mb else "-"
    flops = f"{r['flops'] / 1e9:.2f}" if r.get("flops") else "-"
    gfs = f"{r['gflops_per_s']:.1f}" if r.get("gflops_per_s") else "-"
    frac = f"{100 * r['fraction_of_peak']:.1f}" if r.get("fraction_of_peak") else "-"
    comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
    out.append(f"| {r['case']} | {r['variant']} | {1e3 * r['median_s']:.0f} | "
               f"{r['examples_per_s']:.1f} | {r['ratio_to_baseline']:.2f} | {flops} | {gfs} "
               f"| {frac} | {comp} | {mem_s} |")
  return "\n".join(out)


def _paired(rows_by_variant, a, b):
  ra, rb = rows_by_variant[a]["round_medians_s"], rows_by_variant[b]["round_medians_s"]
  return statistics.median([x / y for x, y in zip(ra, rb)])


def pivot_table(rows):
  """One line per case: ms/step of each variant, then paired time ratios.

  Ratios are medians over rounds of (time of A / time of B) in the same
  round: every JAX variant over every PyTorch variant, and every other JAX
  variant over plain ``jax`` (below 1 = faster).
  """
  cases = list(dict.fromkeys(r["case"] for r in rows))
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  jaxes = [v for v in variants if v.startswith("jax")]
  torches = [v for v in variants if v.startswith("torch")]
  pairs = [(j, t) for j in jaxes for t in torches]
  pairs += [(j, "jax") for j in jaxes if j != "jax" and "jax" in variants]
  head = ["case"] + [f"{v} ms" for v in variants] + [f"{a} / {b}" for a, b in pairs]
  out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
  for case in cases:
    by_v = {r["variant"]: r for r in rows if r["case"] == case}
    cells = [case] + [f"{1e3 * by_v[v]['median_s']:.0f}" for v in variants]
    cells += [f"{_paired(by_v, a, b):.2f}" for a, b in pairs]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def linear_fits(rows):
  """Least-squares ``ms/step = a + b * x`` per variant, x = K or m (whichever varies)."""
  lines = []
  for variant in dict.fromkeys(r["variant"] for r in rows):
    pts = [(tuple(int(v) for v in re.findall(r"[Km]=(\d+)", r["case"])), 1e3 * r["median_s"])
           for r in rows if r["variant"] == variant]
    ks, ms = [k for k, _ in pts], [t for _, t in pts]
    axis = 0 if len({k[0] for k in ks}) > 1 else 1
    xs = [k[axis] for k in ks]
    if len(set(xs)) < 3:
      return ""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ms) / len(ms)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ms)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ms))
    ss_tot = sum((y - my) ** 2 for y in ms)
    name = "K" if axis == 0 else "m"
    lines.append(f"* {variant}: ms/step = {a:.0f} + {b:.1f} * {name} "
                 f"(R^2 = {1 - ss_res / ss_tot:.3f}, {n} points)")
  return "\n".join(lines)


def eval_table(results):
  """One line per (variant, evaluation): seconds per batch and examples/s."""
  lines = ["| variant | evaluation | budget | model | batch | s/batch | ex/s | compile s |",
           "|---|---|---|---|---:|---:|---:|---:|"]
  for r in results:
    comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
    lines.append(f"| {r.get('variant', r['framework'])} | {r['eval']} | {r['budget']} | "
                 f"{r['model']} | {r['batch']} | {r['median_s']:.2f} | "
                 f"{r['examples_per_s']:.1f} | {comp} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--suite", default="methods", choices=("methods", "k_sweep", "m_sweep", "eval"))
  p.add_argument("--model", default="lenet")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--bridges", type=int, default=2)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--k_values", default="1,2,5,10,20,40")
  p.add_argument("--m_values", default="1,2,4,8")
  p.add_argument("--variants", default="torch,jax,jax+fused")
  p.add_argument("--baseline", default="", help="variant the ratios divide by (default: first)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--iters", type=int, default=2, help="timed steps per case per round")
  p.add_argument("--eval_repeats", type=int, default=2)
  p.add_argument("--torch_threads", type=int, default=2)
  p.add_argument("--jax_python", default=sys.executable)
  p.add_argument("--torch_python", default=os.environ.get(
      "BENCH_TORCH_PYTHON", sys.executable),
                 help="a Python with torch (default: $BENCH_TORCH_PYTHON, else this one)")
  p.add_argument("--out", default="", help="JSON results")
  p.add_argument("--markdown", default="", help="append the table to this file")
  p.add_argument("--log_dir", default=tempfile.gettempdir())
  p.add_argument("--render", default="", help="only print the table of a saved --out JSON")
  args = p.parse_args()
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    if "rows" in saved:
      fits = linear_fits(saved["rows"]) if saved["args"]["suite"] != "methods" else ""
      print(pivot_table(saved["rows"]) + "\n\n" + (fits + "\n\n" if fits else "") +
            markdown_table(saved["rows"], saved["args"]["baseline"]))
    else:
      print(eval_table(saved["eval"]))
    return

  variants = [parse_variant(n) for n in args.variants.split(",")]
  args.baseline = args.baseline or variants[0]["name"]
  workers = {}
  for v in variants:
    v["wkey"] = (v["framework"], tuple(sorted(v["worker"].items())))
    if v["wkey"] not in workers:
      workers[v["wkey"]] = Worker(v["framework"], v["worker"], args)
  # Settings, not this machine's paths (interpreters, log and output files).
  settings = {k: v for k, v in vars(args).items() if k not in PATH_ARGS}
  report = {"args": settings, "loadavg_start": os.getloadavg(), "machine": {}}
  try:
    for w in workers.values():
      report["machine"].update(w.call(cmd="machine")["machine"])
    peaks = {}
    for key, w in workers.items():
      peaks[str(key)] = w.call(cmd="peak")["peak"]
    peak = max(p_["best_gflops"] for p_ in peaks.values())
    report["peaks_start"] = peaks
    print("peak f32 GEMM GFLOP/s: " + ", ".join(
        f"{k}: {v['best_gflops']:.1f}" for k, v in peaks.items()), flush=True)

    if args.suite == "eval":
      results = []
      for v in variants:
        w = workers[v["wkey"]]
        if v["framework"] == "jax":
          got = w.call(cmd="eval", case=dict(
              model_name=args.model, batch=args.batch, repeats=args.eval_repeats,
              aa=True, ops=v["case"].get("ops", "auto")))["results"]
        else:
          got = [w.call(cmd="pgd50", case=dict(
              model=args.model, batch=args.batch, repeats=args.eval_repeats))["result"]]
        results += [dict(r, variant=v["name"]) for r in got]
      report["eval"] = results
      table = eval_table(results)
    else:
      cases, results, loads = run_steps(args, variants, workers)
    peaks_end = {str(k): w.call(cmd="peak")["peak"] for k, w in workers.items()}
    report["peaks_end"] = peaks_end
    # The peak: the best GEMM of any worker, at the start or the end.
    peak = max(peak, max(p_["best_gflops"] for p_ in peaks_end.values()))
    report["peak_gflops"] = peak
    if args.suite != "eval":
      rows = summarize(args, cases, variants, results, peak)
      report["rows"], report["loadavg_rounds"] = rows, loads
      fits = linear_fits(rows) if args.suite != "methods" else ""
      table = (pivot_table(rows) + "\n\n" + (fits + "\n\n" if fits else "") +
               markdown_table(rows, args.baseline))
  finally:
    for w in workers.values():
      w.close()
  report["loadavg_end"] = os.getloadavg()
  head = (f"{args.suite}: model={args.model} batch={args.batch} K={args.steps} "
          f"m={args.bridges}; rounds={args.rounds} x iters={args.iters}; load average "
          f"{report['loadavg_start'][0]:.2f} -> {report['loadavg_end'][0]:.2f}; peak (best "
          f"f32 GEMM of any worker, start or end): {report['peak_gflops']:.0f} GFLOP/s")
  print("\n" + head + "\n" + table, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  if args.markdown:
    with open(args.markdown, "a") as f:
      f.write(f"\n`{' '.join(sys.argv)}`\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
  main()
