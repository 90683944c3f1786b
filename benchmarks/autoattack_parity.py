"""bat_jax's AutoAttack beside the authors' (``pyautoattack``) on the same weights.

The JAX model is exported with ``bat_jax.export`` and loaded in PyTorch (the
exported module file; RobustBench's own class where one computes the model
and ``robustbench`` is installed), so both sides attack the same function.
Version 'standard' (APGD-CE, APGD-T, FAB-T, Square), in L-inf and in L2;
per stage the robust accuracy and the wall time, the authors' code with two
seeds (its own spread on these weights) and bat_jax's with one (``--seeds``,
``--jax_seeds``). Two models:

  (a) ``mnist``: a LeNet trained with PGD (``configs/quickstart.py
      --config.method=at``, or ``--mnist_workdir`` of such a run) on the
      first ``--n_mnist`` of the 1,000 bundled real MNIST test digits;
  (b) ``cifar``: a CIFAR-shaped ResNet-18 (``--cifar_width`` stem channels;
      64 is the real one) trained here with PGD for a few hundred steps on
      10-class 32 x 32 images this script makes (smooth class patterns plus
      noise).

  nice -n 10 python benchmarks/autoattack_parity.py --parts=mnist,cifar \\
      --out=benchmarks/results/autoattack_parity.json

A long comparison spreads over cores as one process per norm (``--norms``),
side (``--sides``) or seed set, the CIFAR model trained once
(``--cifar_variables``); ``--table FILE ...`` puts their runs side by side.
``--stages=apgd-ce`` runs the first stage only, cheap enough for the spread
of many seeds on both sides.

Needs torch and ``pyautoattack`` (``pip install pyautoattack==0.2.0``).
Results (JSON: CPU model, versions, settings, per stage accuracy and time,
the examples each run leaves robust; no paths) are rewritten after each run so a long comparison keeps what it
finished. ``--budget=small`` cuts every attack's budget (a smoke run,
tests/test_autoattack_parity.py); the numbers are then not AutoAttack's.
"""

import argparse
import importlib.util
import itertools
import json
import logging as py_logging
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bat_jax import attacks, datasets, export, models, rundir, train  # pylint: disable=g-import-not-at-top
from bat_jax import machine  # pylint: disable=g-import-not-at-top

import torch  # pylint: disable=g-import-not-at-top
import pyautoattack  # pylint: disable=g-import-not-at-top

NORM_NAMES = {"linf": "Linf", "l2": "L2"}  # bat_jax -> pyautoattack
# --budget=small: every attack cut down (bat_jax's setting names -> pyautoattack's).
SMALL_BUDGET = dict(apgd_iters=10, n_target_classes=2, fab_iters=10, square_queries=50)
REPO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# --------------------------------------------------------------------------
# The two sides.
# --------------------------------------------------------------------------


def torch_twin(module, variables, image_shape, directory):
  """The exported PyTorch model (eval mode) and what it is.

  RobustBench's class when one computes the model and robustbench is
  installed (its architecture file loaded by path: the package's __init__
  pulls in timm, torchvision, ...), else the export's own module file.
  """
  paths = export.write_torch_model(module, variables, directory, image_shape)
  architecture = export.robustbench_architecture(module, image_shape)
  spec = importlib.util.find_spec("robustbench")
  if architecture["loadable"] and spec is not None:
    path = os.path.join(spec.submodule_search_locations[0],
                        *architecture["module"].split(".")[1:]) + ".py"
    loader = importlib.util.spec_from_file_location("robustbench_arch", path)
    rb = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(rb)
    args = [getattr(rb, a) if isinstance(a, str) else a for a in architecture["args"]]
    net = getattr(rb, architecture["class"])(*args, **architecture["kwargs"])
    state = export.torch_state_dict(module, variables, image_shape)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                        strict=True)
    if architecture["normalization"]:
      mean = torch.tensor(architecture["normalization"]["mean"]).view(1, -1, 1, 1)
      std = torch.tensor(architecture["normalization"]["std"]).view(1, -1, 1, 1)
      net = torch.nn.Sequential(_Normalize(mean, std), net)
    return net.eval(), f"robustbench {architecture['code']}"
  loader = importlib.util.spec_from_file_location("bat_jax_models_parity", paths["module"])
  mod = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(mod)
  net = mod.load_model(directory)
  return net.eval(), f"bat_jax_models.{net.__class__.__name__} (exported module file)"


