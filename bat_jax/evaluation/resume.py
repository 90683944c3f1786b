"""Resumable evaluation: every batch's per-example outputs are saved as they come.

An evaluation runs in stages (clean, FGSM, PGD, each AutoAttack attack, the
sanity checks' PGD runs); each stage runs one metric on a set of examples,
batch by batch. :class:`StageRunner` saves each finished batch (a *chunk*:
the data-set indices of its examples and their outputs) under

  ROOT/<fingerprint>/fingerprint.json     what the fingerprint hashes
  ROOT/<fingerprint>/<stage>/chunk-<first index>.npz

written atomically (a temporary file, then a rename), so a killed process
loses at most the batch in flight. Rerun, a stage loads its saved chunks and
runs only the examples still missing, in the same order and batches, so
the result equals an uninterrupted run's.

The fingerprint hashes everything that changes the numbers: the model (its
weights' digest, the checkpoint's series and step), the examples (data set,
split, indices and a digest of the images and labels), the norm, eps, every
budget, the seed and the bat_jax version. It leaves out the batch size, the
device and host counts and the JAX version: per-example keys make each
example's result independent of them up to a rare flip at a decision tie;
and the list of attacks run, since each stage is saved on its own. Another
setting gets another directory (logged with the fields that differ), so
saved outputs never mix with other settings.

With several hosts only process 0 writes; before a stage, every process
waits for the others (so process 0 has written all it computed) and reads
the saved chunks (the output directory must be shared, as a training
workdir is), and the processes check that they agree on what is done.
"""

import io
import hashlib
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from bat_jax import fs
from bat_jax.errors import WorkdirError
from bat_jax.evaluation.engine import Evaluator
from bat_jax.evaluation.progress_bar import ProgressBar

FINGERPRINT_FILE = "fingerprint.json"
# Why to stop after the chunk in flight (set by a signal handler), or None.
_stop_reason: List[str] = []


def request_stop(reason: str) -> None:
  """Stops the evaluation after the chunk in flight is saved (e.g. on SIGTERM)."""
  _stop_reason[:] = [reason]


class EvaluationInterrupted(Exception):
  """The evaluation stopped on purpose (``max_new_chunks``); its progress is saved."""


def fingerprint(record: Mapping[str, Any]) -> str:
  """16 hex digits of SHA-256 over the record as canonical JSON."""
  text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(record: Any, prefix: str = "") -> Dict[str, Any]:
  if not isinstance(record, Mapping):
    return {prefix: record}
  flat = {}
  for key, value in record.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
  """'field: old -> new' for every (nested) field that differs."""
  a, b = _flatten(json.loads(json.dumps(old, default=str))), _flatten(
      json.loads(json.dumps(new, default=str)))
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


