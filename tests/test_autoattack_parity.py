"""bat_jax's AutoAttack beside the authors' (pyautoattack) on the same weights, small.

benchmarks/autoattack_parity.py at a smoke size: a LeNet with random weights
(labels: its own predictions, so every example starts robust), 12 bundled
test digits, every attack's budget cut to a few iterations, L-inf and L2, at
radii where about half of the examples break. Each stage's robust accuracy
must agree within 2 examples; the full-budget comparison is the benchmark's
(docs/EVALUATION.md). Needs torch and pyautoattack (CI installs
``pyautoattack==0.2.0``); skipped without them.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

from bat_jax import datasets, models
from test_export import random_variables

pytest.importorskip("torch")
pytest.importorskip("pyautoattack")

# Every attack a few iterations (bat_jax's setting names; the benchmark sets
# pyautoattack's to the same).
BUDGET = dict(apgd_iters=5, n_target_classes=1, fab_iters=5, square_queries=25)
BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "autoattack_parity.py"


def benchmark_module():
  spec = importlib.util.spec_from_file_location("autoattack_parity", BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps", [("linf", 0.01), ("l2", 0.25)])
def test_each_stage_agrees_with_the_authors_autoattack(norm, eps):
  parity = benchmark_module()
  module = models.create_model("lenet", 10)
  variables = random_variables(module, (28, 28, 1), "none")
  x, _ = datasets.load_split("mnist_subset", "test", num_examples=12)
  x = x.astype(np.float32) / 255
  y = np.asarray(module.apply(variables, x, train=False)).argmax(-1).astype(np.int32)
  result = parity.compare(module, variables, (28, 28, 1), x, y, norm=norm, eps=eps,
                          seeds=[0], jax_seeds=[0], budget=BUDGET,
                          batch_size=250, log=print)
  assert result["max_logit_gap_torch_vs_jax"] < 1e-4
  authors, ours = result["runs"]
  assert (authors["side"], ours["side"]) == ("pyautoattack", "bat_jax")
  assert authors["clean_accuracy"] == ours["clean_accuracy"] == 1.0
  assert [s["attack"] for s in authors["stages"]] == [s["attack"] for s in ours["stages"]] \
      == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert 0 < authors["stages"][0]["robust_accuracy"] < 1  # a comparison of something
  for theirs, mine in zip(authors["stages"], ours["stages"]):
    assert abs(theirs["robust_accuracy"] - mine["robust_accuracy"]) <= 2 / 12, (
        theirs, mine)
  assert abs(authors["autoattack_accuracy"] - ours["autoattack_accuracy"]) <= 2 / 12
  assert ours["max_perturbation"] <= eps + 1e-5


def test_the_table_puts_runs_of_separate_processes_side_by_side():
  parity = benchmark_module()

  def results(*runs):
    stages = lambda accuracy: [{"attack": "apgd-ce", "robust_accuracy": accuracy,
                                "run_seconds": 1.0}]
    return {"models": {"mnist": {"comparisons": [{
        "norm": "linf", "eps": 0.3, "n": 10, "torch_model": "m",
        "max_logit_gap_torch_vs_jax": 1e-6,
        "runs": [{"side": side, "seed": seed, "clean_accuracy": 0.9,
                  "stages": stages(len(robust) / 10), "robust_indices": robust}
                 for side, seed, robust in runs]}]}}}

  table = parity.markdown([results(("bat_jax", 0, [0, 1, 7])),
                           results(("pyautoattack", 1, [0, 1, 2, 3, 4]),
                                   ("pyautoattack", 0, [0, 2, 3, 5]))])
  assert table.count("**mnist, Linf eps 0.3, n = 10**") == 1
  assert "| stage | pyautoattack seed 0 | pyautoattack seed 1 | bat_jax seed 0 |" in table
  assert "| apgd-ce | 40.0% (1 s) | 50.0% (1 s) | 30.0% (1 s) |" in table
  # 7: robust for bat_jax, broken by both; 2 and 3: the reverse.
  assert ("bat_jax seed 0: 1 examples robust that every pyautoattack seed broke, "
          "2 broken that every pyautoattack seed left robust") in table

  # Two seeds a side: how much seeds disagree within and across the sides.
  table = parity.markdown([results(("bat_jax", 0, [0, 1, 7]), ("bat_jax", 1, [0, 2])),
                           results(("pyautoattack", 1, [0, 1, 2, 3, 4]),
                                   ("pyautoattack", 0, [0, 2, 3, 5]))])
  assert ("pyautoattack, 2 seeds: 6 examples robust at least once, 3 always; "
          "two seeds disagree on 3-3") in table
  assert "bat_jax, 2 seeds: 4 examples robust at least once, 1 always" in table
  assert ("a pyautoattack and a bat_jax seed disagree on 2-5; robust counts [4, 5] vs "
          "[3, 2], permutation test p = 0.33") in table
