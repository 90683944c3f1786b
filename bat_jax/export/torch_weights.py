"""Flax variables -> the PyTorch state dict of the exported architectures.

Per architecture, the Flax submodule names map to those of the PyTorch module
file (``torch_models.py.txt``, copied into the export as ``bat_jax_models.py``),
and the layouts change: conv kernels HWIO -> OIHW, dense ``[in, out]`` ->
``[out, in]`` (LeNet's first dense layer reordered for PyTorch's NCHW
flatten), BatchNorm scale / bias / mean / var -> weight / bias /
running_mean / running_var.
"""

import json
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence

from flax import traverse_util
import numpy as np

from bat_jax import fs, models
from bat_jax.export.safetensors import write_safetensors

WEIGHTS_FILE = "model.safetensors"
# RobustBench's architecture modules (robustbench/model_zoo/architectures/).
ROBUSTBENCH_MODULES = {"ResNet": "robustbench.model_zoo.architectures.resnet",
                       "PreActResNet": "robustbench.model_zoo.architectures.resnet",
                       "WideResNet": "robustbench.model_zoo.architectures.wide_resnet"}
# Their fixed input: 3-channel 32 x 32 images, and (ResNets) 64 stem channels;
# their average pool has a fixed window (4 or 8), a global mean only at 32 x 32.
_ROBUSTBENCH_IMAGE = (32, 32, 3)
_ROBUSTBENCH_RESNET_WIDTH = 64
MODULE_FILE = "bat_jax_models.py"
# The PyTorch module file, copied as MODULE_FILE (never imported by bat_jax).
TORCH_TEMPLATE = os.path.join(os.path.dirname(__file__), "torch_models.py.txt")
# Safetensors metadata key of {"class", "kwargs"}, read by bat_jax_models.load_model.
ARCHITECTURE_KEY = "bat_jax_architecture"

# Per PyTorch class of bat_jax_models.py: Flax submodule names -> PyTorch names,
# and the pattern of the residual blocks' names (1-based in Flax, 0-based
# Sequential indices in PyTorch). conv1, conv2, bn1, bn2, fc1, fc2 keep theirs.
_RENAMES = {
    "LeNet": ({}, None),
    "ResNet": ({"stem_conv": "conv1", "stem_bn": "bn1", "shortcut_conv": "shortcut.0",
                "shortcut_bn": "shortcut.1", "fc": "linear"},
               (r"stage(\d+)_block(\d+)", "layer{}.{}")),
    "PreActResNet": ({"stem_conv": "conv1", "shortcut_conv": "shortcut.0",
                      "final_bn": "bn", "fc": "linear"},
                     (r"stage(\d+)_block(\d+)", "layer{}.{}")),
    "WideResNet": ({"stem_conv": "conv1", "shortcut_conv": "convShortcut",
                    "final_bn": "bn1", "fc": "fc"},
                   (r"group(\d+)_block(\d+)", "block{}.layer.{}")),
}
_KEPT_NAMES = ("conv1", "conv2", "bn1", "bn2", "fc1", "fc2")


def torch_architecture(module, image_shape: Sequence[int]) -> Dict[str, Any]:
  """``{"class", "kwargs"}`` of the PyTorch twin of the Flax ``module``.

  ``image_shape``: ``(H, W, C)`` of the inputs. Subclasses (ResNet18,
  WRN28_10, ...) map to their base class with their fields as arguments, so
  resized instances export too. TinyCNN (a test model) is not exportable.
  """
  kwargs = {"num_classes": int(module.num_classes), "in_channels": int(image_shape[-1]),
            "mean": None if module.mean is None else [float(v) for v in module.mean],
            "std": None if module.std is None else [float(v) for v in module.std]}
  if isinstance(module, models.LeNet):
    if image_shape[0] != image_shape[1]:
      raise ValueError(f"LeNet export needs square images; got {tuple(image_shape)}.")
    return {"class": "LeNet", "kwargs": dict(kwargs, image_size=int(image_shape[0]))}
  if isinstance(module, models.ResNet):
    return {"class": "ResNet", "kwargs": dict(
        kwargs, stage_sizes=[int(s) for s in module.stage_sizes], width=int(module.width))}
  if isinstance(module, models.PreActResNet):
    return {"class": "PreActResNet", "kwargs": dict(
        kwargs, stage_sizes=[int(s) for s in module.stage_sizes], width=int(module.width),
        final_norm=bool(module.final_norm))}
  if isinstance(module, models.WideResNet):
    return {"class": "WideResNet", "kwargs": dict(
        kwargs, depth=int(module.depth), widen_factor=int(module.widen_factor))}
  raise ValueError(f"No PyTorch export for {type(module).__name__}: exportable are "
                   "LeNet, ResNet, PreActResNet and WideResNet models.")


