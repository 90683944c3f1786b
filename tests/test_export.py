"""bat_jax.export: the exported PyTorch models give the JAX models' logits.

PyTorch is an optional test dependency (CI installs it); without it these
tests are skipped. bat_jax itself never imports torch.
"""

import importlib.machinery
import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import errors, export, models, naming, rundir, train

torch = pytest.importorskip("torch")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)
EXPORTED = ("lenet", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10", "wrn70_16")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_module_file(directory, name="bat_jax_models"):
  """The PyTorch module file in ``directory``, imported without touching sys.path."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_{abs(hash(str(directory)))}", os.path.join(directory, export.MODULE_FILE))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def template_module():
  """The module file as the package holds it (export copies it verbatim)."""
  loader = importlib.machinery.SourceFileLoader("bat_jax_models_template",
                                                export.TORCH_TEMPLATE)
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  return module


def abstract_variables(module, image_shape):
  return jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False))


def random_variables(module, image_shape, stats: str, seed: int = 0):
  """Random parameters (He-scaled kernels, non-trivial BN scale and bias) from NumPy
  (no RNG kernel to compile); BatchNorm statistics 'fresh' (mean 0, var 1) or 'random'."""
  rng = np.random.default_rng(seed)

  def param(path, s):
    leaf = path[-1].key
    if leaf == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape)
    if leaf == "scale":
      return rng.uniform(0.5, 1.5, s.shape)
    return rng.normal(0, 0.1, s.shape)

  def stat(path, s):
    mean = path[-1].key == "mean"
    if stats == "fresh":
      return np.zeros(s.shape) if mean else np.ones(s.shape)
    return rng.normal(0, 0.3, s.shape) if mean else rng.uniform(0.5, 2.0, s.shape)

  abstract = abstract_variables(module, image_shape)
  as_f32 = lambda f: lambda p, s: np.asarray(f(p, s), np.float32)
  variables = {"params": jax.tree_util.tree_map_with_path(as_f32(param),
                                                          abstract["params"])}
  if "batch_stats" in abstract:
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        as_f32(stat), abstract["batch_stats"])
  return variables


def torch_logits(net, images_nhwc):
  with torch.no_grad():
    return net(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def assert_logits_close(jax_logits, torch_logits_):
  """Max abs difference below 1e-4 of the logits' scale (never bitwise)."""
  scale = max(1.0, float(np.abs(jax_logits).max()))
  difference = float(np.abs(jax_logits - torch_logits_).max())
  assert difference < 1e-4 * scale, (difference, scale)
  return difference


# Every architecture bat_jax trains, plus the knobs its classes have. The Wide
# ResNets keep their depth and class at width 1 (about 100x cheaper than
# width 10); test_full_size_names_and_shapes checks the full-size mapping, and
# BAT_JAX_FULL_SIZE_TESTS=1 adds the full-size numeric round trips (~10 s each).
FULL_SIZE = pytest.mark.skipif(not os.environ.get("BAT_JAX_FULL_SIZE_TESTS"),
                               reason="full-size WRNs: set BAT_JAX_FULL_SIZE_TESTS=1")
ROUND_TRIPS = {
    "lenet": ("lenet", {}, MNIST),
    "resnet18": ("resnet18", {}, CIFAR),
    "preact_resnet18": ("preact_resnet18", {}, CIFAR),
    "wrn28_10 (width 1)": ("wrn28_10", {"widen_factor": 1}, CIFAR),
    "wrn34_10 (width 1)": ("wrn34_10", {"widen_factor": 1}, CIFAR),
    "preact, no final norm": ("preact_resnet18", {"final_norm": False, "width": 8,
                                                  "stage_sizes": (1, 1, 1, 1)}, CIFAR),
    "tiny_resnet on MNIST": ("tiny_resnet", {}, MNIST),
    "wrn, SiLU (depth 10, width 1)": ("tiny_wrn", {"activation": "silu"}, CIFAR),
    "wrn16_2 (depth 16, width 2)": ("wrn16_2", {}, CIFAR),
    "wrn16_2, SiLU (depth 16, width 2)": ("wrn16_2", {"activation": "silu"}, CIFAR),
    "wrn28_10": ("wrn28_10", {}, CIFAR),
    "wrn34_10": ("wrn34_10", {}, CIFAR),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    pytest.param(case, marks=FULL_SIZE) if case.startswith("wrn") and "width" not in case
    else case for case in ROUND_TRIPS])
