"""Times bat_jax's compiled train step (attack + loss + update) per method.

For each method (standard, at, trades, mart, bat) the step of
``bat_jax.train_step.make_train_step`` is compiled with ``bat_jax.parallel.Pmap``
(donated state, as the trainer runs it) and timed after compilation:
median step time, examples/s, compile time, memory, XLA's FLOP count of the
step and the achieved fraction of the device's peak (a large f32 matmul timed
in the same run).

  # the per-method table (LeNet, MNIST shapes, batch 128, PGD-10, 2 bridges)
  python benchmarks/bench_jax.py --model=lenet --batch=128 --steps=10 --bridges=2
  # cost scaling: step time vs K and vs m, PGD^50 and AutoAttack throughput
  python benchmarks/bench_jax.py --mode=scaling --model=lenet --batch=128
  python benchmarks/bench_jax.py --mode=eval --model=lenet --batch=128
  # XLA flags are applied before JAX starts (CPU experiments):
  python benchmarks/bench_jax.py --xla_flags=--xla_cpu_use_onednn=true ...

FLOPs: XLA's ``cost_analysis()`` counts the body of a ``while`` loop once,
whatever its trip count (checked: a 5-step ``fori_loop`` reports the flops of
one step). The PGD attack is a ``fori_loop``, so the step's FLOPs are
``cost(step) + (K - 1) * cost(one attack iteration)``, the latter from a jit
of one iteration of the same attack (gradient of its objective with respect
to the input, model in inference mode, plus the projection).

``--worker`` turns the script into a line-oriented JSON server (one request
per stdin line, one reply per stdout line), which ``benchmarks/compare.py``
uses to interleave JAX and PyTorch timings in one run.

The step runs as bat_jax runs it: ``config.ops='auto'`` (``cpu_fast`` on CPU)
and ``bat_jax.util.add_default_xla_flags()``. ``--ops=xla`` and
``--stock_xla_flags`` give stock JAX for comparison. Only user settings are
varied here; to time older code, run this script at an older commit.
"""

import argparse
import json
import os
import resource
import statistics
import time

import worker_protocol

METHODS = ("standard", "at", "trades", "mart", "bat")

# Filled by _import_jax(): JAX must not be imported before XLA_FLAGS is set.
jax = jnp = np = None


def _import_jax(xla_flags: str = "", matmul_precision: str = "",
                stock_xla_flags: bool = False):
  """Sets XLA_FLAGS as bat_jax's entry points do (plus ``xla_flags``), then imports JAX."""
  global jax, jnp, np
  if xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  if not stock_xla_flags:
    from bat_jax import util  # pylint: disable=g-import-not-at-top
    util.add_default_xla_flags()
  import jax as _jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as _jnp  # pylint: disable=g-import-not-at-top
  import numpy as _np  # pylint: disable=g-import-not-at-top
  jax, jnp, np = _jax, _jnp, _np
  if matmul_precision:
    jax.config.update("jax_default_matmul_precision", matmul_precision)


# --------------------------------------------------------------------------
# Configs and helpers.
# --------------------------------------------------------------------------

MNIST_MODELS = ("lenet",)


def dataset_for(model: str) -> str:
  return "mnist" if model in MNIST_MODELS else "cifar10"


def make_config(method="bat", model="lenet", batch=128, steps=10, bridges=2,
                dtype="float32", fused=False, parallel="pmap", ops="auto"):
  """The paper's config for ``model``'s dataset (docs/ALGORITHMS.md section 4), no augmentation.

  MNIST (LeNet): Adam 1e-3, eps 0.3, step 0.02. CIFAR (ResNets, WRNs): SGD
  momentum 0.9, wd 5e-4, eps 8/255, step 2/255. Augmentation is off: the
  PyTorch reference does it in its data loader, outside the step.
  """
  from bat_jax import configlib  # pylint: disable=g-import-not-at-top
  c = configlib.base_config()
  c.dataset = dataset_for(model)
  c.model = model
  c.method = method
  c.batch_size = batch
  c.attack_steps = steps
  c.num_bridges = bridges
  c.dtype = dtype
  c.fused_forward = fused
  c.parallel = parallel
  c.ops = ops
  c.augment = False
  c.schedule = "constant"
  if c.dataset == "cifar10":
    c.eps, c.attack_step_size = 8 / 255, 2 / 255
    c.optimizer, c.learning_rate, c.momentum, c.weight_decay = "sgd", 0.1, 0.9, 5e-4
  configlib.validate(c)
  return c


