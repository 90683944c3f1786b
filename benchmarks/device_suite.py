"""One command that measures bat_jax on a GPU in about ten minutes.

Three parts, in order, each with its own time cap and sized by the clock
(measure first, then fit the rest into what is left):

  1. train_step: the train step (BAT PGD-10 m = 2, AT, TRADES) of WRN-28-10
     at batch 128 on CIFAR-10 shapes, float32 and bfloat16: ms/step, compile
     time, XLA's FLOPs, the fraction of a same-run GEMM peak, memory; beside
     it the PyTorch reference step (``bench_torch.StepBench``: eager,
     ``torch.autograd.grad`` PGD loop, one forward per bridge), interleaved.
  2. autoattack: AutoAttack "standard", stage by stage, on the same model
     (random weights, the labels its predictions, so every input is
     attacked): each stage timed on a chunk of inputs at a fraction of the
     standard budget, then scaled to ``--aa_inputs`` inputs at the standard
     budget (the attacks' loops have fixed trip counts); ``torchattacks`` on
     the same weights and inputs when it imports.
  3. mnist: the paper's Table 1 setting (LeNet, 60k digits, Adam 1e-3 with
     the 50-epoch step schedule, PGD-40 step 0.02, BAT eps 0.45 then 0.3)
     through the real trainer and a local .npz (no TFDS): the step time is
     measured first and the run trains as many of the 50 epochs as fit, then
     PGD-50 x 10 and AutoAttack on the 10k test digits, next to the paper.

After every measurement ``OUT_DIR/results.json`` and ``OUT_DIR/results.md``
are rewritten, so a run stopped by a timeout still returns what it measured.
PyTorch runs in a separate process (``device_suite_torch.py``) and only if
it imports; bat_jax never imports torch.

  # on a GPU (benchmarks/README.md, "GPU suite")
  python3 benchmarks/device_suite.py --out_dir=$OUT --data_file=.devdata/mnist.npz
  # the same code at toy sizes on the CPU (tests/test_device_suite.py runs it)
  python benchmarks/device_suite.py --smoke --out_dir=/tmp/suite_smoke
"""

import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# bat_jax from this checkout: the suite runs where bat_jax is not installed.
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]

from absl import app, flags, logging  # noqa: E402

import bench_jax  # noqa: E402  (imports no JAX until _import_jax)
import compare  # noqa: E402

FLAGS = flags.FLAGS
_OTHER_FLAGS = set(FLAGS)
flags.DEFINE_string("out_dir", None, "Where results.json, results.md and the "
                    "PyTorch worker's log go.")
flags.DEFINE_bool("smoke", False, "Toy sizes for the CPU (SMOKE below): the same "
                  "code, in about a minute.")
flags.DEFINE_float("budget_s", 540, "Wall-clock budget of the whole suite.")
flags.DEFINE_list("parts", ["train_step", "autoattack", "mnist"], "Parts to run.")
flags.DEFINE_float("step_cap_s", 180, "Time cap of part 1 (train step).")
flags.DEFINE_float("autoattack_cap_s", 90, "Time cap of part 2 (AutoAttack).")
flags.DEFINE_float("mnist_cap_s", 0, "Time cap of part 3; 0: what is left.")
flags.DEFINE_string("work_dir", "/tmp/device_suite_work", "Scratch space "
                    "(checkpoints, weights for PyTorch); emptied first.")
flags.DEFINE_string("torch_python", sys.executable, "Python with torch for the "
                    "reference side ('' to skip it).")
flags.DEFINE_float("jax_mem_fraction", 0.45, "XLA_PYTHON_CLIENT_MEM_FRACTION "
                   "when PyTorch shares the GPU (unless already set).")
# Part 1.
flags.DEFINE_string("model", "wrn28_10", "Model of parts 1 and 2 (CIFAR-10 shapes).")
flags.DEFINE_integer("batch", 128, "Batch of part 1.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps K of part 1.")
flags.DEFINE_integer("bridges", 2, "BAT bridges m of part 1.")
flags.DEFINE_list("step_cases", ["bat:float32", "bat:bfloat16", "at:float32",
                                 "trades:float32", "at:bfloat16", "trades:bfloat16"],
                  "method:dtype cases of part 1, most important first.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds per case.")
flags.DEFINE_float("step_timing_s", 8, "Seconds of timed steps per case (both "
                   "frameworks), after compilation.")
flags.DEFINE_integer("max_iters", 20, "At most this many timed steps per round.")
# Part 2.
flags.DEFINE_integer("aa_inputs", 1000, "Inputs the per-stage times are given for.")
flags.DEFINE_integer("aa_chunk", 250, "Inputs each stage is timed on.")
flags.DEFINE_float("aa_budget_fraction", 0.1, "Fraction of the standard budgets "
                   "(iterations, queries) timed; the targets stay 9.")
flags.DEFINE_list("aa_settings", [], "Explicit budget overrides, e.g. "
                  "apgd_iters=4,n_target_classes=2 (after the fraction).")
