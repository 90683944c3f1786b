"""Robust evaluation: files, padding, compile-once, aggregation, sanity checks."""

import json
import os
import shutil

from absl import flags
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import attacks, configlib, datasets, errors, evaluate, rundir, train
from bat_jax.evaluation import engine, stages
from bat_jax.evaluation import sanity as sanity_lib
from test_train import tiny_config

EPS = 0.3
STEP = 0.1  # a few PGD steps must reach the eps-ball's boundary
TINY_AA = evaluate.AutoAttackOptions(version="custom", attacks=("apgd-ce",),
                                     settings=dict(apgd_iters=4))


@pytest.fixture(scope="module", autouse=True)
def optimized_xla():
  """conftest turns XLA's optimisations off for fast compiles; unoptimised conv
  gradients make every attack step ~50x slower, so turn them back on here."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny run trained for a few steps (best and last checkpoints both at step 3)."""
  path = str(tmp_path_factory.mktemp("run"))
  jax.config.update("jax_disable_most_optimizations", True)  # compile-bound
  try:
    train.train_and_evaluate(tiny_config(method="standard", learning_rate=3e-3), path)
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  return path


@pytest.fixture(scope="module")
def test_data():
  return datasets.load_split("mnist_subset", "test", num_examples=100)


def _linear_model(images, labels, steps=200):
  """Softmax regression fitted by full-batch gradient descent: a normal model."""
  x = jnp.asarray(images, jnp.float32).reshape(len(images), -1) / 255.0
  params = {"w": jnp.zeros((x.shape[1], 10)), "b": jnp.zeros((10,))}

  def apply(p, z):
    return z.reshape(z.shape[0], -1) @ p["w"] + p["b"]

  @jax.jit
  def fit(p):
    def step(_, p):
      grads = jax.grad(lambda q: jnp.mean(
          -jax.nn.log_softmax(apply(q, x))[jnp.arange(len(x)), labels]))(p)
      return jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, p, grads)
    return jax.lax.fori_loop(0, steps, step, p)

  return apply, fit(params)


@pytest.fixture(scope="module")
def linear_model():
  return _linear_model(*datasets.load_split("mnist_subset", "train",
                                                  num_examples=1000))


@pytest.mark.slow
def test_evaluate_workdir_writes_json_and_markdown(workdir):
  results = evaluate.evaluate_workdir(
      workdir, which=("best", "last"), num_examples=37, batch_size=16,
      pgd_step_size=STEP, protocol=evaluate.Protocol(
          pgd_steps=3, pgd_restarts=2, autoattack=TINY_AA), sanity_examples=16)
  for which in ("best", "last"):
    with open(os.path.join(workdir, "eval", f"{which}_results.json")) as f:
      saved = json.load(f)
    assert saved == results[which]
    for key in ("clean_acc", "fgsm_acc", "pgd_acc", "autoattack_acc",
                "autoattack_per_attack", "eps", "num_examples", "step", "which",
                "run", "sanity", "sanity_warnings", "settings", "protocol"):
      assert key in saved, key
    assert saved["which"] == which and saved["step"] == 3
    assert saved["num_examples"] == 37 and saved["eps"] == EPS
    assert list(saved["autoattack_per_attack"]) == ["clean", "apgd-ce"]
    assert saved["autoattack_per_attack"]["clean"] == pytest.approx(saved["clean_acc"])
    assert saved["autoattack_acc"] == saved["autoattack_per_attack"]["apgd-ce"]
    assert 0 <= saved["autoattack_acc"] <= saved["clean_acc"] <= 1
    assert saved["sanity"]["pgd_eps_sweep"][0] == {
        "eps": 0.0, "step_size": 0.0, "acc": saved["sanity"]["clean_acc"]}
    assert isinstance(saved["sanity_warnings"], list)
  # The best checkpoint is the last one here: evaluated once, recorded twice.
  assert results["last"]["same_as"] == "best"
  table = open(os.path.join(workdir, "eval", "results.md")).read()
  assert "| best | 3 | 37 | L-inf | 0.3 |" in table
  assert "| last (same step as best) | 3 | 37 |" in table
  assert "PGD^3×2" in table and "AutoAttack (custom, custom budgets)" in table