def robustbench_architecture(module, image_shape: Sequence[int]) -> Dict[str, Any]:
  """The RobustBench class that computes the Flax ``module``'s function, or why none does.

  Returns ``{"loadable": True, "module", "class", "args", "kwargs", "code",
  "normalization"}`` or ``{"loadable": False, "reason"}``. ``args`` name
  classes of ``module`` (e.g. ``"PreActBlock"``) or are plain values;
  ``code`` is the call as one writes it (``WideResNet(depth=34,
  widen_factor=10)``). RobustBench's classes take inputs as they are: with
  ``normalization`` (``{"mean", "std"}``, not None) the exported model
  expects ``(x - mean) / std``, as RobustBench's own normalising subclasses
  feed them. bat_jax's names of the PyTorch twin equal RobustBench's for
  these classes, so the state dict is the same.

  bat_jax's pre-activation blocks take the projection shortcut from the
  activated input (RobustBench's ``out_shortcut=True``); ``PreActResNet18()``
  takes it from the raw input and computes another function from the same
  tensors, so it is never named.
  """
  torch_twin = torch_architecture(module, image_shape)
  name, kwargs = torch_twin["class"], torch_twin["kwargs"]
  why = None
  if name not in ROBUSTBENCH_MODULES:
    why = f"RobustBench has no class for bat_jax's {name}"
  elif tuple(image_shape) != _ROBUSTBENCH_IMAGE:
    why = (f"RobustBench's {name} takes 32 x 32 RGB images (fixed stem and pooling); "
           f"this model takes {tuple(image_shape)}")
  elif name != "WideResNet" and kwargs["width"] != _ROBUSTBENCH_RESNET_WIDTH:
    why = (f"RobustBench's {name} has {_ROBUSTBENCH_RESNET_WIDTH} stem channels; this "
           f"model has {kwargs['width']}")
  if why:
    return {"loadable": False, "reason": why + "."}
  num_classes = kwargs["num_classes"]
  normalization = (None if kwargs["mean"] is None and kwargs["std"] is None
                   else {"mean": kwargs["mean"], "std": kwargs["std"]})
  classes = {} if num_classes == 10 else {"num_classes": num_classes}
  stages = [int(s) for s in kwargs.get("stage_sizes", ())]
  if name == "ResNet":
    shorthand = {(2, 2, 2, 2): "ResNet18", (3, 4, 6, 3): "ResNet34"}.get(tuple(stages))
    if shorthand and not classes:
      spec = (shorthand, [], {})
    else:
      spec = ("ResNet", ["BasicBlock", stages], classes)
  elif name == "PreActResNet":
    spec = ("PreActResNet", ["PreActBlock", stages],
            dict(classes, bn_before_fc=bool(kwargs["final_norm"]), out_shortcut=True))
  else:
    spec = ("WideResNet", [], dict(depth=kwargs["depth"],
                                   widen_factor=kwargs["widen_factor"], **classes))
  cls, args, call_kwargs = spec
  code = ", ".join([str(a) for a in args] + [f"{k}={v!r}" for k, v in call_kwargs.items()])
  return {"loadable": True, "module": ROBUSTBENCH_MODULES[name], "class": cls,
          "args": args, "kwargs": call_kwargs, "code": f"{cls}({code})",
          "normalization": normalization}


