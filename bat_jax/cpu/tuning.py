"""Which program a large convolution takes on this CPU: measured on request, cached per machine.

``conv`` can compute a 3x3 convolution directly or as Winograd F(2x2, 3x3) or
F(4x4, 3x3), and which is faster depends on the CPU, not only on the shapes
(ResNet-18's 64-channel stage at batch 16: Winograd is ~10% faster per BAT
step on a 2-core AMD EPYC and slower on a 2-core Intel Xeon;
docs/PERFORMANCE.md). :func:`choose` takes, in order, the choice pinned from
a run's workdir, this process's, or this machine's cached one. Failing those,
it measures only inside :func:`measuring` (the trainer's first call of its
train step, which traces it on the training shapes): the candidates for each
part of the convolution (forward pass, input gradient, weight gradient) are
compiled and timed on random inputs of its shapes (interleaved rounds,
medians), and the fastest is kept, unless it beats the default by less than
``MIN_SPEEDUP``. The choice is logged with its times and cached in
``$BAT_JAX_CACHE_DIR/cpu_ops_choices.json`` (default ``~/.cache/bat_jax``)
under a key for this machine (CPU model, cores, ISA features, usable cores,
jax/jaxlib version, XLA_FLAGS), so later runs on it reuse it without
measuring. Anywhere else (evaluation, analysis, export, inference on a new
shape) the default candidate is taken, which ``conv`` derives from the shapes
alone, and logged once per shape as not measured: calling a model never
pauses to time programs. A choice changes rounding only (~1e-6 relative).

A trainer records its choices in the workdir (:func:`record_workdir_choices`)
and pins them on resume (:func:`pin_workdir_choices`), so that a resumed run
computes exactly what the first did even where the cache is gone.
``BAT_JAX_CPU_TUNING=off`` (and every multi-process run, whose hosts must
agree) takes the fixed rule everywhere, without reading the cache.
"""

import collections
import contextlib
import datetime
import functools
import json
import os
import statistics
import tempfile
import threading
import time
from importlib import metadata
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from bat_jax import fs, machine

# A candidate other than the default is taken when it is at least this much
# faster (medians): isolated timings vary by ~10% from run to run on a shared
# 2-core machine, and within that the default stays.
MIN_SPEEDUP = 1.10
# Timed calls per candidate, interleaved round by round.
ROUNDS = 7
CACHE_FILE = "cpu_ops_choices.json"
_CACHE_VERSION = 1
# A run's choices, in its workdir: {key: candidate}.
WORKDIR_FILE = "cpu_ops_choices.json"
# The source of a default taken outside ``measuring()`` with nothing cached.
NOT_MEASURED = "not measured: fixed rule"

# One candidate: a function of arrays and the (shape, dtype) of each argument.
Candidate = Tuple[Callable, Sequence[jax.ShapeDtypeStruct]]

_lock = threading.RLock()
_made: Dict[str, Dict] = {}      # this process's choices: key -> record
_pinned: Dict[str, str] = {}     # key -> candidate name, from a run's workdir
_thread = threading.local()      # .blocks: {key: source} per open measuring() block


def enabled() -> bool:
  """Measured or cached choices count unless ``BAT_JAX_CPU_TUNING=off`` or several
  processes run (then the fixed rule, everywhere)."""
  if os.environ.get("BAT_JAX_CPU_TUNING", "on").lower() in ("off", "0", "false", "no"):
    return False
  return jax.process_count() == 1


