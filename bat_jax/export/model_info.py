"""A RobustBench entry, bat_jax's own export metadata and a model card for a run.

RobustBench keeps one JSON per model at ``model_info/<dataset>/<Linf|L2>/<Name>.json``
with a fixed set of fields (:data:`ROBUSTBENCH_FIELDS`) and meanings:
``reported`` is the robust accuracy the model's paper claims ('' when it
claims none), ``autoattack_acc`` the AutoAttack accuracy, ``additional_data``
whether real extra data was used (generated images count as no, with a
footnote), ``unreliable`` whether the evaluation is in doubt.
:func:`robustbench_entry` fills exactly those from the run's config and
evaluation; everything else (the protocol, whether the evaluation is
leaderboard-grade, the training set-up, the RobustBench class to load the
weights into) goes to :func:`export_metadata` and :func:`model_card`.
"""

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from bat_jax import configlib, methods, models, naming, paper, reproduce
from bat_jax.evaluation import stages
from bat_jax.export.torch_weights import MODULE_FILE, WEIGHTS_FILE

METADATA_FILE = "bat_jax_export.json"
CARD_FILE = "MODEL_CARD.md"

# RobustBench's model-info fields of the Linf and L2 leaderboards, in its order
# (its 188 Linf / L2 files; 'external' is the leaderboard's own later evaluation).
ROBUSTBENCH_FIELDS = ("link", "name", "authors", "additional_data",
                      "number_forward_passes", "dataset", "venue", "architecture", "eps",
                      "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable")
# config.norm (any case) -> RobustBench's threat-model name and folder.
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # canonical norm -> RobustBench's folder
# RobustBench's leaderboards: (dataset, threat model) -> eps, on the whole test split.
LEADERBOARDS = {("cifar10", "Linf"): 8 / 255, ("cifar10", "L2"): 0.5,
                ("cifar100", "Linf"): 8 / 255, ("imagenet", "Linf"): 4 / 255}
LEADERBOARD_TEST_SIZE = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
# RobustBench's names for the data sets (the models' are their registry entries').
_DATASETS = {"mnist_subset": "mnist"}
# What an extra-data file (config.extra_data_path) holds, as the export is told.
EXTRA_DATA_KINDS = ("real", "generated")


def _percent(fraction: Optional[float]) -> Optional[str]:
  """RobustBench writes accuracies as percent strings with 2 decimals."""
  return None if fraction is None else f"{100 * fraction:.2f}"


def architecture_name(model: str) -> str:
  """RobustBench's ``architecture`` of ``config.model``: its registry entry's display name."""
  spec = models.find(model)
  return (spec and spec.display_name) or model


def threat_model(norm: str) -> str:
  """Any spelling of a norm ('linf', 'L-inf', 'l2', ...) -> RobustBench's 'Linf' or 'L2'."""
  return THREAT_MODELS[naming.canonical_norm(norm)]


def model_name(config) -> str:
  """RobustBench's ``<Surname><Year><FirstWordOfTitle>_<architecture>`` of the method's paper.

  The architecture is the model's ``export_suffix`` (its registry entry).
  ``Standard_<architecture>`` for standard training (no paper), as
  RobustBench's ``Standard_R50``.
  """
  title, authors, _, venue = methods.get(config.method).paper
  spec = models.find(config.model)
  suffix = (spec and spec.export_suffix) or re.sub(r"\W", "", config.model)
  if not authors:
    return f"Standard_{suffix}"
  surname = authors.split(",")[0].split()[-1]
  years = re.findall(r"(?:19|20)\d\d", venue)
  first_word = re.sub(r"\W", "", title.split()[0]).capitalize()
  return f"{surname}{years[-1] if years else ''}{first_word}_{suffix}"


def _protocol(results: Optional[Mapping[str, Any]], config) -> Optional[Dict[str, Any]]:
  """The evaluation's numbers and settings, as kept in the export metadata."""
  if results is None:
    return None
  settings = results.get("settings") or {}
  evaluation = {
      "checkpoint": results.get("checkpoint", results.get("which")),
      "step": results.get("step"), "split": results.get("split", "test"),
      "num_examples": results.get("num_examples"),
      "norm": str(results.get("norm") or settings.get("norm") or config.norm).lower(),
      "eps": results.get("eps"),
  }
  for stage in stages.STAGES.values():  # each stage's accuracy and budgets
    evaluation.update(stage.card_fields(results))
  evaluation["sanity_warnings"] = list(results.get("sanity_warnings") or [])
  return evaluation


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


