"""Local .npz data files (``config.data_file``): export, load, errors, training."""

import json

import numpy as np
import pytest

from bat_jax import configlib, datasets as ip, train
from bat_jax.data import export_npz


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _good_arrays(n_train=8, n_test=4, shape=(28, 28, 1)):
  rng = np.random.default_rng(0)
  return dict(
      train_image=rng.integers(0, 256, (n_train,) + shape, np.uint8),
      train_label=rng.integers(0, 10, n_train).astype(np.int64),
      test_image=rng.integers(0, 256, (n_test,) + shape, np.uint8),
      test_label=rng.integers(0, 10, n_test).astype(np.int64))


def test_export_round_trip_of_tfds_mnist(mnist_tfds, tmp_path):
  data_dir, _ = mnist_tfds
  out = export_npz.export_npz("mnist", data_dir, str(tmp_path / "m.npz"),
                              num_train=300, num_test=150)
  for split, n in (("train", 300), ("test", 150)):
    want_x, want_y = ip.load_split("mnist", split, data_dir=data_dir,
                                   num_examples=n)
    got_x, got_y = ip.load_split("mnist", split, data_file=str(out))
    assert got_x.dtype == np.uint8 and got_y.dtype == np.int32
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_array_equal(got_y, want_y)
  # num_examples applies to data files too; no TFDS directory is needed.
  x, y = ip.load_split("mnist", "test", data_file=str(out), num_examples=7,
                       data_dir="/nowhere")
  assert x.shape == (7, 28, 28, 1) and y.shape == (7,)


def test_bundled_subset_and_a_data_file_share_one_reader(tmp_path):
  path = _write(tmp_path / "copy.npz", **dict(np.load(ip.MNIST_SUBSET_PATH)))
  for split in ("train", "test"):
    np.testing.assert_array_equal(
        ip.load_split("mnist", split, data_file=path)[0],
        ip.load_split("mnist_subset", split)[0])


@pytest.mark.parametrize("change,message", [
    (dict(drop="test_label"), r"bad\.npz has no split 'test'.*'test_label'"),
    (dict(train_image=np.zeros((8, 28, 28, 1), np.float32)),
     r"bad\.npz: 'train_image' must be uint8"),
    (dict(train_image=np.zeros((8, 28, 28), np.uint8)),
     r"bad\.npz: 'train_image' must be uint8 \[N, H, W, C\]"),
    (dict(train_image=np.zeros((8, 32, 32, 3), np.uint8)),
     r"bad\.npz: 'train_image' images are \(32, 32, 3\), but the dataset "
     r"expects \(28, 28, 1\)"),
    (dict(train_label=np.full(8, 10)),
     r"bad\.npz: 'train_label': 8 of 8 labels are out of range \(#0: 10, .*"
     r"and 3 more\); labels must be \[0, 9\] \(10 classes\)"),
    (dict(train_label=np.array([0, 1, -1, 2, 3, 4, 5, 6])),
     r"'train_label': 1 of 8 labels are out of range \(#2: -1\)"),
    (dict(train_label=np.zeros(8, np.float32)),
     r"'train_label' must be an integer \[N\]"),
    (dict(train_label=np.zeros(5, np.int32)), r"8 images .* but 5 labels"),
])
def test_bad_data_files_are_named_with_what_was_expected(tmp_path, change, message):
  arrays = _good_arrays()
  arrays.pop(change.pop("drop", None), None)
  arrays.update(change)
  path = _write(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=message):
    for split in ("train", "test"):
      ip.load_split("mnist", split, data_file=path)


def test_unreadable_and_missing_data_files(tmp_path):
  pickled = _write(tmp_path / "pickled.npz", **dict(
      _good_arrays(), train_image=np.array([None], dtype=object)))
  with pytest.raises(ValueError, match=r"pickled\.npz stores pickled objects"):
    ip.load_split("mnist", "train", data_file=pickled)
  (tmp_path / "text.npz").write_text("not numpy")
  with pytest.raises(ValueError, match=r"text\.npz as an \.npz"):
    ip.load_split("mnist", "train", data_file=str(tmp_path / "text.npz"))
  with pytest.raises(ip.DatasetNotFoundError, match=r"absent\.npz does not exist"):
    ip.load_split("mnist", "train", data_file=str(tmp_path / "absent.npz"))
  config = configlib.base_config()
  config.data_file = str(tmp_path / "absent.npz")
  with pytest.raises(configlib.ConfigError, match=r"config\.data_file=.*absent\.npz"):
    configlib.validate(config)


@pytest.mark.slow
def test_training_and_evaluation_from_a_data_file(tmp_path):
  subset = np.load(ip.MNIST_SUBSET_PATH)
  path = _write(tmp_path / "digits.npz", train_image=subset["train_image"][:64],
                train_label=subset["train_label"][:64],
                test_image=subset["test_image"][:16], test_label=subset["test_label"][:16])
  c = configlib.base_config()
  c.update(dataset="mnist", data_file=path, data_dir="/nowhere", model="tiny_cnn",
           batch_size=16, attack_steps=2, attack_step_size=0.1, num_train_steps=3,
           num_eval_examples=-1, eval_batch_size=16, eval_attack_steps=2,
           early_stopping=False, log_every_steps=1, checkpoint_every_steps=100,
           schedule="constant")
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["steps"] == 3 and summary["num_eval_examples"] == 16
  assert 0.0 <= summary["clean_acc"] <= 1.0
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["data_file"] == path
