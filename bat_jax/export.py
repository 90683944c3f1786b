"""Export a trained model for PyTorch and RobustBench.

  python -m bat_jax.export --workdir=runs/c10_bat --which=best --out=export/c10_bat

writes four files into ``--out``:

  model.safetensors  the weights under PyTorch names and layouts (float32);
  bat_jax_models.py  the architectures in PyTorch (normalisation inside, NCHW
                     inputs in [0, 1]) and ``load_model(dir)``, needing only torch;
  model_info.json    RobustBench's model-info fields (architecture, dataset,
                     threat model, eps, clean and AutoAttack accuracy, ...) and
                     the evaluation protocol, from ``config.json`` and
                     ``eval/{which}_results.json`` (null accuracies when the
                     checkpoint was not evaluated);
  MODEL_CARD.md      the same for people: what the model is, how it was
                     trained and evaluated, how to load it.

bat_jax never imports torch: the safetensors file is written by
:func:`write_safetensors` below (the format is an 8-byte little-endian header
length, a JSON header and the raw little-endian tensor bytes). Read top-down:
  1. safetensors writing and reading (NumPy only);
  2. Flax variables -> PyTorch state dict (names, layouts) for each
     architecture, and the architecture description ``load_model`` rebuilds;
  3. the RobustBench model info and the model card;
  4. :func:`export` (a config and its variables in, files out) and
     :func:`export_workdir` (a trained run in);
  5. the command line.
"""

import json
import math
import os
import re
import shutil
import struct
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import app, flags, logging
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from bat_jax import checkpointing, evaluate, input_pipeline, models
from bat_jax import train as trainer  # build_model and restore_model

WEIGHTS_FILE = "model.safetensors"
MODULE_FILE = "bat_jax_models.py"
INFO_FILE = "model_info.json"
CARD_FILE = "MODEL_CARD.md"
# The PyTorch module file, copied as MODULE_FILE (never imported by bat_jax).
TORCH_TEMPLATE = os.path.join(os.path.dirname(__file__), "export_torch_models.py.txt")
# Safetensors metadata key of {"class", "kwargs"}, read by bat_jax_models.load_model.
ARCHITECTURE_KEY = "bat_jax_architecture"

# --------------------------------------------------------------------------
# 1. Safetensors.
# --------------------------------------------------------------------------

# NumPy dtype name <-> safetensors dtype name.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16",
                       "bfloat16": "BF16", "int64": "I64", "int32": "I32",
                       "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_NUMPY_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _little_endian(array: np.ndarray) -> np.ndarray:
  array = np.asarray(array, order="C")  # (ascontiguousarray would make scalars 1-d)
  big = array.dtype.byteorder == ">" or (array.dtype.byteorder == "="
                                         and sys.byteorder == "big")
  return array.astype(array.dtype.newbyteorder("<")) if big else array


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes ``{name: array}`` (and string ``metadata``) as a safetensors file.

  Tensors are stored in the given order, back to back; the JSON header is
  padded with spaces to a multiple of 8 bytes so that the data is aligned.
  The file appears atomically (written aside, then renamed).
  """
  header: Dict[str, Any] = {}
  if metadata:
    bad = {k: v for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
      raise ValueError(f"safetensors metadata maps strings to strings; got {bad}.")
    header["__metadata__"] = dict(metadata)
  arrays, offset = [], 0
  for name, value in tensors.items():
    array = _little_endian(np.asarray(value))
    if array.dtype.name not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{name}: dtype {array.dtype} has no safetensors name.")
    header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name],
                    "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  temporary = f"{path}.tmp"
  with open(temporary, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for array in arrays:
      f.write(array.reshape(-1).view(np.uint8).data)
  os.replace(temporary, path)


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """``({name: array}, metadata)`` of a safetensors file (for checks and tests)."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, spec in header.items():
    begin, end = spec["data_offsets"]
    dtype = jnp.dtype(_NUMPY_DTYPES[spec["dtype"]]).newbyteorder("<")
    tensors[name] = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize,
                                  offset=begin).reshape(spec["shape"])
  return tensors, metadata


# --------------------------------------------------------------------------
# 2. Flax -> PyTorch.
# --------------------------------------------------------------------------

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
  os.makedirs(out_dir, exist_ok=True)
  architecture = torch_architecture(module, image_shape)
  paths = {"weights": os.path.join(out_dir, WEIGHTS_FILE),
           "module": os.path.join(out_dir, MODULE_FILE)}
  write_safetensors(paths["weights"], torch_state_dict(module, variables, image_shape),
                    {"format": "pt", ARCHITECTURE_KEY: json.dumps(architecture),
                     **(metadata or {})})
  shutil.copyfile(TORCH_TEMPLATE, paths["module"])
  return paths


