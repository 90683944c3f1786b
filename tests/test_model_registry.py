"""A new model is one registry entry: it trains, evaluates and exports (docs/LAYOUT.md)."""

import json
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np
import pytest

from bat_jax import configlib, errors, evaluate, export, models, rundir, train, train_state
from test_train import tiny_config


class ToyNet(nn.Module):
  """conv 3x3 -> BN -> ReLU -> max-pool 2 -> flatten -> dense, through its layers."""
  num_classes: int = 10
  width: int = 8
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  layers: models.Layers = models.STOCK  # conv / norm / pool factories (CPU-fast in training)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, jnp.float32)
    if self.mean is not None:
      x = x - jnp.asarray(self.mean, jnp.float32)
    if self.std is not None:
      x = x / jnp.asarray(self.std, jnp.float32)
    x = self.layers.conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv")(x.astype(self.dtype))
    x = self.layers.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, axis_name=self.bn_axis_name, name="bn")(x)
    x = self.layers.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(
        x.reshape((x.shape[0], -1)))
    return x.astype(jnp.float32)


# Its PyTorch twin, as text: the exported module file defines nn, F, torch,
# Normalize and batch_norm (bat_jax's BatchNorm eps and momentum).
TOY_TORCH_SOURCE = '''
class ToyNet(nn.Module):
  """ToyNet in PyTorch (NCHW inputs in [0, 1])."""

  def __init__(self, num_classes=10, in_channels=1, image_size=28, width=8, mean=None,
               std=None):
    super().__init__()
    self.normalize = Normalize(mean, std)
    self.features = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), batch_norm(width),
        nn.ReLU(), nn.MaxPool2d(2))
    self.classifier = nn.Linear(width * (image_size // 2) ** 2, num_classes)

  def forward(self, x):
    return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))
'''


