"""Export a trained model for PyTorch and RobustBench.

  python -m bat_jax.export --workdir=runs/c10_bat --which=best --out=export/c10_bat

writes into ``--out``:

  <dataset>/<Linf|L2>/<Name>.json  RobustBench's model-info file: exactly its
                     fields, under its name and folder convention (threat model
                     from the evaluation, else config.norm);
  <dataset>/<Linf|L2>/<Name>.pt    the state dict (``torch.save``) that loads
                     strictly into RobustBench's own class computing the same
                     function (needs torch; absent, with the reason in the card,
                     when torch is not installed or no RobustBench class
                     computes this model);
  model.safetensors  the weights under PyTorch names and layouts (float32);
  bat_jax_models.py  the architectures in PyTorch (normalisation inside, NCHW
                     inputs in [0, 1]; a registered model's own class appended)
                     and ``load_model(dir)``, needing only torch;
  bat_jax_export.json  bat_jax's own record: threat model, evaluation protocol,
                     leaderboard grade, training set-up, RobustBench class, source;
  MODEL_CARD.md      the same for people, with a "not leaderboard-grade" mark and
                     the command that makes it so where it applies.

``safetensors.py`` writes the weights file (NumPy only), ``torch_weights.py``
maps Flax variables to PyTorch names and layouts and to RobustBench's classes,
``model_info.py`` writes the RobustBench entry, the metadata and the card;
below, :func:`export` (a config and its variables in, files out) and
:func:`export_workdir` (a trained run in). bat_jax imports torch only to write
the ``.pt`` file.
"""

import io
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import logging
import numpy as np

from bat_jax import checkpointing, datasets, errors, fs, models, rundir, train_state
from bat_jax.export.model_info import (CARD_FILE, EXTRA_DATA_KINDS, METADATA_FILE,
                                       ROBUSTBENCH_FIELDS, export_metadata,
                                       leaderboard_grade, model_card, model_name,
                                       reported_row, robustbench_entry, threat_model)
from bat_jax.export.safetensors import read_safetensors, write_safetensors
from bat_jax.export.torch_weights import (ARCHITECTURE_KEY, MODULE_FILE, TORCH_TEMPLATE,
                                          WEIGHTS_FILE, robustbench_architecture,
                                          torch_architecture, torch_module_source,
                                          torch_state_dict, write_torch_model)

__all__ = ["ARCHITECTURE_KEY", "CARD_FILE", "EXTRA_DATA_KINDS", "METADATA_FILE",
           "MODULE_FILE", "ROBUSTBENCH_FIELDS", "TORCH_TEMPLATE",
           "WEIGHTS_FILE", "evaluation_of", "export", "export_metadata", "export_workdir",
           "leaderboard_grade", "model_card", "model_name", "read_safetensors",
           "reported_row", "robustbench_architecture", "robustbench_entry",
           "threat_model", "torch_architecture", "torch_module_source", "torch_state_dict",
           "write_robustbench_checkpoint", "write_safetensors", "write_torch_model"]