def _torch_module_name(flax_path: Sequence[str], architecture: str) -> str:
  renames, block = _RENAMES[architecture]
  parts = []
  for part in flax_path:
    match = re.fullmatch(block[0], part) if block else None
    if match:
      parts.append(block[1].format(int(match[1]), int(match[2]) - 1))
    elif part in renames:
      parts.append(renames[part])
    elif part in _KEPT_NAMES:
      parts.append(part)
    else:
      raise ValueError(f"No PyTorch name for the Flax module {'/'.join(flax_path)} "
                       f"of a {architecture}.")
  return ".".join(parts)


def _nchw_flatten_rows(kernel: np.ndarray, channels: int) -> np.ndarray:
  """A dense kernel after an NHWC flatten ``(h, w, c)`` -> after an NCHW one ``(c, h, w)``."""
  features, out = kernel.shape
  side = math.isqrt(features // channels)
  if side * side * channels != features:
    raise ValueError(f"Dense input of {features} is not a square map of {channels} channels.")
  return (kernel.reshape(side, side, channels, out).transpose(2, 0, 1, 3)
          .reshape(features, out))


def torch_state_dict(module, variables: Mapping[str, Any],
                     image_shape: Sequence[int]) -> Dict[str, np.ndarray]:
  """The PyTorch state dict (NumPy arrays) of ``variables`` of the Flax ``module``.

  Conv kernels HWIO -> OIHW, dense kernels ``[in, out]`` -> ``[out, in]`` (the
  LeNet's fc1 rows reordered for PyTorch's NCHW flatten), BatchNorm scale /
  bias / mean / var -> weight / bias / running_mean / running_var, plus
  ``num_batches_tracked`` = 0 (bat_jax does not count updates; PyTorch reads
  it only with ``momentum=None``). Names as in bat_jax_models.py, sorted.
  """
  architecture = torch_architecture(module, image_shape)["class"]
  params = traverse_util.flatten_dict(dict(variables["params"]))
  stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
  state = {}
  for (*path, leaf), value in params.items():
    name = _torch_module_name(path, architecture)
    value = np.asarray(value, np.float32)
    if leaf == "kernel" and value.ndim == 4:
      state[f"{name}.weight"] = value.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and value.ndim == 2:
      if architecture == "LeNet" and path == ["fc1"]:
        value = _nchw_flatten_rows(value, params[("conv2", "kernel")].shape[-1])
      state[f"{name}.weight"] = value.T
    elif leaf == "bias":
      state[f"{name}.bias"] = value
    elif leaf == "scale":
      mean, var = stats.get((*path, "mean")), stats.get((*path, "var"))
      if mean is None or var is None:
        raise ValueError(f"BatchNorm {'/'.join(path)} has no running statistics: pass "
                         "variables with their 'batch_stats' collection.")
      state[f"{name}.weight"] = value
      state[f"{name}.running_mean"] = np.asarray(mean, np.float32)
      state[f"{name}.running_var"] = np.asarray(var, np.float32)
      state[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    else:
      raise ValueError(f"Unexpected parameter {'/'.join(path + [leaf])} "
                       f"{value.shape}.")
  return dict(sorted(state.items()))


def write_torch_model(module, variables: Mapping[str, Any], out_dir: str,
                      image_shape: Sequence[int],
                      metadata: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """Writes WEIGHTS_FILE and MODULE_FILE into ``out_dir``; returns their paths.

  The weights' metadata holds the architecture for ``load_model`` and
  ``metadata`` (strings), besides ``format: pt``.
  """
  architecture = torch_architecture(module, image_shape)
  paths = {"weights": os.path.join(out_dir, WEIGHTS_FILE),
           "module": os.path.join(out_dir, MODULE_FILE)}
  write_safetensors(paths["weights"], torch_state_dict(module, variables, image_shape),
                    {"format": "pt", ARCHITECTURE_KEY: json.dumps(architecture),
                     **(metadata or {})})
  with open(TORCH_TEMPLATE) as f:
    fs.write_text(paths["module"], f.read())
  return paths


