"""The trainer's watch: divergence and preemption, checked at step boundaries.

``StepMetrics`` fetches the per-step device metrics lazily and raises
``DivergenceError`` at the first non-finite step, before any checkpoint of
that state; ``Preemption`` turns SIGTERM, Ctrl-C or JAX's multi-host
preemption notice into a stop at a step that every host agrees on.
"""

import math
import signal
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from bat_jax.errors import DivergenceError


# Loss this many times its first logged value (and above 100) looks like divergence.
EXPLODING_LOSS_FACTOR = 100.0


class StepMetrics:
  """Per-step device metrics, fetched lazily (at log and checkpoint steps only).

  Fetching checks every step's ``train/finite`` flag, so divergence is
  reported at the step it happened, before any checkpoint of that state.
  """

  def __init__(self, par):
    self.par = par
    self._pending: List[Tuple[int, Any]] = []
    self._fetched: List[Tuple[int, Dict[str, float]]] = []
    self.first_loss: Optional[Tuple[int, float]] = None
    self.warned_exploding = False

  def add(self, step: int, device_metrics) -> None:
    self._pending.append((step, device_metrics))

  def fetch(self, last_checkpoint: Optional[int], config) -> None:
    """Moves pending metrics to the host; DivergenceError at the first bad step."""
    for step, device_metrics in self._pending:
      values = {k: float(v) for k, v in
                jax.device_get(self.par.get_output(device_metrics)).items()}
      if values.get("train/finite", 1.0) < 1.0 or not math.isfinite(values["train/loss"]):
        raise DivergenceError(divergence_message(step, values, last_checkpoint, config))
      self._fetched.append((step, values))
    self._pending = []

  def take_average(self, last_checkpoint: Optional[int], config) -> Dict[str, float]:
    """The mean of every metric since the last call; warns once if the loss explodes."""
    self.fetch(last_checkpoint, config)
    records = [values for _, values in self._fetched]
    averaged = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
    averaged.pop("train/finite", None)
    step, loss = self._fetched[-1][0], averaged["train/loss"]
    self._fetched = []
    if self.first_loss is None:
      self.first_loss = (step, loss)
    elif (not self.warned_exploding and abs(loss) > 100
          and abs(loss) > EXPLODING_LOSS_FACTOR * abs(self.first_loss[1])):
      self.warned_exploding = True
      logging.warning(
          "Training loss %.3g at step %d is over %dx its value at step %d (%.3g): "
          "training is probably diverging; consider a lower config.learning_rate "
          "(now %g).", loss, step, EXPLODING_LOSS_FACTOR, self.first_loss[0],
          self.first_loss[1], config.learning_rate)
    return averaged


def divergence_message(step: int, values: Dict[str, float],
                        last_checkpoint: Optional[int], config) -> str:
  shown = {k: values[k] for k in ("train/loss", "train/grad_norm") if k in values}
  if last_checkpoint is None:
    saved = "no checkpoint was written yet, so a rerun starts over"
  else:
    saved = (f"the last checkpoint, step {last_checkpoint}, was checked finite when "
             "saved and is intact")
  return (f"training diverged: the state became non-finite at step {step} "
          f"({shown}). Nothing non-finite was saved; {saved}. Lower "
          f"config.learning_rate (now {config.learning_rate:g}) or check the data, "
          "then start over in a new --workdir, or continue this run with "
          "`--allow_config_changes=learning_rate`.")


class Preemption:
  """Stops the loop at a step boundary, checkpointed, on preemption or Ctrl-C.

  One host: SIGTERM and a first Ctrl-C set a flag (a second Ctrl-C
  interrupts at once). Several hosts must stop at the same step, or the others
  wait forever in the next step's collectives: there JAX's own preemption
  notice is used (``multihost_utils.reached_preemption_sync_point``), which
  every host reaches at the same step, and no Python handler is installed.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.reason = ""
    self._flag = False
    self._previous = {}

  def __enter__(self):
    for sig in () if self.multihost else self._SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler, no flag
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self._flag = True
    self.reason = signal.Signals(signum).name
    if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT,
                                                      signal.default_int_handler))

  def requested(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = "preemption notice"
        return True
      return False
    return self._flag

  def __exit__(self, *_):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
