"""bat_jax.reproduce: the paper's numbers as data, runs per row, the side-by-side report."""

import json
import os

import pytest

from bat_jax import configlib, evaluate, paper, reproduce


def test_paper_tables_are_complete_and_consistent():
  assert set(paper.TABLES) == {"1", "2", "3", "B1", "B2", "B3"}
  one = paper.TABLES["1"]
  assert len(one.rows) == 8  # 4 methods x eps 0.3, 0.45
  bat45 = next(r for r in one.rows if r.method == "bat" and r.eps == 0.45)
  assert bat45.values == {"clean": (97.72, 0.26), "pgd": (88.20, 0.57),
                          "autoattack": (76.09, 1.65)}
  b1 = paper.TABLES["B1"]
  assert sum(r.checkpoint == "best" for r in b1.rows) == 12
  assert next(r for r in paper.TABLES["B2"].rows if r.beta == 10).method == "bat"
  for table in paper.TABLES.values():
    for row in table.rows:
      assert row.method in ("at", "trades", "mart", "bat")
      for mean, std in row.values.values():
        assert 0 <= mean <= 100 and (std is None or std >= 0)


def test_plans_use_the_tables_configs():
  table = paper.TABLES["1"]
  runs = reproduce.plan(table, [0, 1], rows=reproduce.select_rows(table, ["mart"], [0.45]))
  assert sorted(runs) == ["mart_eps0.45_seed0", "mart_eps0.45_seed1"]
  config = runs["mart_eps0.45_seed0"]
  assert (config.eps, config.optimizer, config.learning_rate) == (0.45, "sgd", 0.01)
  assert (config.num_epochs, config.attack_steps) == (50, 40)
  b2 = reproduce.plan(paper.TABLES["B2"], [0])
  assert b2["bat_eps0.06275_beta10_seed0"].beta == 10
  assert b2["at_eps0.03137_seed0"].model == "resnet18"
  assert b2["at_eps0.03137_seed0"].eps == pytest.approx(8 / 255)
  with pytest.raises(configlib.UserError, match=r"unknown \['standard'\]"):
    reproduce.select_rows(table, ["standard"])


def test_compare_cells():
  cell = reproduce.compare((93.97, 0.16), [0.9380, 0.9410, 0.9395])
  assert cell["ours"][0] == pytest.approx(93.95) and cell["within_2sd"] is True
  far = reproduce.compare((93.97, 0.16), [0.90, 0.905])
  assert far["diff"] == pytest.approx(-3.72) and far["within_2sd"] is False
  assert reproduce.compare((82.36, None), [0.8])["within_2sd"] is None  # no std known
  assert reproduce.compare((11.35, 0.0), [0.1135])["within_2sd"] is True


@pytest.mark.slow
def test_runlocal_shape_end_to_end_and_resumes(tmp_path):
  """A few rows of Table 1, tiny: train, evaluate, report; a rerun redoes nothing."""
  tiny = dict(dataset="mnist_subset", model="tiny_cnn", num_train_examples=64,
              batch_size=16, num_train_steps=2, attack_steps=1, num_eval_examples=16,
              eval_batch_size=16, eval_attack_steps=1, log_every_steps=1,
              schedule="constant")
  options = dict(num_examples=16, sanity_examples=0, batch_size=16, pgd_step_size=0.01,
                 protocol=evaluate.Protocol(
                     pgd_steps=2, pgd_restarts=1, autoattack=evaluate.AutoAttackOptions(
                         version="custom", attacks=("apgd-ce",),
                         settings=dict(apgd_iters=2))))
  kwargs = dict(seeds=[0], runlocal=True, methods_filter=["bat", "trades"],
                eps_filter=[0.3], overrides=tiny, options=options)
  text = reproduce.reproduce("1", str(tmp_path), **kwargs)
  assert "| 0.3 | TRADES | 98.89±0.01 | " in text and "| 0.3 | BAT | 98.79±0.06 | " in text
  assert "CPU-sized shape" in text and "PGD^2 x 1 restarts, step 0.01" in text
  assert "evaluated on [16] test examples" in text and "not yet evaluated" not in text
  assert os.path.exists(tmp_path / "table1.md")
  results = tmp_path / "table1" / "bat_eps0.3_seed0" / "eval" / "last_results.json"
  stamp = os.path.getmtime(results)
  again = reproduce.reproduce("1", str(tmp_path), **kwargs)
  assert again == text and os.path.getmtime(results) == stamp


def test_only_the_papers_threat_model_is_compared(tmp_path):
  """The tables are L-inf: another norm is refused, and results measured at
  another threat model (a later evaluation of the run) are left out."""
  table = paper.TABLES["1"]
  row = next(r for r in table.rows if r.method == "bat" and r.eps == 0.3)
  with pytest.raises(configlib.ConfigError, match="L-inf"):
    reproduce.plan(table, [0], runlocal=True, rows=[row], overrides={"norm": "L2"})
  workdir = tmp_path / reproduce.run_name(row, 0)
  (workdir / "eval").mkdir(parents=True)
  counted = {}
  for norm, eps in (("linf", 0.3), ("Linf", 0.3), ("l2", 0.3), ("linf", 0.1)):
    (workdir / "eval" / "last_results.json").write_text(json.dumps(
        {"clean_acc": 0.99, "pgd_acc": 0.9, "eps": eps, "checkpoint": "last",
         "protocol": {"norm": norm}}))
    [item] = reproduce.collect(table, [row], [0], {reproduce.run_name(row, 0):
                                                   str(workdir)})
    counted[(norm, eps)] = item["cells"]["clean"]["n"]
  assert counted == {("linf", 0.3): 1, ("Linf", 0.3): 1, ("l2", 0.3): 0, ("linf", 0.1): 0}
  text = reproduce.markdown(table, [item], [0], reproduce.evaluation_protocol(table, True),
                            {}, True)
  assert "| L-inf ε | Method |" in text and "- threat model: L-inf; eps: 0.3" in text