class OnlyClasses(nn.Module):
  """A module without the fields create_model passes."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def toy_twin(**changes) -> models.TorchTwin:
  fields = dict(
      class_name="ToyNet",
      kwargs=lambda module, shape: {"image_size": shape[0], "width": module.width},
      source=TOY_TORCH_SOURCE,
      renames={"conv": "features.0", "bn": "features.1", "head": "classifier"},
      same_names=(), flatten=("head", "conv"))
  return models.TorchTwin(**{**fields, **changes})


def toy_spec(**changes) -> models.ModelSpec:
  fields = dict(name="toy_net", module=ToyNet, has_batch_norm=True, defaults={"width": 6},
                display_name="ToyNet (a test model)", export_suffix="Toy",
                torch=toy_twin())
  return models.ModelSpec(**{**fields, **changes})


@pytest.fixture
def toy_model():
  """ToyNet registered as docs/LAYOUT.md says; the registry is as before afterwards."""
  spec = models.register_model(toy_spec())
  try:
    yield spec
  finally:
    del models.MODELS["toy_net"]


@pytest.fixture
def registry_kept():
  """For tests that try to register: whatever they add is removed afterwards."""
  before = dict(models.MODELS)
  try:
    yield
  finally:
    models.MODELS.clear()
    models.MODELS.update(before)


@pytest.mark.slow
def test_a_registered_model_trains_evaluates_and_exports(toy_model, tmp_path):
  torch = pytest.importorskip("torch")
  from test_export import assert_logits_close, load_module_file, torch_logits  # needs torch
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny_config(model="toy_net", num_train_steps=2),
                                     workdir)
  assert summary["steps"] == 2 and 0 <= summary["clean_acc"] <= 1
  restored = rundir.restore_model(workdir, "last")
  assert type(restored.model) is ToyNet and restored.model.width == 6
  assert set(restored.variables) == {"params", "batch_stats"}

  results = evaluate.evaluate_workdir(
      workdir, which="last", num_examples=16, batch_size=16, pgd_step_size=0.1,
      protocol=evaluate.Protocol(pgd_steps=2, pgd_restarts=1,
                                 autoattack=evaluate.AutoAttackOptions(
                                     version="custom", attacks=("apgd-ce",),
                                     settings=dict(apgd_iters=2))),
      sanity_examples=16)["last"]
  assert results["model"] == "toy_net" and results["num_examples"] == 16
  assert 0 <= results["autoattack_acc"] <= results["clean_acc"] <= 1

  out = tmp_path / "export"
  paths = export.export_workdir(workdir, "last", str(out))
  net = load_module_file(out).load_model(str(out))
  assert isinstance(net, torch.nn.Module) and not net.training
  images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
  expected = np.asarray(restored.logits_fn(images))
  assert np.abs(expected).max() > 0.1
  assert_logits_close(expected, torch_logits(net, images))

  _, metadata = export.read_safetensors(paths["weights"])
  assert json.loads(metadata[export.ARCHITECTURE_KEY]) == {
      "class": "ToyNet", "kwargs": {"num_classes": 10, "in_channels": 1, "mean": None,
                                    "std": None, "image_size": 28, "width": 6}}
  entry = "mnist/Linf/Kim2021Bridged_Toy.json"
  info = json.loads((out / entry).read_text())
  assert info["architecture"] == "ToyNet (a test model)"
  assert info["clean_acc"] == f"{100 * results['clean_acc']:.2f}"
  card = (out / export.CARD_FILE).read_text()
  assert "RobustBench has no class for bat_jax's ToyNet." in card
  assert "head's rows reordered from the NHWC to the NCHW flatten" in card
  assert "eps 1e-5 and momentum 0.1" in card


def test_the_export_appends_the_twin_source_and_keeps_the_shipped_file(toy_model,
                                                                       tmp_path):
  """Random weights and BatchNorm statistics, normalised inputs: PyTorch's logits."""
  pytest.importorskip("torch")
  from test_export import (assert_logits_close, load_module_file, random_variables,
                           torch_logits)
  mnist = (28, 28, 1)
  module = models.create_model("toy_net", 10, mean=(0.13,), std=(0.31,))
  variables = random_variables(module, mnist, "random")
  export.write_torch_model(module, variables, str(tmp_path), mnist)
  with open(export.TORCH_TEMPLATE) as f:
    template = f.read()
  written = (tmp_path / export.MODULE_FILE).read_text()
  assert written.startswith(template) and written.endswith(
      "\nMODELS['ToyNet'] = ToyNet\n")
  assert export.torch_module_source(models.create_model("lenet", 10)) == template
  net = load_module_file(tmp_path).load_model(str(tmp_path))
  images = np.random.default_rng(1).uniform(size=(4,) + mnist).astype(np.float32)
  expected = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, images))
  assert np.abs(expected).max() > 0.1
  assert_logits_close(expected, torch_logits(net, images))
  assert sorted(load_module_file(tmp_path).MODELS) == sorted(
      models.registry.TEMPLATE_CLASSES + ("ToyNet",))
  assert export.robustbench_architecture(module, mnist) == {
      "loadable": False, "reason": "RobustBench has no class for bat_jax's ToyNet."}


def test_registered_names_are_valid_config_values_only_while_registered(toy_model):
  assert "toy_net" in models.MODEL_NAMES and models.has_batch_norm("toy_net")
  configlib.validate(tiny_config(model="toy_net"))
  del models.MODELS["toy_net"]
  try:
    with pytest.raises(configlib.ConfigError, match="config.model='toy_net'"):
      configlib.validate(tiny_config(model="toy_net"))
  finally:
    models.register_model(toy_model)


def test_unknown_model_names_say_what_exists():
  with pytest.raises(errors.UserError, match="did you mean 'resnet18'"):
    models.create_model("resnet19", 10)
  with pytest.raises(configlib.ConfigError,
                     match=r"config.model='wrn28-10' is invalid.*did you mean 'wrn28_10'"):
    configlib.validate(tiny_config(model="wrn28-10"))


