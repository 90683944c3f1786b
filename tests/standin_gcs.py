"""A stand-in for Cloud Storage in tests: gs:// paths kept in a local folder, no network.

``StandInGCS`` is an fsspec filesystem registered for the ``gs`` protocol, so
``etils.epath`` (all of bat_jax's own files) reads and writes ``gs://bucket/x``
as ``ROOT/bucket/x``, listing and globbing as an object store would (paths
without the scheme). Orbax hands gs:// paths to TensorStore's GCS driver,
which would go to the network: the fixture points that driver's spec at the
same folder (TensorStore's file driver) and skips orbax's bucket-layout query.
"""

import os
import shutil

import fsspec
from fsspec.spec import AbstractFileSystem


class StandInGCS(AbstractFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  ROOT = None  # set by the fixture
  cachable = False

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")

  def local(self, path):
    return os.path.join(self.ROOT, self._strip_protocol(path))

  def info(self, path, **kwargs):
    local, name = self.local(path), self._strip_protocol(path)
    if os.path.isdir(local):
      return {"name": name, "type": "directory", "size": 0}
    if os.path.isfile(local):
      return {"name": name, "type": "file", "size": os.path.getsize(local)}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    name, local = self._strip_protocol(path), self.local(path)
    if os.path.isfile(local):
      entries = [self.info(name)]
    elif os.path.isdir(local):
      entries = [self.info(f"{name}/{n}") for n in sorted(os.listdir(local))]
    else:
      raise FileNotFoundError(path)
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", **kwargs):
    local = self.local(path)
    if "a" in mode:
      raise OSError("objects cannot be appended to")  # as in Cloud Storage
    if "w" in mode:
      os.makedirs(os.path.dirname(local), exist_ok=True)
    return open(local, mode)

  def mkdir(self, path, create_parents=True, **kwargs):
    os.makedirs(self.local(path), exist_ok=True)

  def makedirs(self, path, exist_ok=False):
    os.makedirs(self.local(path), exist_ok=exist_ok)

  def rm_file(self, path):
    local = self.local(path)
    os.rmdir(local) if os.path.isdir(local) else os.remove(local)

  def rm(self, path, recursive=False, maxdepth=None):
    for p in path if isinstance(path, list) else [path]:
      local = self.local(p)
      if os.path.isdir(local):
        shutil.rmtree(local) if recursive else os.rmdir(local)
      elif os.path.exists(local):
        os.remove(local)
      else:
        raise FileNotFoundError(p)

  def rmdir(self, path):
    os.rmdir(self.local(path))

  def cp_file(self, path1, path2, **kwargs):
    os.makedirs(os.path.dirname(self.local(path2)), exist_ok=True)
    shutil.copyfile(self.local(path1), self.local(path2))

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    os.makedirs(os.path.dirname(self.local(path2)), exist_ok=True)
    os.replace(self.local(path1), self.local(path2))

  def created(self, path):
    return None

  def modified(self, path):
    return None


def install(root: str, monkeypatch) -> None:
  """Redirects gs:// to ``root`` for epath and orbax (undone with ``monkeypatch``)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(StandInGCS, "ROOT", str(root))
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, StandInGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  def kvstore(path):
    bucket, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(str(root), bucket, rest)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
