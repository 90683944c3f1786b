"""Data and model outputs checked before any attack; NaN under attack counted; outputs
that cannot be written (a full disk, an unwritable folder) end in one message."""

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import checkpointing, datasets, errors, evaluate, fs, rundir, train
from bat_jax.evaluation import engine, resume, sanity
from test_train import tiny_config

EPS = 0.3
TINY_AA = evaluate.AutoAttackOptions(version="custom", attacks=("apgd-ce",),
                                     settings=dict(apgd_iters=3))


@pytest.fixture
def optimized_xla():
  """Attack steps run ~50x slower unoptimised (see test_evaluate); training tests
  keep conftest's fast compiles."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def data():
  return datasets.load_split("mnist_subset", "test", num_examples=16)


def linear(classes=10):
  """A fixed random linear model over MNIST pixels: ``(apply_fn, params)``."""
  w = jax.random.normal(jax.random.PRNGKey(0), (784, classes)) * 0.05
  return (lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]), {"w": w}


def off_the_pixel_grid(x):
  """[B]: whether an input holds a value that is no uint8 pixel (a perturbed input)."""
  scaled = x.reshape(x.shape[0], -1) * 255
  return jnp.any(jnp.abs(scaled - jnp.round(scaled)) > 1e-3, axis=1)


def nan_off_the_grid(p, x):
  """Finite on clean images, NaN on (almost) every perturbed one; finite gradients."""
  logits = linear()[0](p, x)
  return jnp.where(off_the_pixel_grid(x)[:, None], jnp.nan, logits)


def _no_attacks(monkeypatch):
  """Makes any stage of an evaluation fail the test (the check must come first)."""
  def refuse(*args, **kwargs):
    raise AssertionError("an attack stage ran before the model was refused")
  monkeypatch.setattr(resume.StageRunner, "run", refuse)


# --------------------------------------------------------------------------
# Labels in range, wherever they enter.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 10])
def test_labels_out_of_range_are_refused_in_evaluation(data, monkeypatch, bad):
  images, labels = data
  labels = labels.copy()
  labels[[3, 7]] = bad
  _no_attacks(monkeypatch)
  apply_fn, params = linear()
  with pytest.raises(errors.UserError, match=r"the labels passed in: 2 of 16 labels are "
                     rf"out of range \(#3: {bad}, #7: {bad}\)"):
    evaluate.evaluate(apply_fn, params, images, labels, eps=EPS, pgd_step_size=0.1,
                      num_classes=10 if bad == 10 else None)
  if bad == 10:  # past the first batch (of 4), against the model's 10 logits
    late = np.where(np.arange(16) >= 12, bad, data[1])
    with pytest.raises(errors.UserError, match=r"the labels passed in \(the model gives "
                       r"10 logits per example\): 4 of 16 labels .* \(#12: 10, #13"):
      evaluate.evaluate(apply_fn, params, images, late, eps=EPS, pgd_step_size=0.1,
                        batch_size=4)
  with pytest.raises(errors.UserError, match=r"the labels of mnist \(test\): 2 of 16 .*"
                     r"labels must be \[0, 9\] \(10 classes\)"):
    evaluate.evaluate_model((apply_fn, params), images, labels, eps=EPS,
                            dataset="mnist")


def test_labels_out_of_range_are_refused_in_training(data, tmp_path):
  images, labels = data
  train_labels = np.arange(len(labels)) % 10
  train_labels[5] = 10
  path = str(tmp_path / "data.npz")
  np.savez(path, train_image=images, train_label=train_labels, test_image=images,
           test_label=labels)
  config = tiny_config(data_file=path, num_train_examples=-1)
  with pytest.raises(datasets.DataFileError, match=r"data\.npz: 'train_label': 1 of 16 "
                     r"labels are out of range \(#5: 10\); labels must be \[0, 9\]"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not checkpointing.has_checkpoint(str(tmp_path / "run"))


def test_labels_from_a_data_file_without_a_dataset(data, tmp_path):
  images, labels = data
  path = str(tmp_path / "mine.npz")
  np.savez(path, test_image=images, test_label=np.where(labels == 0, -1, labels))
  with pytest.raises(datasets.DataFileError, match=r"mine\.npz: 'test_label': \d+ of 16 "
                     r"labels are out of range.*non-negative class indices"):
    datasets.load_npz_split(path, "test")


# --------------------------------------------------------------------------
# The model's first batch: class count, finite logits.
# --------------------------------------------------------------------------


def test_a_model_with_another_class_count_is_refused_before_any_attack(
    data, monkeypatch, tmp_path):
  images, labels = data
  _no_attacks(monkeypatch)
  apply_fn, params = linear(classes=100)
  with pytest.raises(errors.UserError, match=r"the model wide\.py:make returns 100 "
                     r"logits per example, but the data set has 10 classes"):
    evaluate.evaluate_model((apply_fn, params), images, labels, eps=EPS,
                            dataset="mnist_subset", out_dir=str(tmp_path / "out"),
                            model_record={"spec": "wide.py:make"})
  with pytest.raises(errors.UserError, match="returns 100 logits per example, but the "
                     "data set has 10 classes"):  # arrays from Python, classes given
    evaluate.evaluate(apply_fn, params, images, labels, eps=EPS, pgd_step_size=0.1,
                      num_classes=10)
  assert not os.path.exists(tmp_path / "out" / "model_results.json")


def test_nan_logits_on_the_first_batch_are_refused_naming_the_model(data, monkeypatch):
  images, labels = data
  _no_attacks(monkeypatch)
  apply_fn, params = linear()
  images = images.copy()
  images[5, 0, 0, 0] = 255  # marks example 5 (MNIST's corners are black)
  nan_at_5 = lambda p, x: jnp.where(x[:, :1, 0, 0] == 1, jnp.nan, apply_fn(p, x))
  with pytest.raises(errors.UserError, match=r"the model nan\.py:make returns non-finite "
                     r"logits \(NaN or inf\) on 1 of the first 16 clean examples "
                     r"\(examples #5\); nothing was attacked"):
    evaluate.evaluate_model((nan_at_5, params), images, labels, eps=EPS,
                            model_record={"spec": "nan.py:make"})
  with pytest.raises(errors.UserError, match=r"the model nan\.py:make returns "
                     r"non-finite logits .* 2 of the first 2"):
    evaluate.evaluate_model((lambda p, x: apply_fn(p, x) * jnp.nan, params), images,
                            labels, eps=EPS, model_record={"spec": "nan.py:make"})


def test_check_logits_rules():
  labels = np.array([0, 1, 2])
  engine.check_logits(np.zeros((3, 10)), labels, model="m", num_classes=10)
  with pytest.raises(errors.UserError, match=r"m must return logits \[B, num_classes\]"):
    engine.check_logits(np.zeros((3,)), labels, model="m")
  with pytest.raises(errors.UserError, match="the model gives 2 logits per example"):
    engine.check_logits(np.zeros((3, 2)), labels, model="m")
  with pytest.raises(errors.UserError, match=r"examples #12"):
    engine.check_logits(np.array([[0.0] * 10, [0.0] * 10, [np.inf] * 10]), labels,
                        model="m", indices=np.array([10, 11, 12]))


# --------------------------------------------------------------------------
# Non-finite values under attack: counted per stage, never robust.
# --------------------------------------------------------------------------


def test_non_finite_values_under_attack_are_counted_per_stage(data, tmp_path,
                                                             optimized_xla):
  images, labels = data
  kwargs = dict(eps=EPS, pgd_step_size=0.1, batch_size=8, dataset="mnist_subset",
                out_dir=str(tmp_path / "out"), sanity_examples=8,
                model_record={"spec": "grid.py:make"},
                protocol=evaluate.Protocol(pgd_steps=3, pgd_restarts=2,
                                           autoattack=TINY_AA))
  results = evaluate.evaluate_model((nan_off_the_grid, linear()[1]), images, labels,
                                    **kwargs)
  counts = results["non_finite_examples"]
  assert counts["clean"] == 0
  clean_right = round(results["clean_acc"] * 16)
  assert counts["fgsm"] == 16 and counts["pgd"] == 16  # every attacked input is NaN
  assert counts["autoattack.apgd-ce"] == clean_right  # the still-robust ones attacked
  assert results["fgsm_acc"] == results["pgd_acc"] == results["autoattack_acc"] == 0
  assert counts["sanity.pgd_eps0"] == 0  # PGD at eps 0 stays on the pixel grid
  warnings = results["sanity_warnings"]
  assert warnings[0].startswith("non-finite values") and "fgsm: 16" in warnings[0]
  assert not any("gradient masking (" in w or "mask its gradients" in w for w in warnings)
  with open(tmp_path / "out" / "model_results.json") as f:
    assert json.load(f)["non_finite_examples"] == counts
  with np.load(tmp_path / "out" / "model_per_example.npz") as flags:
    assert flags["pgd.non_finite"].all() and "clean.non_finite" not in flags.files
  with open(tmp_path / "out" / "results.md") as f:
    text = f.read()
  assert "Non-finite values" in text and "- model: fgsm 16, pgd 16" in text

  again = evaluate.evaluate_model((nan_off_the_grid, linear()[1]), images, labels,
                                  **kwargs)  # resumed from the saved progress
  assert again["non_finite_examples"] == counts
  assert all(s["computed"] == 0 for s in again["run"]["stages"].values())


def test_sanity_warnings_blame_non_finite_values_not_masking():
  measured = {"zero_grad_fraction": 0.5, "large_eps_pgd_acc": 0.5, "large_eps": 1.0}
  masking = sanity.sanity_warnings(measured, {})
  assert any("gradient masking" in w for w in masking)
  blamed = sanity.sanity_warnings(measured, {}, non_finite={"pgd": 3})
  assert len(blamed) == len(masking)
  assert all("non-finite values above" in w for w in blamed)
  assert sanity.non_finite_warnings({"clean": 0, "pgd": 0}) == []


# --------------------------------------------------------------------------
# Outputs that cannot be written.
# --------------------------------------------------------------------------


def test_writes_that_fail_name_the_path_and_leave_nothing_partial(tmp_path, monkeypatch):
  target = tmp_path / "out" / "a.json"

  def full(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(fs.os, "replace", full)
  with pytest.raises(errors.OutputError, match=rf"cannot write {target}: no space left "
                     r"on the device \(the disk is full\)\."):
    fs.write_json(target, {"a": 1})
  assert os.listdir(tmp_path / "out") == []  # the temporary file is gone
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(errors.OutputError, match=r"the export folder cannot be used: "
                     rf"cannot write {blocker}/sub: a part of the path is a file"):
    fs.check_writable(blocker / "sub", "export folder")
  with pytest.raises(errors.OutputError, match="a file of that name is in the way"):
    fs.check_writable(blocker, "export folder")


def test_a_write_check_removes_only_the_folders_it_may(tmp_path):
  """A refused command leaves no folder behind; a workdir that every host of a
  run checks at once is kept, so it never vanishes under another host's try."""
  fs.check_writable(tmp_path / "a" / "b", "export folder")
  assert os.listdir(tmp_path) == []
  fs.check_writable(tmp_path / "run", "workdir", keep=True)
  assert os.listdir(tmp_path) == ["run"] and os.listdir(tmp_path / "run") == []


