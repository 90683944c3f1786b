"""Extra data read by index: the keyed order, per-host reads, the shard format and
its converter, up-front refusals, and exact resume of a run streaming its extra data."""

import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from bat_jax import (configlib, datasets, errors, extra_data, fs, input_pipeline as ip,
                     rundir, train)
from bat_jax.data import convert_extra
from test_unattended import small

MNIST_SHAPE = (28, 28, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_data(n, shape=(4, 4, 1), label_offset=0, num_classes=None):
  """Images whose first two pixels encode the example index; labels index + offset."""
  images = np.zeros((n,) + shape, np.uint8)
  images.reshape(n, -1)[:, 0] = np.arange(n) % 256
  images.reshape(n, -1)[:, 1] = np.arange(n) // 256
  labels = np.arange(n) + label_offset
  if num_classes:
    labels %= num_classes
  return images, labels.astype(np.int32)


def write_set(directory, images, labels, num_shards=3, **kwargs):
  """``images``/``labels`` as a shard set in ``directory`` (through an .npz)."""
  source = os.path.join(os.path.dirname(directory), os.path.basename(directory) + ".npz")
  np.savez(source, image=images, label=labels)
  return convert_extra.convert(source, str(directory), num_shards=num_shards, **kwargs)


class CountingExtra(extra_data.InMemoryExtraData):
  """In-memory extra data that records every index it is asked for."""

  def __init__(self, images, labels):
    super().__init__(images, labels)
    self.reads = []

  def read(self, indices):
    self.reads.append(np.asarray(indices).copy())
    return super().read(indices)


# --------------------------------------------------------------------------
# The keyed permutation.
# --------------------------------------------------------------------------


def test_keyed_permutation_is_a_permutation_of_every_size_and_key():
  for n in list(range(1, 70)) + [255, 256, 257, 1000, 4097]:
    for key in range(25):
      order = ip.KeyedPermutation(n, [key, 1, 3])(np.arange(n))
      assert order.dtype == np.int64
      np.testing.assert_array_equal(np.sort(order), np.arange(n))
  perm = ip.KeyedPermutation(1000, [0, 1, 0])
  np.testing.assert_array_equal(perm([7, 3, 999]), perm(np.arange(1000))[[7, 3, 999]])
  assert not np.array_equal(perm(np.arange(1000)),
                            ip.KeyedPermutation(1000, [0, 1, 1])(np.arange(1000)))
  with pytest.raises(IndexError):
    perm([1000])


def test_keyed_permutation_of_twenty_million_keeps_no_table():
  perm = ip.KeyedPermutation(20_000_000, [3, 1, 0])
  held = sum(np.asarray(v).nbytes for v in vars(perm).values())
  assert held < 1000  # the round keys and sizes: no permutation table
  sample = perm(np.arange(0, 20_000_000, 97))
  assert sample.min() >= 0 and sample.max() < 20_000_000
  assert len(np.unique(sample)) == len(sample)


def test_keyed_permutation_looks_uniform():
  # Where position 0 goes over 2000 keys, n = 10 (cycle-walking from 16): chi-square, 9 dof.
  firsts = np.array([ip.KeyedPermutation(10, [k, 1, 0])([0])[0] for k in range(2000)])
  counts = np.bincount(firsts, minlength=10)
  assert ((counts - 200) ** 2 / 200).sum() < 40  # p ~ 1e-5 for a uniform draw
  # Every (position, index) pair of n = 6 over 2400 keys: chi-square, 25 dof.
  pairs = np.zeros((6, 6))
  for k in range(2400):
    pairs[np.arange(6), ip.KeyedPermutation(6, [k, 1, 2])(np.arange(6))] += 1
  assert ((pairs - 400) ** 2 / 400).sum() < 70
  # One large order: the first 10,000 positions spread like uniform draws.
  n = 100_003
  values = ip.KeyedPermutation(n, [11, 1, 0])(np.arange(10_000)) / n
  assert abs(values.mean() - 0.5) < 0.015  # std of the mean: 0.003
  assert abs(values.var() - 1 / 12) < 0.006
  assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.05  # neighbours unrelated


# --------------------------------------------------------------------------
# TrainBatches with extra data.
# --------------------------------------------------------------------------


def test_extra_stream_visits_each_extra_example_once_per_extra_epoch():
  images, labels = toy_data(40)
  extra_images, extra_labels = toy_data(50, label_offset=10_000)
  batches = ip.TrainBatches(images, labels, batch_size=16, seed=2,
                            extra=extra_data.InMemoryExtraData(extra_images, extra_labels),
                            extra_fraction=0.5, process_index=0,
                            process_count=1, local_device_count=2)
  seen = [batches.batch(s)["label"] for s in range(12)]  # 50 // 8 = 6 steps per extra epoch
  for epoch in range(2):
    got = np.concatenate([b[b >= 10_000] for b in seen[6 * epoch:6 * epoch + 6]])
    assert len(np.unique(got)) == 48
  first, second = (np.concatenate([b[b >= 10_000] for b in seen[s:s + 6]]) for s in (0, 6))
  assert not np.array_equal(first, second)


def test_resumed_batches_equal_the_uninterrupted_ones():
  images, labels = toy_data(64)
  extra_images, extra_labels = toy_data(30, label_offset=1000)
  make = lambda: ip.TrainBatches(images, labels, batch_size=8, seed=4,
                                 extra=extra_data.InMemoryExtraData(extra_images, extra_labels),
                                 extra_fraction=0.5, process_index=0, process_count=1,
                                 local_device_count=2)
  full = list(make().batches(num_steps=40))  # 7 steps per extra epoch: 5 epochs
  for start in (0, 7, 13, 33):
    fresh = make().batch(start)
    np.testing.assert_array_equal(fresh["image"], full[start]["image"])
    np.testing.assert_array_equal(fresh["label"], full[start]["label"])
  backwards = make()
  for step in reversed(range(40)):
    np.testing.assert_array_equal(backwards.batch(step)["label"], full[step]["label"])


def test_base_stream_is_unchanged_by_extra_data():
  images, labels = toy_data(48)
  plain = ip.TrainBatches(images, labels, batch_size=6, seed=9, process_index=0,
                          process_count=1, local_device_count=1)
  # The base stream's order: permutations of np.random.default_rng([seed, 0, epoch]).
  for step in (0, 3, 8, 17):
    epoch, position = divmod(step, 8)
    order = np.random.default_rng([9, 0, epoch]).permutation(48)
    np.testing.assert_array_equal(plain.batch(step)["label"].ravel(),
                                  labels[order[position * 6:(position + 1) * 6]])


def test_each_host_reads_only_its_own_extra_slots():
  images, labels = toy_data(96)
  extra_images, extra_labels = toy_data(500, label_offset=10_000)
  kwargs = dict(batch_size=16, seed=5, extra_fraction=0.7)
  single = ip.TrainBatches(images, labels, extra=CountingExtra(extra_images, extra_labels),
                           process_index=0, process_count=1, local_device_count=4, **kwargs)
  hosts = [ip.TrainBatches(images, labels, extra=CountingExtra(extra_images, extra_labels),
                           process_index=p, process_count=2, local_device_count=2, **kwargs)
           for p in range(2)]
  for step in (0, 7, 45, 46):  # 500 // 11 = 45 steps per extra epoch
    index, is_extra = single.global_indices(step)
    for p, host in enumerate(hosts):
      host.extra.reads.clear()
      host.batch(step)
      mine = slice(8 * p, 8 * p + 8)
      read = np.concatenate(host.extra.reads)
      np.testing.assert_array_equal(read, index[mine][is_extra[mine]])
      assert 0 < len(read) < is_extra.sum()
    parts = [host.batch(step) for host in hosts]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]),
                                    single.batch(step)[key])