def image_shape(model: str):
  return (28, 28, 1) if dataset_for(model) == "mnist" else (32, 32, 3)


def fake_batch(model: str, batch: int, num_devices: int = 1, seed: int = 0):
  rng = np.random.default_rng(seed)
  h, w, c = image_shape(model)
  images = rng.integers(0, 256, (num_devices, batch // num_devices, h, w, c), np.uint8)
  labels = rng.integers(0, 10, (num_devices, batch // num_devices)).astype(np.int32)
  return {"image": images, "label": labels}


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float((ca or {}).get("flops", float("nan")))


def _memory(compiled) -> dict:
  out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    ma = compiled.memory_analysis()
    if isinstance(ma, (list, tuple)):
      ma = ma[0]
    out["xla_temp_mb"] = ma.temp_size_in_bytes / 2**20
    out["xla_args_mb"] = ma.argument_size_in_bytes / 2**20
    out["xla_out_mb"] = ma.output_size_in_bytes / 2**20
    out["xla_alias_mb"] = ma.alias_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  stats = jax.local_devices()[0].memory_stats()
  if stats:
    out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
  return out


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
  """Best-of-``repeats`` GEMM throughput (GFLOP/s) at n x n x n.

  On an accelerator, pass a larger ``n`` (8192) and also time bfloat16.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return {"n": n, "dtype": dtype, "best_gflops": 2 * n**3 / min(times) / 1e9,
          "median_gflops": 2 * n**3 / statistics.median(times) / 1e9}


def device_peak() -> dict:
  """The peak the step is compared with: f32 GEMM on CPU; on GPU/TPU, the
  GEMM of the step's dtype is what matters, so both are measured."""
  if jax.default_backend() == "cpu":
    return matmul_peak()
  out = matmul_peak(8192, dtype="float32")
  out["bf16"] = matmul_peak(8192, dtype="bfloat16")
  return out


# --------------------------------------------------------------------------
# The step benchmark.
# --------------------------------------------------------------------------


class StepBench:
  """One compiled train step, ready to time."""

  def __init__(self, method="bat", model="lenet", batch=128, steps=10, bridges=2,
               dtype="float32", fused=False, donate=True, ops="auto",
               iter_flops=None):
    """``iter_flops``: one attack iteration's FLOPs when already counted for
    the same model, batch, dtype and attack objective (AT after BAT: both
    attack with PGD-CE), which saves compiling that iteration again."""
    from bat_jax import attacks, cpu, methods, parallel, train_state, train_step  # pylint: disable=g-import-not-at-top
    self.case = dict(framework="jax", method=method, model=model, batch=batch,
                     steps=steps if method != "standard" else 0,
                     bridges=bridges if method == "bat" else 0,
                     dtype=dtype, fused=fused, donate=donate, ops=ops)
    config = make_config(method, model, batch, max(steps, 1), bridges, dtype, fused,
                         ops=ops)
    self.config = config
    t0 = time.perf_counter()
    s = train_state.setup(config, image_shape(model), steps_per_epoch=100, total_steps=1000)
    par = parallel.Pmap(jax.local_devices()[:1])
    step_fn = par.compile(train_step.make_train_step(config, s.model, s.tx, s.schedule),
                          donate_state=donate)
    self.state = par.put_state(s.state)
    self.batch = par.put_batch(fake_batch(model, batch))
    self.setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with cpu.measuring("the benchmarked train step"):  # as the trainer's first step
      self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    counted = _flops(self.compiled)
    # One attack iteration, for the loop-body correction (see the module doc).
    if method == "standard":
      iter_flops = 0.0
    if iter_flops is None:
      objective, _ = methods.resolved_attack(config)
      objective_fn = attacks.get_objective(objective)
      variables = s.state.inference_variables()
      model_nc = train_state.without_axis(s.model)
      x = jnp.zeros((batch,) + image_shape(model), jnp.float32)
      y = jnp.zeros((batch,), jnp.int32)
      # PGD computes the clean logits (KL objective) once, outside its loop:
      # they come in as an argument so that the iteration is counted alone.
      clean = jnp.zeros((batch, 10), jnp.float32)

      def one_iteration(variables, x, x_adv, y, clean):
        logits_fn = lambda z: model_nc.apply(variables, z, train=False)
        g = jax.grad(lambda z: jnp.sum(objective_fn(logits_fn(z), y, clean)))(x_adv)
        return attacks.project(x_adv + 0.01 * jnp.sign(g), x, 0.1)

      iter_flops = _flops(jax.jit(one_iteration).lower(variables, x, x, y, clean).compile())
    self.flops = counted + (max(steps, 1) - 1) * iter_flops if method != "standard" else counted
    self.counted_flops, self.iter_flops = counted, iter_flops
    self.memory = _memory(self.compiled)
    self.warmup(2)

  def run_once(self) -> float:
    t = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t

  def warmup(self, n: int = 2) -> None:
    for _ in range(n):
      self.run_once()

  def time(self, n: int) -> list:
    return [self.run_once() for _ in range(n)]

  def info(self) -> dict:
    return dict(self.case, compile_s=self.compile_s, setup_s=self.setup_s,
                flops=self.flops, counted_flops=self.counted_flops,
                attack_iter_flops=self.iter_flops, memory=self.memory)


def summarize(info: dict, times: list, peak_gflops: float) -> dict:
  med = statistics.median(times)
  out = dict(info)
  out.update(median_s=med, min_s=min(times), n=len(times),
             examples_per_s=info["batch"] / med,
             gflops_per_s=info["flops"] / med / 1e9 if info.get("flops") else None)
  if peak_gflops and out["gflops_per_s"]:
    out["fraction_of_peak"] = out["gflops_per_s"] / peak_gflops
  return out


# --------------------------------------------------------------------------
# Evaluation throughput: PGD^50 and AutoAttack.
# --------------------------------------------------------------------------


def eval_benchmarks(model_name="lenet", batch=128, repeats=3, aa_settings=None,
                    aa=True, ops="auto") -> list:
  """Examples/s of PGD^50 (1 restart) and of AutoAttack (small budgets)."""
  from bat_jax import attacks, cpu, datasets, models  # pylint: disable=g-import-not-at-top
  config = make_config("standard", model_name, batch)
  info = datasets.get_dataset_info(config.dataset)
  model = models.create_model(model_name, info.num_classes, dtype=jnp.float32,
                              layers=cpu.layers_for(ops))
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + image_shape(model_name)),
                                           train=False))(jax.random.PRNGKey(0))
  b = fake_batch(model_name, batch)
  x = jnp.asarray(b["image"][0], jnp.float32) / 255.0
  y = jnp.asarray(b["label"][0])
  logits_fn = lambda v, z: model.apply(v, z, train=False)
  results = []

  def timed(name, fn, args, budget):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t)
    med = statistics.median(times)
    results.append(dict(framework="jax", eval=name, model=model_name, batch=batch,
                        budget=budget, compile_s=compile_s, median_s=med,
                        examples_per_s=batch / med))
    print(f"  {name:28s} {budget:40s} {med:8.3f} s/batch  {batch / med:8.1f} ex/s"
          f"  (compile {compile_s:.1f} s)", flush=True)

  eps, step = (0.3, 0.01) if config.dataset == "mnist" else (8 / 255, 2 / 255)
  timed("pgd50", lambda v, x, y: attacks.pgd(
      lambda z: logits_fn(v, z), x, y, eps=eps, step_size=step, num_steps=50,
      key=jax.random.PRNGKey(0)), (variables, x, y), "50 steps, 1 restart")
  if aa:
    settings = aa_settings or dict(apgd_iters=10, n_target_classes=3, fab_iters=10,
                                   square_queries=100)
    budget = ",".join(f"{k}={v}" for k, v in settings.items())
    # Untrained weights: most examples are misclassified and skipped, which
    # would flatter the timing; attack all of them by using the predictions
    # as labels (every example starts robust).
    y_pred = jnp.argmax(logits_fn(variables, x), -1)
    timed("autoattack_standard", lambda v, x, y: attacks.autoattack(
        lambda z: logits_fn(v, z), x, y, eps=eps, key=jax.random.PRNGKey(0),
        **settings)[1], (variables, x, y_pred), budget)
  return results


