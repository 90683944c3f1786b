"""Errors a user can fix: the command-line entry points print them without a traceback.

Every error caused by input (a config field, a flag, a workdir, a data or
checkpoint file) derives from :class:`UserError`; its message names what was
wrong and what to do. ``bat_jax.util.run`` prints such an error in a few
lines and exits with ``EXIT_USER_ERROR``; anything else is a bug and keeps
its traceback.
"""

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
