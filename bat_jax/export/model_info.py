"""RobustBench's model-info fields and a model card for an exported run.

:func:`robustbench_model_info` fills RobustBench's fields from the run's
config and evaluation results (accuracies as percent strings, the eps as the
paper writes it), then adds the threat model, the evaluation protocol and the
training set-up; :func:`model_card` tells the same to people.
"""

import json
from typing import Any, Dict, Mapping, Optional

from bat_jax import labels, methods
from bat_jax.export.torch_weights import MODULE_FILE, WEIGHTS_FILE

INFO_FILE = "model_info.json"
CARD_FILE = "MODEL_CARD.md"

# RobustBench's names for the architectures and data sets.
ARCHITECTURE_NAMES = {"lenet": "LeNet (MNIST CNN)", "resnet18": "ResNet-18",
                      "preact_resnet18": "PreActResNet-18",
                      "wrn28_10": "WideResNet-28-10", "wrn34_10": "WideResNet-34-10",
                      "tiny_resnet": "ResNet (tiny, for tests)"}
_DATASETS = {"mnist_subset": "mnist"}
def _percent(fraction: Optional[float]) -> Optional[str]:
  """RobustBench writes accuracies as percent strings with 2 decimals."""
  return None if fraction is None else f"{100 * fraction:.2f}"


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
  name, authors, link, venue = methods.get(config.method).paper
  protocol = _protocol(results)
  eps = float(config.eps if protocol is None or protocol["eps"] is None
              else protocol["eps"])
  clean = protocol["clean_acc"] if protocol else None
  robust = protocol["autoattack_acc"] if protocol else None
  notes = [f"{methods.describe(config)} trained {'and evaluated ' if protocol else ''}"
           "with bat_jax, the JAX/Flax reimplementation of Bridged Adversarial "
           "Training; not the authors' checkpoint."]
  if config.dataset == "mnist_subset":
    notes.append("Trained on bat_jax's 6,000-image MNIST subset.")
  if abs(eps - float(config.eps)) > 1e-9:
    notes.append(f"Trained at eps = {labels.format_eps(float(config.eps), config.dataset)}.")
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
      "eps": labels.format_eps(eps, config.dataset),
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
  title = (f"# {info['architecture']}, {methods.get(config.method).long_name or methods.display_name(config.method)}, "
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
      f"| training | {methods.describe(config)}; eps {labels.format_eps(training['eps'], config.dataset)}, PGD-"
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


