"""A progress line per evaluation stage: done / total, examples per second, ETA.

On a terminal (stderr is a TTY) one line is redrawn with ``\\r`` after every
batch; elsewhere (a log file, a batch job) a log line is written every
``every_s`` seconds instead, so long runs show where they are without
flooding their logs. It runs on the host between batches, outside the
compiled step, and needs no package beyond absl.
"""

import sys
import time
from typing import Callable, Optional, TextIO

from absl import logging

# Seconds between progress log lines when stderr is not a terminal.
PROGRESS_EVERY_S = 60.0


def format_seconds(seconds: float) -> str:
  """42 -> '42s', 130 -> '2m10s', 7300 -> '2h01m'."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
  """Progress of one stage over ``total`` examples, ``done`` of them already done.

  ``update(n)`` after each batch; ``close()`` at the end. The rate counts only
  the examples computed in this process (``done`` ones were loaded from saved
  progress), so the ETA holds for a resumed stage too. ``enabled=False``
  (every process but the first of a multi-host run) shows nothing.
  """

  def __init__(self, name: str, total: int, *, done: int = 0,
               stream: Optional[TextIO] = None, tty: Optional[bool] = None,
               every_s: float = PROGRESS_EVERY_S, enabled: bool = True,
               clock: Callable[[], float] = time.monotonic):
    self.name, self.total, self.done = name, int(total), int(done)
    self.stream = stream or sys.stderr
    if tty is None:
      tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.tty, self.every_s, self.enabled, self.clock = tty, every_s, enabled, clock
    self.began = self.last_log = clock()
    self.computed, self.width = 0, 0
    self.logged: Optional[int] = None  # examples done at the last log line

  def line(self) -> str:
    """'pgd: 500/1000 (50%), 12.3 examples/s, ETA 41s'."""
    percent = 100 * self.done / self.total if self.total else 100
    text = f"{self.name}: {self.done}/{self.total} ({percent:.0f}%)"
    elapsed = self.clock() - self.began
    if self.computed and elapsed > 0:
      rate = self.computed / elapsed
      text += f", {rate:.1f} examples/s"
      if self.done < self.total:
        text += f", ETA {format_seconds((self.total - self.done) / rate)}"
      else:
        text += f", {format_seconds(elapsed)}"
    return text

  def update(self, count: int) -> None:
    self.done += int(count)
    self.computed += int(count)
    if not self.enabled:
      return
    if self.tty:
      self._draw()
    elif self.clock() - self.last_log >= self.every_s:
      self.last_log, self.logged = self.clock(), self.done
      logging.info("%s", self.line())

  def _draw(self) -> None:
    text = self.line()
    self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
    self.stream.flush()
    self.width = len(text)

  def close(self) -> None:
    """Ends the terminal line (or logs the final state after earlier log lines)."""
    if not self.enabled:
      return
    if self.tty and self.width:
      self.stream.write("\n")
      self.stream.flush()
    elif self.logged is not None and self.logged != self.done:
      logging.info("%s", self.line())
