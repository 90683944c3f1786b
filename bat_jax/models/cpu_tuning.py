"""Which program a large convolution takes on this CPU: measured once, cached per machine.

``cpu_ops`` can compute a 3x3 convolution directly or as Winograd F(2x2, 3x3)
or F(4x4, 3x3), and which is faster depends on the CPU, not only on the shapes (ResNet-18's
64-channel stage at batch 16: Winograd is ~10% faster per BAT step on a
2-core AMD EPYC and slower on a 2-core Intel Xeon; benchmarks/README.md,
"Speed per CPU"). So the first time a program traces such a convolution, the
candidates for each of its parts (forward pass, input gradient, weight
gradient) are compiled and timed on random inputs of its shapes
(interleaved rounds, medians), and the fastest is kept, unless it beats the
default by less than ``MIN_SPEEDUP``. The choice is logged with its times and
cached in ``$BAT_JAX_CACHE_DIR/cpu_ops_choices.json`` (default
``~/.cache/bat_jax``) under a key for this machine (CPU model, cores, ISA
features, usable cores, jax/jaxlib version, XLA_FLAGS), so later runs on it
reuse it without measuring. A choice changes rounding only (~1e-6 relative).

A trainer records its choices in the workdir and pins them on resume
(:func:`pin`), so that a resumed run computes exactly what the first did even
where the cache is gone. ``BAT_JAX_CPU_TUNING=off`` (and every multi-process
run, whose hosts must agree) takes the fixed rule instead: the default
candidate, which cpu_ops derives from the shapes alone.
"""

import datetime
import functools
import json
import os
import statistics
import tempfile
import threading
import time
from importlib import metadata
from typing import Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from bat_jax import machine

# A candidate other than the default is taken when it is at least this much
# faster (medians): isolated timings vary by ~10% from run to run on a shared
# 2-core machine, and within that the default stays.
MIN_SPEEDUP = 1.10
# Timed calls per candidate, interleaved round by round.
ROUNDS = 7
CACHE_FILE = "cpu_ops_choices.json"
_CACHE_VERSION = 1

# One candidate: a function of arrays and the (shape, dtype) of each argument.
Candidate = Tuple[Callable, Sequence[jax.ShapeDtypeStruct]]

_lock = threading.RLock()
_made: Dict[str, Dict] = {}      # this process's choices: key -> record
_pinned: Dict[str, str] = {}     # key -> candidate name, from a run's workdir


def enabled() -> bool:
  """Measuring is on unless ``BAT_JAX_CPU_TUNING=off`` or several processes run."""
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
  choice; otherwise measured now, when measuring is on; otherwise ``default``.
  """
  with _lock:
    if key in _pinned and _pinned[key] in candidates:
      return _remember(key, {"choice": _pinned[key], "source": "pinned"})
    if key in _made and _made[key]["source"] != "rule":
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
    try:
      ms = measure(candidates)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("cpu_tuning: measuring %s failed (%s); using %s.", key, e, default)
      return _remember(key, {"choice": default, "source": "rule"})
    record = {"choice": pick(ms, default), "ms": ms,
              "measured": datetime.datetime.now().isoformat(timespec="seconds")}
    _write_cache_entry(this_machine, key, record)
    return _remember(key, dict(record, source="measured"))


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
    logging.warning("cpu_tuning: could not write the cache %s (%s); the choice is "
                    "kept for this process only.", path, e)