def _full_disk(monkeypatch):
  """Every orbax save fails as tensorstore reports a full disk; returns the steps tried."""
  saves = []

  def full_disk(manager, step, *args, **kwargs):
    saves.append(step)
    raise ValueError(f"RESOURCE_EXHAUSTED: Error writing {manager.directory}/{step}: "
                     "No space left on device [os_error_code='28']")

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save", full_disk)
  return saves


def test_a_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch):
  ckpts = checkpointing.Checkpoints(str(tmp_path))
  state = {"w": np.arange(4.0)}
  ckpts.save("last", 1, state, {"best_step": -1})
  _full_disk(monkeypatch)
  with pytest.raises(errors.OutputError, match=rf"^cannot write checkpoint {tmp_path}/"
                     r"checkpoints/2: no space left on the device \(the disk is full\); "
                     r"that step was not saved"):
    ckpts.save("last", 2, {"w": np.ones(4)}, {"best_step": -1})
  monkeypatch.undo()
  restored, _ = ckpts.restore("last", state)
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  ckpts.close()
  assert "step 1" in checkpointing.intact_note(str(tmp_path))


@pytest.mark.slow
def test_a_full_disk_while_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=1, early_stopping=False)
  train.train_and_evaluate(config, workdir)
  saves = _full_disk(monkeypatch)
  longer = tiny_config(num_train_steps=4, checkpoint_every_steps=1, early_stopping=False)
  with pytest.raises(errors.OutputError) as raised:
    train.train_and_evaluate(longer, workdir)
  message = str(raised.value)
  assert message.startswith(f"cannot write checkpoint {workdir}/checkpoints/3: no space "
                            "left on the device (the disk is full)")
  assert f"The last checkpoint, step 2 ({workdir}/checkpoints/2), is intact" in message
  assert saves == [3] and "\n" not in message
  monkeypatch.undo()
  assert rundir.restore_model(workdir, "last").step == 2


