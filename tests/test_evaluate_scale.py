"""Evaluation at scale: every device and host, resumable progress, models from a file,
the protocol record and the progress bar."""

import dataclasses
import glob
import io
import json
import logging
import os
import pathlib

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bat_jax
from bat_jax import attacks, datasets, evaluate, parallel
from bat_jax.errors import UserError
from bat_jax.evaluation import engine, external, progress_bar, report, resume, suite
from bat_jax.evaluation import stages as stages_lib
from test_evaluate import _linear_model
from test_multihost import run_process_pair

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("multihost_eval_worker.py")
EPS, STEP = 0.1, 0.04  # as in multihost_eval_worker.py
TINY = evaluate.Protocol(
    pgd_steps=3, pgd_restarts=2, autoattack=evaluate.AutoAttackOptions(
        version="custom", attacks=("apgd-ce", "apgd-t"),
        settings=dict(apgd_iters=3, n_target_classes=2)))
STAGES = {"clean", "fgsm", "pgd", "autoattack.apgd-ce", "autoattack.apgd-t"}


@pytest.fixture(scope="module")
def linear():
  return _linear_model(*datasets.load_split("mnist_subset", "train", num_examples=1000))


@pytest.fixture(scope="module")
def data():
  return datasets.load_split("mnist_subset", "test", num_examples=40)


def _single_device(apply_fn, params, images, labels, batch_size=8):
  par = parallel.Pmap(devices=jax.local_devices()[:1])
  evaluator = suite.make_evaluator(apply_fn, params, TINY, batch_size=batch_size, par=par)
  return suite.run_evaluation(evaluator, images, labels, eps=EPS, pgd_step_size=STEP,
                              protocol=TINY, sanity_examples=8, show_progress=False)


def _load_json(path):
  with open(path) as f:
    return json.load(f)


def _without_run(results):
  return {k: v for k, v in results.items() if k != "run"}


@pytest.mark.slow
def test_four_devices_match_one_device_and_the_whole_autoattack(linear, data):
  """Per-example keys: another device count and batch size flip at most a tie."""
  apply_fn, params = linear
  images, labels = data
  one = _single_device(apply_fn, params, images, labels)
  four_ev = suite.make_evaluator(apply_fn, params, TINY, batch_size=12)
  assert len(four_ev.par.devices) == 4
  four = suite.run_evaluation(four_ev, images, labels, eps=EPS, pgd_step_size=STEP,
                              protocol=TINY, sanity_examples=8, show_progress=False)
  flips = report.count_flips(four.per_example, one.per_example)
  assert set(flips) == STAGES and all(n <= 1 for n in flips.values()), flips
  assert four.results["protocol"]["devices"]["count"] == 4
  assert one.results["protocol"]["devices"]["count"] == 1

  # Attack by attack on the examples still robust = AutoAttack on the whole batch.
  @jax.jit
  def whole(x):
    keys = engine.per_example_keys(0, stages_lib.metric_ids()["autoattack"],
                                   jnp.arange(len(x)))
    return attacks.autoattack_robust_flags(
        lambda z: apply_fn(params, z), x, labels, eps=EPS, key=keys, version="custom",
        attacks=("apgd-ce", "apgd-t"), apgd_iters=3, n_target_classes=2)[1]

  expected = whole(jnp.asarray(images, jnp.float32) / 255.0)
  for name in ("clean", "apgd-ce", "apgd-t"):
    got = one.per_example["clean" if name == "clean" else f"autoattack.{name}"]
    assert np.sum(got != np.asarray(expected[name])) <= 1, name
  per_attack = one.results["autoattack_per_attack"]
  assert 0 < per_attack["apgd-t"] <= per_attack["apgd-ce"] < per_attack["clean"]
  # Later attacks ran only on the examples still robust.
  stages = one.results["run"]["stages"]
  assert stages["autoattack.apgd-t"]["examples"] == np.sum(
      one.per_example["autoattack.apgd-ce"])


