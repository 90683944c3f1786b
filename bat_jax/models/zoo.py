"""The models bat_jax ships: their registry entries (registry.py says what each field is).

The PyTorch twins are the classes of the exported module file
(``bat_jax/export/torch_models.py.txt``), named as in the PyTorch code these
architectures come from: kuangliu/pytorch-cifar for the ResNets, TRADES for
the Wide ResNets. Their RobustBench classes take 3 x 32 x 32 inputs and, for
the ResNets, 64 stem channels; other instances (and SiLU Wide ResNets, which
no RobustBench class computes) export without a ``.pt``. Any
``wrn{depth}_{width}`` is a model too (the :class:`ModelFamily` below).
"""

from typing import Any, Dict, Mapping

from bat_jax import errors
from bat_jax.models.lenet import LeNet
from bat_jax.models.registry import (ModelFamily, ModelSpec, RobustBenchClass, TorchTwin,
                                     register_family, register_model)
from bat_jax.models.resnet import PreActResNet18, ResNet, ResNet18
from bat_jax.models.tiny import TinyCNN
from bat_jax.models.wide_resnet import WRN28_10, WRN34_10, WideResNet, depth_error

_RESNET_MODULE = "robustbench.model_zoo.architectures.resnet"
_WIDE_RESNET_MODULE = "robustbench.model_zoo.architectures.wide_resnet"
_ROBUSTBENCH_RESNET_WIDTH = 64  # RobustBench's ResNets: a fixed 64-channel stem


def _classes(kwargs: Mapping[str, Any]) -> Dict[str, int]:
  """RobustBench's classes default to 10 classes: the argument only for others."""
  return {} if kwargs["num_classes"] == 10 else {"num_classes": kwargs["num_classes"]}


def _width_reason(name: str, kwargs: Mapping[str, Any]) -> str:
  return (f"RobustBench's {name} has {_ROBUSTBENCH_RESNET_WIDTH} stem channels; this "
          f"model has {kwargs['width']}")


def _robustbench_resnet(kwargs):
  if kwargs["width"] != _ROBUSTBENCH_RESNET_WIDTH:
    return _width_reason("ResNet", kwargs)
  stages = [int(s) for s in kwargs["stage_sizes"]]
  shorthand = {(2, 2, 2, 2): "ResNet18", (3, 4, 6, 3): "ResNet34"}.get(tuple(stages))
  if shorthand and not _classes(kwargs):
    return shorthand, [], {}
  return "ResNet", ["BasicBlock", stages], _classes(kwargs)


def _robustbench_preact_resnet(kwargs):
  """bat_jax's pre-activation blocks take the projection shortcut from the
  activated input, RobustBench's ``out_shortcut=True``; its
  ``PreActResNet18()`` takes it from the raw input and computes another
  function from the same tensors, so it is never named."""
  if kwargs["width"] != _ROBUSTBENCH_RESNET_WIDTH:
    return _width_reason("PreActResNet", kwargs)
  stages = [int(s) for s in kwargs["stage_sizes"]]
  return ("PreActResNet", ["PreActBlock", stages],
          dict(_classes(kwargs), bn_before_fc=bool(kwargs["final_norm"]),
               out_shortcut=True))


def _robustbench_wide_resnet(kwargs):
  """RobustBench's WideResNet is TRADES's, ReLU only. Its DMWideResNet (Swish) pads
  stride-2 convolutions as TensorFlow's 'SAME' (0 before, 1 after) where
  bat_jax pads 1 on both sides (tests/test_robustbench.py), so a SiLU
  WideResNet has no RobustBench class."""
  if kwargs.get("activation", "relu") != "relu":
    return (f"RobustBench's WideResNet has ReLU activations only (this model has "
            f"{kwargs['activation']}), and its DMWideResNet (Swish) pads the stride-2 "
            "convolutions as TensorFlow's 'SAME' (0 before, 1 after) where bat_jax pads "
            "1 on both sides: it computes another function from the same tensors")
  return "WideResNet", [], dict(depth=kwargs["depth"],
                                widen_factor=kwargs["widen_factor"], **_classes(kwargs))


def _lenet_kwargs(module, image_shape):
  del module  # LeNet's only size argument is the input's
  if image_shape[0] != image_shape[1]:
    raise ValueError(f"LeNet export needs square images; got {tuple(image_shape)}.")
  return {"image_size": int(image_shape[0])}


def _resnet_kwargs(module, image_shape):
  del image_shape
  return {"stage_sizes": [int(s) for s in module.stage_sizes], "width": int(module.width)}