class _Normalize(torch.nn.Module):

  def __init__(self, mean, std):
    super().__init__()
    self.mean, self.std = mean, std

  def forward(self, x):
    return (x - self.mean) / self.std


class _StageLog(py_logging.Handler):
  """Collects pyautoattack's 'robust accuracy after X: a% (total time t s)' lines."""

  def __init__(self):
    super().__init__(py_logging.DEBUG)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def run_pyautoattack(net, x, y, *, norm, eps, seed, budget, batch_size,
                     attack_names=attacks.STANDARD_ATTACKS):
  """The authors' AutoAttack 'standard' (the stages ``attack_names``): per stage
  robust accuracy and time."""
  adversary = pyautoattack.AutoAttack(net, norm=NORM_NAMES[norm], eps=eps, seed=seed,
                                      version="standard", device="cpu")
  adversary.attacks_to_run = list(attack_names)  # standard budgets, these stages only
  if budget:
    adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = budget["apgd_iters"]
    adversary.apgd_targeted.n_target_classes = budget["n_target_classes"]
    adversary.fab.n_iter = budget["fab_iters"]
    adversary.fab.n_target_classes = budget["n_target_classes"]
    adversary.square.n_queries = budget["square_queries"]
  log = _StageLog()
  logger = py_logging.getLogger("auto-attack")
  logger.setLevel(py_logging.DEBUG)
  logger.addHandler(log)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(np.asarray(y).astype(np.int64))
  start = time.time()
  try:
    x_adv, _ = adversary.run_standard_evaluation(xt, yt, batch_size=batch_size)
  finally:
    logger.removeHandler(log)
  total = time.time() - start
  with torch.no_grad():
    clean = float((net(xt).argmax(1) == yt).float().mean())
    robust = (net(x_adv).argmax(1) == yt).numpy()
  stages, previous = [], 0.0
  for line in log.lines:
    match = re.match(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)",
                     line)
    if match:
      seconds = float(match[3])
      stages.append({"attack": match[1].lower(), "robust_accuracy": float(match[2]) / 100,
                     "run_seconds": round(seconds - previous, 2)})
      previous = seconds
  delta = (x_adv - xt).reshape(len(xt), -1)
  size = delta.abs().max(1)[0] if norm == "linf" else delta.norm(dim=1)
  return {"side": "pyautoattack", "seed": seed, "clean_accuracy": clean,
          "stages": stages, "autoattack_accuracy": float(robust.mean()),
          "robust_indices": np.flatnonzero(robust).tolist(),
          "total_seconds": round(total, 2), "max_perturbation": float(size.max())}


