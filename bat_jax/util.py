"""Process set-up shared by the command-line entry points."""

import logging as std_logging
import os

from absl import logging
import jax


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


# XLA:CPU flags that made every train step faster here (benchmarks/README.md):
# YNNPACK library fusions off, so dots and convs use XLA's Eigen kernels (AT
# step: LeNet -25%, ResNet-18 -30%). Eigen's results round differently with
# the batch size (~1e-6), so a batch split over CPU devices is no longer
# bitwise equal to one device; set the flag yourself to keep YNNPACK.
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