# --------------------------------------------------------------------------
# CLI and worker.
# --------------------------------------------------------------------------


def print_table(rows, peak=None):
  hdr = (f"{'method':9s} {'model':9s} {'B':>4s} {'K':>3s} {'m':>2s} {'dtype':8s} "
         f"{'fused':5s} {'step ms':>9s} {'ex/s':>8s} {'compile s':>9s} "
         f"{'GFLOP':>8s} {'GFLOP/s':>8s} {'%peak':>6s} {'mem MB':>8s}")
  print(hdr)
  for r in rows:
    mem = r["memory"].get("device_peak_mb") or (
        r["memory"].get("xla_temp_mb", 0) + r["memory"].get("xla_args_mb", 0)
        + r["memory"].get("xla_out_mb", 0) - r["memory"].get("xla_alias_mb", 0))
    print(f"{r['method']:9s} {r['model']:9s} {r['batch']:4d} {r['steps']:3d} "
          f"{r['bridges']:2d} {r['dtype']:8s} {str(r['fused']):5s} "
          f"{1e3 * r['median_s']:9.1f} {r['examples_per_s']:8.1f} {r['compile_s']:9.1f} "
          f"{r['flops'] / 1e9:8.2f} {r['gflops_per_s']:8.1f} "
          f"{100 * r.get('fraction_of_peak', float('nan')):6.1f} {mem:8.1f}")
  if peak:
    print(f"peak ({peak['dtype']} GEMM {peak['n']}^3, best of 5): "
          f"{peak['best_gflops']:.1f} GFLOP/s")