def run_bat_jax(logits_fn, x, y, *, norm, eps, seed, budget, batch_size,
                attack_names=attacks.STANDARD_ATTACKS):
  """bat_jax's AutoAttack 'standard' (the stages ``attack_names``), stage by
  stage: accuracy, run and compile time."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  key = jax.random.PRNGKey(seed)
  robust = jnp.argmax(logits_fn(x), -1) == y
  clean = float(jnp.mean(robust))
  stages, x_adv = [], x
  for name in attack_names:
    stage = jax.jit(lambda z, yy, r, name=name: attacks.attack_remaining(
        name, logits_fn, z, yy, r, eps=eps, key=key, batch_size=batch_size, norm=norm,
        **(budget or {})))
    start = time.time()
    compiled = stage.lower(x, y, robust).compile()
    compile_seconds = time.time() - start
    start = time.time()
    x_stage, still = jax.block_until_ready(compiled(x, y, robust))
    run_seconds = time.time() - start
    x_adv = jnp.where((robust & ~still)[:, None, None, None], x_stage, x_adv)
    robust = still
    stages.append({"attack": name, "robust_accuracy": float(jnp.mean(robust)),
                   "run_seconds": round(run_seconds, 2),
                   "compile_seconds": round(compile_seconds, 2)})
  delta = np.asarray(x_adv - x).reshape(x.shape[0], -1)
  size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
  final = np.asarray(jnp.argmax(logits_fn(x_adv), -1) == y)
  return {"side": "bat_jax", "seed": seed, "clean_accuracy": clean, "stages": stages,
          "autoattack_accuracy": float(final.mean()),
          "robust_indices": np.flatnonzero(final).tolist(),
          "total_seconds": round(sum(s["run_seconds"] + s["compile_seconds"]
                                     for s in stages), 2),
          "max_perturbation": float(size.max())}


def compare(module, variables, image_shape, x, y, *, norm, eps, seeds, jax_seeds, budget,
            batch_size, sides=("pyautoattack", "bat_jax"),
            stages=attacks.STANDARD_ATTACKS, log=print,
            saved=lambda comparison: None) -> Dict[str, Any]:
  """Both sides on one model and norm; the PyTorch and JAX logits agree first.

  ``saved`` is called with the comparison so far after each run, so a long
  comparison keeps the runs it finished.
  """
  logits_fn = jax.jit(lambda z: module.apply(variables, z, train=False))
  with tempfile.TemporaryDirectory() as directory:
    net, torch_model = torch_twin(module, variables, image_shape, directory)
  with torch.no_grad():
    torch_logits = net(torch.from_numpy(np.asarray(x[:64]).transpose(0, 3, 1, 2).copy()))
  gap = float(np.abs(np.asarray(logits_fn(jnp.asarray(x[:64]))) - torch_logits.numpy()).max())
  comparison = {"norm": norm, "eps": eps, "n": int(len(y)), "torch_model": torch_model,
                "max_logit_gap_torch_vs_jax": gap, "runs": []}
  runs = comparison["runs"]
  for seed in seeds if "pyautoattack" in sides else ():
    runs.append(run_pyautoattack(net, x, y, norm=norm, eps=eps, seed=seed, budget=budget,
                                 batch_size=batch_size, attack_names=stages))
    log(_line(runs[-1], norm))
    saved(comparison)
  for seed in jax_seeds if "bat_jax" in sides else ():
    runs.append(run_bat_jax(logits_fn, x, y, norm=norm, eps=eps, seed=seed,
                            budget=budget, batch_size=batch_size, attack_names=stages))
    log(_line(runs[-1], norm))
    saved(comparison)
  return comparison


def _line(run, norm):
  stages = "  ".join(f"{s['attack']} {s['robust_accuracy']:.2%} ({s['run_seconds']:.0f}s)"
                     for s in run["stages"])
  return f"  {norm:4s} {run['side']:12s} seed {run['seed']}: clean " \
         f"{run['clean_accuracy']:.2%}  {stages}"


# --------------------------------------------------------------------------
# The two models.
# --------------------------------------------------------------------------


def mnist_model(workdir: Optional[str], n: int, log=print):
  """A PGD-trained LeNet (a bat_jax run; trained with the quickstart config when
  ``workdir`` is None) and the first ``n`` bundled test digits."""
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix="parity_mnist_at_")
    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(REPO_ROOT, "configs", "quickstart.py"))
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    config = config_module.get_config()
    config.method = "at"
    log(f"training the MNIST LeNet (AT, {config.num_epochs} epochs) ...")
    train.train_and_evaluate(config, workdir)
  restored = rundir.restore_model(workdir, "last")
  x, y = datasets.load_split("mnist_subset", "test", num_examples=n)
  setting = {"workdir_config": {k: restored.config[k] for k in (
      "method", "model", "dataset", "eps", "attack_steps", "attack_step_size",
      "num_epochs", "num_train_steps", "batch_size", "seed")}, "step": restored.step}
  return (restored.model, restored.variables, (28, 28, 1),
          x.astype(np.float32) / 255, y.astype(np.int32), setting)


def cifar_like_data(n_train, n_test, seed=0):
  """10 classes of 32 x 32 RGB images: a smooth random pattern per class plus noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0.15, 0.85, (10, 4, 4, 3))
  patterns = coarse.repeat(8, 1).repeat(8, 2)

  def draw(count):
    labels = rng.integers(0, 10, count)
    noise = rng.normal(0, 0.25, (count, 8, 8, 3)).repeat(4, 1).repeat(4, 2)
    images = patterns[labels] + noise + rng.normal(0, 0.05, (count, 32, 32, 3))
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int32)

  return draw(n_train), draw(n_test)


