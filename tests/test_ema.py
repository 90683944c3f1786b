"""Weight averaging (config.ema_decay): the recursion, exact resume, restoring it."""

import json

import jax
import numpy as np
import pytest

from bat_jax import (configlib, datasets, errors, evaluate, export, rundir, train,
                     train_state, train_step)
from test_train import global_batch, one_device_pmap, tiny_config

DECAY = 0.2  # small enough that the warm-up, then the decay, set the first steps


def numpy_ema_decay(decay, step):
  return min(decay, (1.0 + step) / (10.0 + step))


def test_ema_follows_the_recursion_computed_in_numpy():
  """ema_{t+1} = d_t ema_t + (1 - d_t) w_{t+1}, d_t = min(decay, (1+t)/(10+t)),
  ema_0 = w_0, for the parameters and the BatchNorm statistics."""
  config = tiny_config(method="trades", ema_decay=DECAY)
  images, labels = datasets.load_split("mnist_subset", "train", num_examples=64)
  setup = train_state.setup(config, images.shape[1:], steps_per_epoch=4, total_steps=4)
  assert setup.state.ema is not None and setup.state.ema["batch_stats"]
  par = one_device_pmap()
  step_fn = par.compile(train_step.make_train_step(config, setup.model, setup.tx,
                                                   setup.schedule))
  expected = jax.device_get(setup.state.inference_variables())
  state = par.put_state(setup.state)
  for t in range(3):
    x, y = global_batch(images, labels, t, config.batch_size)
    state, metrics = step_fn(state, par.put_batch({"image": x[None], "label": y[None]}))
    host = jax.device_get(par.get_state(state))
    d = numpy_ema_decay(DECAY, t)
    np.testing.assert_allclose(float(par.get_output(metrics)["train/ema_decay"]), d,
                               rtol=1e-6)
    expected = jax.tree_util.tree_map(
        lambda e, w, d=d: np.float32(d) * np.asarray(e) + np.float32(1 - d) * np.asarray(w),
        expected, host.inference_variables())
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert len(leaves) == len(jax.tree_util.tree_leaves(host.ema))
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(host.ema)):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7,
                                 err_msg=jax.tree_util.keystr(path))
  # The average differs from the weights it follows.
  assert not np.allclose(jax.tree_util.tree_leaves(host.ema["params"])[0],
                         jax.tree_util.tree_leaves(host.params)[0])


def test_ema_is_off_by_default_and_keeps_no_state():
  state = train_state.abstract_state(tiny_config())
  assert configlib.base_config().ema_decay == 0.0 and state.ema is None


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_bad_ema_decay_names_the_field(value):
  with pytest.raises(configlib.ConfigError, match=r"config\.ema_decay.*\[0, 1\)"):
    configlib.validate(tiny_config(ema_decay=value))


@pytest.mark.slow
def test_resume_is_exact_with_ema_and_evaluation_reads_it(tmp_path):
  config = tiny_config(method="bat", ema_decay=0.9, num_train_steps=4,
                       checkpoint_every_steps=2, eval_every_epochs=100)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["weights"] == "ema"
  train.train_and_evaluate(config, str(tmp_path / "resumed"), max_steps_this_run=2)
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["steps"] == 4 and full["final_state"].ema is not None
  for a, b in zip(jax.tree_util.tree_leaves(full["final_state"]),
                  jax.tree_util.tree_leaves(resumed["final_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["pgd_acc"] == full["pgd_acc"]
  # The periodic evaluation says it read the weight average.
  records = [json.loads(line) for line in
             (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [r["eval/ema_weights"] for r in records if "eval/pgd_acc" in r] == [1.0]

  workdir = str(tmp_path / "full")
  ema = rundir.restore_model(workdir, "ema")
  last = rundir.restore_model(workdir, "last")
  assert (ema.weights, ema.checkpoint, ema.step) == ("ema", "ema", 4)
  assert last.weights == "raw"
  for a, b in zip(jax.tree_util.tree_leaves(ema.variables),
                  jax.tree_util.tree_leaves(full["final_state"].ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  results = evaluate.evaluate_workdir(
      workdir, which=("last", "ema"), num_examples=16, batch_size=16,
      protocol=evaluate.Protocol(attacks=("clean", "pgd"), pgd_steps=2, pgd_restarts=1),
      sanity_examples=0, resume=False)
  assert results["ema"]["weights"] == "ema" and results["last"]["weights"] == "raw"
  assert results["ema"]["step"] == results["last"]["step"] == 4
  assert "same_as" not in results["ema"]  # same step, other weights: evaluated
  table = (tmp_path / "full" / "eval" / "results.md").read_text()
  assert "| ema | 4 |" in table and "| last | 4 |" in table


def test_tables_say_which_weights_they_report(tmp_path):
  """The mean +- std table marks the rows of weight averages: (EMA), (ES, EMA)."""
  def run(name, seed):
    path = tmp_path / name
    (path / "eval").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(
        {"method": "bat", "dataset": "mnist", "eps": 0.3, "seed": seed, "ema_decay": 0.99}))
    for which, weights, pgd in (("last", "raw", 0.5), ("best", "ema", 0.6),
                                ("ema", "ema", 0.7)):
      (path / "eval" / f"{which}_results.json").write_text(json.dumps(
          {"clean_acc": 0.9, "pgd_acc": pgd, "eps": 0.3, "which": which,
           "checkpoint": which, "weights": weights, "sanity_warnings": []}))
    return str(path)

  runs = [run(f"bat{s}", s) for s in range(2)]
  lines = evaluate.aggregate(runs, which=("ema", "best", "last")).splitlines()
  rows = [line for line in lines if line.startswith("| BAT") or line.startswith("| (")]
  assert rows == ["| BAT | 90.00±0.00 | 50.00±0.00 | 2 |",
                  "| (ES, EMA) | 90.00±0.00 | 60.00±0.00 | 2 |",
                  "| (EMA) | 90.00±0.00 | 70.00±0.00 | 2 |"]
  only_ema = evaluate.aggregate(runs, which="ema")
  assert "| BAT (EMA) | 90.00±0.00 | 70.00±0.00 | 2 |" in only_ema
  summary = evaluate.results_markdown(runs[0])
  assert "| best (EMA weights) |" in summary and "| ema |" in summary


def test_which_ema_is_refused_for_a_run_without_it(tmp_path):
  workdir = str(tmp_path / "run")
  rundir.prepare(workdir)
  rundir.write_config(workdir, tiny_config())
  for call in (lambda: rundir.restore_model(workdir, "ema"),
               lambda: evaluate.evaluate_workdir(workdir, which="ema")):
    with pytest.raises(errors.UserError, match="ema_decay is 0.*'last' or 'best'"):
      call()


def test_export_reads_only_results_of_the_same_weights(tmp_path):
  (tmp_path / "eval").mkdir()
  raw = {"which": "last", "checkpoint": "last", "weights": "raw", "step": 4}
  (tmp_path / "eval" / "last_results.json").write_text(json.dumps(raw))
  assert export.evaluation_of(str(tmp_path), "last", 4) == raw
  assert export.evaluation_of(str(tmp_path), "ema", 4, "ema") is None
  ema = dict(raw, which="ema", checkpoint="ema", weights="ema")
  (tmp_path / "eval" / "ema_results.json").write_text(json.dumps(ema))
  assert export.evaluation_of(str(tmp_path), "ema", 4, "ema") == ema
