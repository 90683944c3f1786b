"""This machine's CPU, in a line: for run logs and for bat_jax.cpu.tuning's per-machine cache.

Imports nothing from bat_jax, so any module may use it.
"""

import os
import platform

# CPU features that decide which kernels XLA:CPU (and PyTorch) can use.
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
  """``'<model name>, N cores, <features>'`` of this machine, for the run's log:
  the CPU speed figures (docs/PERFORMANCE.md) hold per CPU, not across them."""
  model, features = "", []
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and not model:
          model = value.strip()
        elif key in ("flags", "Features") and not features:
          present = set(value.split())
          features = [name for name in _CPU_FEATURES if name in present]
  except OSError:
    pass
  model = model or platform.processor() or platform.machine()
  return f"{model}, {os.cpu_count()} cores, {' '.join(features) or 'features unknown'}"