flags.DEFINE_float("aa_eps", 8 / 255, "L-inf radius of part 2.")
# Part 3.
flags.DEFINE_string("data_file", None, "MNIST as a local .npz (export_npz); "
                    "default .devdata/mnist.npz, or in --smoke a subset of the "
                    "bundled digits.")
flags.DEFINE_list("mnist_eps", ["0.45", "0.3"], "Radii of part 3, in order.")
flags.DEFINE_string("mnist_method", "bat", "Method of part 3.")
flags.DEFINE_integer("mnist_epochs", 50, "The paper's epochs (the schedule's length).")
flags.DEFINE_integer("mnist_max_epochs", 50, "Train at most this many of them.")
flags.DEFINE_integer("mnist_batch", 128, "Training batch (paper: 128).")
flags.DEFINE_integer("mnist_train_examples", -1, "Training digits; -1: all.")
flags.DEFINE_integer("mnist_test_examples", -1, "Test digits evaluated; -1: all.")
flags.DEFINE_integer("mnist_attack_steps", 40, "Training PGD steps (paper: 40).")
flags.DEFINE_integer("mnist_probe_steps", 100, "Steps timed before sizing the run.")
flags.DEFINE_float("mnist_eval_reserve_s", 90, "Time kept for each evaluation "
                   "until one has been measured.")
flags.DEFINE_string("mnist_pgd", "50x10", "Evaluation PGD: steps x restarts.")
flags.DEFINE_list("mnist_aa_settings", [], "AutoAttack budget overrides "
                  "(empty: the standard AutoAttack).")
flags.DEFINE_integer("mnist_eval_batch", 10000, "Evaluation batch.")
flags.DEFINE_integer("mnist_sanity_examples", 0, "Examples for evaluate's sanity "
                     "checks (0: none; they cost compilations).")
SUITE_FLAGS = sorted(set(FLAGS) - _OTHER_FLAGS)  # recorded with the results

# --smoke: toy sizes, unless the flag is given on the command line. The caps
# are wide so that nothing is skipped on a loaded 2-core CPU.
SMOKE = dict(
    budget_s=400, step_cap_s=150, autoattack_cap_s=120,
    model="tiny_wrn", batch=8, attack_steps=2,
    step_cases=["bat:float32", "trades:bfloat16"], rounds=2, step_timing_s=0,
    max_iters=2,
    aa_inputs=64, aa_chunk=8, aa_budget_fraction=1.0,
    aa_settings=["apgd_iters=3", "n_target_classes=2", "fab_iters=3",
                 "square_queries=6"],
    mnist_eps=["0.45"], mnist_max_epochs=1, mnist_batch=32,
    mnist_train_examples=256, mnist_test_examples=64, mnist_attack_steps=3,
    mnist_probe_steps=2, mnist_eval_reserve_s=20, mnist_pgd="3x2",
    mnist_aa_settings=["apgd_iters=3", "n_target_classes=2", "fab_iters=3",
                       "square_queries=6"],
    mnist_eval_batch=64, work_dir="/tmp/device_suite_smoke_work")

# The paper's Table 1 (MNIST, mean +- std over 3 seeds, %): clean, PGD^50, AutoAttack.
PAPER_TABLE1 = {
    0.3: {"AT": ("98.79±0.23", "91.69±1.25", "88.64±0.61"),
          "TRADES": ("98.89±0.01", "93.70±0.01", "92.31±0.21"),
          "MART": ("98.78±0.16", "92.37±1.21", "89.62±1.44"),
          "BAT": ("98.79±0.06", "93.97±0.16", "92.19±0.13")},
    0.45: {"AT": ("11.35±0.00", "11.35±0.00", "11.35±0.00"),
           "TRADES": ("99.42±0.05", "11.34±0.01", "0.53±0.26"),
           "MART": ("13.13±2.54", "7.80±3.73", "0.93±1.32"),
           "BAT": ("97.72±0.26", "88.20±0.57", "76.09±1.65")},
}
# What a stage's standard budget is, in bat_jax.attacks' setting names.
STANDARD_BUDGET = {"apgd-ce": ("apgd_iters",), "apgd-t": ("apgd_iters", "n_target_classes"),
                   "fab-t": ("fab_iters", "n_target_classes"), "square": ("square_queries",)}

jax = jnp = np = None  # imported in main(), after the XLA environment is set


# --------------------------------------------------------------------------
# Bookkeeping: the clock, the report (JSON + Markdown), the PyTorch worker.
# --------------------------------------------------------------------------


class Clock:
  """Seconds since the start, and what is left of the budget."""

  def __init__(self, budget_s: float):
    self.start, self.budget_s = time.time(), budget_s

  def elapsed(self) -> float:
    return time.time() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()


