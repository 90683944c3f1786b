"""bat_jax.export against RobustBench: its classes load the weights strictly and give
the JAX logits; the model-info file has RobustBench's fields, names and meanings.

Needs torch and ``robustbench`` (CI installs ``robustbench==1.1.1 --no-deps``);
without robustbench the class tests are skipped. RobustBench's architecture
files need only torch, so they are loaded by path: the package's ``__init__``
imports timm, torchvision and more, which ``--no-deps`` leaves out. The
model-info fields come from RobustBench's own files (not in the wheel):
tests/data/robustbench_model_info_fields.json says where they were read.
"""

import importlib.util
import json
import os
import pathlib
import re
import types

import jax
import ml_collections
import numpy as np
import pytest

from bat_jax import configlib, export, models, paper, reproduce
from test_export import (CIFAR, CIFAR_MEAN, CIFAR_STD, FULL_SIZE, MNIST, random_variables,
                         torch_logits)

torch = pytest.importorskip("torch")
ROBUSTBENCH = importlib.util.find_spec("robustbench")
needs_robustbench = pytest.mark.skipif(ROBUSTBENCH is None,
                                       reason="robustbench is not installed")
FIELDS = json.loads((pathlib.Path(__file__).parent / "data" /
                     "robustbench_model_info_fields.json").read_text())


