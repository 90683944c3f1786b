"""Metrics to ``WORKDIR/metrics.jsonl`` (one JSON object a line) and TensorBoard.

Only process 0 writes. TensorBoard event files go to ``WORKDIR/tensorboard``
through tensorboardX when it is installed; the JSONL file is the source of
truth that ``bat_jax.plots`` reads.
"""

import json
import os
from typing import Dict

from absl import logging


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.info("tensorboardX not installed: writing metrics.jsonl only.")

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str):
  """All records of ``WORKDIR/metrics.jsonl`` as a list of dicts."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