@pytest.mark.parametrize("spec, why", [
    (lambda: models.MODELS["lenet"], "a model 'lenet' is already registered"),
    (lambda: toy_spec(name="toy net"), "the name must be a word"),
    (lambda: toy_spec(module=models.TinyCNN, defaults={"depth": 3}),
     r"TinyCNN has no field \['depth'\]"),
    (lambda: toy_spec(module=OnlyClasses, has_batch_norm=False, defaults={}),
     r"OnlyClasses has no field \['mean', 'std', 'dtype', 'layers'\]"),
    (lambda: toy_spec(torch=toy_twin(source="class Other(nn.Module):\n  pass\n")),
     "torch.source does not define `class ToyNet`"),
    (lambda: toy_spec(torch=toy_twin(class_name="ResNet", source="class ResNet:\n  pass")),
     "'ResNet' is one of the exported module file's"),
    (lambda: toy_spec(torch=toy_twin(source="")),
     "'ToyNet' is not in the exported module file"),
    (lambda: toy_spec(module=models.ResNet, torch=toy_twin(class_name="ResNet", source="")),
     "ResNet is 'tiny_resnet''s, whose PyTorch twin differs"),
])
def test_registering_a_model_that_cannot_work_is_refused(registry_kept, spec, why):
  before = dict(models.MODELS)
  with pytest.raises(ValueError, match=why):
    models.register_model(spec())
  assert models.MODELS == before


def test_registering_twice_is_refused_and_leaves_the_first(toy_model):
  with pytest.raises(ValueError, match="'toy_net' is already registered; choose another"):
    models.register_model(toy_spec(display_name="another"))
  assert models.get("toy_net") is toy_model


def test_a_flax_class_shares_its_twin_and_subclasses_find_it(registry_kept):
  """A second entry for a registered class (here without a twin of its own) exports
  through the class's twin; subclasses of a registered class too."""
  models.register_model(models.ModelSpec("resnet_w32", models.ResNet, True,
                                         {"width": 32}))
  module = models.create_model("resnet_w32", 10)
  assert export.torch_architecture(module, (32, 32, 3))["kwargs"]["width"] == 32
  assert models.torch_twin(models.create_model("resnet18", 10)) is models.zoo.RESNET
  with pytest.raises(ValueError, match="No PyTorch export for TinyCNN"):
    models.torch_twin(models.create_model("tiny_cnn", 10))


def test_any_wrn_depth_width_is_a_model_registered_on_first_use(registry_kept):
  assert "wrn40_4" not in models.MODELS
  configlib.validate(tiny_config(model="wrn40_4", activation="Swish"))
  spec = models.MODELS["wrn40_4"]
  assert (spec.module, spec.defaults, spec.display_name, spec.export_suffix) == (
      models.WideResNet, {"depth": 40, "widen_factor": 4}, "WideResNet-40-4", "WRN40_4")
  assert models.get("wrn40_4") is spec and models.has_batch_norm("wrn40_4")
  module = models.create_model("wrn40_4", 10)
  assert (module.depth, module.widen_factor, module.activation) == (40, 4, "relu")
  assert export.robustbench_architecture(module, (32, 32, 3))["code"] == (
      "WideResNet(depth=40, widen_factor=4)")
  assert models.get("wrn28_10") is models.MODELS["wrn28_10"]  # the shipped entry wins
  for name in ("wrn30_10", "wrn4_1"):
    with pytest.raises(configlib.ConfigError,
                       match=rf"config.model='{name}' is invalid: .*must be 6n \+ 4"):
      configlib.validate(tiny_config(model=name))
  for name in ("wrn28_0", "wrn028_10", "wrn28"):
    with pytest.raises(configlib.ConfigError, match=r"must be one of .*'wrn\{depth\}_\{width\}'"):
      configlib.validate(tiny_config(model=name))
  with pytest.raises(ValueError, match="already registered"):
    models.register_family(models.zoo.WIDE_RESNETS)


def test_activation_is_checked_and_canonical_in_the_config():
  config = tiny_config(model="wrn70_16", activation="SWISH")
  configlib.validate(config)
  assert config.activation == "silu"
  # The trainer, evaluation and export build the config's activation.
  built = train_state.build_model(tiny_config(model="tiny_wrn", activation="silu"),
                                  bn_axis_name=None)
  assert built.activation == "silu"
  with pytest.raises(configlib.ConfigError,
                     match=r"config.activation='silu' is invalid: model 'tiny_cnn' has ReLU"):
    configlib.validate(tiny_config(activation="silu"))
  with pytest.raises(configlib.ConfigError,
                     match=r"config.activation='gelu' is invalid: must be one of \['relu', "):
    configlib.validate(tiny_config(model="tiny_wrn", activation="gelu"))