def _preact_resnet_kwargs(module, image_shape):
  return dict(_resnet_kwargs(module, image_shape), final_norm=bool(module.final_norm))


def _wide_resnet_kwargs(module, image_shape):
  """Depth and width; the activation only when it is not ReLU (the class's default)."""
  del image_shape
  kwargs = {"depth": int(module.depth), "widen_factor": int(module.widen_factor)}
  if module.activation != "relu":
    kwargs["activation"] = module.activation
  return kwargs


_STAGE_BLOCKS = (r"stage(\d+)_block(\d+)", "layer{}.{}")
LENET = TorchTwin("LeNet", _lenet_kwargs, flatten=("fc1", "conv2"))
RESNET = TorchTwin(
    "ResNet", _resnet_kwargs,
    renames={"stem_conv": "conv1", "stem_bn": "bn1", "shortcut_conv": "shortcut.0",
             "shortcut_bn": "shortcut.1", "fc": "linear"},
    blocks=_STAGE_BLOCKS,
    robustbench=RobustBenchClass(_RESNET_MODULE, _robustbench_resnet))
PREACT_RESNET = TorchTwin(
    "PreActResNet", _preact_resnet_kwargs,
    renames={"stem_conv": "conv1", "shortcut_conv": "shortcut.0", "final_bn": "bn",
             "fc": "linear"},
    blocks=_STAGE_BLOCKS,
    robustbench=RobustBenchClass(_RESNET_MODULE, _robustbench_preact_resnet))
WIDE_RESNET = TorchTwin(
    "WideResNet", _wide_resnet_kwargs,
    renames={"stem_conv": "conv1", "shortcut_conv": "convShortcut", "final_bn": "bn1",
             "fc": "fc"},
    blocks=(r"group(\d+)_block(\d+)", "block{}.layer.{}"),
    robustbench=RobustBenchClass(_WIDE_RESNET_MODULE, _robustbench_wide_resnet))

SHIPPED = (
    ModelSpec("lenet", LeNet, False, display_name="LeNet (MNIST CNN)",
              export_suffix="LeNet", torch=LENET),
    ModelSpec("resnet18", ResNet18, True, display_name="ResNet-18", export_suffix="R18",
              torch=RESNET),
    ModelSpec("preact_resnet18", PreActResNet18, True, display_name="PreActResNet-18",
              export_suffix="PreActR18", torch=PREACT_RESNET),
    ModelSpec("wrn28_10", WRN28_10, True, display_name="WideResNet-28-10",
              export_suffix="WRN28_10", torch=WIDE_RESNET),
    ModelSpec("wrn34_10", WRN34_10, True, display_name="WideResNet-34-10",
              export_suffix="WRN34_10", torch=WIDE_RESNET),
    # Gowal et al. 2020 and Rebuffi et al. 2021's largest CIFAR model (~266.8M).
    ModelSpec("wrn70_16", WideResNet, True, {"depth": 70, "widen_factor": 16},
              display_name="WideResNet-70-16", export_suffix="WRN70_16",
              torch=WIDE_RESNET),
    # CPU-sized models for tests and `runlocal` configs; TinyCNN does not export.
    ModelSpec("tiny_cnn", TinyCNN, True),
    ModelSpec("tiny_resnet", ResNet, True, {"stage_sizes": (1, 1, 1, 1), "width": 8},
              display_name="ResNet (tiny, for tests)", export_suffix="TinyR",
              torch=RESNET),
    # WRN-10-1: the WRN-28-10 code path at CPU size (benchmark smoke runs).
    ModelSpec("tiny_wrn", WideResNet, True, {"depth": 10, "widen_factor": 1},
              display_name="WideResNet-10-1", export_suffix="WRN10_1", torch=WIDE_RESNET),
)
for _spec in SHIPPED:
  register_model(_spec)


def _wide_resnet_spec(match) -> ModelSpec:
  """``wrn{depth}_{width}`` -> WRN-depth-width, named as the shipped Wide ResNets."""
  depth, width = int(match[1]), int(match[2])
  if depth_error(depth):
    raise errors.UserError(f"Model {match[0]!r}: {depth_error(depth)}.")
  return ModelSpec(match[0], WideResNet, True, {"depth": depth, "widen_factor": width},
                   display_name=f"WideResNet-{depth}-{width}",
                   export_suffix=f"WRN{depth}_{width}", torch=WIDE_RESNET)


# Any WRN-depth-width, e.g. config.model='wrn40_4' or 'wrn106_16'.
WIDE_RESNETS = register_family(ModelFamily("wrn{depth}_{width}",
                                           r"wrn([1-9]\d*)_([1-9]\d*)", _wide_resnet_spec))