# --------------------------------------------------------------------------
# 3. RobustBench model info and the model card.
# --------------------------------------------------------------------------

# RobustBench's names for the architectures and data sets.
ARCHITECTURE_NAMES = {"lenet": "LeNet (MNIST CNN)", "resnet18": "ResNet-18",
                      "preact_resnet18": "PreActResNet-18",
                      "wrn28_10": "WideResNet-28-10", "wrn34_10": "WideResNet-34-10",
                      "tiny_resnet": "ResNet (tiny, for tests)"}
_DATASETS = {"mnist_subset": "mnist"}
# (name, authors, link, venue) of each training method's paper.
METHOD_PAPERS = {
    "bat": ("Bridged Adversarial Training",
            "Hoki Kim, Woojin Lee, Sungyoon Lee, Jaewook Lee",
            "https://arxiv.org/abs/2108.11135", "arXiv, Aug 2021"),
    "at": ("Towards Deep Learning Models Resistant to Adversarial Attacks",
           "Aleksander Madry, Aleksandar Makelov, Ludwig Schmidt, Dimitris Tsipras, "
           "Adrian Vladu", "https://arxiv.org/abs/1706.06083", "ICLR 2018"),
    "trades": ("Theoretically Principled Trade-off between Robustness and Accuracy",
               "Hongyang Zhang, Yaodong Yu, Jiantao Jiao, Eric P. Xing, "
               "Laurent El Ghaoui, Michael I. Jordan",
               "https://arxiv.org/abs/1901.08573", "ICML 2019"),
    "mart": ("Improving Adversarial Robustness Requires Revisiting Misclassified "
             "Examples", "Yisen Wang, Difan Zou, Jinfeng Yi, James Bailey, Xingjun Ma, "
             "Quanquan Gu", "https://openreview.net/forum?id=rklOg6EFwS", "ICLR 2020"),
    "standard": ("Standard (non-robust) training", "", "", ""),
}
_METHOD_NAMES = {"standard": "Standard training", "at": "AT (PGD adversarial training)",
                 "trades": "TRADES", "mart": "MART", "bat": "BAT"}


def eps_string(eps: float) -> str:
  """8/255 -> '8/255'; radii that are no whole number of 255ths -> '0.3'."""
  scaled = eps * 255
  if eps > 0 and abs(scaled - round(scaled)) < 1e-6:
    return f"{int(round(scaled))}/255"
  return f"{eps:g}"


def _percent(fraction: Optional[float]) -> Optional[str]:
  """RobustBench writes accuracies as percent strings with 2 decimals."""
  return None if fraction is None else f"{100 * fraction:.2f}"


def _method_details(config) -> str:
  method = config.method
  text = _METHOD_NAMES.get(method, method)
  if method == "bat":
    text += f" (beta = {config.beta:g}, m = {config.num_bridges} bridges)"
  elif method in ("trades", "mart"):
    text += f" (beta = {config.beta:g})"
  return text