def _evaluated_norm_eps(config, protocol) -> Tuple[str, float]:
  norm = protocol["norm"] if protocol else str(config.norm).lower()
  eps = float(config.eps if protocol is None or protocol["eps"] is None else protocol["eps"])
  return norm, eps


def leaderboard_grade(config, protocol) -> List[str]:
  """Why the evaluation is not what RobustBench's leaderboard runs ([]: it is).

  The leaderboard's: AutoAttack 'standard' with its own budgets, on the
  whole test split of one of its data sets, at the leaderboard's eps.
  """
  dataset = _DATASETS.get(config.dataset, config.dataset)
  norm, eps = _evaluated_norm_eps(config, protocol)
  reasons = []
  board = LEADERBOARDS.get((dataset, threat_model(norm)))
  if board is None:
    reasons.append(f"RobustBench has no {dataset} {threat_model(norm)} leaderboard")
  elif abs(eps - board) > 1e-9:
    reasons.append(f"eps {naming.format_eps(eps, dataset, norm)}, the leaderboard's is "
                   f"{naming.format_eps(board, dataset, norm)}")
  if protocol is None:
    return reasons + ["not evaluated"]
  if protocol["autoattack_acc"] is None:
    return reasons + ["AutoAttack was not run"]
  if not protocol["autoattack"].get("standard"):
    reasons.append(f"AutoAttack '{protocol['autoattack'].get('version')}'"
                   + (f" with budgets {protocol['autoattack']['settings']}"
                      if protocol["autoattack"].get("settings") else "")
                   + ", not 'standard' with its own budgets")
  if protocol["split"] != "test":
    reasons.append(f"the {protocol['split']} split, not the test split")
  full = LEADERBOARD_TEST_SIZE.get(dataset)
  if full is not None and (protocol["num_examples"] or 0) < full:
    reasons.append(f"{protocol['num_examples']} of the {full:,} test images")
  if config.data_file:
    reasons.append("test images from a local data file (config.data_file)")
  return reasons


def leaderboard_command(config, source: Optional[Mapping[str, Any]]) -> Optional[str]:
  """The evaluation that RobustBench's leaderboard accepts (None: it has no
  leaderboard for the run's data set and threat model)."""
  source = source or {}
  workdir, which = source.get("workdir", "WORKDIR"), source.get("which", "best")
  dataset = _DATASETS.get(config.dataset, config.dataset)
  norm = str(config.norm).lower()
  board = LEADERBOARDS.get((dataset, threat_model(norm)))
  if board is None:
    return None
  radius = ""
  if abs(float(config.eps) - board) > 1e-9:
    radius = f" --eps={naming.format_eps(board, dataset, norm)}"
  return (f"python -m bat_jax.evaluate --workdir={workdir} --which={which} "
          f"--norm={norm}{radius} --autoattack_version=standard --num_examples=-1")


def reported_row(config, checkpoint: Optional[str]) -> Optional[Dict[str, Any]]:
  """The paper's row (table, AutoAttack %) of exactly this run's setting, or None.

  A row matches when the table's config (``configs/``, as
  ``bat_jax.reproduce`` trains it) agrees with the run on data set, model,
  threat model, method and its beta, eps, schedule and length, optimiser and
  extra data, and the row's checkpoint (final or early-stopped) is the one
  exported. Without a checkout holding ``configs/`` nothing matches.
  """
  fields = ("dataset", "model", "norm", "method", "schedule", "num_epochs",
            "num_train_steps", "optimizer")
  if methods.get(config.method).hyperparameters:
    fields += methods.get(config.method).hyperparameters
  for table in paper.TABLES.values():
    for row in table.rows:
      if (row.method != config.method or abs(row.eps - float(config.eps)) > 1e-9
          or row.checkpoint != checkpoint or "autoattack" not in row.values):
        continue
      try:
        expected = next(iter(reproduce.plan(table, [int(config.seed)], rows=[row]).values()))
      except configlib.ConfigError:
        return None  # no configs/ here
      if (all(expected[f] == config[f] for f in fields)
          and bool(expected.extra_data_path) == bool(config.extra_data_path)):
        return {"table": table.name, "method": row.method, "eps": row.eps,
                "checkpoint": row.checkpoint, "beta": row.beta,
                "autoattack": row.values["autoattack"][0]}
  return None