def machine_info() -> dict:
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": model, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.local_devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def worker() -> None:
  """JSON-lines server for compare.py (worker_protocol.py)."""
  worker_protocol.serve(lambda case: StepBench(**case), {
      "peak": lambda req: {"peak": device_peak()},
      "eval": lambda req: {"results": eval_benchmarks(**req["case"])},
      "machine": lambda req: {"machine": machine_info()},
  })


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", default="step", choices=("step", "scaling", "eval"))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--model", default="lenet")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="PGD steps K")
  p.add_argument("--bridges", type=int, default=2, help="BAT bridges m")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--fused", action="store_true", help="config.fused_forward=True")
  p.add_argument("--iters", type=int, default=10, help="timed steps per case")
  p.add_argument("--k_values", default="1,2,5,10,20,40")
  p.add_argument("--m_values", default="1,2,4,8")
  p.add_argument("--no_autoattack", action="store_true")
  p.add_argument("--eval_repeats", type=int, default=3)
  p.add_argument("--xla_flags", default="")
  p.add_argument("--ops", default="auto", choices=("auto", "xla", "cpu_fast"),
                 help="config.ops (auto: cpu_fast on CPU)")
  p.add_argument("--stock_xla_flags", action="store_true",
                 help="skip bat_jax.util.add_default_xla_flags()")
  p.add_argument("--matmul_precision", default="")
  p.add_argument("--out", default="")
  p.add_argument("--worker", action="store_true")
  args = p.parse_args()
  _import_jax(args.xla_flags, args.matmul_precision, args.stock_xla_flags)
  if args.worker:
    return worker()

  report = {"machine": machine_info(), "args": vars(args)}
  print(json.dumps(report["machine"]), flush=True)
  peak = device_peak()
  if args.dtype == "bfloat16" and "bf16" in peak:
    peak = dict(peak["bf16"], f32=peak)
  report["peak"] = peak
  rows = []

  def bench(**case):
    b = StepBench(**case)
    r = summarize(b.info(), b.time(args.iters), peak["best_gflops"])
    r["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    rows.append(r)
    print(f"  {r['method']} K={r['steps']} m={r['bridges']}: "
          f"{1e3 * r['median_s']:.1f} ms/step (compile {r['compile_s']:.1f} s)",
          flush=True)
    return r

  common = dict(model=args.model, batch=args.batch, dtype=args.dtype, fused=args.fused,
                ops=args.ops)
  if args.mode == "step":
    for method in args.methods.split(","):
      bench(method=method, steps=args.steps, bridges=args.bridges, **common)
  elif args.mode == "scaling":
    for k in map(int, args.k_values.split(",")):
      bench(method="at", steps=k, bridges=args.bridges, **common)
    for m in map(int, args.m_values.split(",")):
      bench(method="bat", steps=args.steps, bridges=m, **common)
  else:
    report["eval"] = eval_benchmarks(args.model, args.batch, args.eval_repeats,
                                     aa=not args.no_autoattack, ops=args.ops)
  if rows:
    print_table(rows, peak)
  report["rows"] = rows
  report["machine"]["loadavg_end"] = os.getloadavg()
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