def test_a_full_disk_during_evaluation_keeps_every_finished_batch(data, tmp_path,
                                                                  monkeypatch):
  images, labels = data
  apply_fn, params = linear()
  out_dir = str(tmp_path / "out")
  kwargs = dict(eps=EPS, pgd_step_size=0.1, batch_size=8, out_dir=out_dir,
                sanity_examples=0, protocol=evaluate.Protocol(attacks=("clean", "pgd"),
                                                              pgd_steps=2,
                                                              pgd_restarts=1))
  real_replace = os.replace

  def full_for_results(src, dst):
    if dst.endswith("_results.json"):
      raise OSError(errno.ENOSPC, "No space left on device")
    real_replace(src, dst)

  monkeypatch.setattr(fs.os, "replace", full_for_results)
  with pytest.raises(errors.OutputError, match=rf"cannot write {out_dir}/model_results"
                     r"\.json: no space left .* Every finished batch is saved in "
                     rf"{out_dir}/progress/\w+; .* rerun the same command to continue"):
    evaluate.evaluate_model((apply_fn, params), images, labels, **kwargs)
  monkeypatch.undo()
  results = evaluate.evaluate_model((apply_fn, params), images, labels, **kwargs)
  assert all(s["computed"] == 0 for s in results["run"]["stages"].values())


def test_unwritable_output_folders_are_refused_up_front(data, tmp_path, monkeypatch):
  images, labels = data
  blocker = tmp_path / "file"
  blocker.write_text("")
  _no_attacks(monkeypatch)
  with pytest.raises(errors.OutputError, match=r"the --out_dir cannot be used: cannot "
                     rf"write {blocker}/out"):
    evaluate.evaluate_model(linear(), images, labels, eps=EPS,
                            out_dir=str(blocker / "out"))
  with pytest.raises(errors.OutputError, match="the workdir cannot be used"):
    rundir.prepare(str(blocker / "run"))
