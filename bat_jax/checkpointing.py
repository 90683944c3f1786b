"""Orbax checkpoints in the workdir: the latest (for resume) and the best (early stopping).

Layout::

  WORKDIR/checkpoints/<step>/   the latest train state (auto-resume reads it)
  WORKDIR/best/<step>/          the state with the best early-stopping metric

Each checkpoint holds the train state and a small JSON ``meta`` (the best
metric so far and its step), so a resumed run keeps selecting the same best.
"""

import os
from typing import Any, Optional, Tuple

import orbax.checkpoint as ocp

WHICH = ("last", "best")
_SUBDIR = {"last": "checkpoints", "best": "best"}


class Checkpoints:
  """The two checkpoint series of a run."""

  def __init__(self, workdir: str, create: bool = True):
    # Remote paths (gs://...) go to orbax/tensorstore as they are.
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
    self._managers = {
        which: ocp.CheckpointManager(os.path.join(self.workdir, sub), options=options)
        for which, sub in _SUBDIR.items()}

  def latest_step(self, which: str = "last") -> Optional[int]:
    return self._managers[_check(which)].latest_step()

  def save(self, which: str, step: int, state: Any, meta: dict) -> None:
    """Saves host-local ``state`` (all processes must call it) and waits."""
    manager = self._managers[_check(which)]
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    manager.wait_until_finished()

  def restore(self, which: str, abstract_state: Any,
              step: Optional[int] = None) -> Tuple[Any, dict]:
    """Restores (state, meta); ``abstract_state`` gives the tree structure."""
    manager = self._managers[_check(which)]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"no {which!r} checkpoint in {os.path.join(self.workdir, _SUBDIR[which])}; "
          "train first with `python -m bat_jax.main --config=... --workdir=...`.")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


def _check(which: str) -> str:
  if which not in WHICH:
    raise ValueError(f"checkpoint must be one of {WHICH}; got {which!r}.")
  return which
