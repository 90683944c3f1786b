"""An evaluation stage is one registry entry (docs/LAYOUT.md): a toy one runs from the
command line into the results JSON, results.md, the tables and the sanity checks."""

import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import datasets, errors, evaluate
from bat_jax.evaluation import engine, metrics, report, sanity, stages
from test_evaluate import _linear_model


def noise_metric(logits_fn, x, labels, valid, keys, eps, step_size):
  """Correct under uniform noise in the L-inf eps-box (clipped to [0, 1])."""
  del valid, step_size
  noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], minval=-1.0))(keys)
  return metrics.judge(logits_fn, jnp.clip(x + eps * noise, 0.0, 1.0), labels)


@pytest.fixture
def noise_stage():
  """The stage of docs/LAYOUT.md, registered as the docs say; removed after the test."""
  before = dict(stages.STAGES)
  stage = stages.register(stages.Stage(
      "noise", "Noise", metric_id=7, metric=lambda protocol: noise_metric,
      at_most=("clean",)))
  try:
    yield stage
  finally:
    del stages.STAGES["noise"]
    assert stages.STAGES == before


MODEL_FILE = '''
import numpy as np

def make_model(checkpoint):
  params = dict(np.load(checkpoint))
  return (lambda p, x: x.reshape(x.shape[0], -1) @ p["w"] + p["b"]), params
'''


def test_a_registered_stage_runs_from_the_command_line_into_every_output(
    noise_stage, tmp_path):
  images, labels = datasets.load_split("mnist_subset", "train", num_examples=1000)
  apply_fn, params = _linear_model(images, labels)
  np.savez(tmp_path / "linear.npz", **jax.device_get(params))
  (tmp_path / "linear.py").write_text(MODEL_FILE)
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  fv(["prog", f"--model={tmp_path / 'linear.py'}:make_model",
      f"--checkpoint={tmp_path / 'linear.npz'}", "--dataset=mnist_subset",
      "--eps=0.3", "--num_examples=48", "--batch_size=16", "--attacks=noise,clean,pgd",
      "--pgd_steps=2", "--pgd_restarts=1", "--sanity_examples=16",
      f"--out_dir={tmp_path / 'out'}"])
  text = evaluate.run_from_flags(fv)

  # The results JSON: its accuracy beside the others, run after them, recorded.
  results = json.loads((tmp_path / "out" / "model_results.json").read_text())
  assert list(results)[:6] == ["clean_acc", "fgsm_acc", "pgd_acc", "autoattack_acc",
                               "noise_acc", "autoattack_per_attack"]
  assert results["settings"]["attacks"] == ["clean", "pgd", "noise"]
  assert list(results["run"]["timings_s"])[:3] == ["clean", "pgd", "noise"]
  assert results["protocol"]["metric_ids"]["noise"] == 7
  assert results["fgsm_acc"] is None and 0 < results["noise_acc"] <= 1
  # Its flags are the metric's, with the keys of its metric id.
  with np.load(tmp_path / "out" / "model_per_example.npz") as saved:
    flags_saved = saved["noise"]
  assert results["noise_acc"] == pytest.approx(np.mean(flags_saved))
  test_images, test_labels = datasets.load_split("mnist_subset", "test", num_examples=48)
  x = jnp.asarray(test_images, jnp.float32) / 255.0
  keys = engine.per_example_keys(0, 7, jnp.arange(48))
  expected = noise_metric(lambda z: apply_fn(params, z), x, jnp.asarray(test_labels),
                          None, keys, 0.3, 0.0)["correct"]
  assert np.sum(np.asarray(expected) != flags_saved) <= 1  # a rare tie may flip
  # Noise hurts this model less than PGD does.
  assert results["pgd_acc"] < results["noise_acc"]

  # results.md (what the command prints): a column of its own.
  assert text == (tmp_path / "out" / "results.md").read_text()
  header = next(line for line in text.splitlines() if line.startswith("| checkpoint"))
  assert header.endswith("| Clean | FGSM | PGD^2 | AutoAttack | Noise | warnings |")
  row = next(line for line in text.splitlines() if line.startswith("| model"))
  assert row.endswith(f"| {100 * results['noise_acc']:.2f} | "
                      f"{len(results['sanity_warnings'])} |")

  # The tables over runs and the sanity checks read its entry.
  run = tmp_path / "run"
  (run / "eval").mkdir(parents=True)
  (run / "config.json").write_text('{"method": "at", "dataset": "mnist", "eps": 0.3}')
  (run / "eval" / "last_results.json").write_text(json.dumps(results))
  assert "| Method | Clean | PGD^50 | Noise | runs |" in report.aggregate([str(run)])
  good = {"clean_acc": 0.9, "pgd_eps_sweep": [{"eps": 0.0, "acc": 0.9}]}
  assert sanity.sanity_warnings(good, {"clean_acc": 0.9, "noise_acc": 0.2,
                                       "pgd_acc": 0.5}) == []  # bound by clean only
  warning, = sanity.sanity_warnings(good, {"clean_acc": 0.9, "noise_acc": 0.95})
  assert warning.startswith("Noise accuracy 0.9500 exceeds clean accuracy 0.9000")


def test_unregistered_and_misdeclared_stages_are_refused(noise_stage):
  assert evaluate.Protocol(attacks=("noise",)).attacks == ("noise",)
  with pytest.raises(ValueError, match="already registered"):
    stages.register(noise_stage)
  for bad, message in [
      (dict(name="Bad-name"), "lower-case"), (dict(name="sanity"), "not one of"),
      (dict(metric_id=2), "metric_id 2 is taken"),
      (dict(at_most=("nosie",)), "not registered"),
      (dict(composite=stages.STAGES["autoattack"].composite), "a metric or a composite")]:
    fields = {"name": "other", "column": "Other", "metric_id": 8,
              "metric": lambda protocol: noise_metric, **bad}
    with pytest.raises(ValueError, match=message):
      stages.register(stages.Stage(**fields))
  assert "other" not in stages.STAGES
  del stages.STAGES["noise"]
  try:
    with pytest.raises(errors.UserError, match=r"unknown \['noise'\]"):
      evaluate.Protocol(attacks=("clean", "noise"))
  finally:
    stages.STAGES["noise"] = noise_stage


def test_the_stages_of_bat_jax_keep_their_keys_and_order():
  # The ids seed every attack's keys: another id is another evaluation.
  assert stages.metric_ids() == {"clean": 0, "fgsm": 1, "pgd": 2, "autoattack": 3,
                                 "zero_grad": 4, "pgd_logits": 5, "logits": 6}
  assert stages.DEFAULT_ATTACKS == ("clean", "fgsm", "pgd", "autoattack")
  pairs = [(a.name, b.name) for a, b in stages.ordering(["clean", "pgd", "autoattack"])]
  assert pairs == [("autoattack", "pgd"), ("pgd", "clean")]  # FGSM not run: passed on