def test_exported_torch_model_gives_the_jax_logits(case, tmp_path):
  name, overrides, image_shape = ROUND_TRIPS[case]
  channels = image_shape[-1]
  module = models.create_model(name, 10, mean=CIFAR_MEAN[:channels],
                               std=CIFAR_STD[:channels], **overrides)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  images = np.random.default_rng(1).uniform(size=(4,) + image_shape).astype(np.float32)
  for stats in ("fresh", "random") if models.has_batch_norm(name) else ("none",):
    variables = random_variables(module, image_shape, stats)
    out = tmp_path / stats
    export.write_torch_model(module, variables, str(out), image_shape)
    net = load_module_file(out).load_model(str(out))
    assert not net.training
    expected = np.asarray(apply(variables, images))
    assert np.abs(expected).max() > 0.1  # the comparison is not of zeros
    assert_logits_close(expected, torch_logits(net, images))


@pytest.mark.parametrize("name", EXPORTED)
def test_full_size_names_and_shapes_match_the_torch_module(name):
  """Name and shape of every tensor, at full size, without computing anything."""
  image_shape = MNIST if name == "lenet" else CIFAR
  module = models.create_model(name, 10)
  abstract = abstract_variables(module, image_shape)
  # Zero-strided stand-ins: the conversion's transposes are views, nothing is allocated.
  fake = jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
  state = export.torch_state_dict(module, fake, image_shape)
  torch_models = template_module()
  with torch.device("meta"):
    net = torch_models.build_model(export.torch_architecture(module, image_shape))
  expected = {k: (tuple(v.shape), str(v.dtype)) for k, v in net.state_dict().items()}
  got = {k: (tuple(v.shape), str(torch.from_numpy(np.zeros((), v.dtype)).dtype))
         for k, v in state.items()}
  assert got == expected
  assert (sum(p.numel() for p in net.parameters())
          == models.count_params(abstract["params"]))