def test_shards_and_the_npz_give_the_same_batches(tmp_path):
  images, labels = toy_data(64)
  extra_images, extra_labels = toy_data(300, num_classes=7)
  write_set(tmp_path / "set", extra_images, extra_labels, num_shards=4)
  shards = extra_data.open_extra_data(str(tmp_path / "set"), (4, 4, 1), 10)
  assert isinstance(shards, extra_data.ArrayRecordExtraData)
  kwargs = dict(batch_size=16, seed=1, extra_fraction=0.5, process_index=0,
                process_count=1, local_device_count=2)
  streamed = ip.TrainBatches(images, labels, extra=shards, **kwargs)
  in_memory = ip.TrainBatches(
      images, labels, extra=extra_data.InMemoryExtraData(extra_images, extra_labels), **kwargs)
  for step in (0, 5, 40):
    for key in ("image", "label"):
      np.testing.assert_array_equal(streamed.batch(step)[key], in_memory.batch(step)[key])


# --------------------------------------------------------------------------
# The shard format and the converter.
# --------------------------------------------------------------------------


def test_npz_round_trip_through_shards_in_chunks(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (103, 5, 6, 3), dtype=np.uint8)
  labels = np.random.default_rng(1).integers(0, 10, 103).astype(np.int64)
  source = tmp_path / "extra.npz"
  np.savez_compressed(source, image=images, label=labels)
  info = convert_extra.convert(str(source), str(tmp_path / "set"), examples_per_shard=40,
                               chunk=7)  # chunks cross the shard boundaries
  assert [c for _, c in info.shards] == [35, 34, 34]  # ceil(103 / 40) = 3 shards
  meta = json.loads((tmp_path / "set" / extra_data.METADATA_FILE).read_text())
  assert meta["count"] == 103 and meta["image_shape"] == [5, 6, 3]
  assert meta["record_bytes"] == 4 + 90 and meta["dtype"] == "uint8"
  assert (meta["label_min"], meta["label_max"]) == (labels.min(), labels.max())
  assert meta["num_classes"] == labels.max() + 1 and meta["format_version"] == 1
  reader = extra_data.ArrayRecordExtraData(str(tmp_path / "set"))
  assert len(reader) == 103 and reader.image_shape == (5, 6, 3)
  order = np.random.default_rng(2).permutation(103)
  got_x, got_y = reader.read(order)
  np.testing.assert_array_equal(got_x, images[order])
  np.testing.assert_array_equal(got_y, labels[order])
  assert got_x.dtype == np.uint8 and got_y.dtype == np.int32
  with pytest.raises(IndexError):
    reader.read([103])
  empty_x, empty_y = reader.read([])
  assert empty_x.shape == (0, 5, 6, 3) and empty_y.shape == (0,)