def cache_path() -> str:
  root = os.environ.get("BAT_JAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "bat_jax")
  return os.path.join(root, CACHE_FILE)


def machine_key() -> str:
  """What the measured times depend on, besides the shapes."""
  try:
    jaxlib_version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    jaxlib_version = "?"
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
  return (f"{machine.cpu_description()}; {usable} usable; jax {jax.__version__} "
          f"jaxlib {jaxlib_version}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def choose(key: str, candidates: Dict[str, Candidate], default: str) -> str:
  """The name of the candidate to use for ``key`` (a string naming the op and shapes).

  Pinned (a resumed run's), then this process's, then the machine cache's
  choice; otherwise measured now inside :func:`measuring` (when
  :func:`enabled`), else ``default``, logged as not measured.
  """
  with _lock:
    if key in _pinned and _pinned[key] in candidates:
      return _remember(key, {"choice": _pinned[key], "source": "pinned"})
    if key in _made and _made[key]["source"] not in ("rule", NOT_MEASURED):
      _seen(key, _made[key]["source"])
      return _made[key]["choice"]
    if not enabled():
      return _remember(key, {"choice": default, "source": "rule"})
    this_machine = machine_key()
    cached = _read_cache().get("machines", {}).get(this_machine, {}).get(key)
    # An entry counts if it timed every candidate there is now (a newer
    # bat_jax may add one, which is then measured).
    if cached and cached.get("choice") in candidates and set(candidates) <= set(
        cached.get("ms") or ()):
      return _remember(key, dict(cached, source="cached"))
    if not _measuring_here():
      return _remember(key, {"choice": default, "source": NOT_MEASURED})
    try:
      ms = measure(candidates)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("cpu_ops: measuring %s failed (%s); using %s.", key, e, default)
      return _remember(key, {"choice": default, "source": "rule"})
    record = {"choice": pick(ms, default), "ms": ms,
              "measured": datetime.datetime.now().isoformat(timespec="seconds")}
    _write_cache_entry(this_machine, key, record)
    return _remember(key, dict(record, source="measured"))


@contextlib.contextmanager
def measuring(what: str = "this program") -> Iterator[None]:
  """Lets :func:`choose` measure, in this thread, what it finds no choice for.

  Meant for the program that traces a training step on its shapes; when the
  block ends, one line logs how its convolutions' programs were chosen
  (measured, cached, pinned or by the fixed rule). Off (the fixed rule) with
  ``BAT_JAX_CPU_TUNING=off`` or several processes, as everywhere.
  """
  blocks = _thread.__dict__.setdefault("blocks", [])
  blocks.append({})
  try:
    yield
  finally:
    seen = blocks.pop()
    if seen:
      counts = collections.Counter(seen.values())
      words = {"rule": "by the fixed rule (BAT_JAX_CPU_TUNING=off or several processes)"}
      logging.info("cpu_ops: %s: %d convolution programs chosen (%s).", what, len(seen),
                   ", ".join(f"{n} {words.get(source, source)}"
                             for source, n in sorted(counts.items())))


def measuring_first_call(fn: Callable, what: str) -> Callable:
  """``fn`` whose first call, the one that traces and compiles it, runs inside
  ``measuring(what)``; later calls run it as it is."""
  called = []

  def call(*args, **kwargs):
    if called:
      return fn(*args, **kwargs)
    called.append(True)
    with measuring(what):
      return fn(*args, **kwargs)
  return call


def _measuring_here() -> bool:
  return bool(getattr(_thread, "blocks", None))


def _seen(key: str, source: str) -> None:
  """Notes a choice for the innermost open :func:`measuring` block's summary."""
  blocks = getattr(_thread, "blocks", None)
  if blocks:
    blocks[-1][key] = source


def pick(ms: Dict[str, float], default: str) -> str:
  """The fastest candidate, or ``default`` unless it is ``MIN_SPEEDUP`` times faster."""
  fastest = min(ms, key=ms.get)
  return fastest if ms[fastest] * MIN_SPEEDUP <= ms[default] else default


def measure(candidates: Dict[str, Candidate]) -> Dict[str, float]:
  """Median milliseconds per call of each candidate, compiled, on random inputs.

  Runs eagerly even while a program is being traced (compiled executables
  called with NumPy arrays).
  """
  rng = np.random.default_rng(0)
  compiled, inputs = {}, {}
  for name, (fn, specs) in candidates.items():
    compiled[name] = jax.jit(fn).lower(*specs).compile()
    inputs[name] = [rng.standard_normal(s.shape).astype(s.dtype) for s in specs]
    jax.block_until_ready(compiled[name](*inputs[name]))  # warm up
  times = {name: [] for name in candidates}
  order = list(candidates)
  for r in range(ROUNDS):
    for name in (order if r % 2 == 0 else order[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*inputs[name]))
      times[name].append(time.perf_counter() - start)
  return {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}


def note(key: str, choice: str) -> str:
  """Logs, once per process, a program that ``key``'s shapes alone decide.

  Not measured, cached or pinned: the same shapes give the same program on
  every machine.
  """
  _log(key, choice, "by shape", "")
  return choice


def choices_made() -> Dict[str, str]:
  """``{key: candidate}`` of every choice this process made (to record in a workdir)."""
  with _lock:
    return {key: record["choice"] for key, record in sorted(_made.items())}


def pin_workdir_choices(workdir: str) -> Dict[str, str]:
  """Pins the choices a run recorded in ``workdir`` (on resume); returns them.

  The machine's cache would give the same ones; the record keeps a resumed
  run exact where the cache is gone or another machine of the kind resumes.
  """
  path = fs.join(workdir, WORKDIR_FILE)
  choices = json.loads(fs.read_text(path)) if fs.exists(path) else {}
  if choices:
    pin(choices)
    logging.info("Pinned %d convolution choices from %s.", len(choices), path)
  return choices


def record_workdir_choices(workdir: str, written: Dict[str, str]) -> Dict[str, str]:
  """Writes ``written`` (what the workdir holds) updated with this process's choices
  to ``workdir`` when they differ; returns what the workdir now holds."""
  choices = {**written, **choices_made()}
  if choices != written:
    fs.write_json(fs.join(workdir, WORKDIR_FILE), choices, indent=1, sort_keys=True)
  return choices


def pin(choices: Dict[str, str]) -> None:
  """Makes ``choices`` (a workdir's record) win over the cache and the rule."""
  with _lock:
    _pinned.update(choices)
    for key in choices:
      _made.pop(key, None)


def reset() -> None:
  """Forgets this process's and the pinned choices, and what was logged (tests;
  the cache file stays)."""
  with _lock:
    _made.clear()
    _pinned.clear()
    _log.cache_clear()


def _remember(key: str, record: Dict) -> str:
  """Keeps ``record`` as this process's choice for ``key`` and logs it once."""
  _made[key] = record
  _seen(key, record["source"])
  times = record.get("ms") or {}
  _log(key, record["choice"], record["source"],
       ", ".join(f"{name} {t:.2f} ms" for name, t in times.items()))
  return record["choice"]


@functools.lru_cache(maxsize=None)
def _log(key: str, choice: str, source: str, timing: str) -> None:
  logging.info("cpu_ops: %s -> %s (%s%s)", key, choice, source,
               f": {timing}" if timing else "")


def _read_cache(path: Optional[str] = None) -> Dict:
  path = path or cache_path()
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {}
  return data if isinstance(data, dict) and data.get("version") == _CACHE_VERSION else {}


def _write_cache_entry(machine_id: str, key: str, record: Dict) -> None:
  """Adds one entry to the cache file (read, merge, atomic replace); never fails a run."""
  path = cache_path()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read_cache(path) or {"version": _CACHE_VERSION, "machines": {}}
    data.setdefault("machines", {}).setdefault(machine_id, {})[key] = record
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cpu_ops_choices.")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("cpu_ops: could not write the cache %s (%s); the choice is "
                    "kept for this process only.", path, e)
