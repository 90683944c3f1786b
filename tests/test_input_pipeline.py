"""Tests for bat_jax.datasets (loading) and bat_jax.input_pipeline (batches, eval, augmentation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bat_jax import datasets as ds
from bat_jax import input_pipeline as ip
from bat_jax.extra_data import InMemoryExtraData
from mnist_helpers import as_written_order  # tests/ is on sys.path


def _toy_data(n, shape=(4, 4, 1), label_offset=0):
  """Images whose first pixel encodes the example index, so batches can be
  traced back to the examples they hold."""
  images = np.zeros((n,) + shape, np.uint8)
  images.reshape(n, -1)[:, 0] = np.arange(n) % 256
  images.reshape(n, -1)[:, 1] = np.arange(n) // 256
  labels = (np.arange(n) + label_offset).astype(np.int32)
  return images, labels


def _all_batches(batches, steps, start=0):
  return [batches.batch(s) for s in range(start, steps)]


# --------------------------------------------------------------------------
# Dataset metadata and loading.
# --------------------------------------------------------------------------


def test_dataset_info():
  assert ds.DATASETS["mnist"].num_classes == 10
  assert ds.DATASETS["mnist"].mean is None
  assert ds.DATASETS["mnist_subset"].image_shape == (28, 28, 1)
  c10 = ds.DATASETS["cifar10"]
  assert c10.image_shape == (32, 32, 3)
  assert c10.mean == (0.4914, 0.4822, 0.4465)
  assert c10.std == (0.2471, 0.2435, 0.2616)
  c100 = ds.DATASETS["cifar100"]
  assert c100.num_classes == 100
  assert c100.mean == (0.5071, 0.4865, 0.4409)
  assert c100.std == (0.2673, 0.2564, 0.2762)
  with pytest.raises(ValueError, match="cifar10"):
    ds.get_dataset_info("svhn")


def test_bundled_mnist_subset_loads_without_tfds_data():
  train_x, train_y = ds.load_split("mnist_subset", "train")
  test_x, test_y = ds.load_split("mnist_subset", "test", num_examples=10)
  assert train_x.shape == (6000, 28, 28, 1) and train_x.dtype == np.uint8
  assert train_y.shape == (6000,) and train_y.dtype == np.int32
  assert test_x.shape == (10, 28, 28, 1) and test_y.shape == (10,)
  assert set(np.unique(train_y)) == set(range(10))
  assert train_x.max() == 255 and train_x.min() == 0
  assert ds.MNIST_SUBSET_PATH.stat().st_size < 3e6
  assert ds.split_size("mnist_subset", "test") == 1000
  assert ds.split_size("mnist", "train", data_file=str(ds.MNIST_SUBSET_PATH)) == 6000
  with pytest.raises(ValueError, match="splits"):
    ds.load_split("mnist_subset", "validation")


def test_tfds_prepared_mnist_loads_every_written_digit(mnist_tfds):
  data_dir, written = mnist_tfds
  for split, (want_x, want_y) in written.items():
    images, labels = ds.load_split("mnist", split, data_dir=data_dir)
    assert images.shape == want_x.shape and images.dtype == np.uint8
    assert labels.shape == want_y.shape and labels.dtype == np.int32
    # TFDS stores the records shuffled; each written digit comes back once,
    # with its own label, pixel for pixel.
    order = as_written_order(images, labels, (want_x, want_y))
    np.testing.assert_array_equal(np.sort(order), np.arange(len(want_y)))
    np.testing.assert_array_equal(images, want_x[order])
    assert ds.split_size("mnist", split, data_dir=data_dir) == len(want_y)
  first = ds.load_split("mnist", "test", data_dir=data_dir, num_examples=7)
  np.testing.assert_array_equal(first[0], images[:7])
  np.testing.assert_array_equal(first[1], labels[:7])
  # Pixel statistics of real digits (mostly black, mean ~33/255).
  assert 25 < images.mean() < 40


def test_missing_dataset_raises_a_clear_error(tmp_path):
  with pytest.raises(ds.DatasetNotFoundError) as info:
    ds.load_split("cifar10", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert str(tmp_path) in message
  assert f"tfds build cifar10 --data_dir={tmp_path}" in message
  assert "download_and_prepare(file_format='array_record')" in message
  assert not any(tmp_path.iterdir())  # Nothing was downloaded or written.


def test_cifar_shapes_through_tfds_mock_data(tmp_path):
  # mock_data mocks tfds.data_source; its mocked __getitems__ is broken in
  # TFDS 4.9.10, so this also exercises load_split's item-wise fallback.
  with tfds.testing.mock_data(num_examples=12):
    images, labels = ds.load_split("cifar10", "train", data_dir=str(tmp_path))
    test_images, test_labels = ds.load_split("cifar100", "test",
                                             data_dir=str(tmp_path),
                                             num_examples=5)
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < 10
  assert test_images.shape == (5, 32, 32, 3)
  assert test_labels.min() >= 0 and test_labels.max() < 100


def test_load_extra_npz_round_trip_and_errors(tmp_path):
  images, labels = _toy_data(10, (8, 8, 3))
  good = tmp_path / "extra.npz"
  np.savez(good, image=images, label=labels.astype(np.int64))
  got_x, got_y = ds.load_extra_npz(str(good), image_shape=(8, 8, 3),
                                   num_classes=10)
  np.testing.assert_array_equal(got_x, images)
  assert got_y.dtype == np.int32

  missing = tmp_path / "missing_key.npz"
  np.savez(missing, data=images, label=labels)
  with pytest.raises(ValueError, match=r"missing_key\.npz.*'image'"):
    ds.load_extra_npz(str(missing))
  wrong_dtype = tmp_path / "float.npz"
  np.savez(wrong_dtype, image=images.astype(np.float32), label=labels)
  with pytest.raises(ValueError, match=r"float\.npz.*uint8"):
    ds.load_extra_npz(str(wrong_dtype))
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, image=np.array([images], dtype=object), label=labels)
  with pytest.raises(ValueError, match=r"pickled\.npz"):
    ds.load_extra_npz(str(pickled))
  with pytest.raises(ValueError, match="'label': .* labels are out of range"):
    ds.load_extra_npz(str(good), num_classes=5)
  with pytest.raises(ds.DatasetNotFoundError, match="nowhere.npz"):
    ds.load_extra_npz(str(tmp_path / "nowhere.npz"))


# --------------------------------------------------------------------------
# Training batches.
# --------------------------------------------------------------------------


def test_batches_are_deterministic_and_visit_each_example_once_per_epoch():
  images, labels = _toy_data(103)
  make = lambda seed: ip.TrainBatches(images, labels, batch_size=20, seed=seed,
                                      process_index=0, process_count=1,
                                      local_device_count=2)
  batches = make(0)
  assert batches.steps_per_epoch == 5  # 103 // 20: drops the partial batch.
  run = _all_batches(batches, 10)
  again = _all_batches(make(0), 10)
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = _all_batches(make(1), 10)
  assert not all(np.array_equal(a["label"], b["label"])
                 for a, b in zip(run, other))
  for epoch in range(2):
    seen = np.concatenate([b["label"].ravel()
                           for b in run[5 * epoch:5 * epoch + 5]])
    assert len(np.unique(seen)) == 100  # No repeats within an epoch.
  first, second = (np.concatenate([b["label"].ravel() for b in run[s:s + 5]])
                   for s in (0, 5))
  assert not np.array_equal(first, second)  # A new order every epoch.
  # Images and labels stay paired.
  for b in run:
    np.testing.assert_array_equal(b["image"][..., 0, 0, 0], b["label"] % 256)


def test_resume_yields_exactly_the_uninterrupted_batches():
  images, labels = _toy_data(64)
  kwargs = dict(batch_size=8, seed=3, process_index=0, process_count=1,
                local_device_count=4)
  full = list(ip.TrainBatches(images, labels, **kwargs).batches(num_steps=30))
  # A fresh object (as after a restart) resuming mid-epoch and at a boundary.
  for start in (13, 16):
    resumed = ip.TrainBatches(images, labels, **kwargs).batches(
        start_step=start)
    for step in range(start, 30):
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], full[step]["image"])
      np.testing.assert_array_equal(got["label"], full[step]["label"])


def test_host_shards_concatenate_to_the_single_host_batch():
  images, labels = _toy_data(96)
  single = ip.TrainBatches(images, labels, batch_size=16, seed=5,
                           process_index=0, process_count=1,
                           local_device_count=4)
  assert single.batch(0)["image"].shape == (4, 4, 4, 4, 1)
  assert single.batch(0)["label"].shape == (4, 4)
  shards = [ip.TrainBatches(images, labels, batch_size=16, seed=5,
                            process_index=p, process_count=2,
                            local_device_count=2) for p in range(2)]
  for step in (0, 7, 11):
    parts = [s.batch(step) for s in shards]
    assert parts[0]["label"].shape == (2, 4)
    for key in ("image", "label"):
      together = np.concatenate([p[key] for p in parts])  # Device axis.
      np.testing.assert_array_equal(together, single.batch(step)[key])


def test_defaults_use_the_local_devices():
  images, labels = _toy_data(32)
  batches = ip.TrainBatches(images, labels, batch_size=8, seed=0)
  assert batches.batch(0)["label"].shape == (jax.local_device_count(),
                                             8 // jax.local_device_count())


def test_batch_size_must_divide_across_devices():
  images, labels = _toy_data(32)
  with pytest.raises(ValueError, match="batch_size=10"):
    ip.TrainBatches(images, labels, batch_size=10, seed=0, process_index=0,
                    process_count=1, local_device_count=4)
  with pytest.raises(ValueError, match="batch_size=6"):
    ip.TrainBatches(images, labels, batch_size=6, seed=0, process_index=0,
                    process_count=2, local_device_count=2)
  with pytest.raises(ValueError, match="only 32"):
    ip.TrainBatches(images, labels, batch_size=64, seed=0, process_index=0,
                    process_count=1, local_device_count=1)


def test_extra_data_is_mixed_in_at_the_requested_fraction():
  images, labels = _toy_data(40)
  extra_images, extra_labels = _toy_data(1000, label_offset=10_000)
  batches = ip.TrainBatches(images, labels, batch_size=16, seed=1,
                            extra=InMemoryExtraData(extra_images, extra_labels),
                            extra_fraction=0.5,
                            process_index=0, process_count=1,
                            local_device_count=4)
  assert batches.steps_per_epoch == 5  # Counted on the base data: 40 // 8.
  extra_seen = []
  for step in range(20):
    got = batches.batch(step)["label"]
    is_extra = got >= 10_000
    assert is_extra.sum() == 8
    np.testing.assert_array_equal(is_extra.sum(axis=1), 2)  # Per device.
    extra_seen.append(got[is_extra])
  extra_seen = np.concatenate(extra_seen)
  # The extra set runs through its own permutation: no repeats yet.
  assert len(np.unique(extra_seen)) == len(extra_seen) == 160
  # Base examples still cycle through all 40 every 5 steps.
  base = np.concatenate([batches.batch(s)["label"].ravel() for s in range(5)])
  assert sorted(base[base < 10_000]) == list(range(40))

  quarter = ip.TrainBatches(images, labels, batch_size=16, seed=1,
                            extra=InMemoryExtraData(extra_images, extra_labels),
                            extra_fraction=0.25,
                            process_index=0, process_count=1,
                            local_device_count=1)
  assert (quarter.batch(3)["label"] >= 10_000).sum() == 4
  with pytest.raises(ValueError, match="extra_fraction"):
    ip.TrainBatches(images, labels, batch_size=16, seed=1,
                    extra_fraction=0.5, process_index=0, process_count=1,
                    local_device_count=1)


# --------------------------------------------------------------------------
# Evaluation batches.
# --------------------------------------------------------------------------


def test_eval_batches_cover_every_example_exactly_once():
  images, labels = _toy_data(23)
  batches = list(ip.eval_batches(images, labels, batch_size=8, num_devices=4))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (4, 2, 4, 4, 1) and b["image"].dtype == np.uint8
    assert b["label"].shape == b["mask"].shape == (4, 2)
    assert b["mask"].dtype == bool
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(23))
  last = batches[-1]
  assert last["mask"].sum() == 7
  assert not last["image"][~last["mask"]].any()  # Zero padding.

  # Two hosts: their shards together give the single-host batches.
  shards = [list(ip.eval_batches(images, labels, batch_size=8, num_devices=2,
                                 process_index=p, process_count=2))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  for b, s0, s1 in zip(batches, *shards):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([s0[key], s1[key]]), b[key])
  with pytest.raises(ValueError, match="batch_size=6"):
    next(ip.eval_batches(images, labels, batch_size=6, num_devices=4))


# --------------------------------------------------------------------------
# On-device preprocessing.
# --------------------------------------------------------------------------


def test_to_float():
  x = ip.to_float(np.array([0, 128, 255], np.uint8))
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(x, [0.0, 128 / 255, 1.0])


def test_augment_crops_and_flips_each_example():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 1.0, size=(32, 8, 8, 3)).astype(np.float32)
  augmented = np.asarray(jax.jit(ip.augment)(jax.random.key(0), images))
  assert augmented.shape == images.shape and augmented.dtype == np.float32
  assert augmented.min() >= 0.0 and augmented.max() <= 1.0
  again = np.asarray(jax.jit(ip.augment)(jax.random.key(0), images))
  np.testing.assert_array_equal(augmented, again)

  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  offsets, flips = set(), 0
  for i in range(len(images)):
    matches = [(dy, dx, flip)
               for dy in range(9) for dx in range(9) for flip in (False, True)
               if np.array_equal(
                   padded[i, dy:dy + 8, dx:dx + 8][:, ::-1] if flip
                   else padded[i, dy:dy + 8, dx:dx + 8], augmented[i])]
    assert matches, f"example {i} is not a crop/flip of its input"
    offsets.add(matches[0][:2])
    flips += matches[0][2]
  assert len(offsets) > 5  # Offsets vary per example...
  assert 4 <= flips <= 28  # ... and about half the examples are flipped.
  assert (augmented == 0).any()  # Some crops reach into the zero padding.