@pytest.mark.slow
def test_interrupted_evaluation_resumes_to_the_same_results(linear, data, tmp_path,
                                                            caplog):
  apply_fn, params = linear
  images, labels = data
  kwargs = dict(eps=EPS, pgd_step_size=STEP, protocol=TINY, batch_size=8,
                sanity_examples=8)
  whole_dir, cut_dir = str(tmp_path / "whole"), str(tmp_path / "cut")
  evaluate.evaluate_model((apply_fn, params), images, labels, out_dir=whole_dir, **kwargs)
  with pytest.raises(evaluate.EvaluationInterrupted, match="rerun"):
    evaluate.evaluate_model((apply_fn, params), images, labels, out_dir=cut_dir,
                            max_chunks_this_run=7, **kwargs)  # clean: 5, FGSM: 2 of 5
  assert not os.path.exists(os.path.join(cut_dir, "model_results.json"))
  evaluate.evaluate_model((apply_fn, params), images, labels, out_dir=cut_dir, **kwargs)

  whole = _load_json(os.path.join(whole_dir, "model_results.json"))
  resumed = _load_json(os.path.join(cut_dir, "model_results.json"))
  assert _without_run(resumed) == _without_run(whole)  # same process, same shapes
  stages = resumed["run"]["stages"]
  assert stages["clean"] == dict(stages["clean"], loaded=40, computed=0)
  assert stages["fgsm"] == dict(stages["fgsm"], loaded=16, computed=24)
  assert stages["pgd"]["loaded"] == 0 and whole["run"]["stages"]["fgsm"]["loaded"] == 0
  with np.load(os.path.join(whole_dir, "model_per_example.npz")) as a, \
       np.load(os.path.join(cut_dir, "model_per_example.npz")) as b:
    assert set(a.files) == STAGES | {"index"}
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])

  # Another budget never mixes with saved progress: a new record, the change named.
  caplog.set_level(logging.INFO)
  other = dataclasses.replace(TINY, attacks=("clean",), pgd_steps=4)
  changed = evaluate.evaluate_model((apply_fn, params), images, labels, out_dir=cut_dir,
                                    **dict(kwargs, protocol=other))
  assert len(os.listdir(os.path.join(cut_dir, "progress"))) == 2
  assert changed["run"]["stages"]["clean"]["loaded"] == 0
  assert "pgd.steps: 3 -> 4" in caplog.text

  # SIGTERM's handler asks to stop: the batch in flight is saved, then it stops.
  resume.request_stop("by SIGTERM")
  with pytest.raises(evaluate.EvaluationInterrupted, match="stopped by SIGTERM"):
    evaluate.evaluate_model((apply_fn, params), images, labels,
                            out_dir=str(tmp_path / "term"), **kwargs)
  assert len(glob.glob(str(tmp_path / "term" / "progress" / "*" / "clean" / "*"))) == 1


MLP_FILE = '''
"""A plain-JAX MLP (no Flax), weights from an .npz checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np


def apply(params, x):
  hidden = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def make_model(checkpoint):
  with np.load(checkpoint) as f:
    return apply, {k: jnp.asarray(f[k]) for k in f.files}


def make_logits_fn(checkpoint):
  apply_fn, params = make_model(checkpoint)
  return lambda x: apply_fn(params, x)
'''