def test_rst_pickle_layout_converts_and_refuses_other_objects(tmp_path):
  images, labels = toy_data(20, (32, 32, 3), num_classes=10)
  for protocol in (2, 3, 4, 5):
    data = {"data": images, "extrapolated_targets": labels.astype(np.int64),
            "prediction_model": "a model"}
    raw = pickle.dumps(data, protocol=protocol)
    if protocol <= 3:  # as NumPy 1.x wrote RST's file (protocol 3)
      raw = raw.replace(b"numpy._core.", b"numpy.core.")
      assert b"numpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / f"ti_p{protocol}.pickle"
    path.write_bytes(raw)
    info = convert_extra.convert(str(path), str(tmp_path / f"set{protocol}"), num_shards=2)
    assert info.count == 20 and info.num_classes == 10
    got_x, got_y = extra_data.ArrayRecordExtraData(str(tmp_path / f"set{protocol}")).read(
        np.arange(20))
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)
  evil = tmp_path / "evil.pickle"
  evil.write_bytes(pickle.dumps({"data": _Exploit(), "extrapolated_targets": [0]}))
  with pytest.raises(datasets.DataFileError, match="posix.system|os.system"):
    convert_extra.load_rst_pickle(str(evil))
  assert not (tmp_path / "pwned").exists()
  wrong = tmp_path / "wrong.pickle"
  wrong.write_bytes(pickle.dumps({"images": images}))
  with pytest.raises(datasets.DataFileError, match="'data'.*'extrapolated_targets'"):
    convert_extra.load_rst_pickle(str(wrong))


class _Exploit:
  def __reduce__(self):
    return (os.system, ("touch pwned",))


def test_the_converter_refuses_a_folder_in_use(tmp_path):
  images, labels = toy_data(10)
  write_set(tmp_path / "set", images, labels, num_shards=2)
  with pytest.raises(errors.UserError, match="not empty .* --overwrite"):
    write_set(tmp_path / "set", images, labels)
  info = write_set(tmp_path / "set", images[:6], labels[:6], num_shards=3, overwrite=True)
  assert info.count == 6
  assert sorted(os.listdir(tmp_path / "set")) == sorted(
      [extra_data.METADATA_FILE] + [name for name, _ in info.shards])
  (tmp_path / "set" / "notes.txt").write_text("mine")
  with pytest.raises(errors.UserError, match="notes.txt"):
    write_set(tmp_path / "set", images, labels, overwrite=True)
  with pytest.raises(datasets.DataFileError, match="span \\[0, 9\\].*\\[0, 5\\)"):
    write_set(tmp_path / "other", images, labels, num_classes=5)


