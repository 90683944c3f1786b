"""Files wherever a run keeps them: a local path or any URL ``etils.epath`` reads (gs://...).

Every file bat_jax writes or reads in a workdir goes through these few
functions, so a TPU pod can keep its runs in Cloud Storage. Orbax (the
checkpoints) and TFDS (the data) take such URLs themselves. Object stores
have no rename, no append and no advisory locks, so:

* :func:`write_text` / :func:`write_bytes` replace a file atomically: a
  local file is written aside and renamed; an object is written whole
  (an object store never shows a half-written object);
* :func:`append_text` appends locally and rewrites the object remotely;
* a write that fails for lack of space or permission (a full disk, a
  read-only or unwritable folder, a file where a folder should be) raises
  one :class:`~bat_jax.errors.OutputError` naming the path, and leaves no
  partial file behind; :func:`check_writable` tries a folder up front;
* :class:`WorkdirLock` holds ``fcntl.flock`` locally and, remotely, a lock
  object whose owner rewrites it every :data:`HEARTBEAT_S` seconds; one not
  rewritten for :data:`STALE_S` seconds belongs to a run that died.
"""

import contextlib
import errno
import io
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, List, Optional

from etils import epath

from bat_jax.errors import OutputError

PathLike = Any  # str, os.PathLike or epath.Path
HEARTBEAT_S = 30.0
STALE_S = 180.0


def is_remote(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (local paths made absolute)."""
  return epath.Path(p if is_remote(p) else os.path.abspath(os.fspath(p)))


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(base).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def is_dir(p: PathLike) -> bool:
  return epath.Path(p).is_dir()


# Why a write failed, in words, by errno.
_WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device (the disk is full)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this system allows",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file of that name is in the way of a folder",
    errno.EISDIR: "it is a folder",
}


def output_error(p: PathLike, error: OSError) -> OutputError:
  """An :class:`OutputError` naming ``p`` and why ``error`` stopped the write."""
  reason = _WRITE_FAILURES.get(error.errno) or error.strerror or str(error)
  return OutputError(f"cannot write {os.fspath(p)}: {reason}.", os.fspath(p))


# How libraries that do not raise OSError (tensorstore, under orbax) say the same.
_WRITE_FAILURE_TEXTS = {"No space left on device": errno.ENOSPC,
                        "Disk quota exceeded": errno.EDQUOT,
                        "Permission denied": errno.EACCES,
                        "Read-only file system": errno.EROFS,
                        "Not a directory": errno.ENOTDIR}


def write_failure_reason(error: BaseException) -> Optional[str]:
  """Why ``error`` (or one of its causes) failed to write, in words; None when it
  is not a storage failure (a full disk, no permission, a read-only system)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _WRITE_FAILURES:
      return _WRITE_FAILURES[error.errno]
    for text, code in _WRITE_FAILURE_TEXTS.items():
      if text in str(error):
        return _WRITE_FAILURES[code]
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def writing(p: PathLike):
  """Turns an ``OSError`` raised while writing ``p`` into an :class:`OutputError`."""
  try:
    yield
  except OutputError:
    raise
  except OSError as e:
    raise output_error(p, e) from None


def makedirs(p: PathLike) -> None:
  with writing(p):
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def check_writable(directory: PathLike, what: str = "output folder",
                   keep: bool = False) -> None:
  """Writes and removes a small file in ``directory``, creating it for the try.

  Raises an :class:`OutputError` naming ``what`` and the path when it cannot
  be written, before any work whose results would be lost. Folders the try
  created are removed again while empty, so a command refused later leaves
  nothing behind, unless ``keep``: a folder that several processes check at
  once (a multi-host run's workdir) must not vanish under another's try.
  (An object store is not probed: it has no folders to refuse.)
  """
  if is_remote(directory):
    return
  directory = os.path.abspath(os.fspath(directory))
  missing = []  # the folders this try creates, innermost first
  parent = directory
  while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
    missing.append(parent)
    parent = os.path.dirname(parent)
  try:
    makedirs(directory)
    if not os.path.isdir(directory):
      raise OutputError(f"cannot write {directory}: it is a file, not a folder.",
                        directory)
    # Unique per try: hosts sharing a filesystem may run the same process id.
    probe = os.path.join(directory, f".bat_jax_write_test.{uuid.uuid4().hex}")
    with writing(probe):
      with open(probe, "wb") as f:
        f.write(b"bat_jax")
      os.remove(probe)
  except OutputError as e:
    raise OutputError(f"the {what} cannot be used: {e}", e.path) from None
  finally:
    for folder in [] if keep else missing:
      try:
        os.rmdir(folder)
      except OSError:  # not empty (another writer) or already gone
        break


def glob(directory: PathLike, pattern: str) -> List[str]:
  """Paths in ``directory`` matching ``pattern``, sorted (none if it is missing)."""
  base = epath.Path(directory)
  if not base.exists():
    return []
  return sorted(os.fspath(p) for p in base.glob(pattern))


def mtime(p: PathLike) -> float:
  """Seconds since the epoch of the last change (0 where the store does not say)."""
  return float(getattr(epath.Path(p).stat(), "mtime", 0) or 0)


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return epath.Path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> None:
  """Replaces ``p`` with ``data`` atomically (see the module docstring)."""
  target = epath.Path(p)
  makedirs(target.parent)
  with writing(p):
    if is_remote(p):
      target.write_bytes(data)
      return
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
      tmp.write_bytes(data)
      os.replace(os.fspath(tmp), os.fspath(target))
    except OSError:
      with contextlib.suppress(OSError):
        os.remove(os.fspath(tmp))  # no partial file left taking space
      raise


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, value: Any, **kwargs) -> None:
  write_text(p, json.dumps(value, **kwargs) + ("\n" if kwargs.get("indent") else ""))


