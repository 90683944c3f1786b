"""Two processes with jax.distributed on 127.0.0.1 train in lockstep (the multi-host path)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_to_identical_parameters(tmp_path):
  port = free_port()
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(port), str(i), str(workdir),
       str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
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