class ProgressStore:
  """The saved chunks of one evaluation (one fingerprint) under ``root``.

  ``write``: whether this process writes (process 0 of a multi-host run).
  ``max_new_chunks``: raise :class:`EvaluationInterrupted` once this many
  new chunks are saved (``--max_chunks_this_run``; tests). ``earlier_records``:
  the same settings as earlier bat_jax versions wrote them (e.g. the norm
  spelt 'Linf'); progress saved under one of them is continued there.
  """

  def __init__(self, root: str, record: Mapping[str, Any], *, write: bool = True,
               max_new_chunks: Optional[int] = None,
               earlier_records: Sequence[Mapping[str, Any]] = ()):
    self.root, self.record = root, json.loads(json.dumps(record, default=str))
    self.fingerprint = fingerprint(self.record)
    self.dir = os.path.join(root, self.fingerprint)
    for earlier in earlier_records:
      earlier_dir = os.path.join(root, fingerprint(json.loads(json.dumps(
          earlier, default=str))))
      if (not fs.exists(os.path.join(self.dir, FINGERPRINT_FILE))
          and fs.exists(os.path.join(earlier_dir, FINGERPRINT_FILE))):
        self.dir = earlier_dir
    self.write, self.max_new_chunks, self.new_chunks = write, max_new_chunks, 0
    if fs.exists(os.path.join(self.dir, FINGERPRINT_FILE)):
      logging.info("Continuing the saved evaluation progress in %s.", self.dir)
    elif write:
      self._note_other_records()
      fs.write_json(os.path.join(self.dir, FINGERPRINT_FILE), self.record, indent=2,
                    sort_keys=True)

  def _note_other_records(self) -> None:
    """Logs how the newest other saved evaluation differs (it is left alone)."""
    others = []
    for path in fs.glob(self.root, f"*/{FINGERPRINT_FILE}"):
      try:
        record = json.loads(fs.read_text(path))
      except (OSError, ValueError):
        continue
      others.append((fs.mtime(path), path, record))
    if not others:
      logging.info("Saving evaluation progress in %s.", self.dir)
      return
    _, path, old = max(others, key=lambda o: o[0])
    changed = differences(old, self.record)
    logging.info("Saved progress in %s is for other settings (%s); starting a new "
                 "record in %s.", os.path.dirname(path), "; ".join(changed) or "?",
                 self.dir)

  def _stage_dir(self, stage: str) -> str:
    return os.path.join(self.dir, stage)

  def load(self, stage: str) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The saved ``(indices, outputs)`` of ``stage`` (unreadable chunks skipped)."""
    indices, outputs = [], {}
    for path in fs.glob(self._stage_dir(stage), "chunk-*.npz"):
      try:
        with fs.load_npz(path, allow_pickle=False) as data:
          chunk = {k: data[k] for k in data.files}
      except (OSError, ValueError, EOFError) as e:
        logging.warning("Saved chunk %s cannot be read (%s); it is evaluated again.",
                        path, e)
        continue
      indices.append(chunk.pop("index"))
      for key, value in chunk.items():
        outputs.setdefault(key, []).append(value)
    if not indices:
      return np.zeros((0,), np.int64), {}
    return (np.concatenate(indices).astype(np.int64),
            {k: np.concatenate(v) for k, v in outputs.items()})

  def save(self, stage: str, indices: np.ndarray, outputs: Mapping[str, np.ndarray]
           ) -> None:
    """Saves one chunk; then raises EvaluationInterrupted after ``max_new_chunks``
    chunks or when :func:`request_stop` was called."""
    if self.write and len(indices):
      path = os.path.join(self._stage_dir(stage), f"chunk-{int(indices[0]):09d}.npz")
      buffer = io.BytesIO()
      np.savez(buffer, index=np.asarray(indices, np.int64), **outputs)
      fs.write_bytes(path, buffer.getvalue())
    self.new_chunks += 1
    reason = _stop_reason.pop() if _stop_reason else None  # a request stops once
    if self.max_new_chunks is not None and self.new_chunks >= self.max_new_chunks:
      reason = f"after {self.new_chunks} new chunk(s) as asked"
    if reason:
      raise EvaluationInterrupted(
          f"stopped {reason}; the progress is saved in {self.dir}: rerun the same "
          "command to continue.")


class StageRunner:
  """Runs an evaluation's stages on one data set, saving and resuming each chunk.

  ``images``/``labels`` are the examples evaluated, ``indices`` their
  indices in the data set (their keys); ``store`` None keeps nothing.
  ``stats`` records, per stage, the examples loaded and computed and the
  seconds spent (this run's, not part of the results); ``non_finite``, per
  stage, how many selected examples met NaN or inf (from the metric's
  ``non_finite`` output, saved with the chunks, so a resumed run counts the
  same).
  """

  def __init__(self, evaluator: Evaluator, images: np.ndarray, labels: np.ndarray,
               indices: Optional[np.ndarray] = None,
               store: Optional[ProgressStore] = None, show_progress: bool = True):
    self.evaluator, self.images, self.labels = evaluator, images, labels
    self.indices = (np.arange(len(images), dtype=np.int64) if indices is None
                    else np.asarray(indices, np.int64))
    self.store, self.show_progress = store, show_progress
    self.stats: Dict[str, Dict[str, Any]] = {}
    self.non_finite: Dict[str, int] = {}

  def run(self, stage: str, metric: str, *, eps: float = 0.0, step_size: float = 0.0,
          select: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Metric ``metric`` on the ``select``-ed examples (default all) as ``stage``.

    Returns ``{output: [N, ...]}`` over all N examples, zero (False) where not
    selected; an empty dict when nothing is selected.
    """
    num = len(self.images)
    positions = np.arange(num) if select is None else np.flatnonzero(select)
    began = time.time()
    outputs: Dict[str, np.ndarray] = {}
    filled = np.zeros((num,), np.int64)

    def put(where, rows):
      np.add.at(filled, where, 1)
      for key, value in rows.items():
        if key not in outputs:
          outputs[key] = np.zeros((num,) + value.shape[1:], value.dtype)
        outputs[key][where] = value

    loaded = self._load(stage, positions)
    if loaded is not None:
      put(*loaded)
    todo = positions[filled[positions] == 0]
    bar = ProgressBar(stage, len(positions), done=len(positions) - len(todo),
                      enabled=self.show_progress and jax.process_index() == 0)
    for where, rows in self.evaluator.run_batches(
        metric, self.images[todo], self.labels[todo], indices=self.indices[todo],
        eps=eps, step_size=step_size):
      where = todo[where]
      put(where, rows)
      bar.update(len(where))
      if self.store is not None:
        self.store.save(stage, self.indices[where], rows)
    bar.close()
    if not np.all(filled[positions] == 1) or np.sum(filled) != len(positions):
      raise RuntimeError(f"{stage}: examples filled {sorted(set(filled.tolist()))} "
                         "times; expected each selected one exactly once.")
    if "non_finite" in outputs or not len(positions):
      flags = outputs.get("non_finite", np.zeros((num,), bool))
      self.non_finite[stage] = int(np.sum(flags[positions]))
    self.stats[stage] = {"examples": int(len(positions)),
                         "loaded": int(len(positions) - len(todo)),
                         "computed": int(len(todo)),
                         "seconds": round(time.time() - began, 3)}
    return outputs

  def _load(self, stage: str, positions: np.ndarray
            ) -> Optional[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """The saved rows of ``stage`` among ``positions``: ``(positions, rows)``."""
    if self.store is None:
      return None
    if jax.process_count() > 1:
      # Process 0 writes each chunk after its batch; wait until it has written
      # everything before this stage (an earlier, interrupted run included).
      multihost_utils.sync_global_devices(f"bat_jax evaluation: load {stage}")
    indices, rows = self.store.load(stage)
    wanted = self.indices[positions]
    keep = np.isin(indices, wanted)
    indices, rows = indices[keep], {k: v[keep] for k, v in rows.items()}
    indices, first = np.unique(indices, return_index=True)  # a duplicate: keep one
    rows = {k: v[first] for k, v in rows.items()}
    order = np.argsort(wanted)
    where = positions[order[np.searchsorted(wanted[order], indices)]]
    if jax.process_count() > 1:
      self._check_hosts_agree(stage, indices)
    return where, rows

  def _check_hosts_agree(self, stage: str, indices: np.ndarray) -> None:
    digest = hashlib.sha256(np.asarray(indices, np.int64).tobytes()).digest()[:8]
    try:
      multihost_utils.assert_equal(np.frombuffer(digest, np.int32))
    except AssertionError:
      raise WorkdirError(
          f"{stage}: the processes see different saved progress under "
          f"{self.store.dir}; the output directory must be one directory shared by "
          "every host (or rerun with --resume=false).") from None

