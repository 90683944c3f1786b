"""Orbax checkpoints in the workdir: the latest (for resume) and the best (early stopping).

Layout::

  WORKDIR/checkpoints/<step>/   the two latest train states (auto-resume reads the newest)
  WORKDIR/best/<step>/          the state with the best early-stopping metric

Each checkpoint holds the train state and a small JSON ``meta`` (the best
metric so far, its step, the last evaluated step), so a resumed run keeps
selecting the same best. Two guarantees for unattended runs:

* nothing non-finite is ever written: :meth:`Checkpoints.save` checks the
  state first and raises :class:`~bat_jax.errors.DivergenceError`;
* a damaged newest checkpoint (a truncated file, missing metadata) is
  skipped with a warning and the older one restored; when none can be read,
  or the newest holds non-finite values, one :class:`CheckpointError` names
  the directories and what to do.
"""

import os
import sys
from typing import Any, List, Optional, Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from bat_jax.errors import CheckpointError, DivergenceError

WHICH = ("last", "best")
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
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    manager.wait_until_finished()

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
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
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


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir`` holds a 'last' checkpoint (creates nothing)."""
  ckpts = Checkpoints(workdir, create=False)
  try:
    return ckpts.latest_step("last") is not None
  finally:
    ckpts.close()


def _quiet_abandoned_reads() -> None:
  """Silences the reads orbax abandons when a restore fails.

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
