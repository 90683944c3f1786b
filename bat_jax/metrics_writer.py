"""Metrics to ``WORKDIR/metrics.jsonl`` (one JSON object a line) and TensorBoard.

Only process 0 writes. TensorBoard event files go to ``WORKDIR/tensorboard``
through tensorboardX when it is installed; the JSONL file is the source of
truth that ``bat_jax.plots`` reads (``rundir.read_metrics``). A resumed run first drops the records
that the interrupted run logged after its checkpoint (:meth:`MetricWriter.rewind`),
so every step is in the file once.
"""

import json
import os
from typing import Any, Callable, Dict

from absl import logging

from bat_jax import fs


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if fs.is_remote(workdir):  # tensorboardX writes local files; metrics.jsonl is the record
      logging.info("A remote workdir: TensorBoard events are not written, only "
                   "metrics.jsonl.")
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.info("tensorboardX not installed: writing metrics.jsonl only.")

  def rewind(self, keep: Callable[[Dict[str, Any]], bool]) -> int:
    """Keeps only the records ``keep`` accepts (atomically); returns how many went.

    Lines that are not JSON (a write cut off by a kill) are dropped too.
    """
    if not self.enabled or not fs.exists(self.path):
      return 0
    lines = [line for line in fs.read_text(self.path).splitlines() if line.strip()]
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and keep(record):
        kept.append(json.dumps(record) + "\n")
    if len(kept) != len(lines):
      fs.write_text(self.path, "".join(kept))
    return len(lines) - len(kept)

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    fs.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
