"""Unattended runs lose nothing: the workdir guard, NaN-safe and damaged checkpoints,
evaluation after the checkpoint, preemption on a checkpoint step, idempotent logs,
and bad input refused up front with a message naming the field."""

import glob
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bat_jax import checkpointing, configlib, errors, rundir, train, watch
from test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def small(**overrides):
  """A tiny run: 4 steps of AT, checkpoints every 2, evaluation every 2."""
  base = dict(method="at", num_train_steps=4, checkpoint_every_steps=2,
              num_train_examples=32, eval_every_epochs=1, num_eval_examples=16,
              early_stopping=False)
  return tiny_config(**{**base, **overrides})


def leaves_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One uninterrupted run of :func:`small` (the reference for resumed runs)."""
  workdir = tmp_path_factory.mktemp("finished")
  summary = train.train_and_evaluate(small(), str(workdir))
  return workdir, summary


# --------------------------------------------------------------------------
# One run per workdir.
# --------------------------------------------------------------------------


def test_other_config_is_refused_before_anything_is_written(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  stored = (workdir / "config.json").read_text()
  other = small(method="trades", learning_rate=0.01, num_train_steps=6)
  with pytest.raises(errors.WorkdirError) as info:
    train.train_and_evaluate(other, str(workdir))
  message = str(info.value)
  assert "method: 'at' -> 'trades'" in message
  assert "learning_rate: 0.001 -> 0.01" in message
  assert "num_train_steps" not in message  # a longer run is not a conflict
  assert (workdir / "config.json").read_text() == stored


@pytest.mark.slow
def test_harmless_changes_and_a_longer_run_resume(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  longer = small(num_train_steps=6, eval_batch_size=8, log_every_steps=2,
                 num_eval_examples=8)
  summary = train.train_and_evaluate(longer, str(workdir))
  assert summary["steps"] == 6
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 6


def test_length_shaped_schedules_and_shorter_runs_are_refused(finished, tmp_path):
  stored = json.loads((finished[0] / "config.json").read_text())
  onecycle = dict(stored, schedule="onecycle")
  conflicts = rundir.resume_conflicts(onecycle, small(schedule="onecycle",
                                                      num_train_steps=8))
  assert len(conflicts) == 1 and "num_train_steps" in conflicts[0]
  with pytest.raises(errors.WorkdirError, match="at step 4"):
    rundir.check_length(small(num_train_steps=3), total_steps=3, restored_step=4)


@pytest.mark.slow
def test_allowed_change_continues_and_is_recorded(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  lower = small(learning_rate=1e-4, num_train_steps=5)
  summary = train.train_and_evaluate(lower, str(workdir),
                                     allow_config_changes=["learning_rate"])
  assert summary["steps"] == 5
  record = json.loads((workdir / rundir.CHANGES_FILE).read_text())
  assert record["changes"] == ["learning_rate: 0.001 -> 0.0001"]


@pytest.mark.slow
def test_two_trainers_never_share_a_workdir(tmp_path):
  with rundir.workdir_lock(str(tmp_path)):
    with pytest.raises(errors.WorkdirError, match="in use by pid"):
      train.train_and_evaluate(small(), str(tmp_path))
  assert not (tmp_path / "config.json").exists()
  # Released on exit: the next trainer may take it.
  with rundir.workdir_lock(str(tmp_path)):
    pass


def test_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(errors.WorkdirError, match="existing file"):
    train.train_and_evaluate(small(), str(path))


# --------------------------------------------------------------------------
# Non-finite states are never saved, never resumed.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_saves_nothing_non_finite(tmp_path):
  # Adam with lr 1e30 overflows the parameters within a few steps; a
  # checkpoint every step and no log until the end would once have saved it.
  config = small(learning_rate=1e30, num_train_steps=6, checkpoint_every_steps=1,
                 log_every_steps=100, eval_every_epochs=100)
  with pytest.raises(errors.DivergenceError) as info:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert "non-finite at step" in message and "learning_rate" in message
  ckpts = checkpointing.Checkpoints(str(tmp_path), create=False)
  steps = ckpts._managers["last"].all_steps()  # pylint: disable=protected-access
  ckpts.close()
  first_bad = int(message.split("non-finite at step ")[1].split(" ")[0])
  assert all(step < first_bad for step in steps)
  if steps:
    assert f"step {max(steps)}, was checked finite" in message
    restored = rundir.restore_model(str(tmp_path), "last")
    assert not checkpointing.non_finite_leaves(restored.variables)


def test_non_finite_checkpoint_is_refused(tmp_path):
  ckpts = checkpointing.Checkpoints(str(tmp_path))
  state = {"w": np.ones((3,), np.float32)}
  with pytest.raises(errors.DivergenceError, match=r"\['w'\]"):
    ckpts.save("last", 1, {"w": np.array([1.0, np.nan, 0.0], np.float32)}, {})
  assert ckpts.latest_step() is None
  ckpts.save("last", 1, state, {})
  # A checkpoint written by an older version, without the check:
  manager = ckpts._managers["last"]  # pylint: disable=protected-access
  manager.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.array([np.inf, 0, 0], np.float32)}),
      meta=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  with pytest.raises(errors.CheckpointError, match=r"checkpoints/2 holds non-finite"):
    ckpts.restore("last", state)
  ckpts.close()


def test_exploding_loss_warns(caplog):
  class Host:
    get_output = staticmethod(lambda tree: tree)

  step_metrics = watch.StepMetrics(Host())
  config = small()
  for step, loss in ((1, 2.3), (2, 8e31)):
    step_metrics.add(step, {"train/loss": np.float32(loss), "train/finite": np.float32(1)})
    with caplog.at_level(logging.WARNING):
      step_metrics.take_average(None, config)
  assert "probably diverging" in caplog.text
  step_metrics.add(3, {"train/loss": np.float32(np.nan), "train/finite": np.float32(0)})
  with pytest.raises(errors.DivergenceError, match="no checkpoint was written yet"):
    step_metrics.fetch(None, config)


# --------------------------------------------------------------------------
# Damaged checkpoints: fall back to the older one, or one clear message.
# --------------------------------------------------------------------------


def _truncate_data(step_dir):
  biggest = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
                key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(10)


def _remove_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _empty_meta(step_dir):
  open(os.path.join(step_dir, "meta", "metadata"), "w").close()


@pytest.mark.parametrize("damage", [_truncate_data, _remove_metadata, _empty_meta])
def test_damaged_checkpoint_falls_back_then_fails_clearly(finished, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  damage(str(workdir / "checkpoints" / "4"))
  assert rundir.restore_model(str(workdir), "last").step == 2
  damage(str(workdir / "checkpoints" / "2"))
  with pytest.raises(errors.CheckpointError) as info:
    rundir.restore_model(str(workdir), "last")
  message = str(info.value)
  assert "checkpoints/4" in message and "checkpoints/2" in message
  assert "Move the damaged step directories away" in message
  assert len(message.splitlines()) <= 5


# --------------------------------------------------------------------------
# Checkpoint before evaluation; preemption on a checkpoint step; logs once.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_step_is_checkpointed_before_its_evaluation(finished, tmp_path, monkeypatch):
  workdir = tmp_path / "run"

  def broken_eval(*args, **kwargs):
    raise RuntimeError("evaluation crashed")

  with monkeypatch.context() as patch:
    patch.setattr(train.PeriodicEvaluation, "accuracies", broken_eval)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
      train.train_and_evaluate(small(), str(workdir))
  assert (workdir / "checkpoints" / "2").exists()  # saved before the crash
  resumed = train.train_and_evaluate(small(), str(workdir))
  reference = finished[1]
  leaves_equal(resumed["final_state"], reference["final_state"])
  assert resumed["pgd_acc"] == reference["pgd_acc"]
  records = rundir.read_metrics(str(workdir))
  evals = [r["step"] for r in records if "eval/pgd_acc" in r]
  assert evals == [2, 4]  # step 2 evaluated on resume, once


@pytest.mark.slow
def test_stop_on_a_checkpoint_step_saves_once_and_resumes(finished, tmp_path,
                                                          monkeypatch):
  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    patch.setattr(watch.Preemption, "requested",
                  lambda self, step: step == 2)
    stopped = train.train_and_evaluate(small(), str(workdir))
  assert stopped["stopped"] and stopped["steps"] == 2 and stopped["clean_acc"] is None
  resumed = train.train_and_evaluate(small(), str(workdir))
  assert resumed["stopped"] is None
  leaves_equal(resumed["final_state"], finished[1]["final_state"])
  records = rundir.read_metrics(str(workdir))
  assert [r["step"] for r in records if "eval/pgd_acc" in r] == [2, 4]


@pytest.mark.slow
def test_records_after_the_checkpoint_are_logged_once(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  # As if killed after logging step 4 but before writing its checkpoint.
  shutil.rmtree(workdir / "checkpoints" / "4")
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "train/lo')  # a line cut off by the kill
  train.train_and_evaluate(small(), str(workdir))
  records = rundir.read_metrics(str(workdir))
  reference = rundir.read_metrics(str(finished[0]))
  strip = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rs]
  assert strip(records) == strip(reference)


# --------------------------------------------------------------------------
# Bad input is refused before training, naming the field.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("num_eval_examples", 0, "-1 (the whole split) or a positive count"),
    ("momentum", 1.0, "config.momentum"),
    ("momentum", -0.1, "config.momentum"),
    ("learning_rate", float("nan"), "config.learning_rate=nan is invalid: must be a finite"),
    ("beta", float("nan"), "config.beta"),
    ("lr_decay_epochs", (30, 60), "fall inside the run's 50 epochs"),
    ("lr_decay_factor", -0.1, "config.lr_decay_factor"),
    ("eval_attack_step_size", 0.0, "config.eval_attack_step_size"),
    ("eval_attack_step_size", -0.01, "config.eval_attack_step_size"),
    ("eval_attack_steps", -5, "config.eval_attack_steps"),
    ("early_stopping_attack_steps", -1, "config.early_stopping_attack_steps"),
    ("extra_data_path", "/nowhere/extra.npz", "existing .npz"),
])
def test_bad_values_are_refused_up_front(field, value, message):
  config = tiny_config(num_train_steps=-1, num_epochs=50, schedule="step",
                       early_stopping=True)
  config[field] = value
  with pytest.raises(configlib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    configlib.validate(config)


def test_decay_after_the_last_step_is_refused():
  with pytest.raises(configlib.ConfigError, match="never happen"):
    configlib.check_schedule_fits(tiny_config(schedule="step", lr_decay_epochs=(5,)),
                                  steps_per_epoch=10, total_steps=30)


def test_unknown_field_suggests_the_right_one():
  assert "did you mean 'eps'?" in configlib.unknown_field_message("epsilon")
  assert "did you mean 'learning_rate'" in configlib.unknown_field_message("learning_rat")


def test_cifar_eps_argument():
  from bat_jax.util import _with_fractions  # pylint: disable=g-import-not-at-top
  args = lambda text: configlib.parse_arg(text)
  assert configlib.eps_from_arg(args("eps=8"), 8, "c") == pytest.approx(8 / 255)
  assert configlib.eps_from_arg(args("eps=8/255"), 8, "c") == pytest.approx(8 / 255)
  with pytest.raises(configlib.ConfigError, match="eps=8 or eps=8/255"):
    configlib.eps_from_arg(args("eps=0.031"), 8, "configs/cifar10.py")
  assert _with_fractions(["--config.eps=8/255", "--workdir=a/b"]) == [
      f"--config.eps={8 / 255!r}", "--workdir=a/b"]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", None])
def test_bad_extra_data_is_refused_before_training(tmp_path, content):
  path = tmp_path / "extra.npz"
  if content is None:  # wrong image shape for MNIST
    np.savez(path, image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, np.int64))
  else:
    path.write_bytes(content)
  config = small(extra_data_path=str(path), extra_fraction=0.5)
  with pytest.raises(errors.UserError, match="extra.npz"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def _run_module(*args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_command_line_errors_are_short_and_exit_2(tmp_path):
  cases = [
      (["bat_jax.main", "--config=configs/quickstart.py", "--config.epsilon=0.3",
        f"--workdir={tmp_path}/a"], "unknown config field 'epsilon'; did you mean 'eps'?"),
      (["bat_jax.main", "--config=configs/cifar10.py:eps=0.031",
        f"--workdir={tmp_path}/b"], "eps=8 or eps=8/255"),
      (["bat_jax.main", "--config=configs/quickstart.py", "--config.momentum=1.5",
        f"--workdir={tmp_path}/c"], "config.momentum=1.5 is invalid"),
      (["bat_jax.evaluate", f"--workdir={tmp_path}", "--num_examples=0"],
       "--num_examples=0"),
      (["bat_jax.evaluate", f"--workdir={tmp_path}", "--eps=abc"],
       "--eps='abc' is not a number"),
      (["bat_jax.evaluate", f"--workdir={tmp_path}", "--pgd_step_size=-0.1"],
       "must be > 0"),
  ]
  for args, expected in cases:
    result = _run_module(*args)
    assert result.returncode == errors.EXIT_USER_ERROR, (args, result.stderr[-2000:])
    assert expected in result.stderr, (args, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
  assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_time_slice_exits_with_the_resume_code(tmp_path):
  result = _run_module("bat_jax.main", "--config=configs/quickstart.py",
                       "--config.num_train_examples=256", "--config.batch_size=32",
                       "--config.attack_steps=1", "--config.num_train_steps=3",
                       "--max_steps_this_run=1", f"--workdir={tmp_path}")
  assert result.returncode == errors.EXIT_PREEMPTED, result.stderr[-3000:]
  assert "rerun the same command to resume" in result.stdout
  assert (tmp_path / "checkpoints" / "1").exists()
