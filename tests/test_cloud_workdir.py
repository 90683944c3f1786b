"""Workdirs in Cloud Storage: every file through one path abstraction, tested
on a stand-in gs:// filesystem (tests/standin_gcs.py), no network."""

import json
import time

import numpy as np
import pytest

from bat_jax import analysis, errors, evaluate, fs, plots, rundir, train
from test_train import tiny_config


def test_files_round_trip_through_the_stand_in(standin_gcs):
  fs.write_text("gs://bucket/a/b.txt", "hello")
  fs.append_text("gs://bucket/a/b.txt", " world")
  assert fs.read_text("gs://bucket/a/b.txt") == "hello world"
  assert (standin_gcs / "bucket" / "a" / "b.txt").read_text() == "hello world"
  fs.save_npz("gs://bucket/a/x.npz", x=np.arange(3))
  with fs.load_npz("gs://bucket/a/x.npz") as data:
    np.testing.assert_array_equal(data["x"], np.arange(3))
  assert fs.glob("gs://bucket/a", "*.txt") == ["gs://bucket/a/b.txt"]
  assert fs.is_dir("gs://bucket/a") and not fs.exists("gs://bucket/nothing")


def test_remote_lock_heartbeat_and_stale_takeover(standin_gcs):
  path = "gs://bucket/run/.lock"
  with fs.WorkdirLock(path, heartbeat_s=0.05, stale_s=0.5):
    first = json.loads(fs.read_text(path))["heartbeat"]
    time.sleep(0.3)
    assert json.loads(fs.read_text(path))["heartbeat"] > first  # it beats
    with pytest.raises(fs.LockHeld, match="pid"):
      with fs.WorkdirLock(path, stale_s=0.5):
        pass
  assert not fs.exists(path)  # released
  # A holder that died (no heartbeat for stale_s) is taken over.
  fs.write_json(path, {"owner": "pid 1 on host gone", "token": "x",
                       "heartbeat": time.time() - 10})
  with fs.WorkdirLock(path, stale_s=5):
    assert json.loads(fs.read_text(path))["owner"] != "pid 1 on host gone"


@pytest.mark.slow
def test_training_evaluation_analysis_figures_in_cloud_storage(standin_gcs, tmp_path):
  workdir = "gs://bucket/runs/bat"
  config = tiny_config(method="bat", num_train_steps=4, checkpoint_every_steps=2,
                       num_train_examples=64, eval_every_epochs=1)
  summary = train.train_and_evaluate(config, workdir)
  assert summary["steps"] == 4
  run = standin_gcs / "bucket" / "runs" / "bat"
  assert (run / "config.json").exists() and (run / "metrics.jsonl").exists()
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
  # Resume guard and lock work there too.
  with pytest.raises(errors.WorkdirError, match="method: 'bat' -> 'at'"):
    train.train_and_evaluate(tiny_config(method="at", num_train_steps=4), workdir)
  assert rundir.restore_model(workdir, "last").step == 4
  results = evaluate.evaluate_workdir(
      workdir, which="last", num_examples=16, batch_size=16, sanity_examples=0,
      protocol=evaluate.Protocol(attacks=("clean", "pgd"), pgd_steps=2, pgd_restarts=1))
  assert 0 <= results["last"]["pgd_acc"] <= results["last"]["clean_acc"]
  assert (run / "eval" / "last_results.json").exists() and (run / "eval" / "results.md").exists()
  analysis.analyse_workdir(workdir, which="last", num_examples=16, num_steps=2,
                           batch_size=16)
  assert (run / "analysis" / "last_measures.npz").exists()
  paths = plots.make_all_figures([workdir], "gs://bucket/figures", which="last")
  assert paths and all(p.startswith("gs://bucket/figures/fig") for p in paths)
  assert all((standin_gcs / p[len("gs://"):]).read_bytes()[:4] == b"\x89PNG" for p in paths)
  assert "| BAT |" in evaluate.aggregate([workdir], which="last")