def _flags(args):
  fv = flags.FlagValues()
  convert_extra.define_flags(fv)
  fv(["prog", *args])
  return fv


def test_the_converter_checks_its_flags_and_prints_the_config_field(tmp_path, monkeypatch,
                                                                     capsys):
  images, labels = toy_data(12)
  np.savez(tmp_path / "extra.npz", image=images, label=labels)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  (tmp_path / "data.csv").write_text("x")
  good = [f"--input={tmp_path / 'extra.npz'}", f"--output_dir={tmp_path / 'out'}"]
  cases = [([f"--output_dir={tmp_path / 'out'}"], "Pass --input"),
           ([f"--input={tmp_path / 'nope.npz'}", good[1]], "is not a file"),
           ([f"--input={tmp_path / 'data.csv'}", good[1]], "an .npz"),
           (good + ["--num_shards=2", "--examples_per_shard=5"], "not both"),
           (good + ["--num_shards=-1"], "--num_shards=-1 must be >= 0"),
           ([good[0], f"--output_dir={tmp_path / 'full'}"], "not empty"),
           ([good[0], f"--output_dir={tmp_path / 'extra.npz'}"], "is a file")]
  for args, message in cases:
    with pytest.raises(errors.UserError, match=message):
      convert_extra.check_flags(_flags(args))
  assert not (tmp_path / "out").exists()
  monkeypatch.setattr(convert_extra, "FLAGS", _flags(good + ["--examples_per_shard=5"]))
  convert_extra.main(["prog"])
  assert f"--config.extra_data_path={tmp_path / 'out'}" in capsys.readouterr().out
  assert len(extra_data.read_metadata(str(tmp_path / "out")).shards) == 3


def test_the_converter_command_refuses_with_exit_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "bat_jax.data.convert_extra",
                         f"--input={tmp_path / 'nope.npz'}", f"--output_dir={tmp_path / 'o'}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "is not a file" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------
# Refused up front, from the metadata.
# --------------------------------------------------------------------------