def _protocol(results: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
  """The evaluation's numbers and settings, as kept in model_info.json."""
  if results is None:
    return None
  settings = results.get("settings") or {}
  autoattack = settings.get("autoattack") or {}
  return {
      "checkpoint": results.get("checkpoint", results.get("which")),
      "step": results.get("step"), "split": results.get("split", "test"),
      "num_examples": results.get("num_examples"), "eps": results.get("eps"),
      "clean_acc": results.get("clean_acc"), "fgsm_acc": results.get("fgsm_acc"),
      "pgd_acc": results.get("pgd_acc"),
      "pgd": {k: settings.get(k) for k in ("pgd_steps", "pgd_restarts", "pgd_step_size")},
      "autoattack_acc": results.get("autoattack_acc"),
      "autoattack": {k: autoattack.get(k) for k in ("version", "attacks", "settings",
                                                    "standard")},
      "autoattack_per_attack": results.get("autoattack_per_attack"),
      "sanity_warnings": results.get("sanity_warnings", []),
  }


def _autoattack_text(protocol: Mapping[str, Any]) -> str:
  autoattack = protocol["autoattack"]
  attacks = ", ".join(autoattack.get("attacks") or [])
  if autoattack.get("settings"):
    attacks += f"; budgets {autoattack['settings']}"
  text = (f"AutoAttack '{autoattack.get('version')}' ({attacks}) on "
          f"{protocol['num_examples']} {protocol['split']} images")
  if not autoattack.get("standard"):
    text += ", not the standard AutoAttack"
  return text


def robustbench_model_info(config, results: Optional[Mapping[str, Any]] = None,
                           source: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """RobustBench's model-info fields for a bat_jax run, and then bat_jax's own.

  ``results``: the checkpoint's ``eval/{which}_results.json`` (None: not
  evaluated, accuracies null). RobustBench's fields first (accuracies as
  percent strings, ``eps`` as RobustBench writes it, e.g. '8/255';
  ``reported`` is bat_jax's AutoAttack accuracy, what the export claims); name,
  authors, link and venue are those of the training method's paper: edit
  them when submitting work of your own. Then ``threat_model`` ('Linf'),
  ``eps_value`` (a number), the evaluation protocol and the training set-up.
  """
  name, authors, link, venue = METHOD_PAPERS.get(config.method, (config.method, "", "", ""))
  protocol = _protocol(results)
  eps = float(config.eps if protocol is None or protocol["eps"] is None
              else protocol["eps"])
  clean = protocol["clean_acc"] if protocol else None
  robust = protocol["autoattack_acc"] if protocol else None
  notes = [f"{_method_details(config)} trained {'and evaluated ' if protocol else ''}"
           "with bat_jax, the JAX/Flax reimplementation of Bridged Adversarial "
           "Training; not the authors' checkpoint."]
  if config.dataset == "mnist_subset":
    notes.append("Trained on bat_jax's 6,000-image MNIST subset.")
  if abs(eps - float(config.eps)) > 1e-9:
    notes.append(f"Trained at eps = {eps_string(float(config.eps))}.")
  if protocol is None:
    notes.append("Not evaluated: accuracies are null.")
  elif robust is None:
    notes.append(f"Clean accuracy on {protocol['num_examples']} {protocol['split']} "
                 "images; AutoAttack was not run.")
  else:
    notes.append(f"Evaluated with {_autoattack_text(protocol)}.")
  return {
      "link": link, "name": name, "authors": authors,
      "additional_data": bool(config.extra_data_path),
      "number_forward_passes": 1,
      "dataset": _DATASETS.get(config.dataset, config.dataset),
      "venue": venue,
      "architecture": ARCHITECTURE_NAMES.get(config.model, config.model),
      "eps": eps_string(eps),
      "clean_acc": _percent(clean),
      "reported": _percent(robust),
      "autoattack_acc": _percent(robust),
      "footnote": " ".join(notes),
      "unreliable": False,
      "threat_model": "Linf",
      "eps_value": eps,
      "evaluation": protocol,
      "training": {
          "library": "bat_jax", "method": config.method, "model": config.model,
          "dataset": config.dataset, "eps": float(config.eps), "beta": float(config.beta),
          "num_bridges": int(config.num_bridges), "attack_steps": int(config.attack_steps),
          "attack_step_size": float(config.attack_step_size),
          "optimizer": config.optimizer, "learning_rate": float(config.learning_rate),
          "schedule": config.schedule, "num_epochs": int(config.num_epochs),
          "num_train_steps": int(config.num_train_steps),
          "batch_size": int(config.batch_size), "seed": int(config.seed),
          "extra_data_path": config.extra_data_path or None,
          "dtype": config.dtype,
      },
      "source": dict(source) if source else None,
  }


def _accuracy_cell(value: Optional[str], protocol, what: str) -> str:
  if value is None:
    return "not evaluated" if protocol is None else f"{what} not run"
  return f"{value}%"


def model_card(config, info: Mapping[str, Any], architecture: Mapping[str, Any],
               num_params: int) -> str:
  """MODEL_CARD.md: the model, its training, its evaluation, how to load it."""
  protocol, training = info["evaluation"], info["training"]
  source = info.get("source") or {}
  kwargs = architecture["kwargs"]
  eps = f"{info['eps']} ({info['eps_value']:.4g})" if "/" in info["eps"] else info["eps"]
  title = (f"# {info['architecture']}, {_METHOD_NAMES.get(config.method, config.method)}, "
           f"{info['dataset'].upper()} (Linf, eps = {info['eps']})")
  lines = [title, ""]
  if source:
    lines += [f"Exported by `bat_jax.export` from `{source.get('workdir')}` (checkpoint "
              f"'{source.get('which')}' = {source.get('checkpoint')}, step "
              f"{source.get('step')}).", ""]
  examples = f" ({protocol['num_examples']} {protocol['split']} images)" if protocol else ""
  lines += [
      "| | |", "|---|---|",
      f"| architecture | {info['architecture']} (`{config.model}`, {num_params:,} "
      "parameters) |",
      f"| dataset | {config.dataset} ({kwargs['num_classes']} classes) |",
      f"| threat model | Linf, eps = {eps} |",
      f"| clean accuracy | {_accuracy_cell(info['clean_acc'], protocol, 'clean')}{examples} |",
      f"| AutoAttack accuracy | "
      f"{_accuracy_cell(info['autoattack_acc'], protocol, 'AutoAttack')}"
      + (f" ({_autoattack_text(protocol)})" if info["autoattack_acc"] else "") + " |",
  ]
  if protocol and protocol.get("pgd_acc") is not None:
    pgd = protocol["pgd"]
    lines.append(f"| PGD accuracy | {_percent(protocol['pgd_acc'])}% (PGD-"
                 f"{pgd['pgd_steps']}, {pgd['pgd_restarts']} restarts, step "
                 f"{pgd['pgd_step_size']:g}) |")
  extra = training["extra_data_path"]
  lines += [
      f"| additional data | {'yes: ' + extra if info['additional_data'] else 'no'} |",
      f"| training | {_method_details(config)}; eps {eps_string(training['eps'])}, PGD-"
      f"{training['attack_steps']} (step {training['attack_step_size']:g}); "
      f"{training['optimizer']}, lr {training['learning_rate']:g} ({training['schedule']}), "
      f"batch {training['batch_size']}, "
      + (f"{training['num_train_steps']} steps" if training["num_train_steps"] > 0
         else f"{training['num_epochs']} epochs")
      + f"; seed {training['seed']} |",
      "", "## Evaluation", ""]
  if protocol is None:
    lines += ["This checkpoint has no evaluation (no `eval/*_results.json` of its step in "
              "the workdir), so the accuracies in `model_info.json` are null. Evaluate and "
              "export again:", "",
              f"    python -m bat_jax.evaluate --workdir={source.get('workdir', 'WORKDIR')} "
              f"--which={source.get('which', 'best')}",
              f"    python -m bat_jax.export --workdir={source.get('workdir', 'WORKDIR')} "
              f"--which={source.get('which', 'best')} --out=DIR", ""]
  else:
    lines += [f"`bat_jax.evaluate` on the first {protocol['num_examples']} "
              f"{protocol['split']} images at eps = {eps}: clean "
              f"{_percent(protocol['clean_acc']) or '-'}%, "
              f"AutoAttack {_percent(protocol['autoattack_acc']) or '-'}%."]
    if protocol["autoattack_acc"] is not None:
      lines.append(f"Protocol: {_autoattack_text(protocol)}.")
      if not protocol["autoattack"].get("standard"):
        lines.append("RobustBench's leaderboards use the standard AutoAttack on the "
                     "whole test set: `python -m bat_jax.evaluate --workdir=... "
                     "--which=...` with its defaults.")
    for warning in protocol["sanity_warnings"]:
      lines.append(f"- sanity-check warning: {warning}")
    lines.append("")
  if kwargs["mean"] is None and kwargs["std"] is None:
    norm = "the model takes them as they are (no normalisation)"
  else:
    norm = (f"the model normalises them itself, `(x - mean) / std` with mean "
            f"{kwargs['mean']} and std {kwargs['std']}")
  channels = f"{kwargs['in_channels']} channel{'s' if kwargs['in_channels'] > 1 else ''}"
  lines += [
      "## Files", "",
      f"- `{WEIGHTS_FILE}`: the weights under PyTorch names and layouts (float32).",
      f"- `{MODULE_FILE}`: the architecture in PyTorch and `load_model(dir)`; needs "
      "only torch (uses the `safetensors` package when installed).",
      f"- `{INFO_FILE}`: RobustBench's model-info fields, the evaluation protocol and "
      "the training set-up.",
      f"- `{CARD_FILE}`: this card.", "",
      "## Use in PyTorch", "",
      "```python",
      "import sys",
      "sys.path.insert(0, EXPORT_DIR)  # the folder holding these files",
      "import bat_jax_models",
      "model = bat_jax_models.load_model(EXPORT_DIR)  # eval mode",
      "logits = model(images)  # NCHW float images in [0, 1]",
      "```", "",
      f"Inputs are NCHW images in [0, 1] ({channels}); {norm}, so eps is in pixel "
      f"units. The model is `{architecture['class']}` with `{json.dumps(kwargs)}`.", "",
      "## Submitting to RobustBench", "",
      f"`{INFO_FILE}` starts with RobustBench's model-info fields; name, authors, link "
      "and venue are those of the training method's paper, so edit them for work of "
      "your own. Its accuracies are bat_jax's evaluation, with the protocol under "
      "`evaluation`; the parameter names follow the PyTorch code the architecture "
      "comes from (see the docstring of `bat_jax_models.py`).", "",
      "## Conversion", "",
      "- Conv kernels HWIO -> OIHW, dense kernels [in, out] -> [out, in]"
      + ("; fc1's rows reordered from the NHWC to the NCHW flatten" if
         architecture["class"] == "LeNet" else "") + ".",
      "- BatchNorm: eps 1e-5 and momentum 0.1 as in bat_jax (Flax momentum 0.9); "
      "`num_batches_tracked` is 0 (bat_jax does not count updates)."
      if architecture["class"] != "LeNet" else "- No BatchNorm.",
      f"- Parameters are float32 (training computed in {training['dtype']}). The "
      "PyTorch model gives the JAX model's logits up to float rounding "
      "(tests/test_export.py checks every architecture).", "",
      "## Citation", "",
      (f"{info['authors']}. {info['name']}. {info['venue']}. <{info['link']}>"
       if info["authors"] else "Standard training: no method paper."), "",
  ]
  return "\n".join(lines)


# --------------------------------------------------------------------------
# 4. Export.
# --------------------------------------------------------------------------


def export(config, variables: Mapping[str, Any], out_dir: str, *,
           results: Optional[Mapping[str, Any]] = None,
           source: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
  """Writes the four export files of a ``config`` model with ``variables``.

  ``results``: its evaluation (``eval/{which}_results.json``; None: not
  evaluated). ``source``: where it came from (workdir, which, step), for
  the card and the metadata. Returns ``{kind: path}``.
  """
  module = trainer.build_model(config, bn_axis_name=None)
  image_shape = input_pipeline.get_dataset_info(config.dataset).image_shape
  metadata = {"bat_jax_model": config.model, "bat_jax_method": config.method}
  if source:
    metadata["bat_jax_source"] = json.dumps(dict(source))
  paths = write_torch_model(module, variables, out_dir, image_shape, metadata)
  info = robustbench_model_info(config, results, source)
  paths["info"] = os.path.join(out_dir, INFO_FILE)
  with open(paths["info"], "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
  paths["card"] = os.path.join(out_dir, CARD_FILE)
  with open(paths["card"], "w") as f:
    f.write(model_card(config, info, torch_architecture(module, image_shape),
                       models.count_params(variables["params"])))
  return paths


def evaluation_of(workdir: str, which: str, step: int) -> Optional[Dict[str, Any]]:
  """The evaluation results of the checkpoint at ``step``, or None.

  ``eval/{which}_results.json`` when it is of that step; else another
  results file of the same step ('best' that fell back to 'last' is the
  'last' checkpoint). Results of another step (a stale evaluation) are not used.
  """
  runs = evaluate.load_results(workdir)
  ordered = ([runs[which]] if which in runs else []) + [
      r for w, r in runs.items() if w != which]
  for results in ordered:
    if results.get("step") == step:
      return results
  if runs:
    logging.warning("%s: no evaluation of step %d (evaluated: %s); exporting null "
                    "accuracies.", workdir, step,
                    {w: r.get("step") for w, r in runs.items()})
  return None


def export_workdir(workdir: str, which: str = "best", out_dir: str = "export"
                   ) -> Dict[str, str]:
  """Exports the ``which`` checkpoint of a training run ('best' falls back to 'last')."""
  if which not in checkpointing.WHICH:
    raise ValueError(f"which must be one of {checkpointing.WHICH}; got {which!r}.")
  series, _ = evaluate.resolve_checkpoint(workdir, which)
  restored = trainer.restore_model(workdir, which)
  source = {"workdir": os.path.abspath(workdir), "which": which, "checkpoint": series,
            "step": restored.step}
  return export(restored.config, restored.variables, out_dir,
                results=evaluation_of(workdir, which, restored.step), source=source)


# --------------------------------------------------------------------------
# 5. Command line.
# --------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints, "
                      "eval/).", **fv)
  flags.DEFINE_enum("which", "best", list(checkpointing.WHICH),
                    "Checkpoint to export; 'best' falls back to 'last'.", **fv)
  flags.DEFINE_string("out", None, "Export folder (created; its files are replaced).", **fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("Pass --workdir=DIR and --out=DIR.")
  from bat_jax import util
  util.setup_runtime()
  paths = export_workdir(FLAGS.workdir, FLAGS.which, FLAGS.out)
  for path in paths.values():
    print(f"{os.path.getsize(path):>12,d}  {path}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
