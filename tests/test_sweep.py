"""bat_jax.sweep: what is done is skipped, an interrupted sweep resumes where it stopped."""

import json
import os

import pytest

from bat_jax import errors, evaluate, sweep, train
from test_train import tiny_config


def tiny_runs():
  return {f"{method}_run": tiny_config(method=method, num_train_steps=2,
                                       early_stopping=False)
          for method in ("at", "bat")}


TINY_OPTIONS = dict(num_examples=16, sanity_examples=0, batch_size=16, pgd_step_size=None,
                    protocol=evaluate.Protocol(attacks=("clean", "pgd"), pgd_steps=2,
                                               pgd_restarts=1))


def test_cpu_budget_is_one_definition():
  cpu = sweep.evaluation_options("l2", cpu_budget=True, attacks=("clean", "pgd"))
  assert cpu["num_examples"] == sweep.CPU_BUDGET["num_examples"] == 500
  assert cpu["sanity_examples"] == 100 and cpu["protocol"].pgd_restarts == 2
  assert cpu["protocol"].autoattack.version == "fast"
  assert (cpu["protocol"].norm, cpu["protocol"].attacks) == ("l2", ("clean", "pgd"))
  assert sweep.evaluation_options("linf", cpu_budget=True, num_examples=20)["num_examples"] == 20
  full = sweep.evaluation_options("linf", num_examples=-1, pgd_step_size=0.01)
  assert full["num_examples"] is None and full["pgd_step_size"] == 0.01
  assert full["protocol"] == evaluate.Protocol() and "sanity_examples" not in full


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
  runs, root = tiny_runs(), str(tmp_path)
  trained, evaluated, preempt = [], [], {"bat_run"}
  real_train, real_evaluate = train.train_and_evaluate, evaluate.evaluate_workdir

  def train_spy(config, workdir, **kwargs):
    name = os.path.basename(workdir)
    trained.append(name)
    if name in preempt:  # stopped after one step, as a preempted job is
      kwargs["max_steps_this_run"] = 1
    return real_train(config, workdir, **kwargs)

  def evaluate_spy(workdir, **kwargs):
    evaluated.append((os.path.basename(workdir), tuple(kwargs["which"])))
    return real_evaluate(workdir, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", train_spy)
  monkeypatch.setattr(evaluate, "evaluate_workdir", evaluate_spy)

  def run_sweep(**options):
    trained.clear()
    evaluated.clear()
    sweep.run(runs, root, stages=("train", "evaluate"), checkpoints=("best", "last"),
              options=dict(TINY_OPTIONS, **options))

  with pytest.raises(SystemExit) as stopped:
    run_sweep()
  assert stopped.value.code == errors.EXIT_PREEMPTED
  assert trained == ["at_run", "bat_run"] and evaluated == [("at_run", ("best", "last"))]
  done = os.path.join(root, "at_run")
  assert os.path.exists(os.path.join(done, sweep.TRAINED_FILE))
  assert not os.path.exists(os.path.join(root, "bat_run", sweep.TRAINED_FILE))
  results = os.path.join(done, "eval", "last_results.json")
  stamp = os.path.getmtime(results)

  run_sweep()  # the rerun: only the interrupted run trains on, and is evaluated
  assert trained == ["bat_run"] and evaluated == [("bat_run", ("best", "last"))]
  with open(os.path.join(root, "bat_run", sweep.TRAINED_FILE)) as f:
    assert json.load(f)["steps"] == 2
  assert os.path.getmtime(results) == stamp
  run_sweep()  # all done
  assert trained == evaluated == []

  # Another protocol re-evaluates, without training; so does another threat model.
  assert sweep.evaluated(done, "last", TINY_OPTIONS)
  for change in (dict(num_examples=None), dict(num_examples=10**6), dict(num_examples=8),
                 dict(pgd_step_size=0.02), dict(eps=0.2), dict(sanity_examples=4),
                 dict(protocol=evaluate.Protocol(attacks=("clean", "pgd"), pgd_steps=2,
                                                 pgd_restarts=1, norm="l2"))):
    assert not sweep.evaluated(done, "last", dict(TINY_OPTIONS, **change)), change
  run_sweep(num_examples=8)
  assert trained == [] and evaluated == [("at_run", ("best", "last")),
                                         ("bat_run", ("best", "last"))]

  # A changed config trains on from the run's checkpoint (here: two more steps).
  assert sweep.trained(done, tiny_config(method="at", num_train_steps=2,
                                         early_stopping=False, norm="Linf"))
  runs["at_run"].num_train_steps = 4
  assert not sweep.trained(done, runs["at_run"])
  run_sweep(num_examples=8)
  assert trained == ["at_run"] and evaluated == [("at_run", ("best", "last"))]
  with open(os.path.join(done, sweep.TRAINED_FILE)) as f:
    assert json.load(f)["steps"] == 4


def test_a_run_not_trained_is_not_evaluated(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluate, "evaluate_workdir", lambda *a, **k: pytest.fail(
      "evaluated a run whose training has not finished"))
  workdirs = sweep.run(tiny_runs(), str(tmp_path), stages=("evaluate",),
                       checkpoints=("last",), options=TINY_OPTIONS)
  assert workdirs == {name: str(tmp_path / name) for name in tiny_runs()}