def test_safetensors_writer_round_trips_and_reads_with_torch_alone(tmp_path):
  tensors = {"b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
             "a.count": np.array(7, np.int64), "c.empty": np.zeros((0, 3), np.float32),
             "d.flag": np.array([True, False])}
  path = str(tmp_path / "t.safetensors")
  export.write_safetensors(path, tensors, {"format": "pt", "note": "x"})
  raw = pathlib.Path(path).read_bytes()
  header_size = int.from_bytes(raw[:8], "little")
  assert header_size % 8 == 0  # the data starts 8-byte aligned
  header = json.loads(raw[8:8 + header_size])
  assert header["b.weight"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
  assert header["a.count"]["dtype"] == "I64" and header["a.count"]["shape"] == []
  read, metadata = export.read_safetensors(path)
  assert metadata == {"format": "pt", "note": "x"}
  for name, value in tensors.items():
    np.testing.assert_array_equal(read[name], value)
    assert read[name].dtype == value.dtype and read[name].shape == value.shape
  by_torch = template_module().read_safetensors(path)
  for name, value in tensors.items():
    np.testing.assert_array_equal(by_torch[name].numpy(), value)
  try:
    from safetensors.numpy import load_file  # optional: the reference reader
  except ImportError:
    load_file = None
  if load_file is not None:
    for name, value in load_file(path).items():
      np.testing.assert_array_equal(value, tensors[name])
  with pytest.raises(ValueError, match="strings"):
    export.write_safetensors(path, tensors, {"epoch": 3})


def test_tiny_cnn_is_refused_with_a_clear_message():
  with pytest.raises(ValueError, match="No PyTorch export for TinyCNN"):
    export.torch_architecture(models.create_model("tiny_cnn", 10), MNIST)


def test_eps_strings():
  assert naming.format_eps(8 / 255, "cifar10") == "8/255"
  assert naming.format_eps(0.3, "mnist") == "0.3"
  assert naming.format_eps(0.0, "cifar10") == "0"


def quickstart_like_config(**overrides):
  spec = importlib.util.spec_from_file_location(
      "quickstart_config", REPO_ROOT / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(num_train_steps=2, num_train_examples=64, batch_size=16,
                attack_steps=1, num_eval_examples=16, eval_batch_size=16,
                eval_attack_steps=1, log_every_steps=1, checkpoint_every_steps=100)
  config.update(overrides)
  return config


def fake_results(step):
  """An eval/last_results.json as bat_jax.evaluate writes it (fast AutoAttack)."""
  return {"clean_acc": 0.9375, "fgsm_acc": 0.75, "pgd_acc": 0.5, "autoattack_acc": 0.4375,
          "autoattack_per_attack": {"clean": 0.9375, "apgd-ce": 0.5, "apgd-t": 0.4375},
          "eps": 0.3, "num_examples": 16, "sanity_warnings": [],
          "settings": {"pgd_steps": 50, "pgd_restarts": 10, "pgd_step_size": 0.03,
                       "autoattack": {"version": "fast", "attacks": ["apgd-ce", "apgd-t"],
                                      "settings": {}, "chunk_size": None,
                                      "standard": False}},
          "which": "last", "checkpoint": "last", "step": step, "split": "test",
          "dataset": "mnist_subset", "method": "bat", "model": "lenet"}


@pytest.mark.slow
def test_export_workdir_end_to_end(tmp_path):
  workdir, out = str(tmp_path / "run"), tmp_path / "export"
  train.train_and_evaluate(quickstart_like_config(), workdir)
  paths = export.export_workdir(workdir, "best", str(out))  # no best: falls back to last
  entry = "mnist/Linf/Kim2021Bridged_LeNet.json"
  assert sorted(os.listdir(out)) == sorted([export.CARD_FILE, export.MODULE_FILE,
                                            export.WEIGHTS_FILE, export.METADATA_FILE,
                                            "mnist"])
  assert os.listdir(out / "mnist" / "Linf") == ["Kim2021Bridged_LeNet.json"]  # no .pt
  assert set(paths) == {"weights", "module", "robustbench_info", "metadata", "card"}

  # The generated module file loads the weights and gives the JAX logits.
  restored = rundir.restore_model(workdir, "last")
  net = load_module_file(out).load_model(str(out))
  images = np.random.default_rng(0).uniform(size=(8,) + MNIST).astype(np.float32)
  assert_logits_close(np.asarray(restored.logits_fn(images)), torch_logits(net, images))
  _, metadata = export.read_safetensors(paths["weights"])
  assert metadata["format"] == "pt" and metadata["bat_jax_model"] == "lenet"
  assert json.loads(metadata[export.ARCHITECTURE_KEY])["class"] == "LeNet"

  # Not evaluated: null accuracies, and the card says so.
  info = json.loads((out / entry).read_text())
  assert tuple(info) == export.ROBUSTBENCH_FIELDS
  assert info["clean_acc"] is None and info["autoattack_acc"] is None
  assert (info["dataset"], info["eps"], info["reported"]) == ("mnist", "0.3", "")
  assert info["architecture"] == "LeNet (MNIST CNN)" and info["additional_data"] is False
  assert info["name"] == "Bridged Adversarial Training" and info["unreliable"] is False
  assert info["footnote"] == "Trained with bat_jax (JAX/Flax), not the authors' checkpoint."
  record = json.loads((out / export.METADATA_FILE).read_text())
  assert record["evaluation"] is None and record["threat_model"] == "Linf"
  assert record["source"]["checkpoint"] == "last" and record["source"]["step"] == 2
  assert record["training"]["method"] == "bat" and record["leaderboard_grade"] is False
  assert not record["robustbench"]["architecture"]["loadable"]
  assert record["robustbench"]["checkpoint"] is None
  card = (out / export.CARD_FILE).read_text()
  assert "no evaluation" in card and "**Not leaderboard-grade**" in card
  assert "RobustBench has no mnist Linf leaderboard" in card
  assert "No RobustBench class computes this model" in card

  # Evaluated: accuracies and protocol from eval/last_results.json; the sanity
  # checks' warning makes RobustBench's `unreliable` true.
  os.makedirs(os.path.join(workdir, "eval"))
  results = fake_results(step=2)
  results["sanity_warnings"] = ["PGD at eps 1 leaves 12% accuracy"]
  with open(os.path.join(workdir, "eval", "last_results.json"), "w") as f:
    json.dump(results, f)
  export.export_workdir(workdir, "best", str(tmp_path / "evaluated"))
  info = json.loads((tmp_path / "evaluated" / entry).read_text())
  assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == (
      "93.75", "43.75", "")
  assert info["unreliable"] is True and "sanity checks warned" in info["footnote"]
  record = json.loads((tmp_path / "evaluated" / export.METADATA_FILE).read_text())
  assert record["evaluation"]["num_examples"] == 16
  assert record["evaluation"]["autoattack"]["version"] == "fast"
  assert any("not 'standard'" in r for r in record["not_leaderboard_grade"])
  card = (tmp_path / "evaluated" / export.CARD_FILE).read_text()
  assert "43.75%" in card and "not the standard AutoAttack" in card
  assert "sanity-check warning: PGD at eps 1" in card

  # An evaluation of another step is stale: not used.
  with open(os.path.join(workdir, "eval", "last_results.json"), "w") as f:
    json.dump(fake_results(step=1), f)
  export.export_workdir(workdir, "last", str(tmp_path / "stale"))
  assert json.loads((tmp_path / "stale" / entry).read_text())["clean_acc"] is None

  # --extra_data describes extra data; a run without any refuses it.
  with pytest.raises(errors.UserError, match="extra_data_path"):
    export.export_workdir(workdir, "last", str(tmp_path / "x"), extra_data="generated")