def test_model_from_a_file_on_the_command_line(linear, data, tmp_path, monkeypatch):
  apply_fn, params = linear
  images, labels = data
  model_file = tmp_path / "user_mlp.py"
  model_file.write_text(MLP_FILE)
  checkpoint = str(tmp_path / "mlp.npz")
  np.savez(checkpoint, w1=np.asarray(params["w"]), b1=np.asarray(params["b"]) + 20.0,
           w2=np.eye(10, dtype=np.float32), b2=np.zeros(10, np.float32))
  data_file = str(tmp_path / "digits.npz")
  np.savez(data_file, test_image=images[:24], test_label=labels[:24])
  out_dir = str(tmp_path / "out")
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  fv(["prog", f"--model={model_file}:make_model", f"--checkpoint={checkpoint}",
      f"--data={data_file}", "--eps=8/255", f"--out_dir={out_dir}", "--pgd_steps=2",
      "--pgd_restarts=1", "--autoattack_version=custom", "--autoattack_attacks=apgd-ce",
      "--autoattack_settings=apgd_iters=2", "--sanity_examples=8", "--batch_size=8"])
  text = evaluate.run_from_flags(fv)

  saved = _load_json(os.path.join(out_dir, "model_results.json"))
  assert saved["num_examples"] == 24 and saved["eps"] == pytest.approx(8 / 255)
  assert saved["clean_acc"] > 0.7  # the MLP is the fitted linear model
  assert saved["model"] == f"{model_file}:make_model"
  assert saved["model_record"]["checkpoint_sha256"]
  protocol = saved["protocol"]
  assert protocol["norm"] == "linf" and protocol["eps_255"] == "8/255"
  assert protocol["examples"] == dict(protocol["examples"], count=24, range=[0, 24],
                                      split="test", dataset="digits.npz")
  assert protocol["seed"] == 0 and protocol["budgets"]["pgd"] == {
      "loss": "ce", "start": "uniform", "steps": 2, "restarts": 1,
      "step_size": pytest.approx(2.5 * (8 / 255) / 2)}
  assert protocol["budgets"]["autoattack"]["apgd_iters"] == 2
  assert protocol["budgets"]["autoattack"]["square_queries"] == 5000
  assert protocol["autoattack"]["attacks"] == ["apgd-ce"]
  assert not protocol["autoattack"]["standard"]
  assert protocol["bat_jax_version"] == bat_jax.__version__
  assert protocol["jax_version"] == jax.__version__
  assert protocol["devices"] == dict(protocol["devices"], count=4, processes=1)
  assert protocol["sanity"]["examples"] == 8
  assert protocol["sanity"]["outcome"] in ("passed", "1 warning(s)", "2 warning(s)")
  assert "Protocol (model):" in text and "eps 0.0313725 = 8/255" in text
  assert "test[0:24] (24 examples)" in text

  # The same function as module:function, returning a plain logits_fn.
  monkeypatch.syspath_prepend(str(tmp_path))
  logits_fn, variables, model = external.load_model("user_mlp:make_logits_fn",
                                                    checkpoint)
  x = jnp.asarray(images[:3], jnp.float32) / 255.0
  np.testing.assert_allclose(logits_fn(variables, x), apply_fn(params, x) + 20.0,
                             rtol=1e-5, atol=1e-4)
  assert variables == {} and model["spec"] == "user_mlp:make_logits_fn"
  with pytest.raises(UserError, match="has no function 'nope'.*make_model"):
    external.load_model("user_mlp:nope")
  with pytest.raises(UserError, match="no Python file"):
    external.load_model(str(tmp_path / "missing.py") + ":make_model")
  with pytest.raises(UserError, match="needs --eps"):
    fv.eps = ""
    evaluate.run_from_flags(fv)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(linear, data, tmp_path):
  """2 processes x 2 devices: stop, resume, same flags on both, as one device's."""
  apply_fn, params = linear
  images, labels = data
  inputs, out_dir = str(tmp_path / "in.npz"), str(tmp_path / "out")
  np.savez(inputs, images=images, labels=labels, w=np.asarray(params["w"]),
           b=np.asarray(params["b"]))
  env = dict(os.environ)
  # This checkout's bat_jax, not the one an editable install points at.
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + (
      [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  run_process_pair(WORKER, lambda i: [inputs, out_dir, str(tmp_path / f"out{i}.npz")], env)
  a, b = np.load(tmp_path / "out0.npz"), np.load(tmp_path / "out1.npz")
  for key in STAGES | {"index"}:
    np.testing.assert_array_equal(a[key], b[key])
  assert str(a["results"]) == str(b["results"])
  loaded = json.loads(str(a["resumed_loaded"]))
  computed = json.loads(str(a["resumed_computed"]))
  assert loaded["clean"] == 24 and computed["clean"] == 16  # 3 of 5 batches saved
  assert not any(json.loads(str(a["final_computed"])).values())  # all loaded
  results = json.loads(str(a["results"]))
  assert results["protocol"]["devices"] == dict(results["protocol"]["devices"],
                                                count=4, processes=2, local=2)
  # Process 0 wrote the result files, from the same flags.
  saved = _load_json(os.path.join(out_dir, "model_results.json"))
  assert [saved[f"{k}_acc"] for k in ("clean", "fgsm", "pgd", "autoattack")] == \
      json.loads(str(a["final_acc"]))
  with np.load(os.path.join(out_dir, "model_per_example.npz")) as written:
    for key in STAGES:
      np.testing.assert_array_equal(written[key], a[key])
  # One process, one device: the same flags up to a tie.
  one = _single_device(apply_fn, params, images, labels)
  flips = report.count_flips(dict(a), one.per_example)
  assert set(flips) == STAGES and all(n <= 1 for n in flips.values()), flips


def test_progress_bar_on_a_terminal_and_in_logs(monkeypatch):
  now = [0.0]
  clock = lambda: now[0]
  stream = io.StringIO()
  bar = progress_bar.ProgressBar("pgd", 100, done=20, stream=stream, tty=True,
                                 clock=clock)
  now[0] = 10.0
  bar.update(40)
  assert stream.getvalue() == "\rpgd: 60/100 (60%), 4.0 examples/s, ETA 10s"
  now[0] = 20.0
  bar.update(40)
  bar.close()
  # Spaces clear the rest of the longer line before.
  assert stream.getvalue().endswith("\rpgd: 100/100 (100%), 4.0 examples/s, 20s  \n")

  logged = []
  monkeypatch.setattr(progress_bar.logging, "info",
                      lambda fmt, *args: logged.append(fmt % args))
  now[0] = 0.0
  bar = progress_bar.ProgressBar("autoattack.apgd-t", 10, tty=False, every_s=60,
                                 clock=clock, stream=io.StringIO())
  now[0] = 30.0
  bar.update(2)
  assert not logged  # not a minute yet
  now[0] = 61.0
  bar.update(2)
  assert logged == ["autoattack.apgd-t: 4/10 (40%), 0.1 examples/s, ETA 1m32s"]
  now[0] = 70.0
  bar.update(6)
  bar.close()  # the final state, once
  assert logged[1:] == ["autoattack.apgd-t: 10/10 (100%), 0.1 examples/s, 1m10s"]
  assert progress_bar.format_seconds(7300) == "2h01m"