def cifar_model(n: int, width: int, steps: int, training: str = "at",
                cache: Optional[str] = None, log=print):
  """A ResNet-18 (``width`` stem channels) trained with Adam on :func:`cifar_like_data`.

  ``training='at'``: on PGD-7 examples (L-inf 8/255, step 2/255, bat_jax's
  PGD on the model in inference mode), so that APGD-CE leaves examples for
  the later stages to attack; ``'clean'``: on the clean images (every example
  falls to APGD-CE at 8/255). ``cache``: a file the trained variables are
  written to, and read from when it exists (one training for several processes).
  """
  if training not in ("at", "clean"):
    raise SystemExit(f"--cifar_training: 'at' or 'clean'; got {training!r}")
  (x_train, y_train), (x_test, y_test) = cifar_like_data(4096, n)
  module = models.create_model("resnet18", 10, width=width)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  if cache and os.path.exists(cache):
    with open(cache, "rb") as f:
      variables = serialization.from_bytes(variables, f.read())
    with open(cache + ".json") as f:
      setting = json.load(f)
    log(f"  cifar-like ResNet-18 read from {os.path.basename(cache)} ({setting['training']})")
    return module, variables, (32, 32, 3), x_test, y_test, setting
  params, stats = variables["params"], variables["batch_stats"]
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  pgd = dict(eps=8 / 255, step_size=2 / 255, num_steps=7)

  @jax.jit
  def step(params, stats, opt_state, xb, yb, key):
    if training == "at":
      logits_fn = lambda z: module.apply({"params": params, "batch_stats": stats}, z,
                                         train=False)
      xb = attacks.pgd(logits_fn, xb, yb, key=key, **pgd)

    def loss_fn(p):
      logits, new = module.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                 mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss

  rng = np.random.default_rng(1)
  start = time.time()
  for i in range(steps):
    idx = rng.integers(0, len(y_train), 64)
    params, stats, opt_state, loss = step(params, stats, opt_state, x_train[idx],
                                          y_train[idx], jax.random.PRNGKey(i))
    if i % 50 == 0 or i == steps - 1:
      log(f"  cifar-like ResNet-18 step {i}/{steps}: loss {float(loss):.3f} "
          f"({time.time() - start:.0f} s)")
  setting = {"width": width, "train_steps": steps, "batch_size": 64,
             "optimizer": "adam 1e-3", "train_examples": 4096,
             "training": ("PGD-7 adversarial training, L-inf 8/255, step 2/255"
                          if training == "at" else "standard (clean) training"),
             "train_seconds": round(time.time() - start, 1)}
  variables = {"params": params, "batch_stats": stats}
  if cache:
    with open(cache, "wb") as f:
      f.write(serialization.to_bytes(variables))
    with open(cache + ".json", "w") as f:
      json.dump(setting, f)
  return module, variables, (32, 32, 3), x_test, y_test, setting


# --------------------------------------------------------------------------


