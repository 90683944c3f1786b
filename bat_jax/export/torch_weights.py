"""Flax variables -> the PyTorch state dict of the exported architectures.

Per architecture, the Flax submodule names map to those of the PyTorch module
file (``torch_models.py.txt``, copied into the export as ``bat_jax_models.py``,
with the source of a registered model's own class appended) as its registry
entry's twin says (``models.TorchTwin``), and the layouts change: conv kernels
HWIO -> OIHW, dense ``[in, out]`` -> ``[out, in]`` (a dense layer after a
flatten reordered for PyTorch's NCHW flatten), BatchNorm scale / bias / mean /
var -> weight / bias / running_mean / running_var.
"""

import json
import math
import os
import re
import textwrap
from typing import Any, Dict, Mapping, Optional, Sequence

from flax import traverse_util
import numpy as np

from bat_jax import fs, models
from bat_jax.export.safetensors import write_safetensors

WEIGHTS_FILE = "model.safetensors"
MODULE_FILE = "bat_jax_models.py"
# The PyTorch module file, copied as MODULE_FILE (never imported by bat_jax).
TORCH_TEMPLATE = os.path.join(os.path.dirname(__file__), "torch_models.py.txt")
# Safetensors metadata key of {"class", "kwargs"}, read by bat_jax_models.load_model.
ARCHITECTURE_KEY = "bat_jax_architecture"


def torch_architecture(module, image_shape: Sequence[int]) -> Dict[str, Any]:
  """``{"class", "kwargs"}`` of the PyTorch twin of the Flax ``module``.

  ``image_shape``: ``(H, W, C)`` of the inputs. The twin is the registry's
  (``models.torch_twin``): subclasses (ResNet18, WRN28_10, ...) share their
  base class's, with their fields as arguments, so resized instances export
  too. A model without a twin (TinyCNN, a test model) is refused.
  """
  twin = models.torch_twin(module)
  kwargs = {"num_classes": int(module.num_classes), "in_channels": int(image_shape[-1]),
            "mean": None if module.mean is None else [float(v) for v in module.mean],
            "std": None if module.std is None else [float(v) for v in module.std]}
  return {"class": twin.class_name,
          "kwargs": dict(kwargs, **twin.kwargs(module, tuple(image_shape)))}


def _images_text(shape: Sequence[int]) -> str:
  """``(32, 32, 3)`` -> '32 x 32 RGB images'."""
  channels = "RGB" if shape[2] == 3 else f"{shape[2]}-channel"
  return f"{shape[0]} x {shape[1]} {channels} images"


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

  The class and its call are the registry entry's (``models.RobustBenchClass``).
  bat_jax's pre-activation blocks take the projection shortcut from the
  activated input (RobustBench's ``out_shortcut=True``); ``PreActResNet18()``
  takes it from the raw input and computes another function from the same
  tensors, so it is never named.
  """
  twin = torch_architecture(module, image_shape)
  name, kwargs = twin["class"], twin["kwargs"]
  robustbench = models.torch_twin(module).robustbench
  why = call = None
  if robustbench is None:
    why = f"RobustBench has no class for bat_jax's {name}"
  elif tuple(image_shape) != tuple(robustbench.image_shape):
    why = (f"RobustBench's {name} takes {_images_text(robustbench.image_shape)} (fixed "
           f"stem and pooling); this model takes {tuple(image_shape)}")
  else:
    call = robustbench.call(kwargs)
    why = call if isinstance(call, str) else None
  if why:
    return {"loadable": False, "reason": why + "."}
  normalization = (None if kwargs["mean"] is None and kwargs["std"] is None
                   else {"mean": kwargs["mean"], "std": kwargs["std"]})
  cls, args, call_kwargs = call
  code = ", ".join([str(a) for a in args] + [f"{k}={v!r}" for k, v in call_kwargs.items()])
  return {"loadable": True, "module": robustbench.module, "class": cls,
          "args": args, "kwargs": call_kwargs, "code": f"{cls}({code})",
          "normalization": normalization}


def _torch_module_name(flax_path: Sequence[str], twin) -> str:
  parts = []
  for part in flax_path:
    match = re.fullmatch(twin.blocks[0], part) if twin.blocks else None
    if match:
      parts.append(twin.blocks[1].format(int(match[1]), int(match[2]) - 1))
    elif part in twin.renames:
      parts.append(twin.renames[part])
    elif part in twin.same_names:
      parts.append(part)
    else:
      raise ValueError(f"No PyTorch name for the Flax module {'/'.join(flax_path)} "
                       f"of a {twin.class_name}.")
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
  rows of the twin's ``flatten`` dense layer reordered for PyTorch's NCHW
  flatten, e.g. the LeNet's fc1), BatchNorm scale / bias / mean / var ->
  weight / bias / running_mean / running_var, plus ``num_batches_tracked`` = 0
  (bat_jax does not count updates; PyTorch reads it only with
  ``momentum=None``). Names as in bat_jax_models.py, sorted.
  """
  twin = models.torch_twin(module)
  torch_architecture(module, image_shape)  # refuses shapes the twin cannot take
  params = traverse_util.flatten_dict(dict(variables["params"]))
  stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
  state = {}
  for (*path, leaf), value in params.items():
    name = _torch_module_name(path, twin)
    value = np.asarray(value, np.float32)
    if leaf == "kernel" and value.ndim == 4:
      state[f"{name}.weight"] = value.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and value.ndim == 2:
      if twin.flatten and "/".join(path) == twin.flatten[0]:
        conv = tuple(twin.flatten[1].split("/")) + ("kernel",)
        value = _nchw_flatten_rows(value, params[conv].shape[-1])
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


def torch_module_source(module) -> str:
  """The text of MODULE_FILE for the Flax ``module``: the shipped classes, and the
  source of its twin's class appended (added to ``MODELS``) when it has one."""
  with open(TORCH_TEMPLATE) as f:
    text = f.read()
  twin = models.torch_twin(module)
  if twin.source:
    text += (f"\n\n# {twin.class_name}: a model registered with "
             f"bat_jax.models.register_model.\n"
             f"{textwrap.dedent(twin.source).strip()}\n\n\n"
             f"MODELS[{twin.class_name!r}] = {twin.class_name}\n")
  return text


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
  fs.write_text(paths["module"], torch_module_source(module))
  return paths