class Report:
  """The suite's results; ``save()`` rewrites results.json and results.md."""

  def __init__(self, out_dir: str, clock: Clock):
    self.out_dir, self.clock = out_dir, clock
    self.data = {"suite": {}, "machine": {}, "parts": {}}

  def part(self, name: str, **settings) -> dict:
    self.data["parts"][name] = {"status": "running", "settings": settings,
                                "started_s": round(self.clock.elapsed(), 1),
                                "errors": [], "skipped": []}
    return self.data["parts"][name]

  def save(self) -> None:
    self.data["suite"]["elapsed_s"] = round(self.clock.elapsed(), 1)
    path = os.path.join(self.out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    with open(os.path.join(self.out_dir, "results.md"), "w") as f:
      f.write(render_markdown(self.data))


def _error(part: dict, where: str, e: BaseException) -> None:
  logging.error("%s: %r", where, e)
  part["errors"].append({"where": where, "error": repr(e),
                         "traceback": traceback.format_exc()[-3000:]})


class TorchWorker(compare.Worker):
  """``compare.Worker`` for ``device_suite_torch.py``, with a deadline per reply."""

  def __init__(self, python: str, device: str, log_path: str):  # pylint: disable=super-init-not-called
    self._start([python, os.path.join(HERE, "device_suite_torch.py"), f"--device={device}"],
                log_path)

  def call(self, timeout: float = 600, **req):
    return super().call(timeout=timeout, **req)

  def close(self) -> None:
    if self.proc.poll() is None:
      super().close()
    self.log.close()


def start_torch(report: Report, device: str):
  """The PyTorch worker, or None (and why) when torch does not import."""
  info = report.data["machine"]
  if not FLAGS.torch_python:
    info["torch"] = "skipped (--torch_python='')"
    return None
  log_path = os.path.join(FLAGS.out_dir, "torch_worker.log")
  try:
    worker = TorchWorker(FLAGS.torch_python, device, log_path)
    info["torch"] = worker.call(cmd="machine", timeout=180)["machine"]
    return worker
  except Exception as e:  # pylint: disable=broad-except
    with open(log_path) as f:
      last = (f.read().strip().splitlines() or [""])[-1]  # e.g. the ImportError
    info["torch"] = f"not available: {last or repr(e)} (see torch_worker.log)"
    logging.warning("PyTorch side skipped: %s", info["torch"])
    return None


def machine_info() -> dict:
  """Versions, devices and the GPU (nvidia-smi when there is one)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  info = bench_jax.machine_info()
  info.update(python=platform.python_version(), jaxlib=jaxlib.__version__,
              flax=flax.__version__, optax=optax.__version__, numpy=np.__version__,
              device_kind=jax.devices()[0].device_kind,
              matmul_precision=str(jax.config.jax_default_matmul_precision),
              mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
  try:
    import orbax.checkpoint  # pylint: disable=g-import-not-at-top
    info["orbax_checkpoint"] = getattr(orbax.checkpoint, "__version__", "?")
  except ImportError:
    pass
  for name, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,"
                                    "memory.total,clocks.max.sm", "--format=csv,noheader"]),
                    ("git_commit", ["git", "-C", ROOT, "rev-parse", "HEAD"])):
    try:
      info[name] = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
      info[name] = None
  return info


# --------------------------------------------------------------------------
# Part 1: the train step, bat_jax vs the PyTorch reference.
# --------------------------------------------------------------------------


def _xla_step_mb(memory: dict):
  if "xla_temp_mb" not in memory:
    return None
  return (memory["xla_temp_mb"] + memory["xla_args_mb"] + memory["xla_out_mb"]
          - memory["xla_alias_mb"])


def part_train_step(report: Report, deadline: float, torch_worker) -> None:
  """Each case: compile, probe one step per framework, size the rounds, time."""
  from bat_jax import methods  # pylint: disable=g-import-not-at-top
  part = report.part("train_step", model=FLAGS.model, batch=FLAGS.batch,
                     attack_steps=FLAGS.attack_steps, bridges=FLAGS.bridges,
                     cases=FLAGS.step_cases, rounds=FLAGS.rounds,
                     step_timing_s=FLAGS.step_timing_s, dataset="cifar10 shapes "
                     "(random uint8 images and labels)")
  if jax.default_backend() == "cpu":
    peak = bench_jax.matmul_peak(512 if FLAGS.smoke else 2048)
  else:
    peak = bench_jax.device_peak()
  part["peak"] = peak
  peak_of = {"float32": peak["best_gflops"],
             "bfloat16": peak.get("bf16", peak)["best_gflops"]}
  if torch_worker is not None:
    try:
      part["torch_peak"] = torch_worker.call(cmd="peak", timeout=120)["peak"]
    except Exception as e:  # pylint: disable=broad-except
      _error(part, "torch peak", e)
  part["rows"], iter_flops, case_cost = [], {}, 0.0
  report.save()
  for index, case in enumerate(FLAGS.step_cases):
    method, dtype = case.split(":")
    if deadline - time.time() < case_cost:
      part["skipped"].append({"case": case, "why": f"{deadline - time.time():.0f} s "
                              f"left in the part, the last case took {case_cost:.0f} s"})
      continue
    began = time.time()
    spec = dict(method=method, model=FLAGS.model, batch=FLAGS.batch,
                steps=FLAGS.attack_steps, bridges=FLAGS.bridges, dtype=dtype)
    bench = None
    try:
      objective = methods.get(method).attack_objective
      bench = bench_jax.StepBench(**spec, iter_flops=iter_flops.get((objective, dtype)))
      iter_flops[(objective, dtype)] = bench.iter_flops
      probe, torch_info = {"jax": bench.time(1)[0]}, {}
      if torch_worker is not None:
        try:
          # The reply's info: the two warm-up steps' time and peak memory.
          torch_info = torch_worker.call(cmd="setup", id=case, case=spec,
                                         timeout=300)["info"]
          probe["torch"] = torch_worker.call(cmd="time", id=case, n=1, timeout=300)["times"][0]
        except Exception as e:  # pylint: disable=broad-except
          _error(part, f"torch setup {case}", e)
      per_step = sum(probe.values())
      iters = max(1, min(FLAGS.max_iters, int(FLAGS.step_timing_s / FLAGS.rounds / per_step)))
      times = {fw: [] for fw in probe}
      for r in range(FLAGS.rounds):
        for fw in (sorted(probe) if r % 2 == 0 else sorted(probe, reverse=True)):
          if fw == "jax":
            times["jax"].append(bench.time(iters))
          else:
            try:
              times["torch"].append(torch_worker.call(cmd="time", id=case, n=iters,
                                                      timeout=300)["times"])
            except Exception as e:  # pylint: disable=broad-except
              _error(part, f"torch time {case}", e)
              probe.pop("torch")
              times.pop("torch")
      jax_row = bench_jax.summarize(bench.info(), sum(times["jax"], []), peak_of[dtype])
      jax_row.update(case=case, round_medians_s=[statistics.median(t) for t in times["jax"]],
                     xla_step_mb=_xla_step_mb(jax_row["memory"]),
                     peak_gflops=peak_of[dtype])
      part["rows"].append(jax_row)
      if times.get("torch"):
        flat = sum(times["torch"], [])
        med = statistics.median(flat)
        medians = [statistics.median(t) for t in times["torch"]]
        part["rows"].append(dict(
            spec, framework="torch", case=case, median_s=med, min_s=min(flat),
            warmup_s=torch_info.get("compile_s"), memory=torch_info.get("memory"),
            n=len(flat), round_medians_s=medians, examples_per_s=FLAGS.batch / med,
            flops=bench.flops, gflops_per_s=bench.flops / med / 1e9,
            fraction_of_peak=bench.flops / med / 1e9 / peak_of[dtype],
            torch_over_jax=statistics.median(
                [t / j for t, j in zip(medians, jax_row["round_medians_s"])])))
    except Exception as e:  # pylint: disable=broad-except
      _error(part, f"case {case}", e)
    finally:
      del bench
      if torch_worker is not None and torch_worker.proc.poll() is None:
        try:
          torch_worker.call(cmd="drop", id=case, timeout=60)
        except Exception:  # pylint: disable=broad-except
          pass
    case_cost = max(case_cost, time.time() - began)
    logging.info("train_step %s (%d/%d) done in %.0f s", case, index + 1,
                 len(FLAGS.step_cases), time.time() - began)
    report.save()
  part["status"] = "done"


# --------------------------------------------------------------------------
# Part 2: AutoAttack per stage.
# --------------------------------------------------------------------------


def _parse_settings(items) -> dict:
  return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in items)}


def stage_settings() -> dict:
  """The budgets timed: a fraction of the standard ones, then explicit overrides."""
  from bat_jax import attacks  # pylint: disable=g-import-not-at-top
  std, f = attacks.STANDARD_SETTINGS, FLAGS.aa_budget_fraction
  settings = {k: max(1, round(std[k] * f)) for k in ("apgd_iters", "fab_iters",
                                                     "square_queries")}
  settings.update(_parse_settings(FLAGS.aa_settings))
  return settings


def standard_scale(stage: str, settings: dict) -> float:
  """How many times the standard budget of ``stage`` is the one timed."""
  from bat_jax import attacks  # pylint: disable=g-import-not-at-top
  std = attacks.STANDARD_SETTINGS
  scale = 1.0
  for key in STANDARD_BUDGET[stage]:
    scale *= std[key] / settings.get(key, std[key])
  return scale


def part_autoattack(report: Report, deadline: float, torch_worker) -> None:
  """Each stage of AutoAttack on ``--aa_chunk`` inputs, every input attacked."""
  import flax  # pylint: disable=g-import-not-at-top
  from bat_jax import attacks, models  # pylint: disable=g-import-not-at-top
  settings = stage_settings()
  part = report.part("autoattack", model=FLAGS.model, inputs_timed=FLAGS.aa_chunk,
                     inputs_reported=FLAGS.aa_inputs, eps=FLAGS.aa_eps,
                     budgets_timed=settings, weights="random init (PRNGKey(0)), "
                     "inference-mode BatchNorm", labels="the model's predictions: "
                     "every input is attacked by every stage")
  model = models.create_model(FLAGS.model, 10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0))
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.aa_chunk, 32, 32, 3), np.uint8)
  x = jnp.asarray(images, jnp.float32) / 255.0
  apply = lambda v, z: model.apply(v, z, train=False)
  logits = jax.jit(apply)(variables, x)
  y = jnp.argmax(logits, -1)
  robust = jnp.ones(y.shape, bool)
  key = jax.random.PRNGKey(0)
  if torch_worker is not None:
    try:
      path = os.path.join(FLAGS.work_dir, "aa_weights.npz")
      flat = flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/")
      np.savez(path, **{k: np.asarray(v) for k, v in flat.items()},
               **{"inputs/image": images, "inputs/label": np.asarray(y),
                  "inputs/jax_logits": np.asarray(logits[:32])})
      part["torch_weights"] = {k: v for k, v in torch_worker.call(
          cmd="aa_load", path=path, model=FLAGS.model, timeout=300).items() if k != "ok"}
      if not part["torch_weights"].get("torchattacks"):
        part["skipped"].append({"what": "torchattacks", "why": "not installed"})
        torch_worker = None
    except Exception as e:  # pylint: disable=broad-except
      _error(part, "torch aa_load", e)
      torch_worker = None
  part["rows"], stage_cost = [], 0.0
  report.save()
  for stage in attacks.STANDARD_ATTACKS:
    if deadline - time.time() < stage_cost:
      part["skipped"].append({"stage": stage, "why": f"{deadline - time.time():.0f} s "
                              f"left in the part, the last stage took {stage_cost:.0f} s"})
      continue
    began = time.time()
    scale = standard_scale(stage, settings) * FLAGS.aa_inputs / FLAGS.aa_chunk
    row = {"stage": stage, "inputs": FLAGS.aa_chunk, "settings": settings,
           "scale_to_reported": scale}
    try:
      fn = jax.jit(lambda v, x, y, r, stage=stage: attacks.attack_remaining(
          stage, lambda z: apply(v, z), x, y, r, eps=FLAGS.aa_eps, key=key, **settings))
      start = time.perf_counter()
      compiled = fn.lower(variables, x, y, robust).compile()
      row["jax_compile_s"] = time.perf_counter() - start
      runs = []
      while len(runs) < 2 and sum(runs) < 10:  # a second run when the first is short
        start = time.perf_counter()
        x_stage, still = jax.block_until_ready(compiled(variables, x, y, robust))
        runs.append(time.perf_counter() - start)
      row.update(jax_s=min(runs), jax_runs_s=runs, jax_robust=float(jnp.mean(still)),
                 jax_max_perturbation=float(jnp.max(jnp.abs(x_stage - x))),
                 jax_reported_s=min(runs) * scale)
    except Exception as e:  # pylint: disable=broad-except
      _error(part, f"jax {stage}", e)
    if torch_worker is not None:
      try:
        got = torch_worker.call(cmd="aa_stage", stage=stage, settings=settings,
                                n=FLAGS.aa_chunk, eps=FLAGS.aa_eps,
                                timeout=max(deadline - time.time(), 60))
        row.update(torch_s=got["seconds"], torch_robust=got["robust"],
                   torch_max_perturbation=got["max_perturbation"],
                   torch_reported_s=got["seconds"] * scale)
      except Exception as e:  # pylint: disable=broad-except
        _error(part, f"torch {stage}", e)
    part["rows"].append(row)
    stage_cost = max(stage_cost, time.time() - began)
    report.save()
  part["status"] = "done"


# --------------------------------------------------------------------------
# Part 3: the paper's MNIST Table 1 setting, sized by the measured step time.
# --------------------------------------------------------------------------


def mnist_config(eps: float, data_file: str):
  """configs/mnist.py (the paper's settings) at ``eps``, reading ``data_file``."""
  spec = importlib.util.spec_from_file_location("mnist_config",
                                                os.path.join(ROOT, "configs", "mnist.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"eps={eps}")
  c.method = FLAGS.mnist_method
  c.data_file = data_file
  c.num_epochs = FLAGS.mnist_epochs
  c.batch_size = FLAGS.mnist_batch
  c.num_train_examples = FLAGS.mnist_train_examples
  c.attack_steps = FLAGS.mnist_attack_steps
  c.early_stopping = False  # the paper: no early stopping on MNIST
  c.eval_every_epochs = 10**6  # the final evaluation below is the one that counts
  c.checkpoint_every_steps = 10**9  # checkpoints only where a call stops
  c.log_every_steps = max(FLAGS.mnist_probe_steps // 2, 1)
  return c


def _smoke_data_file(path: str) -> str:
  """The first digits of the bundled subset as a data file (no TFDS)."""
  from bat_jax import datasets  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split, n in (("train", FLAGS.mnist_train_examples), ("test", FLAGS.mnist_test_examples)):
    images, labels = datasets.load_split("mnist_subset", split, num_examples=n)
    arrays[f"{split}_image"], arrays[f"{split}_label"] = images, labels
  np.savez(path, **arrays)
  return path


def part_mnist(report: Report, deadline: float) -> None:
  """For each eps: probe the step time, train what fits, evaluate, compare."""
  from bat_jax import datasets, evaluate, train  # pylint: disable=g-import-not-at-top
  from bat_jax.rundir import read_metrics  # pylint: disable=g-import-not-at-top
  data_file = FLAGS.data_file
  if data_file is None:
    data_file = (_smoke_data_file(os.path.join(FLAGS.work_dir, "mnist_smoke.npz"))
                 if FLAGS.smoke else os.path.join(ROOT, ".devdata", "mnist.npz"))
  data_file = os.path.abspath(data_file)
  pgd_steps, pgd_restarts = map(int, FLAGS.mnist_pgd.split("x"))
  aa_settings = _parse_settings(FLAGS.mnist_aa_settings)
  part = report.part("mnist", data_file=data_file, method=FLAGS.mnist_method,
                     eps=FLAGS.mnist_eps, epochs_of_schedule=FLAGS.mnist_epochs,
                     max_epochs=FLAGS.mnist_max_epochs, batch=FLAGS.mnist_batch,
                     pgd=f"PGD-{pgd_steps} x {pgd_restarts} restarts, step 0.01",
                     autoattack=aa_settings or "standard",
                     probe_steps=FLAGS.mnist_probe_steps)
  part["runs"] = []
  n_train = len(datasets.load_split(
      "mnist", "train", data_file=data_file,
      num_examples=None if FLAGS.mnist_train_examples < 0 else FLAGS.mnist_train_examples)[1])
  eval_reserve = FLAGS.mnist_eval_reserve_s
  report.save()
  for index, eps_text in enumerate(FLAGS.mnist_eps):
    eps = float(eps_text)
    runs_left = len(FLAGS.mnist_eps) - index
    train_budget = (deadline - time.time() - runs_left * eval_reserve) / runs_left
    run = {"eps": eps, "method": FLAGS.mnist_method, "train_budget_s": train_budget,
           "paper": PAPER_TABLE1.get(eps)}
    if train_budget <= 0:
      part["skipped"].append({"eps": eps, "why": f"{deadline - time.time():.0f} s left, "
                              f"{eval_reserve:.0f} s kept per evaluation"})
      continue
    part["runs"].append(run)
    try:
      config = mnist_config(eps, data_file)
      steps_per_epoch = n_train // config.batch_size
      total = min(config.num_epochs, FLAGS.mnist_max_epochs) * steps_per_epoch
      workdir = os.path.join(FLAGS.work_dir, f"mnist_{FLAGS.mnist_method}_eps{eps}")
      shutil.rmtree(workdir, ignore_errors=True)
      began = time.time()
      probe = min(FLAGS.mnist_probe_steps, total)
      train.train_and_evaluate(config, workdir, max_steps_this_run=probe)
      probe_s = time.time() - began
      logged = [r for r in read_metrics(workdir) if "steps_per_sec" in r]
      step_s = 1.0 / logged[-1]["steps_per_sec"]  # the last interval: no compilation
      overhead_s = max(probe_s - probe * step_s, 0.0)  # setup + compilation
      fit = probe + int(max(train_budget - probe_s - overhead_s, 0.0) / step_s)
      target = min(total, fit)
      if target >= steps_per_epoch:
        target -= target % steps_per_epoch  # whole epochs when one fits
      target = max(target, probe)
      run.update(steps_per_epoch=steps_per_epoch, step_ms=1e3 * step_s,
                 probe_s=probe_s, overhead_s=overhead_s, steps=target,
                 epochs=target / steps_per_epoch, train_examples=n_train)
      report.save()
      if target > probe:
        train.train_and_evaluate(config, workdir, max_steps_this_run=target - probe)
      run["train_s"] = time.time() - began
      run["curve"] = [{k: v for k, v in r.items() if k in (
          "step", "epoch", "train/loss", "train/clean_acc", "train/adv_acc",
          "train/learning_rate", "steps_per_sec")} for r in read_metrics(workdir)]
      report.save()
      began = time.time()
      results = evaluate.evaluate_workdir(
          workdir, which="last",
          num_examples=None if FLAGS.mnist_test_examples < 0 else FLAGS.mnist_test_examples,
          batch_size=FLAGS.mnist_eval_batch,
          protocol=evaluate.Protocol(
              attacks=("clean", "pgd", "autoattack"), pgd_steps=pgd_steps,
              pgd_restarts=pgd_restarts,
              autoattack=evaluate.AutoAttackOptions(settings=aa_settings)),
          sanity_examples=FLAGS.mnist_sanity_examples)["last"]
      run["eval_s"] = time.time() - began
      eval_reserve = 1.1 * run["eval_s"]
      run.update({k: results[k] for k in (
          "clean_acc", "pgd_acc", "autoattack_acc", "autoattack_per_attack",
          "num_examples", "settings", "step")}, timings_s=results["run"]["timings_s"])
    except Exception as e:  # pylint: disable=broad-except
      _error(part, f"mnist eps={eps}", e)
    report.save()
  part["status"] = "done"


# --------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------


def _f(value, fmt="{:.1f}", scale=1.0):
  return "-" if value is None else fmt.format(value * scale)


def _md_train_step(part) -> list:
  s = part["settings"]
  peak = part.get("peak", {})
  lines = [f"## 1. Train step: {s['model']}, batch {s['batch']}, {s['dataset']}, "
           f"PGD-{s['attack_steps']}, BAT m = {s['bridges']}", "",
           f"Peak (same run, JAX GEMM): f32 {_f(peak.get('best_gflops'), '{:.0f}')} GFLOP/s"
           + (f", bf16 {peak['bf16']['best_gflops']:.0f} GFLOP/s" if "bf16" in peak else "")
           + "".join(f"; PyTorch GEMM {k} {v['best_gflops']:.0f} GFLOP/s"
                     for k, v in part.get("torch_peak", {}).items())
           + ". % of peak: the step's XLA FLOPs (PyTorch rows: the same count) / "
           "time / the JAX GEMM peak of the row's dtype.", "",
           "| method | dtype | framework | ms/step | ex/s | torch / jax | compile (torch: "
           "2 warm-up steps) s | GFLOP/step | TFLOP/s | % of peak | memory MB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in part.get("rows", []):
    jax_row = r.get("framework", "jax") == "jax"
    mem = (r.get("xla_step_mb") if jax_row else
           (r.get("memory") or {}).get("device_peak_mb") or
           (r.get("memory") or {}).get("peak_rss_mb"))
    mem_note = "" if jax_row else (" (peak alloc.)" if (r.get("memory") or {}).get(
        "device_peak_mb") else " (RSS)")
    lines.append(
        f"| {r['method']} | {r['dtype']} | {r.get('framework', 'jax')} | "
        f"{_f(r['median_s'], '{:.1f}', 1e3)} | {_f(r['examples_per_s'])} | "
        f"{_f(r.get('torch_over_jax'), '{:.2f}')} | "
        f"{_f(r.get('compile_s') if jax_row else r.get('warmup_s'))} | "
        f"{_f(r.get('flops'), '{:.0f}', 1e-9)} | {_f(r.get('gflops_per_s'), '{:.2f}', 1e-3)} | "
        f"{_f(r.get('fraction_of_peak'), '{:.1f}', 100)} | {_f(mem, '{:.0f}')}{mem_note} |")
  return lines + ["", "JAX memory: XLA's buffers of the compiled step (arguments + "
                  "outputs + temporaries - aliased)."]


def _md_autoattack(part) -> list:
  s = part["settings"]
  lines = [f"## 2. AutoAttack \"standard\" per stage: {s['model']}, eps {s['eps']:.4f}", "",
           f"Timed on {s['inputs_timed']} inputs at budgets {s['budgets_timed']}; "
           f"'per {s['inputs_reported']}' scales that linearly to {s['inputs_reported']} "
           "inputs at the standard budgets (100 iterations, 9 targets, 5000 queries). "
           f"Weights: {s['weights']}; labels: {s['labels']}.", ""]
  tw = part.get("torch_weights")
  if tw:
    lines += [f"torchattacks {tw.get('torchattacks')} on the same weights: logits differ "
              f"by at most {tw['logit_max_abs_diff']:.2e} (scale {tw['logit_scale']:.2f}), "
              f"predictions agree on {100 * tw['prediction_agreement']:.1f}%.", ""]
  lines += ["| stage | JAX s | torch s | JAX s per reported | torch s per reported | "
            "JAX compile s | robust after (JAX / torch) |",
            "|---|---:|---:|---:|---:|---:|---|"]
  for r in part.get("rows", []):
    lines.append(f"| {r['stage']} | {_f(r.get('jax_s'), '{:.2f}')} | "
                 f"{_f(r.get('torch_s'), '{:.2f}')} | {_f(r.get('jax_reported_s'), '{:.0f}')} | "
                 f"{_f(r.get('torch_reported_s'), '{:.0f}')} | {_f(r.get('jax_compile_s'))} | "
                 f"{_f(r.get('jax_robust'), '{:.1f}', 100)}% / "
                 f"{_f(r.get('torch_robust'), '{:.1f}', 100)}% |")
  return lines


def _md_mnist(part) -> list:
  s = part["settings"]
  lines = [f"## 3. MNIST Table 1 (LeNet, {s['method'].upper()}): {s['pgd']}, AutoAttack "
           f"{s['autoattack']}", "",
           f"| eps | row | epochs | clean % | {s['pgd'].split(' ')[0]} % (paper: PGD-50 x 10) "
           "| AutoAttack % |",
           "|---|---|---:|---:|---:|---:|"]
  for r in part.get("runs", []):
    for method, (clean, pgd, aa) in (r.get("paper") or {}).items():
      lines.append(f"| {r['eps']} | paper {method} | 50 | {clean} | {pgd} | {aa} |")
    epochs = (f"{r['epochs']:.2f} of {s['epochs_of_schedule']}" if "epochs" in r else "-")
    lines.append(f"| {r['eps']} | **bat_jax {r['method'].upper()} (this run)** | {epochs} | "
                 f"{_f(r.get('clean_acc'), '{:.2f}', 100)} | {_f(r.get('pgd_acc'), '{:.2f}', 100)} "
                 f"| {_f(r.get('autoattack_acc'), '{:.2f}', 100)} |")
  lines += ["", "| eps | step ms | steps | train s (incl. compile) | eval s | test digits | "
            "AutoAttack per stage % |", "|---|---:|---:|---:|---:|---:|---|"]
  for r in part.get("runs", []):
    stages = ", ".join(f"{k} {100 * v:.2f}" for k, v in (r.get("autoattack_per_attack")
                                                          or {}).items())
    lines.append(f"| {r['eps']} | {_f(r.get('step_ms'), '{:.1f}')} | {r.get('steps', '-')} | "
                 f"{_f(r.get('train_s'), '{:.0f}')} | {_f(r.get('eval_s'), '{:.0f}')} | "
                 f"{r.get('num_examples', '-')} | {stages or '-'} |")
  return lines


def render_markdown(data: dict) -> str:
  suite, machine = data["suite"], data["machine"]
  torch_info = machine.get("torch")
  torch_text = (f"torch {torch_info.get('torch')} on {torch_info.get('device')}"
                f" ({torch_info.get('gpu', 'CPU')}), torchattacks {torch_info.get('torchattacks')}"
                if isinstance(torch_info, dict) else f"torch: {torch_info}")
  lines = [f"# bat_jax device suite{' (smoke)' if suite.get('smoke') else ''}: "
           f"{machine.get('device_kind', '?')}", "",
           f"{suite.get('started', '')}; {suite.get('elapsed_s', 0):.0f} s of a "
           f"{suite.get('budget_s', 0):.0f} s budget; `{suite.get('command', '')}`", "",
           f"jax {machine.get('jax')} / jaxlib {machine.get('jaxlib')} ({machine.get('backend')}, "
           f"{machine.get('devices')}), flax {machine.get('flax')}, optax {machine.get('optax')}, "
           f"Python {machine.get('python')}; {torch_text}; GPU: {machine.get('nvidia_smi')}; "
           f"CPU: {machine.get('cpu')}; commit {machine.get('git_commit')}", ""]
  render = {"train_step": _md_train_step, "autoattack": _md_autoattack, "mnist": _md_mnist}
  for name, part in data["parts"].items():
    try:
      lines += render[name](part)
    except Exception as e:  # pylint: disable=broad-except  (never lose the JSON)
      lines.append(f"## {name}: could not render ({e!r})")
    lines.append("")
    lines.append(f"Status: {part['status']}, started at {part['started_s']} s" +
                 (f"; skipped: {part['skipped']}" if part["skipped"] else "") +
                 (f"; errors: {[e['where'] + ': ' + e['error'] for e in part['errors']]}"
                  if part["errors"] else ""))
    lines.append("")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def apply_smoke_defaults() -> None:
  for name, value in SMOKE.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value


def main(argv):
  global jax, jnp, np
  del argv
  if not FLAGS.out_dir:
    raise app.UsageError("Pass --out_dir=DIR.")
  if FLAGS.smoke:
    apply_smoke_defaults()
  clock = Clock(FLAGS.budget_s)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  shutil.rmtree(FLAGS.work_dir, ignore_errors=True)
  os.makedirs(FLAGS.work_dir)
  if FLAGS.torch_python:  # leave GPU memory to the PyTorch process
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(FLAGS.jax_mem_fraction))
  bench_jax._import_jax()  # pylint: disable=protected-access
  jax, jnp, np = bench_jax.jax, bench_jax.jnp, bench_jax.np
  from bat_jax import util  # pylint: disable=g-import-not-at-top
  util.setup_runtime()
  if FLAGS.smoke:  # toy programs: compile time dominates, as in the tests
    jax.config.update("jax_disable_most_optimizations", True)

  report = Report(FLAGS.out_dir, clock)
  report.data["suite"] = {
      "command": " ".join(sys.argv), "smoke": FLAGS.smoke, "budget_s": FLAGS.budget_s,
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "flags": {name: FLAGS[name].value for name in SUITE_FLAGS}}
  report.data["machine"] = machine_info()
  report.save()
  torch_worker = start_torch(report, "cpu" if jax.default_backend() == "cpu" else "cuda")
  report.save()
  caps = {"train_step": FLAGS.step_cap_s, "autoattack": FLAGS.autoattack_cap_s,
          "mnist": FLAGS.mnist_cap_s or clock.left()}
  runners = {"train_step": lambda d: part_train_step(report, d, torch_worker),
             "autoattack": lambda d: part_autoattack(report, d, torch_worker),
             "mnist": lambda d: part_mnist(report, d)}
  try:
    for name in FLAGS.parts:
      left = clock.left()
      if left <= 0:
        report.part(name)["status"] = "skipped: the budget is spent"
        continue
      deadline = time.time() + min(caps[name], left)
      try:
        runners[name](deadline)
      except Exception as e:  # pylint: disable=broad-except
        part = report.data["parts"].get(name) or report.part(name)
        _error(part, name, e)
        part["status"] = "failed"
      report.save()
  finally:
    if torch_worker is not None:
      torch_worker.close()
    report.data["machine"]["tensorflow_datasets_imported"] = (
        "tensorflow_datasets" in sys.modules)
    report.data["suite"]["finished"] = True
    report.save()
  print(open(os.path.join(FLAGS.out_dir, "results.md")).read(), flush=True)


if __name__ == "__main__":
  app.run(main)
