"""Orbax checkpoints in the workdir: the latest (for resume) and the best (early stopping).

Layout::

  WORKDIR/checkpoints/<step>/   the two latest train states (auto-resume reads the newest)
  WORKDIR/best/<step>/          the state with the best early-stopping metric

Each checkpoint holds the train state and a small JSON ``meta`` (the best
metric so far, its step, the last evaluated step), so a resumed run keeps
selecting the same best. Three guarantees for unattended runs:

* nothing non-finite is ever written: :meth:`Checkpoints.save` checks the
  state first and raises :class:`~bat_jax.errors.DivergenceError`;
* a damaged newest checkpoint (a truncated file, missing metadata) is
  skipped with a warning and the older one restored; when none can be read,
  or the newest holds non-finite values, one :class:`CheckpointError` names
  the directories and what to do;
* a save that fails for lack of space or permission removes its partial
  step directory (orbax never restores an unfinished one) and raises one
  :class:`~bat_jax.errors.OutputError` naming it; the older checkpoints
  are intact (orbax's threads' own tracebacks of that failure are held
  back).
"""

import contextlib
import dataclasses
import glob
import logging as std_logging
import os
import shutil
import sys
import threading
from typing import Any, List, Optional, Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from bat_jax import fs
from bat_jax.errors import CheckpointError, DivergenceError, OutputError

WHICH = ("last", "best")  # the series written
# The models a run can be restored as (every entry point's --which): a series,
# or 'ema', the weight average (config.ema_decay > 0) of the 'last' checkpoint.
CHOICES = WHICH + ("ema",)
_SUBDIR = {"last": "checkpoints", "best": "best"}
# How many checkpoints each series keeps: two latest, so restore can fall back.
_KEEP = {"last": 2, "best": 1}


def non_finite_leaves(tree: Any) -> List[str]:
  """Paths of the floating-point leaves of ``tree`` holding NaN or inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
      bad.append(jax.tree_util.keystr(path))
  return bad


class Checkpoints:
  """The two checkpoint series of a run."""

  def __init__(self, workdir: str, create: bool = True):
    # Remote paths (gs://...) go to orbax/tensorstore as they are.
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self._managers = {
        which: ocp.CheckpointManager(
            self.directory(which),
            options=ocp.CheckpointManagerOptions(max_to_keep=_KEEP[which],
                                                 create=create))
        for which in WHICH}

  def directory(self, which: str, step: Optional[int] = None) -> str:
    path = os.path.join(self.workdir, _SUBDIR[_check(which)])
    return path if step is None else os.path.join(path, str(step))

  def latest_step(self, which: str = "last") -> Optional[int]:
    return self._managers[_check(which)].latest_step()

  def save(self, which: str, step: int, state: Any, meta: dict) -> None:
    """Saves host-local ``state`` (all processes must call it) and waits.

    Raises DivergenceError, writing nothing, if the state is not finite.
    """
    bad = non_finite_leaves(state)
    if bad:
      raise DivergenceError(
          f"the train state at step {step} holds non-finite values ({_few(bad)}); "
          f"it was not saved to {self.directory(which)}.")
    manager = self._managers[_check(which)]
    _quiet_abandoned_reads()  # a failing save's stray writes print at once
    with _held_orbax_errors() as held:
      try:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_stored_tree(state)),
            meta=ocp.args.JsonSave(meta)),
            force=True)
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
        reason = fs.write_failure_reason(e)
        if reason is None:
          held.release()
          raise
        _join_orbax_threads()  # the save's other writers fail too; let them end
        self._remove_partial(which, step)
        raise OutputError(f"cannot write checkpoint {self.directory(which, step)}: "
                          f"{reason}; that step was not saved (its partial files "
                          "are removed, never restored).",
                          self.directory(which)) from None
      held.release()

  def _remove_partial(self, which: str, step: int) -> None:
    """Removes what a failed save left of ``step`` (orbax's temporary directories)."""
    if fs.is_remote(self.workdir):
      return
    for path in glob.glob(self.directory(which, step) + ".orbax-checkpoint-tmp*"):
      shutil.rmtree(path, ignore_errors=True)

  def restore(self, which: str, abstract_state: Any,
              step: Optional[int] = None) -> Tuple[Any, dict]:
    """Restores (state, meta) of the newest readable checkpoint (or of ``step``).

    ``abstract_state`` gives the tree structure. A checkpoint that cannot be
    read is skipped for the next older one, with a warning; a non-finite one
    is refused. Raises CheckpointError when nothing can be restored.
    """
    manager = self._managers[_check(which)]
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise CheckpointError(
          f"no {which!r} checkpoint in {self.directory(which)}; train first with "
          "`python -m bat_jax.main --config=... --workdir=...`.")
    failures = []
    for candidate in steps:
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_stored_tree(abstract_state)),
            meta=ocp.args.JsonRestore()))
        state = _from_stored_tree(abstract_state, restored["state"])
        meta = restored["meta"]
        if not isinstance(meta, dict):
          raise ValueError(f"its meta is {type(meta).__name__}, not a JSON object")
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
        _quiet_abandoned_reads()
        reason = _first_line(e)
        failures.append(f"{self.directory(which, candidate)}: {reason}")
        logging.warning("Checkpoint %s cannot be read (%s)%s.",
                        self.directory(which, candidate), reason,
                        "; trying the previous one" if candidate != steps[-1] else "")
        continue
      bad = non_finite_leaves(state)
      if bad:
        raise CheckpointError(
            f"checkpoint {self.directory(which, candidate)} holds non-finite values "
            f"({_few(bad)}): it was saved by a diverged run (before bat_jax refused "
            "to save such states). Move it away to resume from an older checkpoint, "
            "or start over in a new workdir.")
      if failures:
        logging.warning("Restored the older checkpoint %s instead.",
                        self.directory(which, candidate))
      return state, dict(meta)
    raise CheckpointError(
        f"no {which!r} checkpoint in {self.directory(which)} can be restored:\n  "
        + "\n  ".join(failures) + "\nThey are damaged (an interrupted copy or a full "
        "disk?). Move the damaged step directories away to start this run over, or "
        "restore them from a backup.")

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


