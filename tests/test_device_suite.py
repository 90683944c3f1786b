"""benchmarks/device_suite.py --smoke: the GPU suite's code at toy sizes on the CPU.

The suite runs on a GPU rarely; this runs the same command on the CPU so
that it keeps working in between. The PyTorch side runs
too when BENCH_TORCH_PYTHON names a Python with torch (and torchattacks).
"""

import json
import os
import subprocess
import sys

import pytest

from bat_jax import attacks
from conftest import REPO_ROOT


def _positive(*values):
  return all(v is not None and v > 0 for v in values)


@pytest.mark.slow
def test_smoke_run_fills_every_part(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, like the one GPU (conftest forces 4)
  cmd = [sys.executable, "benchmarks/device_suite.py", "--smoke",
         f"--out_dir={tmp_path / 'out'}", f"--work_dir={tmp_path / 'work'}",
         f"--torch_python={os.environ.get('BENCH_TORCH_PYTHON', '')}"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / "out" / "results.json") as f:
    data = json.load(f)
  suite, machine, parts = data["suite"], data["machine"], data["parts"]
  assert suite["smoke"] and suite["finished"] and suite["flags"]["model"] == "tiny_wrn"
  assert suite["elapsed_s"] < suite["budget_s"]
  assert machine["backend"] == "cpu" and machine["jax"] and machine["jaxlib"]
  assert machine["tensorflow_datasets_imported"] is False  # the .npz path needs no TFDS
  for name, part in parts.items():
    assert part["status"] == "done" and not part["errors"], (name, part["errors"])
    assert all(s.get("what") == "torchattacks" for s in part["skipped"]), (
        name, part["skipped"])  # nothing skipped for time: the smoke's caps are wide

  step = parts["train_step"]
  jax_rows = [r for r in step["rows"] if r["framework"] == "jax"]
  assert [r["case"] for r in jax_rows] == suite["flags"]["step_cases"]
  for r in jax_rows:
    assert _positive(r["median_s"], r["compile_s"], r["flops"], r["xla_step_mb"])
    assert 0 < r["fraction_of_peak"] < 2 and r["n"] >= suite["flags"]["rounds"]
  for r in step["rows"]:
    if r["framework"] == "torch":
      assert _positive(r["median_s"], r["torch_over_jax"])

  aa = parts["autoattack"]
  assert [r["stage"] for r in aa["rows"]] == list(attacks.STANDARD_ATTACKS)
  for r in aa["rows"]:
    assert _positive(r["jax_s"], r["jax_compile_s"]) and r["jax_reported_s"] > r["jax_s"]
    assert 0 <= r["jax_robust"] <= 1
    assert r["jax_max_perturbation"] <= aa["settings"]["eps"] + 1e-6
  if "torch_weights" in aa:  # the same weights in PyTorch give the same logits
    assert aa["torch_weights"]["logit_max_abs_diff"] < 1e-3

  (run,) = parts["mnist"]["runs"]
  assert run["eps"] == 0.45 and run["paper"]["BAT"] == ["97.72±0.26", "88.20±0.57",
                                                         "76.09±1.65"]
  assert _positive(run["step_ms"], run["steps"], run["epochs"], run["train_s"],
                   run["eval_s"])
  assert run["num_examples"] == 64
  for key in ("clean_acc", "pgd_acc", "autoattack_acc"):
    assert 0 <= run[key] <= 1
  assert run["autoattack_acc"] <= run["clean_acc"]
  assert run["curve"] and run["curve"][-1]["step"] == run["steps"]

  markdown = (tmp_path / "out" / "results.md").read_text()
  for text in ("## 1. Train step", "## 2. AutoAttack", "## 3. MNIST Table 1", "97.72±0.26",
               "bat_jax BAT (this run)"):
    assert text in markdown
