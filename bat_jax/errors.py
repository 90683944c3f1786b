"""Errors a user can fix: the command-line entry points print them without a traceback.

Every error caused by input (a config field, a flag, a workdir, a data or
checkpoint file) derives from :class:`UserError`; its message names what was
wrong and what to do. ``bat_jax.util.run`` prints such an error in a few
lines and exits with ``EXIT_USER_ERROR``; anything else is a bug and keeps
its traceback. The checks below (:func:`choose`, :func:`choose_each`,
:func:`at_least`, ...) are the one validation layer of the entry points: each
checks its flags with them before any training, evaluation or file write.
"""

import difflib
import os
from typing import List, Optional, Sequence

# Exit codes of the entry points (launch/README.md documents them).
EXIT_USER_ERROR = 2     # bad input, or an output path that cannot be written (a full
                        # disk, an unwritable folder): the message says what was kept
EXIT_DIVERGED = 3       # training stopped on a non-finite state; checkpoints are finite
EXIT_PREEMPTED = 75     # stopped early (SIGTERM, Ctrl-C, a time slice), checkpointed:
                        # rerun the same command to resume (sysexits' EX_TEMPFAIL)


class UserError(ValueError):
  """Bad input; the message says which and how to fix it."""


class WorkdirError(UserError):
  """The workdir cannot be used for this run (another run's, locked, not a directory)."""


class CheckpointError(UserError):
  """No checkpoint in the workdir can be restored (damaged, non-finite, missing)."""


class OutputError(UserError):
  """A file cannot be written (a full disk, no permission, a read-only file system).

  ``path`` is the file or folder; the message names it and the reason, and
  the caller may add what was kept (:meth:`with_note`).
  """

  def __init__(self, message: str, path: str = ""):
    super().__init__(message)
    self.path = path

  def with_note(self, note: str) -> "OutputError":
    """The same error with ``note`` (e.g. what is intact) appended."""
    return OutputError(f"{self} {note}", self.path)


class DivergenceError(FloatingPointError):
  """Training produced a non-finite state; nothing non-finite was saved."""


# --------------------------------------------------------------------------
# Checks of a user's values, shared by every entry point: each raises a
# UserError that names the flag (or field), lists what is allowed and, for
# a misspelt name, says "did you mean ...?".
# --------------------------------------------------------------------------


def did_you_mean(name: str, allowed: Sequence[str]) -> str:
  """" (did you mean 'pgd'?)" for a name close to an allowed one, else ""."""
  close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=2, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def choose(what: str, value: str, allowed: Sequence[str]) -> str:
  """``value`` if it is one of ``allowed``; a UserError listing them otherwise."""
  if value not in allowed:
    named = f"{what}={value}" if what.startswith("--") and " " not in what else (
        f"{what} {value!r}")
    raise UserError(f"{named} is unknown{did_you_mean(value, allowed)}; "
                    f"choose from {list(allowed)}.")
  return value


def choose_each(what: str, values: Sequence[str], allowed: Sequence[str]) -> List[str]:
  """A non-empty list of distinct names from ``allowed`` (a flag like ``--attacks=a,b``)."""
  values = list(values)
  if not values:
    raise UserError(f"{what} is empty; choose from {list(allowed)}.")
  unknown = [v for v in values if v not in allowed]
  if unknown:
    hints = "".join(did_you_mean(v, allowed) for v in unknown)
    raise UserError(f"{what}: unknown {unknown}{hints}; choose from {list(allowed)}.")
  repeated = sorted({v for v in values if values.count(v) > 1})
  if repeated:
    raise UserError(f"{what} names {repeated} more than once.")
  return values


def at_least(what: str, value, minimum, note: str = ""):
  """``value`` if it is ``>= minimum``; a UserError otherwise."""
  if not value >= minimum:
    raise UserError(f"{what}={value} must be >= {minimum}{note}.")
  return value


def count_or_all(what: str, value: int) -> int:
  """A count of examples: -1 (all of them) or a positive number."""
  if value == 0 or value < -1:
    raise UserError(f"{what}={value} must be -1 (all) or a positive count.")
  return value


def integers(what: str, values: Sequence[str], minimum: int = 0) -> List[int]:
  """``['0', '1']`` -> ``[0, 1]`` (e.g. ``--seeds``): distinct integers ``>= minimum``."""
  out = []
  for value in values:
    try:
      out.append(int(str(value).strip()))
    except ValueError:
      raise UserError(f"{what}: {value!r} is not an integer (e.g. {what}=0,1,2).") from None
    at_least(what, out[-1], minimum)
  if not out:
    raise UserError(f"{what} is empty; give at least one integer.")
  if len(set(out)) != len(out):
    raise UserError(f"{what} names {sorted({v for v in out if out.count(v) > 1})} "
                    "more than once.")
  return out


def output_dir(what: str, path: Optional[str]) -> Optional[str]:
  """A folder to write into: missing (it is created) or a folder, not a file."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{what}={path} is a file; give a folder (new or existing).")
  return path


def output_file(what: str, path: Optional[str]) -> Optional[str]:
  """A file to write: missing or a file, not a folder."""
  if path and os.path.isdir(path):
    raise UserError(f"{what}={path} is a folder; give a file name.")
  return path