def robustbench_entry(config, results: Optional[Mapping[str, Any]] = None,
                      source: Optional[Mapping[str, Any]] = None,
                      extra_data: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
  """``(relative path, fields)`` of the run's RobustBench model-info file.

  The path is ``<dataset>/<Linf|L2>/<Name>.json`` (:func:`model_name`); the
  fields are exactly :data:`ROBUSTBENCH_FIELDS`, with RobustBench's
  meanings: the threat model and eps are the evaluation's (else the
  config's); ``reported`` the paper's AutoAttack accuracy for this setting
  (:func:`reported_row`), '' where the paper reports none; ``unreliable``
  whether the sanity checks warned; ``additional_data`` true for real extra
  data, false for ``extra_data='generated'`` (said in the footnote). Name,
  authors, link and venue are those of the training method's paper.
  """
  title, authors, link, venue = methods.get(config.method).paper
  protocol = _protocol(results, config)
  norm, eps = _evaluated_norm_eps(config, protocol)
  dataset = _DATASETS.get(config.dataset, config.dataset)
  row = reported_row(config, (source or {}).get("checkpoint"))
  notes = ["Trained with bat_jax (JAX/Flax), not the authors' checkpoint."]
  if config.extra_data_path and extra_data == "generated":
    notes.append("It uses additional synthetic images in training.")
  if protocol and protocol["sanity_warnings"]:
    notes.append("The evaluation's sanity checks warned (see the model card).")
  info = {
      "link": link, "name": title, "authors": authors,
      "additional_data": bool(config.extra_data_path) and extra_data != "generated",
      "number_forward_passes": 1,
      "dataset": dataset,
      "venue": venue,
      "architecture": architecture_name(config.model),
      "eps": naming.format_eps(eps, dataset, norm),
      "clean_acc": _percent(protocol["clean_acc"] if protocol else None),
      "reported": f"{row['autoattack']:.2f}" if row else "",
      "autoattack_acc": _percent(protocol["autoattack_acc"] if protocol else None),
      "footnote": " ".join(notes),
      "unreliable": bool(protocol and protocol["sanity_warnings"]),
  }
  assert tuple(info) == ROBUSTBENCH_FIELDS
  return f"{dataset}/{threat_model(norm)}/{model_name(config)}.json", info


def export_metadata(config, results: Optional[Mapping[str, Any]],
                    source: Optional[Mapping[str, Any]], *, entry_path: str,
                    checkpoint_path: Optional[str], checkpoint_missing: Optional[str],
                    architecture: Mapping[str, Any], torch_architecture: Mapping[str, Any],
                    extra_data: Optional[str] = None) -> Dict[str, Any]:
  """bat_jax's own record of the export (``bat_jax_export.json``): all RobustBench's
  file leaves out.

  The threat model and eps, the evaluation protocol and whether it is
  leaderboard-grade (with the command that makes it so), the paper row
  ``reported`` came from, the RobustBench class and file names, the training
  set-up and where the checkpoint came from.
  """
  protocol = _protocol(results, config)
  norm, eps = _evaluated_norm_eps(config, protocol)
  reasons = leaderboard_grade(config, protocol)
  return {
      "threat_model": threat_model(norm), "norm": norm, "eps": eps,
      "leaderboard_grade": not reasons, "not_leaderboard_grade": reasons,
      "leaderboard_command": leaderboard_command(config, source),
      "robustbench": {"model_name": model_name(config), "model_info": entry_path,
                      "checkpoint": checkpoint_path,
                      "checkpoint_missing": checkpoint_missing,
                      "architecture": dict(architecture)},
      "reported_from": reported_row(config, (source or {}).get("checkpoint")),
      "evaluation": protocol,
      "torch_architecture": dict(torch_architecture),
      "training": {
          "library": "bat_jax", "method": config.method, "model": config.model,
          "dataset": config.dataset, "norm": str(config.norm).lower(),
          "eps": float(config.eps), "beta": float(config.beta),
          "num_bridges": int(config.num_bridges), "attack_steps": int(config.attack_steps),
          "attack_step_size": float(config.attack_step_size),
          "optimizer": config.optimizer, "learning_rate": float(config.learning_rate),
          "schedule": config.schedule, "num_epochs": int(config.num_epochs),
          "num_train_steps": int(config.num_train_steps),
          "batch_size": int(config.batch_size), "seed": int(config.seed),
          "extra_data_path": config.extra_data_path or None,
          "extra_data": (extra_data or "real") if config.extra_data_path else None,
          "dtype": config.dtype,
          # Only where not the default, so that other records are as before.
          **({"activation": config.activation} if config.activation != "relu" else {}),
          **({"label_smoothing": float(config.label_smoothing)}
             if config.label_smoothing else {}),
      },
      "source": dict(source) if source else None,
  }


def _accuracy_cell(value: Optional[str], protocol, what: str) -> str:
  if value is None:
    return "not evaluated" if protocol is None else f"{what} not run"
  return f"{value}%"


def model_card(config, info: Mapping[str, Any], metadata: Mapping[str, Any],
               num_params: int) -> str:
  """MODEL_CARD.md: the model, its training, its evaluation, how to load it."""
  protocol, training = metadata["evaluation"], metadata["training"]
  source = metadata.get("source") or {}
  robustbench = metadata["robustbench"]
  rb_arch = robustbench["architecture"]
  kwargs = metadata["torch_architecture"]["kwargs"]
  spec = models.get(config.model)
  flatten = spec.torch.flatten if spec.torch else None
  tm = metadata["threat_model"]
  eps = (f"{info['eps']} ({metadata['eps']:.4g})" if "/" in info["eps"] else info["eps"])
  title = (f"# {info['architecture']}, {methods.get(config.method).long_name or methods.display_name(config.method)}, "
           f"{info['dataset'].upper()} ({tm}, eps = {info['eps']})")
  lines = [title, ""]
  if metadata["not_leaderboard_grade"] and metadata["leaderboard_command"] is None:
    lines += ["**Not leaderboard-grade**: " + "; ".join(metadata["not_leaderboard_grade"])
              + ". No evaluation of this model is: RobustBench ranks CIFAR-10 (Linf, "
              "L2), CIFAR-100 (Linf) and ImageNet (Linf) models.", ""]
  elif metadata["not_leaderboard_grade"]:
    lines += ["**Not leaderboard-grade**: " + "; ".join(metadata["not_leaderboard_grade"])
              + ". RobustBench's leaderboard evaluates AutoAttack 'standard' on the whole "
              "test split; for that, evaluate and export again:", "",
              f"    {metadata['leaderboard_command']}",
              f"    python -m bat_jax.export --workdir={source.get('workdir', 'WORKDIR')} "
              f"--which={source.get('which', 'best')} --out=DIR", ""]
  else:
    lines += ["Leaderboard-grade: AutoAttack 'standard' on the whole test split at the "
              "leaderboard's eps.", ""]
  if source:
    lines += [f"Exported by `bat_jax.export` from `{source.get('workdir')}` (checkpoint "
              f"'{source.get('which')}' = {source.get('checkpoint')}, step "
              f"{source.get('step')}, {source.get('weights', 'raw')} weights).", ""]
  examples = f" ({protocol['num_examples']} {protocol['split']} images)" if protocol else ""
  reported = metadata["reported_from"]
  lines += [
      "| | |", "|---|---|",
      f"| architecture | {info['architecture']} (`{config.model}`"
      + (f", {kwargs['activation']} activations" if "activation" in kwargs else "")
      + f", {num_params:,} parameters) |",
      f"| dataset | {config.dataset} ({kwargs['num_classes']} classes) |",
      f"| threat model | {tm}, eps = {eps} |",
      f"| clean accuracy | {_accuracy_cell(info['clean_acc'], protocol, 'clean')}{examples} |",
      f"| AutoAttack accuracy | "
      f"{_accuracy_cell(info['autoattack_acc'], protocol, 'AutoAttack')}"
      + (f" ({_autoattack_text(protocol)})" if info["autoattack_acc"] else "") + " |",
      "| reported by the paper | " + (
          f"{info['reported']}% (Table {reported['table']}, AutoAttack)" if reported
          else "none for this setting") + " |",
  ]
  for stage in stages.STAGES.values():  # rows besides RobustBench's clean and AutoAttack
    row = stage.card_row(protocol) if protocol and stage.card_row else None
    if row:
      lines.append(row)
  extra = training["extra_data_path"]
  lines += [
      "| additional data | " + (f"{training['extra_data']}: {extra}" if extra else "no")
      + " |",
      f"| training | {methods.describe(config)}; {training['norm']} eps "
      f"{naming.format_eps(training['eps'], config.dataset, training['norm'])}, PGD-"
      f"{training['attack_steps']} (step {training['attack_step_size']:g}); "
      f"{training['optimizer']}, lr {training['learning_rate']:g} ({training['schedule']}), "
      f"batch {training['batch_size']}, "
      + (f"{training['num_train_steps']} steps" if training["num_train_steps"] > 0
         else f"{training['num_epochs']} epochs")
      + f"; seed {training['seed']} |",
      "", "## Evaluation", ""]
  if protocol is None:
    lines += ["This checkpoint has no evaluation (no `eval/*_results.json` of its step in "
              "the workdir), so the accuracies are null.", ""]
  else:
    lines += [f"`bat_jax.evaluate` on the first {protocol['num_examples']} "
              f"{protocol['split']} images, {tm} eps = {eps}: clean "
              f"{_percent(protocol['clean_acc']) or '-'}%, "
              f"AutoAttack {_percent(protocol['autoattack_acc']) or '-'}%."]
    if protocol["autoattack_acc"] is not None:
      lines.append(f"Protocol: {_autoattack_text(protocol)}.")
    for warning in protocol["sanity_warnings"]:
      lines.append(f"- sanity-check warning: {warning}")
    if protocol["sanity_warnings"]:
      lines.append("RobustBench's `unreliable` is therefore true.")
    lines.append("")
  if kwargs["mean"] is None and kwargs["std"] is None:
    norm_text = "the model takes them as they are (no normalisation)"
  else:
    norm_text = (f"the model normalises them itself, `(x - mean) / std` with mean "
                 f"{kwargs['mean']} and std {kwargs['std']}")
  channels = f"{kwargs['in_channels']} channel{'s' if kwargs['in_channels'] > 1 else ''}"
  folder = robustbench["model_info"].rsplit("/", 1)[0]
  lines += ["## RobustBench", "",
            f"- `{robustbench['model_info']}`: the model-info file, RobustBench's fields "
            "only, under its name and folder convention. Name, authors, link and venue "
            "are those of the training method's paper: for work of your own, edit them "
            "(and the file name).", ""]
  if rb_arch["loadable"]:
    lines += [
        f"- `{robustbench['checkpoint'] or folder + '/' + robustbench['model_name'] + '.pt'}`: "
        "the state dict (`torch.save`), loading strictly into RobustBench's "
        f"`{rb_arch['code']}` (`{rb_arch['module']}`)."
        + ("" if robustbench["checkpoint"] else
           f" **Not written**: {robustbench['checkpoint_missing']}"), "",
        "```python",
        "import torch",
        f"from {rb_arch['module']} import {', '.join([rb_arch['class']] + [a for a in rb_arch['args'] if isinstance(a, str)])}",
        f"model = {rb_arch['code']}",
        f"model.load_state_dict(torch.load('{folder}/{robustbench['model_name']}.pt'), "
        "strict=True)",
        "```", ""]
    if rb_arch["normalization"]:
      lines += [f"RobustBench's class takes its inputs as they are, and this model was "
                f"trained on normalised ones: feed it `(x - mean) / std` with mean "
                f"{rb_arch['normalization']['mean']} and std "
                f"{rb_arch['normalization']['std']}, as RobustBench's normalising "
                "subclasses (`mu`, `sigma`) do.", ""]
  else:
    lines += [f"- No RobustBench class computes this model: {rb_arch['reason']} No `.pt` "
              "for RobustBench is written; use the PyTorch files below.", ""]
  lines += [
      "## Files", "",
      f"- `{WEIGHTS_FILE}`: the weights under PyTorch names and layouts (float32).",
      f"- `{MODULE_FILE}`: the architecture in PyTorch and `load_model(dir)`; needs "
      "only torch (uses the `safetensors` package when installed).",
      f"- `{METADATA_FILE}`: bat_jax's record of the export: threat model, evaluation "
      "protocol, leaderboard grade, training set-up, source.",
      f"- `{CARD_FILE}`: this card.", "",
      "## Use in PyTorch", "",
      "```python",
      "import sys",
      "sys.path.insert(0, EXPORT_DIR)  # the folder holding these files",
      "import bat_jax_models",
      "model = bat_jax_models.load_model(EXPORT_DIR)  # eval mode",
      "logits = model(images)  # NCHW float images in [0, 1]",
      "```", "",
      f"Inputs are NCHW images in [0, 1] ({channels}); {norm_text}, so eps is in pixel "
      f"units. The model is `{metadata['torch_architecture']['class']}` with "
      f"`{json.dumps(kwargs)}`.", "",
      "## Conversion", "",
      "- Conv kernels HWIO -> OIHW, dense kernels [in, out] -> [out, in]"
      + (f"; {flatten[0]}'s rows reordered from the NHWC to the NCHW flatten" if
         flatten else "") + ".",
      "- BatchNorm: eps 1e-5 and momentum 0.1 as in bat_jax (Flax momentum 0.9); "
      "`num_batches_tracked` is 0 (bat_jax does not count updates)."
      if spec.has_batch_norm else "- No BatchNorm.",
      f"- Parameters are float32 (training computed in {training['dtype']}). The "
      "PyTorch model gives the JAX model's logits up to float rounding "
      "(tests/test_export.py checks every architecture).", "",
      "## Citation", "",
      (f"{info['authors']}. {info['name']}. {info['venue']}. <{info['link']}>"
       if info["authors"] else "Standard training: no method paper."), "",
  ]
  return "\n".join(lines)