@pytest.mark.slow
def test_best_falls_back_to_last(workdir, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  assert rundir.resolve_checkpoint(copy, "best") == ("best", 3)
  shutil.rmtree(os.path.join(copy, "best"))
  assert rundir.resolve_checkpoint(copy, "best") == ("last", 3)


@pytest.mark.slow
def test_padded_batches_match_unbatched_and_compile_once(linear_model, test_data):
  """37 examples in batches of 16 on 4 devices: each example once, as if unbatched."""
  images, labels = test_data[0][:37], test_data[1][:37]
  apply_fn, params = linear_model
  protocol = evaluate.Protocol(pgd_steps=3, pgd_restarts=2)
  # Each metric compiles once, for every batch, eps, example count and weights below.
  once = {name: chex.assert_max_traces(fn, n=1) for name, fn in protocol.metrics().items()}
  ev = engine.Evaluator(apply_fn, params, batch_size=16, metrics=once,
                        key_fn=protocol.key_fn())
  eps, step = 0.1, 0.04
  pgd = ev.run("pgd", images, labels, eps=eps, step_size=step)["correct"]
  clean = ev.run("clean", images, labels)["correct"]
  fgsm = ev.run("fgsm", images, labels, eps=eps)["correct"]
  assert pgd.shape == clean.shape == fgsm.shape == (37,)

  @jax.jit
  def unbatched(x):
    logits_fn = lambda z: apply_fn(params, z)
    keys = engine.per_example_keys(0, stages.metric_ids()["pgd"], jnp.arange(len(x)))
    x_pgd = attacks.pgd(logits_fn, x, labels, eps=eps, step_size=step, num_steps=3,
                        key=keys, num_restarts=2)
    x_fgsm = attacks.fgsm(logits_fn, x, labels, eps)
    return [jnp.argmax(logits_fn(z), -1) == labels for z in (x, x_fgsm, x_pgd)]

  expected = unbatched(jnp.asarray(images, jnp.float32) / 255.0)
  assert 0 < np.sum(pgd) < np.sum(clean) < 37  # a non-trivial case
  # Batches of 16 and one of 37 are different programs that may round
  # differently: an example at a decision tie may flip (at most one here).
  for got, want in zip((clean, fgsm, pgd), expected):
    assert np.sum(got != np.asarray(want)) <= 1

  # Other eps, other examples, other variables: no new compilation.
  ev.run("pgd", images[:5], labels[:5], eps=0.1, step_size=0.05)
  ev.set_variables(jax.tree_util.tree_map(lambda a: a * 1.01, params))
  ev.run("pgd", images, labels, eps=eps, step_size=step)


# --------------------------------------------------------------------------
# Sanity checks.
# --------------------------------------------------------------------------


def test_no_warnings_on_a_normal_model(linear_model, test_data):
  apply_fn, params = linear_model
  images, labels = test_data
  results = evaluate.evaluate(
      apply_fn, params, images, labels, eps=0.05, pgd_step_size=0.01,
      protocol=evaluate.Protocol(attacks=("clean", "fgsm", "pgd"), pgd_steps=10,
                                 pgd_restarts=2),
      batch_size=48, sanity_examples=40)
  assert results["clean_acc"] > 0.7
  assert results["sanity"]["num_examples"] == 40  # exactly, whatever the batch size
  assert results["sanity"]["large_eps_pgd_acc"] == 0.0
  assert results["sanity"]["zero_grad_fraction"] == 0.0
  assert results["sanity_warnings"] == []


def test_warnings_on_a_model_that_ignores_its_input(test_data):
  images, labels = test_data
  constant = lambda v, x: jnp.broadcast_to(v["b"], (x.shape[0], 10))
  results = evaluate.evaluate(
      constant, {"b": jnp.arange(10.0)}, images, labels, eps=EPS,
      pgd_step_size=STEP, protocol=evaluate.Protocol(attacks=("clean", "pgd"),
                                                     pgd_steps=2, pgd_restarts=1),
      batch_size=32, sanity_examples=32)
  assert results["sanity"]["zero_grad_fraction"] == 1.0
  warnings = " ".join(results["sanity_warnings"])
  assert "all-zero input gradient" in warnings
  assert "PGD at eps=1 leaves accuracy" in warnings
  assert results["fgsm_acc"] is None and results["autoattack_acc"] is None


def test_sanity_warnings_rules():
  good = {"clean_acc": 0.9, "large_eps": 1.0, "large_eps_pgd_acc": 0.0,
          "zero_grad_fraction": 0.0,
          "pgd_eps_sweep": [{"eps": 0.0, "acc": 0.9}, {"eps": 0.15, "acc": 0.7},
                            {"eps": 0.3, "acc": 0.5}, {"eps": 0.6, "acc": 0.1}]}
  accs = {"clean_acc": 0.9, "fgsm_acc": 0.6, "pgd_acc": 0.5, "autoattack_acc": 0.45}
  assert sanity_lib.sanity_warnings(good, accs) == []
  # Within the tolerance is fine.
  assert sanity_lib.sanity_warnings(good, dict(accs, autoattack_acc=0.505)) == []

  def fires(sanity=None, accuracies=None):
    found = sanity_lib.sanity_warnings(dict(good, **(sanity or {})),
                                     dict(accs, **(accuracies or {})))
    assert len(found) == 1, found
    return found[0]

  bad_sweep = [dict(p) for p in good["pgd_eps_sweep"]]
  at_zero_wrong = [dict(bad_sweep[0], acc=0.8)] + bad_sweep[1:]
  assert "eps=0" in fires({"pgd_eps_sweep": at_zero_wrong})
  bad_sweep[3]["acc"] = 0.6
  assert "increases with eps" in fires({"pgd_eps_sweep": bad_sweep})
  assert "AutoAttack accuracy 0.5500 exceeds PGD" in fires(
      accuracies={"autoattack_acc": 0.55})
  assert "PGD accuracy 0.7000 exceeds FGSM" in fires(accuracies={"pgd_acc": 0.7,
                                                                 "autoattack_acc": 0.6})
  # Attacks that were not run are skipped: AutoAttack is compared with FGSM.
  assert "exceeds FGSM" in fires(accuracies={"pgd_acc": None, "autoattack_acc": 0.7})
  assert "eps=1 leaves accuracy 0.1000" in fires({"large_eps_pgd_acc": 0.1})
  assert "50.0% of examples" in fires({"zero_grad_fraction": 0.5})


# --------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------


def _fake_run(root, name, method, dataset, eps, seed, which="last", **accs):
  path = os.path.join(root, name)
  os.makedirs(os.path.join(path, "eval"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"method": method, "dataset": dataset, "eps": eps, "seed": seed,
               "beta": 5.0}, f)
  results = {"clean_acc": None, "fgsm_acc": None, "pgd_acc": None,
             "autoattack_acc": None, "eps": eps, "which": which,
             "sanity_warnings": [], **accs}
  with open(os.path.join(path, "eval", f"{which}_results.json"), "w") as f:
    json.dump(results, f)
  return path


def test_aggregate_mean_std_over_seeds(tmp_path):
  root = str(tmp_path)
  runs = [_fake_run(root, f"bat{s}", "bat", "mnist", 0.3, s, clean_acc=c, pgd_acc=p,
                    autoattack_acc=a)
          for s, (c, p, a) in enumerate([(0.99, 0.90, 0.88), (0.98, 0.92, 0.89),
                                         (0.97, 0.94, 0.90)])]
  runs += [_fake_run(root, f"at{s}", "at", "mnist", 0.3, s, clean_acc=c, pgd_acc=0.9,
                     autoattack_acc=0.85) for s, c in enumerate([0.95, 0.97])]
  runs.append(_fake_run(root, "c10", "trades", "cifar10", 8 / 255, 0, clean_acc=0.85,
                        fgsm_acc=0.6, pgd_acc=0.5, autoattack_acc=0.48))
  runs.append(os.path.join(root, "missing"))
  table = evaluate.aggregate(runs, which="last")
  lines = table.splitlines()
  header = lines.index("| Method | Clean | FGSM | PGD^50 | AutoAttack | runs |")
  assert lines[header + 2:header + 7] == [
      "| **CIFAR10 (L-inf ε=8/255)** | | | | | |",
      "| TRADES | 85.00 | 60.00 | 50.00 | 48.00 | 1 |",
      "| **MNIST (L-inf ε=0.3)** | | | | | |",
      "| AT | 96.00±1.41 | – | 90.00±0.00 | 85.00±0.00 | 2 |",
      "| BAT | 98.00±1.00 | – | 92.00±2.00 | 89.00±1.00 | 3 |"]
  assert "missing (last)" in table  # listed as skipped


def test_aggregate_cli_and_es_rows(tmp_path):
  root = str(tmp_path)
  runs = []
  for s in range(2):
    path = _fake_run(root, f"r{s}", "bat", "mnist", 0.45, s, which="last",
                     clean_acc=0.9, pgd_acc=0.5 + 0.1 * s)
    with open(os.path.join(path, "eval", "best_results.json"), "w") as f:
      json.dump({"clean_acc": 0.8, "pgd_acc": 0.7, "eps": 0.45, "which": "best",
                 "sanity_warnings": ["something"]}, f)
    runs.append(path)
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  out = str(tmp_path / "table.md")
  fv(["prog", "--aggregate", f"--workdirs={','.join(runs)}", "--which=last,best",
      f"--out={out}"])
  text = evaluate.run_from_flags(fv)
  assert open(out).read() == text
  assert "| BAT | 90.00±0.00 | 55.00±7.07 | 2 |" in text
  assert "| (ES) | 80.00±0.00 | 70.00±0.00 | 2 |" in text
  assert text.index("| BAT |") < text.index("| (ES) |")  # final model first
  assert "sanity-check warnings" in text
  # A run that kept no best checkpoint has no (ES) row, only its final one.
  for path in runs:
    with open(os.path.join(path, "eval", "best_results.json"), "w") as f:
      json.dump({"clean_acc": 0.9, "eps": 0.45, "which": "best", "checkpoint": "last"}, f)
  table = evaluate.aggregate(runs, which=("best", "last"))
  assert "(ES)" not in table and "| BAT |" in table
  assert "no early-stopped checkpoint" in table


@pytest.mark.slow
def test_cli_evaluates_a_workdir(workdir, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  fv(["prog", f"--workdir={copy}", "--which=last", "--num_examples=10",
      "--attacks=clean", "--sanity_examples=0", "--eps=8/255"])
  text = evaluate.run_from_flags(fv)
  with open(os.path.join(copy, "eval", "last_results.json")) as f:
    saved = json.load(f)
  assert saved["num_examples"] == 10 and saved["eps"] == pytest.approx(8 / 255)
  assert saved["pgd_acc"] is None and saved["sanity"] == {}
  assert "| last | 3 | 10 | L-inf | 0.03137 |" in text and "- last: not run" in text


def test_an_unwritable_eval_folder_is_refused_before_evaluating(workdir, tmp_path,
                                                               monkeypatch):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
  with open(os.path.join(copy, "eval"), "w") as f:
    f.write("")
  monkeypatch.setattr(rundir, "restore_model", lambda *a: pytest.fail("restored"))
  with pytest.raises(errors.OutputError, match=r"the evaluation folder \(WORKDIR/eval\) "
                     rf"cannot be used: cannot write {copy}/eval"):
    evaluate.evaluate_workdir(copy, which="last", num_examples=4)


def test_default_pgd_step_follows_the_threat_model():
  config = configlib.base_config()
  config.eps, config.eval_attack_step_size, config.norm = 0.3, 0.0375, "linf"
  linf, l2 = evaluate.Protocol(norm="Linf"), evaluate.Protocol(norm="l2")
  assert evaluate.default_pgd_step_size(config, 0.3, linf) == 0.0375  # the run's own
  assert evaluate.default_pgd_step_size(config, 0.15, linf) == pytest.approx(0.01875)
  assert evaluate.default_pgd_step_size(config, 2.0, l2) == pytest.approx(0.25)
  assert evaluate.default_pgd_step_size(config, 0.3, l2) == pytest.approx(0.0375)
  config.eps = 0.0
  assert evaluate.default_pgd_step_size(config, 0.3, linf) == pytest.approx(2.5 * 0.3 / 50)