def environment() -> Dict[str, Any]:
  return {"cpu": machine.cpu_description(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "torch": torch.__version__,
          "pyautoattack": pyautoattack.__version__, "torch_threads": torch.get_num_threads(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_1_5_15min": [round(v, 1) for v in os.getloadavg()]}


def merged(files: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
  """The comparisons of several result files, runs of the same (model, norm,
  eps, n) side by side (e.g. each side or seed run as its own process)."""
  tables: Dict[Any, Dict[str, Any]] = {}
  for results in files:
    for part, entry in results["models"].items():
      for comparison in entry["comparisons"]:
        key = (part, comparison["norm"], comparison["eps"], comparison["n"])
        table = tables.setdefault(key, dict(comparison, part=part, runs=[]))
        table["runs"] += comparison["runs"]
  return tables


def markdown(files: List[Dict[str, Any]]) -> str:
  """Per model and norm: each stage's robust accuracy and seconds, side by side."""
  lines = []
  for comparison in merged(files).values():
    runs = sorted(comparison["runs"], key=lambda r: (r["side"] != "pyautoattack", r["seed"]))
    lines += [f"**{comparison['part']}, {NORM_NAMES[comparison['norm']]} eps "
              f"{comparison['eps']:g}, n = {comparison['n']}** (PyTorch side: "
              f"{comparison['torch_model']}; max logit gap "
              f"{comparison['max_logit_gap_torch_vs_jax']:.1e})", "",
              "| stage | " + " | ".join(
                  f"{r['side']} seed {r['seed']}" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    names = ["clean"] + [s["attack"] for s in max(runs, key=lambda r: len(r["stages"]))[
        "stages"]]
    for name in names:
      cells = []
      for run in runs:
        if name == "clean":
          cells.append(f"{run['clean_accuracy']:.1%}")
          continue
        stage = next((s for s in run["stages"] if s["attack"] == name), None)
        if stage is None:
          cells.append("-")
          continue
        seconds = f"{stage['run_seconds']:.0f} s"
        if "compile_seconds" in stage:
          seconds += f" + {stage['compile_seconds']:.0f} s compile"
        cells.append(f"{stage['robust_accuracy']:.1%} ({seconds})")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *example_differences(runs), ""]
  return "\n".join(lines)


def example_differences(runs: List[Dict[str, Any]]) -> List[str]:
  """Which examples each side leaves robust, seed against seed.

  Per bat_jax run, the examples it decides against every authors' run; with
  several seeds a side, how much two seeds disagree within a side and across
  the sides, and a permutation test of the robust counts (the side labels
  shuffled over the runs).
  """
  robust = {side: [set(r["robust_indices"]) for r in runs
                   if r["side"] == side and "robust_indices" in r]
            for side in ("pyautoattack", "bat_jax")}
  theirs, ours = robust["pyautoattack"], robust["bat_jax"]
  if not theirs or not ours:
    return []
  always, ever = set.intersection(*theirs), set.union(*theirs)
  lines = [f"bat_jax seed {r['seed']}: {len(set(r['robust_indices']) - ever)} examples "
           f"robust that every pyautoattack seed broke, "
           f"{len(always - set(r['robust_indices']))} broken that every pyautoattack seed "
           f"left robust ({len(theirs)} pyautoattack seeds)"
           for r in runs if r["side"] == "bat_jax" and "robust_indices" in r]
  if len(theirs) < 2 or len(ours) < 2:
    return lines

  def span(pairs):
    sizes = [len(a ^ b) for a, b in pairs]
    return f"{min(sizes)}-{max(sizes)}"

  for side, sets in robust.items():
    lines.append(f"{side}, {len(sets)} seeds: {len(set.union(*sets))} examples robust "
                 f"at least once, {len(set.intersection(*sets))} always; two seeds "
                 f"disagree on {span(itertools.combinations(sets, 2))}")
  counts = np.array([len(r) for r in theirs + ours])
  observed = abs(counts[len(theirs):].mean() - counts[:len(theirs)].mean())
  shuffled = [abs(np.delete(counts, list(ours_)).mean() - counts[list(ours_)].mean())
              for ours_ in itertools.combinations(range(len(counts)), len(ours))]
  p_value = np.mean(np.array(shuffled) >= observed - 1e-9)
  lines.append(f"a pyautoattack and a bat_jax seed disagree on "
               f"{span(itertools.product(theirs, ours))}; robust counts "
               f"{counts[:len(theirs)].tolist()} vs {counts[len(theirs):].tolist()}, "
               f"permutation test p = {p_value:.2f}")
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="mnist,cifar")
  parser.add_argument("--norms", default="linf,l2")
  parser.add_argument("--n_mnist", type=int, default=1000)
  parser.add_argument("--n_cifar", type=int, default=100)
  parser.add_argument("--mnist_workdir", default=None,
                      help="a bat_jax run of configs/quickstart.py --config.method=at "
                      "(default: train one)")
  parser.add_argument("--mnist_eps", default="0.3,2.0", help="L-inf,L2 radii")
  parser.add_argument("--cifar_eps", default="0.09411764705882353,3.0",
                      help="L-inf,L2 radii (default 24/255, 3.0; at 8/255 and 0.5 "
                      "PGD-20 broke none of the PGD-trained model's first 50 test "
                      "images, leaving the attacks nothing to compare)")
  parser.add_argument("--cifar_width", type=int, default=16,
                      help="stem channels (64: the real ResNet-18, ~16x the cost)")
  parser.add_argument("--cifar_steps", type=int, default=200)
  parser.add_argument("--cifar_training", default="at", choices=["at", "clean"],
                      help="PGD-7 adversarial training (default) or clean training")
  parser.add_argument("--cifar_variables", default=None,
                      help="file for the trained CIFAR model's variables: read when it "
                      "exists, else written after training")
  parser.add_argument("--seeds", default="0,1", help="pyautoattack's seeds")
  parser.add_argument("--sides", default="pyautoattack,bat_jax",
                      help="which codes run (one per process spreads a long comparison "
                      "over cores; --table merges the files)")
  parser.add_argument("--jax_seeds", default="0", help="bat_jax's seeds")
  parser.add_argument("--stages", default=",".join(attacks.STANDARD_ATTACKS),
                      help="the first stages of 'standard' to run (standard budgets), "
                      "e.g. apgd-ce for the spread of many seeds")
  parser.add_argument("--budget", choices=["standard", "small"], default="standard")
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--threads", type=int, default=1,
                      help="CPU threads of each side (torch intra-op; XLA's Eigen pool "
                      "when 1); 0: the libraries' defaults")
  parser.add_argument("--out", default=None)
  parser.add_argument("--table", nargs="*", default=None,
                      help="print the markdown table of these result files and stop")
  args = parser.parse_args(argv)
  if args.table is not None:
    files = []
    for path in args.table:
      with open(path) as f:
        files.append(json.load(f))
    print(markdown(files))
    return None
  if args.threads:
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # before the first JAX computation creates the CPU client
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 " --xla_cpu_multi_thread_eigen=false").strip()
  budget = SMALL_BUDGET if args.budget == "small" else None
  seeds = [int(s) for s in args.seeds.split(",")]
  jax_seeds = [int(s) for s in args.jax_seeds.split(",")]
  stages = tuple(args.stages.split(","))
  if stages != attacks.STANDARD_ATTACKS[:len(stages)]:
    raise SystemExit(f"--stages: the first stages of {attacks.STANDARD_ATTACKS}; "
                     f"got {args.stages!r}")
  norms = args.norms.split(",")
  sides = args.sides.split(",")
  if not sides or set(sides) - {"pyautoattack", "bat_jax"}:
    raise SystemExit(f"--sides: pyautoattack and/or bat_jax; got {args.sides!r}")
  results = {"environment": environment(), "threads": args.threads, "budget": args.budget,
             "budget_settings": budget, "seeds": seeds, "jax_seeds": jax_seeds,
             "stages": stages,
             "batch_size": args.batch_size, "models": {}}

  def save():
    if args.out:
      with open(args.out, "w") as f:
        json.dump(results, f, indent=2)

  for part in args.parts.split(","):
    if part == "mnist":
      module, variables, shape, x, y, setting = mnist_model(args.mnist_workdir,
                                                            args.n_mnist)
      radii = [float(e) for e in args.mnist_eps.split(",")]
    elif part == "cifar":
      module, variables, shape, x, y, setting = cifar_model(
          args.n_cifar, args.cifar_width, args.cifar_steps, args.cifar_training,
          args.cifar_variables)
      radii = [float(e) for e in args.cifar_eps.split(",")]
    else:
      raise SystemExit(f"--parts: mnist and/or cifar; got {part!r}")
    entry = results["models"][part] = {"setting": setting, "comparisons": []}
    for norm in norms:
      eps = radii[0] if norm == "linf" else radii[1]
      print(f"{part} {norm} eps {eps:g}, n {len(y)}", flush=True)

      def saved(comparison, entry=entry):
        if not entry["comparisons"] or entry["comparisons"][-1] is not comparison:
          entry["comparisons"].append(comparison)
        entry["load_average_after"] = [round(v, 1) for v in os.getloadavg()]
        save()

      compare(module, variables, shape, x, y, norm=norm, eps=eps, seeds=seeds,
              jax_seeds=jax_seeds, budget=budget, batch_size=args.batch_size,
              sides=sides, stages=stages, log=lambda line: print(line, flush=True),
              saved=saved)
  return results


if __name__ == "__main__":
  main()