def write_robustbench_checkpoint(path: str, state: Mapping[str, Any]
                                 ) -> Tuple[Optional[str], Optional[str]]:
  """Writes ``state`` (NumPy arrays) with ``torch.save``: ``(path, None)``.

  Without torch nothing is written: ``(None, why)``, and a warning says how to
  get the file.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: only for the .pt
  except ImportError:
    why = ("PyTorch is not installed; `pip install torch` and export again to get "
           "RobustBench's .pt checkpoint.")
    logging.warning("%s not written: %s", path, why)
    return None, why
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, buffer)
  fs.write_bytes(path, buffer.getvalue())
  return path, None


def export(config, variables: Mapping[str, Any], out_dir: str, *,
           results: Optional[Mapping[str, Any]] = None,
           source: Optional[Mapping[str, Any]] = None,
           extra_data: Optional[str] = None) -> Dict[str, str]:
  """Writes the export files of a ``config`` model with ``variables``.

  ``results``: its evaluation (``eval/{which}_results.json``; None: not
  evaluated). ``source``: where it came from (workdir, which, checkpoint,
  step), for the card and the metadata. ``extra_data``: 'real' or
  'generated', what ``config.extra_data_path`` holds (RobustBench counts only
  real extra data as additional data). Returns ``{kind: path}``.
  """
  if extra_data is not None and extra_data not in EXTRA_DATA_KINDS:
    raise ValueError(f"extra_data must be one of {EXTRA_DATA_KINDS}; got {extra_data!r}.")
  if extra_data is not None and not config.extra_data_path:
    raise errors.UserError(f"--extra_data={extra_data}: the run used no extra data "
                           "(config.extra_data_path is empty); leave the flag out.")
  fs.check_writable(out_dir, "export folder")
  module = train_state.build_model(config, bn_axis_name=None)
  image_shape = datasets.get_dataset_info(config.dataset).image_shape
  twin = torch_architecture(module, image_shape)
  metadata = {"bat_jax_model": config.model, "bat_jax_method": config.method}
  if source:
    metadata["bat_jax_source"] = json.dumps(dict(source))
  paths = write_torch_model(module, variables, out_dir, image_shape, metadata)

  entry_path, info = robustbench_entry(config, results, source, extra_data)
  paths["robustbench_info"] = os.path.join(out_dir, entry_path)
  fs.write_json(paths["robustbench_info"], info, indent=2)
  architecture = robustbench_architecture(module, image_shape)
  checkpoint, missing = None, None
  if architecture["loadable"]:
    relative = entry_path[:-len(".json")] + ".pt"
    written, missing = write_robustbench_checkpoint(
        os.path.join(out_dir, relative), torch_state_dict(module, variables, image_shape))
    if written:
      checkpoint, paths["robustbench_checkpoint"] = relative, written
  else:
    missing = architecture["reason"]
  record = export_metadata(config, results, source, entry_path=entry_path,
                           checkpoint_path=checkpoint, checkpoint_missing=missing,
                           architecture=architecture, torch_architecture=twin,
                           extra_data=extra_data)
  paths["metadata"] = os.path.join(out_dir, METADATA_FILE)
  fs.write_json(paths["metadata"], record, indent=2)
  paths["card"] = os.path.join(out_dir, CARD_FILE)
  fs.write_text(paths["card"], model_card(config, info, record,
                                          models.count_params(variables["params"])))
  return paths


def evaluation_of(workdir: str, which: str, step: int,
                  weights: str = "raw") -> Optional[Dict[str, Any]]:
  """The evaluation results of the checkpoint at ``step`` with ``weights``, or None.

  ``eval/{which}_results.json`` when it is of that step; else another
  results file of the same step and weights ('best' that fell back to 'last'
  is the 'last' checkpoint). Results of another step (a stale evaluation) or
  of other weights (the raw weights of an 'ema' step) are not used.
  """
  runs = rundir.load_results(workdir)
  ordered = ([runs[which]] if which in runs else []) + [
      r for w, r in runs.items() if w != which]
  for results in ordered:
    if results.get("step") == step and results.get("weights", "raw") == weights:
      return results
  if runs:
    logging.warning("%s: no evaluation of step %d (evaluated: %s); exporting null "
                    "accuracies.", workdir, step,
                    {w: r.get("step") for w, r in runs.items()})
  return None


def export_workdir(workdir: str, which: str = "best", out_dir: str = "export",
                   extra_data: Optional[str] = None) -> Dict[str, str]:
  """Exports the ``which`` checkpoint of a training run ('best' falls back to 'last')."""
  restored = rundir.restore_model(workdir, which)
  source = {"workdir": os.fspath(fs.path(workdir)), "which": which,
            "checkpoint": restored.checkpoint, "weights": restored.weights,
            "step": restored.step}
  return export(restored.config, restored.variables, out_dir,
                results=evaluation_of(workdir, which, restored.step, restored.weights),
                source=source,
                extra_data=extra_data)


