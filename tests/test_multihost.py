"""Two processes with jax.distributed on 127.0.0.1 train in lockstep (the multi-host path)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_process_pair(worker, args_of, env=None, timeout=240):
  """Runs ``worker`` as processes 0 and 1 (``args_of(i)``: the arguments after
  the script) on a free loopback port; asserts both exit 0, returns their output.
  XLA_FLAGS is dropped: each process has one CPU device."""
  env = {k: v for k, v in (env or os.environ).items() if k != "XLA_FLAGS"}
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i)] + args_of(i),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


@pytest.mark.slow
def test_two_processes_train_to_identical_parameters(tmp_path):
  workdir = tmp_path / "run"
  run_process_pair(WORKER, lambda i: [str(workdir), str(tmp_path / f"out{i}.npz")])
  a, b = np.load(tmp_path / "out0.npz"), np.load(tmp_path / "out1.npz")
  assert int(a["steps"]) == 3
  param_keys = [k for k in a.files if k.startswith("arr_")]
  assert param_keys
  for k in param_keys:
    np.testing.assert_array_equal(a[k], b[k])
  assert float(a["pgd_acc"]) == float(b["pgd_acc"])
  # Process 0 alone writes the run's files; both wrote the shared checkpoint.
  assert (workdir / "config.json").exists() and (workdir / "metrics.jsonl").exists()
  assert any((workdir / "checkpoints").iterdir())