def test_bad_extra_data_is_refused_from_its_metadata(tmp_path):
  images, labels = toy_data(30, MNIST_SHAPE, num_classes=10)
  write_set(tmp_path / "good", images, labels)
  extra_data.check_extra_data(str(tmp_path / "good"), MNIST_SHAPE, 10)
  check = lambda path, shape=MNIST_SHAPE, classes=10: extra_data.check_extra_data(
      str(path), shape, classes)
  with pytest.raises(datasets.DatasetNotFoundError, match="config.extra_data_path=.*nope"):
    check(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(datasets.DatasetNotFoundError, match="without extra_data.json"):
    check(tmp_path / "empty")
  with pytest.raises(datasets.DataFileError, match=r"\(28, 28, 1\), but the dataset expects "
                     r"\(32, 32, 3\)"):
    check(tmp_path / "good", (32, 32, 3))
  with pytest.raises(datasets.DataFileError, match=r"labels span \[0, 9\] .* \[0, 4\]"):
    check(tmp_path / "good", MNIST_SHAPE, 5)

  def broken(name, change):
    directory = tmp_path / name
    write_set(directory, images, labels)
    meta = json.loads((directory / extra_data.METADATA_FILE).read_text())
    change(directory, meta)
    (directory / extra_data.METADATA_FILE).write_text(json.dumps(meta))
    return directory

  cases = [
      ("version", lambda d, m: m.update(format_version=2), "format_version 2"),
      ("count", lambda d, m: m.update(count=31), "count 31 is not the sum"),
      ("dtype", lambda d, m: m.update(dtype="float32"), "only 'uint8'"),
      ("field", lambda d, m: m.pop("label_max"), "missing or malformed"),
      ("missing", lambda d, m: os.remove(d / m["shards"][1]["file"]), "is missing"),
      ("short", lambda d, m: os.truncate(d / m["shards"][0]["file"], 100), "truncated"),
  ]
  for name, change, message in cases:
    with pytest.raises(datasets.DataFileError, match=message):
      check(broken(name, change))
  (tmp_path / "json").mkdir()
  (tmp_path / "json" / extra_data.METADATA_FILE).write_text("{not json")
  with pytest.raises(datasets.DataFileError, match="is not JSON"):
    check(tmp_path / "json")


def test_a_remote_npz_is_read_and_a_remote_shard_set_refused(standin_gcs):
  images, labels = toy_data(12, MNIST_SHAPE, num_classes=10)
  fs.save_npz("gs://bucket/extra.npz", image=images, label=labels)
  extra = extra_data.open_extra_data("gs://bucket/extra.npz", MNIST_SHAPE, 10)
  np.testing.assert_array_equal(extra.read([3, 1])[1], labels[[3, 1]])
  fs.write_json(f"gs://bucket/set/{extra_data.METADATA_FILE}", {})
  with pytest.raises(errors.UserError, match="gs://bucket/set: shard sets are streamed from "
                     "a local or mounted filesystem only"):
    extra_data.check_extra_data("gs://bucket/set", MNIST_SHAPE, 10)


def test_config_validation_names_the_field(tmp_path):
  (tmp_path / "folder").mkdir()
  config = small(extra_data_path=str(tmp_path / "folder"))
  with pytest.raises(configlib.ConfigError, match="config.extra_data_path=.*without "
                     "extra_data.json.*bat_jax.data.convert_extra"):
    configlib.validate(config)
  images, labels = toy_data(30, (32, 32, 3))
  write_set(tmp_path / "cifar", images, labels)
  config = small(extra_data_path=str(tmp_path / "cifar"))
  configlib.validate(config)  # the field's own check: a shard set is there
  with pytest.raises(datasets.DataFileError, match=r"\(32, 32, 3\), but the dataset"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before the workdir is claimed


# --------------------------------------------------------------------------
# A run with the whole recipe (streamed extra data, EMA, AWP) resumes exactly.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_streamed_run_with_ema_and_awp_resumes_exactly(tmp_path):
  # 24 extra digits, 8 a step: the run crosses an extra epoch, the resume too.
  # 32 base digits, 8 a step: AWP's one-epoch warm-up ends at step 4, after
  # the interruption at step 3.
  images, labels = datasets.load_split("mnist_subset", "test", num_examples=24)
  write_set(tmp_path / "extra", images, labels, num_shards=3)
  config = small(method="bat", extra_data_path=str(tmp_path / "extra"), extra_fraction=0.5,
                 ema_decay=0.9, awp_gamma=0.01, awp_warmup_epochs=1,
                 num_train_steps=6, eval_every_epochs=100)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  interrupted = train.train_and_evaluate(config, str(tmp_path / "resumed"),
                                         max_steps_this_run=3)
  assert interrupted["steps"] == 3 and interrupted["stopped"]
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert full["steps"] == resumed["steps"] == 6
  assert full["final_state"].ema is not None and resumed["weights"] == "ema"
  for a, b in zip(jax.tree_util.tree_leaves(full["final_state"]),
                  jax.tree_util.tree_leaves(resumed["final_state"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert resumed["pgd_acc"] == full["pgd_acc"]
  records = [r for r in rundir.read_metrics(str(tmp_path / "resumed")) if "train/loss" in r]
  assert [r["train/awp_active"] for r in records] == [0.0] * 4 + [1.0] * 2


# --------------------------------------------------------------------------
# The benchmark, at a tiny size.
# --------------------------------------------------------------------------


def test_the_benchmark_runs_and_records_no_path(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = tmp_path / "results"
  proc = subprocess.run([sys.executable, "benchmarks/extra_data_stream.py", "--sizes=3000",
                         "--steps=3", "--memory_max=3000", "--base_examples=1000",
                         f"--dir={tmp_path / 'sets'}", f"--out_dir={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "extra_data_stream.json").read_text())
  assert [r["reader"] for r in report["results"]] == ["shards", "memory"]
  for result in report["results"]:
    assert result["count"] == 3000 and result["examples_per_s"] > 0
    assert result["rss_mib"]["before_open"] > 0
  assert report["settings"]["batch_size"] == 512 and report["machine"]["cpu"]
  for text in ((out / "extra_data_stream.json").read_text(),
               (out / "extra_data_stream.md").read_text()):
    assert str(tmp_path) not in text and REPO not in text
  assert os.listdir(tmp_path / "sets") == []  # the sets are deleted without --keep