def robustbench_module(name):
  """A RobustBench architecture module (e.g. '...architectures.resnet'), loaded by path."""
  path = os.path.join(ROBUSTBENCH.submodule_search_locations[0],
                      *name.split(".")[1:]) + ".py"
  spec = importlib.util.spec_from_file_location(f"rb_{name.rsplit('.', 1)[-1]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def robustbench_model(architecture):
  """RobustBench's class built as ``architecture`` (robustbench_architecture) says."""
  module = robustbench_module(architecture["module"])
  args = [getattr(module, a) if isinstance(a, str) else a for a in architecture["args"]]
  return getattr(module, architecture["class"])(*args, **architecture["kwargs"]).eval()


def relative_gap(expected, got):
  return float(np.abs(expected - got).max()) / max(1.0, float(np.abs(expected).max()))


# name -> (bat_jax model, overrides, classes, the RobustBench call the export must name).
# ResNets at their real width (RobustBench's are fixed at 64 channels), the
# Wide ResNets narrow (widen_factor is an argument there too).
STRICT = {
    "resnet18": ("resnet18", {}, 10, "ResNet18()"),
    "resnet18, normalised, 100 classes": (
        "resnet18", {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 100,
        "ResNet(BasicBlock, [2, 2, 2, 2], num_classes=100)"),
    "preact_resnet18": ("preact_resnet18", {}, 10,
                        "PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True, "
                        "out_shortcut=True)"),
    "preact, no final norm": ("preact_resnet18", {"final_norm": False,
                                                  "stage_sizes": (1, 1, 1, 1)}, 10,
                              "PreActResNet(PreActBlock, [1, 1, 1, 1], "
                              "bn_before_fc=False, out_shortcut=True)"),
    "wrn28_10 (width 1)": ("wrn28_10", {"widen_factor": 1}, 10,
                           "WideResNet(depth=28, widen_factor=1)"),
    "wrn34_10 (width 2, 100 classes)": ("wrn34_10", {"widen_factor": 2}, 100,
                                        "WideResNet(depth=34, widen_factor=2, "
                                        "num_classes=100)"),
    "tiny_wrn": ("tiny_wrn", {}, 10, "WideResNet(depth=10, widen_factor=1)"),
    "wrn16_2 (any depth and width)": ("wrn16_2", {}, 10,
                                      "WideResNet(depth=16, widen_factor=2)"),
    "wrn28_10": ("wrn28_10", {}, 10, "WideResNet(depth=28, widen_factor=10)"),
    "wrn34_10": ("wrn34_10", {}, 10, "WideResNet(depth=34, widen_factor=10)"),
}


@needs_robustbench
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=FULL_SIZE) if c in ("wrn28_10", "wrn34_10") else c for c in STRICT])
def test_robustbench_class_loads_the_pt_strictly_and_gives_the_jax_logits(case, tmp_path):
  name, overrides, classes, code = STRICT[case]
  module = models.create_model(name, classes, **overrides)
  architecture = export.robustbench_architecture(module, CIFAR)
  assert architecture["loadable"] and architecture["code"] == code
  variables = random_variables(module, CIFAR, "random")
  path, missing = export.write_robustbench_checkpoint(
      str(tmp_path / "m.pt"), export.torch_state_dict(module, variables, CIFAR))
  assert missing is None
  net = robustbench_model(architecture)
  net.load_state_dict(torch.load(path), strict=True)
  images = np.random.default_rng(1).uniform(size=(3,) + CIFAR).astype(np.float32)
  expected = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, images))
  assert np.abs(expected).max() > 0.1
  inputs = images
  if "mean" in overrides:  # RobustBench's class takes what the model's first layer sees
    assert architecture["normalization"] == {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    inputs = ((images - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)).astype(np.float32)
  else:
    assert architecture["normalization"] is None
  gap = relative_gap(expected, torch_logits(net, inputs))
  print(f"{case}: {code} loads strictly; max |logit gap| / scale {gap:.1e}")
  assert gap < 1e-4


@needs_robustbench
def test_preact_resnet18_class_would_be_silently_wrong_so_it_is_never_named():
  """PreActResNet18() takes the projection shortcut from the raw input: the same
  tensors load strictly and compute another function. The export names the
  out_shortcut=True class instead (the test above checks it computes bat_jax's)."""
  module = models.create_model("preact_resnet18", 10, final_norm=False)
  variables = random_variables(module, CIFAR, "random")
  state = {k: torch.from_numpy(np.array(v))
           for k, v in export.torch_state_dict(module, variables, CIFAR).items()}
  wrong = robustbench_module("robustbench.model_zoo.architectures.resnet").PreActResNet18()
  wrong.load_state_dict(state, strict=True)
  images = np.random.default_rng(2).uniform(size=(2,) + CIFAR).astype(np.float32)
  expected = np.asarray(module.apply(variables, images, train=False))
  assert relative_gap(expected, torch_logits(wrong.eval(), images)) > 1e-2
  assert "PreActResNet18" not in export.robustbench_architecture(module, CIFAR)["code"]


@pytest.mark.parametrize("name, overrides, shape, why", [
    ("lenet", {}, MNIST, "no class for bat_jax's LeNet"),
    ("tiny_resnet", {}, CIFAR, "64 stem channels; this model has 8"),
    ("resnet18", {"width": 32}, CIFAR, "this model has 32"),
    ("wrn28_10", {"widen_factor": 1}, (28, 28, 1), "32 x 32 RGB images"),
    ("tiny_wrn", {"activation": "silu"}, CIFAR, "ReLU activations only (this model has silu)"),
    ("wrn70_16", {"activation": "silu"}, CIFAR, "DMWideResNet (Swish) pads the stride-2"),
])
def test_models_no_robustbench_class_computes_are_declared_not_loadable(name, overrides,
                                                                         shape, why):
  module = models.create_model(name, 10, **overrides)
  architecture = export.robustbench_architecture(module, shape)
  assert architecture == {"loadable": False, "reason": architecture["reason"]}
  assert why in architecture["reason"]


def dm_state_dict(state):
  """bat_jax's (TRADES's) WRN names -> those of RobustBench's DMWideResNet."""
  top = {"conv1.": "init_conv.", "bn1.": "batchnorm.", "fc.": "logits."}
  inner = {"bn1": "batchnorm_0", "conv1": "conv_0", "bn2": "batchnorm_1",
           "conv2": "conv_1", "convShortcut": "shortcut"}
  renamed = {}
  for name, value in state.items():
    match = re.fullmatch(r"block(\d)\.layer\.(\d+)\.(\w+)\.(\w+)", name)
    if match:
      group, block, module, leaf = match.groups()
      name = f"layer.{int(group) - 1}.block.{block}.{inner[module]}.{leaf}"
    else:
      prefix = next(p for p in top if name.startswith(p))
      name = top[prefix] + name[len(prefix):]
    renamed[name] = torch.from_numpy(np.array(value))
  return renamed


@needs_robustbench
def test_dm_wide_resnet_would_be_silently_wrong_for_a_silu_wrn_so_none_is_named():
  """DMWideResNet (Swish) takes bat_jax's SiLU WRN tensors strictly but pads its
  stride-2 convolutions (0, 1) as TensorFlow's SAME, where bat_jax pads (1, 1):
  another function. With the padding made symmetric it gives bat_jax's logits,
  so the padding is the only difference."""
  module = models.create_model("wrn16_2", 10, activation="silu")
  variables = random_variables(module, CIFAR, "random")
  state = dm_state_dict(export.torch_state_dict(module, variables, CIFAR))
  dm = robustbench_module("robustbench.model_zoo.architectures.dm_wide_resnet")
  net = dm.DMWideResNet(num_classes=10, depth=16, width=2, activation_fn=dm.Swish,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
  net.load_state_dict(state, strict=True)
  images = np.random.default_rng(3).uniform(size=(2,) + CIFAR).astype(np.float32)
  expected = np.asarray(module.apply(variables, images, train=False))
  assert relative_gap(expected, torch_logits(net, images)) > 1e-2
  torch_pad = torch.nn.functional.pad
  symmetric = lambda x, pad: torch_pad(x, (1, 1, 1, 1) if tuple(pad) == (0, 1, 0, 1) else pad)
  dm.F = types.SimpleNamespace(pad=symmetric, avg_pool2d=torch.nn.functional.avg_pool2d)
  assert relative_gap(expected, torch_logits(net, images)) < 1e-4
  assert export.robustbench_architecture(module, CIFAR)["loadable"] is False


@needs_robustbench
def test_wrn70_16_has_robustbench_wide_resnets_parameter_count():
  """Counted from shapes on both sides: nothing of WRN-70-16's size is allocated."""
  module = models.create_model("wrn70_16", 10)
  architecture = export.robustbench_architecture(module, CIFAR)
  assert architecture["code"] == "WideResNet(depth=70, widen_factor=16)"
  with torch.device("meta"):
    net = robustbench_model(architecture)
  abstract = jax.eval_shape(lambda: module.init(
      jax.random.key(0), np.zeros((1,) + CIFAR, np.float32), train=False))
  assert (models.count_params(abstract["params"])
          == sum(p.numel() for p in net.parameters()) == 266_796_506)


# --------------------------------------------------------------------------
# The model-info file.
# --------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"^(Standard|[A-Z][A-Za-z-]+\d{4}[A-Za-z0-9-]+)(_[\w.-]+)?$")
PERCENT = re.compile(r"^\d{1,3}\.\d{2}$")


def test_fixture_is_robustbench_files_and_the_name_pattern_fits_all_of_them():
  assert FIELDS["files"] == 188 and FIELDS["threat_models"] == ["L2", "Linf"]
  assert all(NAME_PATTERN.match(n) for n in FIELDS["names"])


def assert_valid_entry(path, info):
  """``info`` at ``path`` is a RobustBench model-info file as its own files are."""
  dataset, threat, file_name = path.split("/")
  assert threat in FIELDS["threat_models"] and file_name.endswith(".json")
  assert NAME_PATTERN.match(file_name[:-len(".json")]), file_name
  in_every_file = {k for k, v in FIELDS["fields"].items() if v["files"] == FIELDS["files"]}
  assert in_every_file <= set(info) <= set(FIELDS["fields"]), set(info) ^ in_every_file
  types = {str: "string", bool: "boolean", int: "integer", type(None): "null"}
  for key, value in info.items():
    assert types[type(value)] in FIELDS["fields"][key]["types"], (key, value)
  assert info["dataset"] == dataset
  for key in ("clean_acc", "autoattack_acc"):
    assert PERCENT.match(info[key]), (key, info[key])
  assert info["reported"] == "" or PERCENT.match(info["reported"])


def cifar_config(**overrides):
  config = ml_collections.ConfigDict(configlib.base_config().to_dict())
  config.update(dataset="cifar10", model="tiny_wrn", method="bat", eps=8 / 255,
                attack_step_size=2 / 255, num_train_steps=2)
  config.update(overrides)
  return config


def standard_results(num_examples, eps, norm, warnings=()):
  return {"clean_acc": 0.8123, "autoattack_acc": 0.4567, "pgd_acc": 0.5, "eps": eps,
          "norm": norm, "num_examples": num_examples, "split": "test", "step": 2,
          "checkpoint": "last", "sanity_warnings": list(warnings),
          "autoattack_per_attack": {"clean": 0.8123, "apgd-ce": 0.5, "apgd-t": 0.47,
                                    "fab-t": 0.46, "square": 0.4567},
          "settings": {"pgd_steps": 50, "pgd_restarts": 10, "pgd_step_size": 2 / 255,
                       "autoattack": {"version": "standard", "attacks": [
                           "apgd-ce", "apgd-t", "fab-t", "square"], "settings": {},
                           "standard": True}}}


@pytest.mark.parametrize("norm, eps, eps_text, folder", [
    ("linf", 8 / 255, "8/255", "Linf"), ("L2", 0.5, "0.5", "L2")])
def test_export_writes_a_valid_robustbench_entry_per_threat_model(norm, eps, eps_text,
                                                                   folder, tmp_path):
  config = cifar_config(norm=norm, eps=eps)
  module = models.create_model("tiny_wrn", 10)
  variables = random_variables(module, CIFAR, "random")
  source = {"workdir": "runs/c10", "which": "last", "checkpoint": "last", "step": 2}
  paths = export.export(config, variables, str(tmp_path), source=source,
                        results=standard_results(10_000, eps, norm.lower()))
  path = f"cifar10/{folder}/Kim2021Bridged_WRN10_1.json"
  info = json.loads((tmp_path / path).read_text())
  print(f"{path}:\n{json.dumps(info, indent=2)}")
  assert_valid_entry(path, info)
  assert (info["eps"], info["clean_acc"], info["autoattack_acc"], info["reported"],
          info["unreliable"], info["additional_data"]) == (
              eps_text, "81.23", "45.67", "", False, False)
  assert info["architecture"] == "WideResNet-10-1"
  record = json.loads((tmp_path / export.METADATA_FILE).read_text())
  assert record["threat_model"] == folder and record["leaderboard_grade"] is True
  assert record["robustbench"]["checkpoint"] == path[:-5] + ".pt"
  assert paths["robustbench_checkpoint"] == str(tmp_path / path[:-5]) + ".pt"
  card = (tmp_path / export.CARD_FILE).read_text()
  assert f"({folder}, eps = {eps_text})" in card and "Not leaderboard-grade" not in card
  assert "WideResNet(depth=10, widen_factor=1)" in card
  if ROBUSTBENCH is not None:
    net = robustbench_model(record["robustbench"]["architecture"])
    net.load_state_dict(torch.load(tmp_path / record["robustbench"]["checkpoint"]),
                        strict=True)


def test_the_card_of_a_silu_wrn_names_no_robustbench_class_and_its_training():
  """The card and record of a SiLU WRN-16-2 trained with label smoothing 0.1."""
  def card_and_record(config, module):
    architecture = export.robustbench_architecture(module, CIFAR)
    entry_path, info = export.robustbench_entry(config)
    record = export.export_metadata(
        config, None, None, entry_path=entry_path, checkpoint_path=None,
        checkpoint_missing=architecture.get("reason"), architecture=architecture,
        torch_architecture=export.torch_architecture(module, CIFAR))
    return export.model_card(config, info, record, 1234), record, entry_path

  config = cifar_config(model="wrn16_2", activation="silu", label_smoothing=0.1)
  configlib.validate(config)
  card, record, entry_path = card_and_record(
      config, models.create_model("wrn16_2", 10, activation="silu"))
  assert entry_path == "cifar10/Linf/Kim2021Bridged_WRN16_2.json"
  assert ("| architecture | WideResNet-16-2 (`wrn16_2`, silu activations, 1,234 "
          "parameters) |") in card
  assert ("No RobustBench class computes this model: RobustBench's WideResNet has ReLU "
          "activations only (this model has silu)") in card
  assert "BAT (beta = 5, num_bridges = 2, label_smoothing = 0.1)" in card
  assert (record["training"]["activation"], record["training"]["label_smoothing"]) == (
      "silu", 0.1)
  assert record["torch_architecture"]["kwargs"]["activation"] == "silu"
  card, record, _ = card_and_record(cifar_config(), models.create_model("tiny_wrn", 10))
  assert "activation" not in record["training"] and "label_smoothing" not in record["training"]
  assert "activation" not in record["torch_architecture"]["kwargs"]
  assert "| architecture | WideResNet-10-1 (`tiny_wrn`, 1,234 parameters) |" in card


def test_subset_and_custom_budget_evaluations_are_marked_not_leaderboard_grade(tmp_path):
  config = cifar_config()
  results = standard_results(1000, 8 / 255, "linf", warnings=["FGSM beats PGD"])
  results["settings"]["autoattack"].update(settings={"square_queries": 100},
                                           standard=False)
  module = models.create_model("tiny_wrn", 10)
  export.export(config, random_variables(module, CIFAR, "fresh"), str(tmp_path),
                results=results, source={"workdir": "runs/c10", "which": "best",
                                         "checkpoint": "best", "step": 2},
                extra_data=None)
  info = json.loads((tmp_path / "cifar10/Linf/Kim2021Bridged_WRN10_1.json").read_text())
  assert info["unreliable"] is True
  record = json.loads((tmp_path / export.METADATA_FILE).read_text())
  assert record["leaderboard_grade"] is False
  reasons = " ".join(record["not_leaderboard_grade"])
  assert "1000 of the 10,000 test images" in reasons and "not 'standard'" in reasons
  card = (tmp_path / export.CARD_FILE).read_text()
  assert "**Not leaderboard-grade**" in card
  assert ("python -m bat_jax.evaluate --workdir=runs/c10 --which=best --norm=linf "
          "--autoattack_version=standard --num_examples=-1") in card


def test_reported_is_the_papers_number_for_exactly_that_setting():
  """Table B.2's BAT ResNet-18 at 8/255 reports 48.44% AutoAttack; another
  schedule, eps or checkpoint is another setting: '' as RobustBench writes it."""
  table = paper.TABLES["B2"]
  row = next(r for r in table.rows if r.method == "bat" and abs(r.eps - 8 / 255) < 1e-9)
  config = next(iter(reproduce.plan(table, [0], rows=[row]).values()))
  _, info = export.robustbench_entry(config, source={"checkpoint": "last"})
  assert info["reported"] == "48.44"
  assert export.robustbench_entry(config, source={"checkpoint": "best"})[1]["reported"] == ""
  config.schedule = "step"
  assert export.robustbench_entry(config, source={"checkpoint": "last"})[1]["reported"] == ""


def test_generated_extra_data_is_not_additional_data_but_a_footnote():
  config = cifar_config(extra_data_path="generated.npz")
  assert export.robustbench_entry(config)[1]["additional_data"] is True
  _, info = export.robustbench_entry(config, extra_data="generated")
  assert info["additional_data"] is False
  assert "It uses additional synthetic images in training." in info["footnote"]


def test_threat_model_and_names():
  assert [export.threat_model(n) for n in ("linf", "LINF", "l2", "L2")] == [
      "Linf", "Linf", "L2", "L2"]
  with pytest.raises(ValueError, match="l1"):
    export.threat_model("l1")
  assert export.model_name(cifar_config(method="trades", model="wrn34_10")) == (
      "Zhang2019Theoretically_WRN34_10")
  assert export.model_name(cifar_config(method="standard", model="resnet18")) == (
      "Standard_R18")
