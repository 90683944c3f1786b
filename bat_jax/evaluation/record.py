"""The protocol record of an evaluation, and the digests that identify its inputs.

:func:`protocol_record` says how the numbers were made: the norm, eps (as a
number and as k/255 where it is one), which examples (by index), the seed
and how keys are drawn, every stage's budgets and settings (from its entry
in ``evaluation.stages``: PGD's steps, the AutoAttack version, ...), the
bat_jax and JAX versions, the devices, and the sanity checks' outcome. It
goes into the results JSON and results.md. The digests (:func:`tree_sha256`,
:func:`arrays_sha256`, :func:`path_sha256`) name a model's weights, a data
set or a checkpoint file in the fingerprint of saved progress
(``evaluation.resume``).
"""

import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

import bat_jax
from bat_jax import fs, naming
from bat_jax.evaluation import stages
from bat_jax.evaluation.stages import Protocol

KEYS_RULE = "fold_in(fold_in(PRNGKey(seed), metric id), example index)"


def _update(h, array) -> None:
  array = np.ascontiguousarray(np.asarray(array))
  h.update(f"{array.dtype.str}{array.shape}".encode())
  h.update(array.tobytes())


def arrays_sha256(*arrays) -> str:
  """SHA-256 of arrays' dtypes, shapes and bytes."""
  h = hashlib.sha256()
  for array in arrays:
    _update(h, array)
  return h.hexdigest()


def tree_sha256(tree: Any) -> str:
  """SHA-256 of a pytree of arrays (e.g. a model's variables), paths included."""
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  for path, leaf in leaves:
    h.update(jax.tree_util.keystr(path).encode())
    _update(h, leaf)
  return h.hexdigest()


def path_sha256(path: str) -> Optional[str]:
  """SHA-256 of a file's bytes, or of a directory's file names, sizes and times."""
  if not path or not fs.exists(path):
    return None
  h = hashlib.sha256()
  if fs.is_remote(path):  # an object's bytes; a remote folder is named, not hashed
    return None if fs.is_dir(path) else hashlib.sha256(fs.read_bytes(path)).hexdigest()
  if os.path.isfile(path):
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      stat = os.stat(full)
      h.update(f"{os.path.relpath(full, path)}:{stat.st_size}:{stat.st_mtime_ns}\n"
               .encode())
  return h.hexdigest()


def describe_indices(indices: np.ndarray) -> Dict[str, Any]:
  """Which examples: ``{'range': [a, b]}`` for a contiguous run, else a digest."""
  indices = np.asarray(indices, np.int64)
  count = int(len(indices))
  if count and np.array_equal(indices, np.arange(indices[0], indices[0] + count)):
    return {"count": count, "range": [int(indices[0]), int(indices[0]) + count]}
  return {"count": count, "sha256": arrays_sha256(indices)}


def indices_text(examples: Dict[str, Any]) -> str:
  """'test[0:1000] (1000 examples)' or '1000 examples (indices sha256 1a2b...)'."""
  split = examples.get("split") or ""
  if "range" in examples:
    a, b = examples["range"]
    return f"{split}[{a}:{b}] ({examples['count']} examples)"
  return (f"{examples['count']} {split} examples (indices sha256 "
          f"{examples.get('sha256', '?')[:12]})")


def devices_record(local_devices: Sequence[Any]) -> Dict[str, Any]:
  """The devices that ran the evaluation: each host's ``local_devices``."""
  return {"count": len(local_devices) * jax.process_count(),
          "processes": jax.process_count(), "local": len(local_devices),
          "platform": local_devices[0].platform, "kind": local_devices[0].device_kind}


def data_record(images, labels, indices, *, dataset: str = "", split: str = "test",
                source: Optional[str] = None) -> Dict[str, Any]:
  """The examples evaluated: data set, split, indices, and a digest of the arrays."""
  return {"dataset": dataset, "split": split, "source": source,
          **describe_indices(indices), "data_sha256": arrays_sha256(images, labels)}


def protocol_record(protocol: Protocol, *, eps: float, pgd_step_size: float,
                    examples: Dict[str, Any], sanity_examples: int, large_eps: float,
                    tolerance: float, attacks: Sequence[str],
                    devices: Sequence[Any]) -> Dict[str, Any]:
  """How the numbers were made (the sanity outcome is filled in after the checks).

  Each stage's budgets and other entries come from its registry entry
  (``stages.Stage.record``).
  """
  dataset = examples.get("dataset") or ""
  described = [stage.describe(protocol, eps, pgd_step_size)
               for stage in stages.STAGES.values()]
  return {
      "norm": protocol.norm,
      "eps": float(eps), "eps_255": naming.eps_255(eps),
      "eps_label": naming.format_eps(eps, dataset, protocol.norm),
      "examples": examples,
      "attacks": list(attacks),
      "seed": int(protocol.seed), "keys": KEYS_RULE, "metric_ids": stages.metric_ids(),
      "budgets": {stage.name: d.budget for stage, d in zip(stages.STAGES.values(), described)
                  if d.budget is not None},
      **{key: value for d in described for key, value in (d.record or {}).items()},
      "sanity": {"examples": int(sanity_examples), "large_eps": float(large_eps),
                 "tolerance": float(tolerance), "outcome": None},
      "bat_jax_version": bat_jax.__version__, "jax_version": jax.__version__,
      "devices": devices_record(devices),
  }


def sanity_outcome(ran: bool, warnings: List[str]) -> str:
  """'passed', 'not run' or '2 warnings'."""
  if not ran:
    return "not run"
  return "passed" if not warnings else f"{len(warnings)} warning(s)"


def protocol_lines(record: Dict[str, Any]) -> List[str]:
  """The record as Markdown bullet points (results.md)."""
  if not record:
    return []
  eps = f"{record['eps']:.6g}" + (f" = {record['eps_255']}" if record.get("eps_255")
                                   else "")
  norm = naming.norm_of(record)
  devices = record.get("devices", {})
  sanity = record.get("sanity", {})
  return [
      f"- threat model: {naming.norm_label(norm)} ({norm}), eps {eps}",
      f"- examples: {indices_text(record.get('examples', {}))} of "
      f"`{record.get('examples', {}).get('dataset')}`",
      f"- attacks: {', '.join(record.get('attacks', []))}; seed {record.get('seed')}, "
      f"per-example keys {record.get('keys')}",
      *[stage.record_line(record) for stage in stages.STAGES.values() if stage.record_line],
      f"- sanity checks on {sanity.get('examples')} examples: {sanity.get('outcome')}",
      f"- bat_jax {record.get('bat_jax_version')}, jax {record.get('jax_version')}, "
      f"{devices.get('count')} {devices.get('platform')} device(s) on "
      f"{devices.get('processes')} process(es)",
  ]
