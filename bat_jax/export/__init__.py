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

``safetensors.py`` writes the weights file (NumPy only: bat_jax never
imports torch), ``torch_weights.py`` maps Flax variables to PyTorch names and
layouts, ``model_info.py`` writes the model info and the card; below,
:func:`export` (a config and its variables in, files out) and
:func:`export_workdir` (a trained run in).
"""

import json
import os
from typing import Any, Dict, Mapping, Optional

from absl import logging

from bat_jax import checkpointing, datasets, fs, models, rundir, train_state
from bat_jax.export.model_info import (CARD_FILE, INFO_FILE, model_card,
                                       robustbench_model_info)
from bat_jax.export.safetensors import read_safetensors, write_safetensors
from bat_jax.export.torch_weights import (ARCHITECTURE_KEY, MODULE_FILE, TORCH_TEMPLATE,
                                          WEIGHTS_FILE, torch_architecture,
                                          torch_state_dict, write_torch_model)

__all__ = ["ARCHITECTURE_KEY", "CARD_FILE", "INFO_FILE", "MODULE_FILE", "TORCH_TEMPLATE",
           "WEIGHTS_FILE", "evaluation_of", "export", "export_workdir", "model_card",
           "read_safetensors", "robustbench_model_info", "torch_architecture",
           "torch_state_dict", "write_safetensors", "write_torch_model"]


def export(config, variables: Mapping[str, Any], out_dir: str, *,
           results: Optional[Mapping[str, Any]] = None,
           source: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
  """Writes the four export files of a ``config`` model with ``variables``.

  ``results``: its evaluation (``eval/{which}_results.json``; None: not
  evaluated). ``source``: where it came from (workdir, which, step), for
  the card and the metadata. Returns ``{kind: path}``.
  """
  fs.check_writable(out_dir, "export folder")
  module = train_state.build_model(config, bn_axis_name=None)
  image_shape = datasets.get_dataset_info(config.dataset).image_shape
  metadata = {"bat_jax_model": config.model, "bat_jax_method": config.method}
  if source:
    metadata["bat_jax_source"] = json.dumps(dict(source))
  paths = write_torch_model(module, variables, out_dir, image_shape, metadata)
  info = robustbench_model_info(config, results, source)
  paths["info"] = os.path.join(out_dir, INFO_FILE)
  fs.write_json(paths["info"], info, indent=2)
  paths["card"] = os.path.join(out_dir, CARD_FILE)
  fs.write_text(paths["card"], model_card(config, info, torch_architecture(module, image_shape),
                                          models.count_params(variables["params"])))
  return paths


def evaluation_of(workdir: str, which: str, step: int) -> Optional[Dict[str, Any]]:
  """The evaluation results of the checkpoint at ``step``, or None.

  ``eval/{which}_results.json`` when it is of that step; else another
  results file of the same step ('best' that fell back to 'last' is the
  'last' checkpoint). Results of another step (a stale evaluation) are not used.
  """
  runs = rundir.load_results(workdir)
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
  restored = rundir.restore_model(workdir, which)
  source = {"workdir": os.fspath(fs.path(workdir)), "which": which,
            "checkpoint": restored.checkpoint, "step": restored.step}
  return export(restored.config, restored.variables, out_dir,
                results=evaluation_of(workdir, which, restored.step), source=source)