def append_text(p: PathLike, text: str) -> None:
  """Appends ``text`` to ``p`` (an object is read and written whole)."""
  if not is_remote(p):
    makedirs(os.path.dirname(os.path.abspath(os.fspath(p))))
    with writing(p):
      with open(os.fspath(p), "a") as f:
        f.write(text)
    return
  target = epath.Path(p)
  old = target.read_text() if target.exists() else ""
  write_text(p, old + text)


def remove(p: PathLike) -> None:
  target = epath.Path(p)
  if target.exists():
    target.rmtree() if target.is_dir() else target.unlink()


def save_npz(p: PathLike, **arrays) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  write_bytes(p, buffer.getvalue())


def load_npz(p: PathLike, **kwargs):
  """``np.load`` of an .npz at any path (pickles refused unless asked for)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not is_remote(p):
    return np.load(os.fspath(p), **kwargs)
  return np.load(io.BytesIO(read_bytes(p)), **kwargs)


# --------------------------------------------------------------------------
# One holder of a workdir at a time.
# --------------------------------------------------------------------------


class LockHeld(Exception):
  """Another process holds the lock; the message names it."""


class WorkdirLock:
  """An exclusive lock on ``WORKDIR/.lock`` (a context manager).

  Local paths: ``fcntl.flock``, which the operating system releases when
  its holder exits, even when killed. Remote paths: a lock object naming its
  owner, rewritten every ``heartbeat_s`` by a daemon thread; an object not
  rewritten for ``stale_s`` is taken over (its run died). Object stores have
  no compare-and-swap here, so two trainers starting within the same second
  could both think they hold it; after writing, the holder reads the object
  back and gives up if another owner's write won.
  """

  def __init__(self, lock_path: PathLike, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S):
    self.path = os.fspath(lock_path)
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.owner = f"pid {os.getpid()} on host {socket.gethostname()}"
    self._token = uuid.uuid4().hex
    self._handle = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self):
    if is_remote(self.path):
      self._acquire_remote()
    else:
      self._acquire_local()
    return self

  def __exit__(self, *_):
    if self._handle is not None:
      self._handle.close()  # releases the flock
      self._handle = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout=5)
      if self._read_remote().get("token") == self._token:
        remove(self.path)

  def _acquire_local(self):
    try:
      import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only
    except ImportError:  # no advisory locks here: run unguarded
      return
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise LockHeld(holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{self.owner} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    self._handle = handle

  def _read_remote(self) -> dict:
    try:
      return json.loads(read_text(self.path))
    except (FileNotFoundError, ValueError, OSError):
      return {}

  def _write_remote(self):
    write_json(self.path, {"owner": self.owner, "token": self._token,
                           "since": self._since, "heartbeat": time.time()})

  def _acquire_remote(self):
    held = self._read_remote()
    age = time.time() - held.get("heartbeat", 0)
    if held and age < self.stale_s:
      raise LockHeld(f"{held.get('owner', 'another process')} (alive {age:.0f} s ago)")
    self._since = time.strftime("%Y-%m-%d %H:%M:%S")
    self._write_remote()
    if self._read_remote().get("token") != self._token:  # another writer won
      raise LockHeld(self._read_remote().get("owner", "another process"))
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._write_remote()
      except (OSError, OutputError):  # transient store error: retry at the next beat
        pass
