"""Process set-up shared by the command-line entry points.

:func:`run` is ``absl.app.run`` with what every bat_jax command wants: a
config override that names an unknown field gets "did you mean ...?",
``--config.eps=8/255`` is accepted, and bad input (a
:class:`~bat_jax.errors.UserError` or an ``app.UsageError``) or a divergence
ends the process with a short message and an exit code from
:mod:`bat_jax.errors` instead of a traceback or the whole help text.
"""

import logging as std_logging
import os
import re
import sys
from typing import Callable, List, Optional

from absl import app, flags, logging
import jax

from bat_jax import configlib, errors
from bat_jax.machine import cpu_description  # noqa: F401 (re-exported)


class _DropOrbaxInfo(std_logging.Filter):
  """Orbax logs every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def _distributed_kwargs() -> dict:
  """What ``jax.distributed.initialize()`` does not read from the environment itself
  (``launch/local_multiprocess.sh`` sets these)."""
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  return kwargs


# XLA:CPU flags that made every train step faster (docs/PERFORMANCE.md):
# YNNPACK library fusions off, so dots and convs use XLA's Eigen kernels (with
# them on, the AT step took 1.11x as long on LeNet, 1.48x on ResNet-18).
# Eigen's results round differently with the batch size (~1e-6), so a batch
# split over CPU devices is no longer bitwise equal to one device; set the
# flag yourself to keep YNNPACK.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def add_default_xla_flags() -> None:
  """Appends CPU_XLA_FLAGS to ``XLA_FLAGS`` (a flag the user already set wins).

  Must run before JAX initialises a backend (XLA reads the variable then).
  The flags only change how XLA:CPU compiles; GPU/TPU programs are unaffected.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags


def setup_runtime() -> None:
  """XLA flags, multi-host initialisation when launched that way, and quiet logs.

  ``jax.distributed.initialize()`` runs when the launcher set the coordinator
  (``JAX_COORDINATOR_ADDRESS``), on Cloud TPU pods (``TPU_WORKER_HOSTNAMES``
  with more than one host) or under SLURM with several tasks.
  """
  add_default_xla_flags()
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("absl").addFilter(_DropOrbaxInfo())
  multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or multi_tpu or slurm:
    jax.distributed.initialize(**_distributed_kwargs())
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  if jax.default_backend() == "cpu":
    logging.info("CPU: %s; XLA_FLAGS=%r.", cpu_description(), os.environ.get("XLA_FLAGS", ""))


# --config.FIELD=VALUE with a fraction VALUE such as 8/255.
_FRACTION = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*/\s*"
                       r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_OVERRIDE = re.compile(r"^--(config)\.([A-Za-z_][\w.]*)(=(.*))?$", re.DOTALL)


def _with_fractions(argv: List[str]) -> List[str]:
  """``--config.eps=8/255`` -> ``--config.eps=0.03137254901960784``."""
  out = []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and match.group(4) is not None and _FRACTION.match(match.group(4)):
      num, den = match.group(4).split("/")
      arg = f"--{match.group(1)}.{match.group(2)}={float(num) / float(den)!r}"
    out.append(arg)
  return out


_CONFIG_FILE = re.compile(r"^(--?config=)([^:]*)(:.*)?$")


def _with_config_files(argv: List[str]) -> List[str]:
  """``--config=configs/NAME.py[:arg]`` -> bat_jax's own copy of that file when
  the path does not exist here (an installed package run from another folder)."""
  out = []
  for arg in argv:
    match = _CONFIG_FILE.match(arg)
    if match:
      arg = (match.group(1) + configlib.config_file_path(match.group(2))
             + (match.group(3) or ""))
    out.append(arg)
  return out


def overridden_fields(argv: List[str]) -> List[str]:
  """The top-level config fields set on the command line (``--config.FIELD=...``).

  ``configlib.resolve`` leaves them alone: what the user typed wins over a
  config file's per-method settings.
  """
  fields = []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match:
      fields.append(match.group(2).split(".")[0])
  return fields


def _unknown_override(argv: List[str]) -> Optional[str]:
  from bat_jax import configlib  # pylint: disable=g-import-not-at-top
  fields = set(configlib.base_config().keys())
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and match.group(2).split(".")[0] not in fields:
      return configlib.unknown_field_message(match.group(2).split(".")[0])
  return None


def _fail(message: str, code: int) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _user_error_cause(error: BaseException) -> Optional[errors.UserError]:
  """The innermost UserError behind ``error`` (ml_collections re-wraps them)."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    if isinstance(error, errors.UserError):
      found = error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return found


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def parse_flags(argv: List[str]) -> List[str]:
  """absl flag parsing with short messages for bad config overrides."""
  try:
    argv = _with_config_files(_with_fractions(argv))
  except errors.UserError as e:  # a config file that does not exist
    _fail(str(e), errors.EXIT_USER_ERROR)
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing the help a user asked for
    if e.code == 1 and any(arg.split("=")[0].lstrip("-") in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    cause = _user_error_cause(e)  # a config file's own check, e.g. its eps argument
    _fail(str(cause) if cause else f"{e}\nPass --helpshort to see the flags.",
          errors.EXIT_USER_ERROR)
  except (AttributeError, KeyError):  # ml_collections on an unknown field
    message = _unknown_override(argv)
    if message is None:
      raise
    _fail(message, errors.EXIT_USER_ERROR)
  return []


def guarded(main: Callable[[List[str]], None]) -> Callable[[List[str]], None]:
  """``main`` that ends bad input and divergence with a short message and its exit code."""

  def guarded_main(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      _fail(str(e), errors.EXIT_USER_ERROR)
    except app.UsageError as e:  # absl would print the whole help text first
      _fail(f"{e}\nPass --helpshort to see the flags.", errors.EXIT_USER_ERROR)
    except errors.DivergenceError as e:
      _fail(str(e), errors.EXIT_DIVERGED)

  return guarded_main


def run(main: Callable[[List[str]], None]) -> None:
  """``app.run(main)`` that turns user errors and divergence into short messages."""
  app.run(guarded(main), flags_parser=parse_flags)