def intact_note(workdir: str) -> str:
  """What a run stopped by an unwritable output keeps, for its error message."""
  ckpts = Checkpoints(workdir, create=False)
  try:
    step = ckpts.latest_step("last")
  finally:
    ckpts.close()
  if step is None:
    return "No checkpoint was written yet: a rerun starts over."
  return (f"The last checkpoint, step {step} ({ckpts.directory('last', step)}), is "
          "intact: make room (or fix the permissions) and rerun the same command to "
          "resume from it.")


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir`` holds a 'last' checkpoint (creates nothing)."""
  ckpts = Checkpoints(workdir, create=False)
  try:
    return ckpts.latest_step("last") is not None
  finally:
    ckpts.close()


class _OrbaxErrorHold(std_logging.Filter):
  """Holds back the error records orbax's threads log (each with its traceback)."""

  def __init__(self):
    super().__init__()
    self.records, self.holding = [], True

  def filter(self, record):
    if (self.holding and record.levelno >= std_logging.ERROR
        and "orbax" in record.pathname):
      self.records.append(record)
      return False
    return True

  def release(self) -> None:
    """Logs the held records after all (the failure was not a storage one)."""
    records, self.records, self.holding = self.records, [], False
    for record in records:
      std_logging.getLogger(record.name).handle(record)


def _join_orbax_threads(timeout_s: float = 60.0) -> None:
  """Waits for orbax's background writer threads (after a failed save)."""
  for thread in threading.enumerate():
    if (thread is not threading.current_thread()
        and type(thread).__module__.startswith("orbax")):
      threading.Thread.join(thread, timeout_s)  # orbax's own join re-raises


@contextlib.contextmanager
def _held_orbax_errors():
  """While saving: orbax's error logs are held; dropped if the save's failure is
  reported as one OutputError, else logged (:meth:`_OrbaxErrorHold.release`)."""
  hold = _OrbaxErrorHold()
  loggers = [std_logging.getLogger("absl"), std_logging.getLogger()]
  for logger in loggers:
    logger.addFilter(hold)
  try:
    yield hold
  finally:
    for logger in loggers:
      logger.removeFilter(hold)


def _quiet_abandoned_reads() -> None:
  """Silences the reads and writes orbax abandons when a restore or save fails.

  Its other pending reads then fail inside coroutines nobody awaits, and
  Python prints each one (a tensorstore spec of ~80 lines) as "Exception
  ignored in"; the failure is already reported once, with its reason.
  """
  previous = sys.unraisablehook
  if getattr(previous, "bat_jax_quiet", False):
    return

  def hook(unraisable):
    where = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
    message = str(unraisable.exc_value)
    if "orbax" in where or message == "Event loop is closed":
      return
    previous(unraisable)

  hook.bat_jax_quiet = True
  sys.unraisablehook = hook
  previous_excepthook = sys.excepthook

  def excepthook(kind, value, traceback):
    # tensorstore's callbacks into a closed orbax event loop print this one.
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      previous_excepthook(kind, value, traceback)

  sys.excepthook = excepthook


def _stored_tree(state: Any) -> Any:
  """What is written of ``state``: a dataclass as a dict of its fields but those
  that are None (an optional part, e.g. the weight average when off), so that
  states without it keep the layout of checkpoints written before it existed."""
  if not dataclasses.is_dataclass(state):
    return state
  return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
          if getattr(state, field.name) is not None}


def _from_stored_tree(abstract_state: Any, tree: Any) -> Any:
  """The restored state, in the form of ``abstract_state`` (inverse of _stored_tree)."""
  if not dataclasses.is_dataclass(abstract_state):
    return tree
  return abstract_state.replace(**tree)


def _first_line(error: Exception) -> str:
  """A one-line reason: the innermost cause's first line, without tensorstore's dump."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = (str(error).strip().splitlines() or [""])[0]
  text = text.split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text[:300]}"


def _few(items: List[str], limit: int = 3) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def _check(which: str) -> str:
  if which not in WHICH:
    raise ValueError(f"checkpoint must be one of {WHICH}; got {which!r}.")
  return which
