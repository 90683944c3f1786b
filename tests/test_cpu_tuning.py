"""bat_jax.cpu.tuning: the direct-or-Winograd choice per convolution, measured once
(only inside ``cpu.measuring()``) and cached per machine, pinned from a run's
workdir on resume."""

import json
import logging

import jax
import numpy as np
import pytest

from bat_jax import cpu, models, train
from bat_jax.cpu import conv, tuning as cpu_tuning
from test_train import tiny_config

SAME = ((1, 1), (1, 1))


@pytest.fixture
def tuning(tmp_path, monkeypatch):
  """Measuring on (conftest turns it off), a fresh cache dir, every 3x3 conv eligible."""
  monkeypatch.setenv("BAT_JAX_CPU_TUNING", "on")
  monkeypatch.setenv("BAT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(conv, "WINOGRAD_MIN_MACS", 0)
  cpu_tuning.reset()
  yield tmp_path / "cache" / cpu_tuning.CACHE_FILE
  cpu_tuning.reset()


def fake_times(monkeypatch, ms):
  """``measure`` replaced by fixed times; returns the list of calls."""
  calls = []

  def measure(candidates):
    calls.append(sorted(candidates))
    return dict(ms)
  monkeypatch.setattr(cpu_tuning, "measure", measure)
  return calls


def winograd(x, w, part="forward"):
  """Whether that part of the convolution takes a Winograd program (either tiling)."""
  return conv.conv_program(x, w, (1, 1), SAME, part) != "direct"


def _arrays(shape=(2, 6, 6, 8), cout=8):
  rng = np.random.default_rng(0)
  return (rng.standard_normal(shape).astype(np.float32),
          (0.2 * rng.standard_normal((3, 3, shape[-1], cout))).astype(np.float32))


def test_pick_keeps_the_default_within_the_margin():
  assert cpu_tuning.pick({"direct": 10.0, "winograd": 9.0}, "direct") == "winograd"
  assert cpu_tuning.pick({"direct": 10.0, "winograd": 9.7}, "direct") == "direct"
  assert cpu_tuning.pick({"direct": 9.7, "winograd": 10.0}, "winograd") == "winograd"
  assert cpu_tuning.pick({"direct": 9.0, "winograd": 10.0}, "winograd") == "direct"


def test_measured_once_then_cached_per_machine(tuning, monkeypatch):
  calls = fake_times(monkeypatch, {"direct": 5.0, "winograd": 3.0, "winograd4": 3.2})
  x, w = _arrays()  # 8 input channels: the fixed rule would say direct
  with cpu.measuring():
    assert winograd(x, w)
  assert winograd(x, w)  # this process remembers it
  assert calls == [["direct", "winograd", "winograd4"]]
  cache = json.loads(tuning.read_text())
  (entries,) = cache["machines"].values()
  key = "conv (2, 6, 6, 8) * (3, 3, 8, 8) forward"
  assert entries[key]["choice"] == "winograd"
  assert entries[key]["ms"] == {"direct": 5.0, "winograd": 3.0, "winograd4": 3.2}
  assert cpu_tuning.machine_key() in cache["machines"]

  cpu_tuning.reset()  # a new process on the same machine reads the cache
  fake_times(monkeypatch, {"direct": 1.0, "winograd": 9.0, "winograd4": 9.0})
  assert winograd(x, w)  # outside measuring() too
  assert cpu_tuning._made[key]["source"] == "cached"  # pylint: disable=protected-access
  with cpu.measuring():
    # Each gradient is a choice of its own; another machine measures anew.
    assert not winograd(x, w, "input_grad") and not winograd(x, w, "weight_grad")
    cpu_tuning.reset()
    monkeypatch.setattr(cpu_tuning, "machine_key", lambda: "another CPU")
    assert not winograd(x, w)
  assert len(json.loads(tuning.read_text())["machines"]) == 2


def test_the_fastest_of_three_and_a_cache_entry_missing_one_is_measured_again(
    tuning, monkeypatch):
  x, w = _arrays()
  key = "conv (2, 6, 6, 8) * (3, 3, 8, 8) forward"
  # A cache written when only two programs existed: the third is measured.
  tuning.parent.mkdir(parents=True)
  tuning.write_text(json.dumps({"version": 1, "machines": {cpu_tuning.machine_key(): {
      key: {"choice": "winograd", "ms": {"direct": 5.0, "winograd": 3.0}}}}}))
  calls = fake_times(monkeypatch, {"direct": 5.0, "winograd": 3.0, "winograd4": 2.0})
  with cpu.measuring():
    assert conv.conv_program(x, w, (1, 1), SAME) == "winograd4"
  assert len(calls) == 1 and cpu_tuning._made[key]["source"] == "measured"  # pylint: disable=protected-access
  entry = json.loads(tuning.read_text())["machines"][cpu_tuning.machine_key()][key]
  assert entry["choice"] == "winograd4"


def test_off_and_multi_process_take_the_fixed_rule(tuning, monkeypatch):
  calls = fake_times(monkeypatch, {"direct": 9.0, "winograd": 1.0, "winograd4": 1.0})
  small, big = _arrays(cout=8), _arrays((2, 6, 6, 128), 8)
  monkeypatch.setenv("BAT_JAX_CPU_TUNING", "off")
  with cpu.measuring():  # measuring is asked for, but off
    assert not winograd(*small)   # C_in 8 < WINOGRAD_MIN_CIN
    assert winograd(*big)         # C_in 128
    assert winograd(*big, "input_grad") and not winograd(*big, "weight_grad")
    monkeypatch.setenv("BAT_JAX_CPU_TUNING", "on")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not winograd(*small)
  assert calls == [] and not tuning.exists()


def test_pinned_choices_win(tuning, monkeypatch):
  fake_times(monkeypatch, {"direct": 9.0, "winograd": 1.0, "winograd4": 1.0})
  x, w = _arrays()
  cpu_tuning.pin({"conv (2, 6, 6, 8) * (3, 3, 8, 8) forward": "direct"})
  with cpu.measuring():
    assert not winograd(x, w)
  assert cpu_tuning.choices_made() == {"conv (2, 6, 6, 8) * (3, 3, 8, 8) forward": "direct"}


@pytest.mark.slow
def test_real_measurement_inside_a_trace_gives_the_convolution(tuning):
  # Measured for real (tiny shapes), while jax.grad and jit trace the model.
  x, w = _arrays((2, 7, 5, 8), 6)
  probe = np.random.default_rng(1).standard_normal((2, 7, 5, 6)).astype(np.float32)

  def loss(x_, w_):
    return jax.numpy.sum(cpu.conv_general_dilated(
        x_, w_, (1, 1), SAME, dimension_numbers=jax.lax.conv_dimension_numbers(
            x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))) * probe)

  with cpu.measuring():
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
  want = jax.value_and_grad(lambda a, b: jax.numpy.sum(jax.lax.conv_general_dilated(
      a, b, (1, 1), SAME, dimension_numbers=("NHWC", "HWIO", "NHWC")) * probe),
                            argnums=(0, 1))(x, w)
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * np.abs(r).max())
  (entries,) = json.loads(tuning.read_text())["machines"].values()
  assert sorted(entries) == ["conv (2, 7, 5, 8) * (3, 3, 8, 6) forward",
                             "conv (2, 7, 5, 8) * (3, 3, 8, 6) input_grad",
                             "conv (2, 7, 5, 8) * (3, 3, 8, 6) weight_grad"]
  for record in entries.values():
    assert set(record["ms"]) == {"direct", "winograd", "winograd4"}
    assert all(t > 0 for t in record["ms"].values())


@pytest.mark.slow
def test_a_run_records_its_choices_and_a_resume_pins_them(tuning, monkeypatch, tmp_path,
                                                         caplog):
  caplog.set_level(logging.INFO)
  calls = fake_times(monkeypatch, {"direct": 1.0, "winograd": 9.0, "winograd4": 9.0})
  monkeypatch.setattr(conv, "SMALL_CIN", 0)  # tiny_cnn's 1-channel 3x3 conv qualifies
  config = tiny_config(ops="cpu_fast", num_train_steps=2,
                       checkpoint_every_steps=1, num_eval_examples=16, early_stopping=False)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir), max_steps_this_run=1)
  recorded = json.loads((workdir / cpu.WORKDIR_FILE).read_text())
  assert calls and recorded and set(recorded.values()) == {"direct"}
  # The train step's first call measured; the init (a batch of 1) took the fixed rule.
  assert "cpu_ops: the train step: 3 convolution programs chosen (3 measured)" in caplog.text
  assert "(1, 28, 28, 1) * (3, 3, 1, 8) forward -> direct (not measured: fixed rule)" in (
      caplog.text)
  # The machine's cache now says otherwise: the resumed run keeps the record.
  cache = json.loads(tuning.read_text())
  for entries in cache["machines"].values():
    for record in entries.values():
      record["choice"] = "winograd"
  tuning.write_text(json.dumps(cache))
  cpu_tuning.reset()
  train.train_and_evaluate(config, str(workdir))
  made = cpu_tuning._made  # pylint: disable=protected-access
  used = [k for k in recorded if k in made]
  assert used and all(made[k]["choice"] == "direct" and made[k]["source"] == "pinned"
                      for k in used)


def test_calling_a_model_measures_only_inside_measuring(tuning, monkeypatch, caplog):
  # pylint: disable=protected-access
  caplog.set_level(logging.INFO)
  calls = []

  def measure(candidates):
    calls.append(sorted(candidates))
    return {"direct": 9.0, "winograd": 1.0, "winograd4": 2.0}
  monkeypatch.setattr(cpu_tuning, "measure", measure)
  model = models.create_model("tiny_resnet", 10, layers=cpu.LAYERS)
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def logits_and_input_grad():  # a new trace each time: conv_program runs again
    logits = jax.jit(lambda v, x_: model.apply(v, x_))(variables, x)
    dx = jax.jit(jax.grad(lambda x_: model.apply(variables, x_).sum()))(x)
    return logits, dx

  # A restored model on a new shape: the fixed rule (direct below 128 channels),
  # logged, and nothing timed.
  logits_and_input_grad()
  made = dict(cpu_tuning._made)
  assert made and calls == [] and not tuning.exists()
  assert all(r["source"] == cpu_tuning.NOT_MEASURED and r["choice"] == "direct"
             for r in made.values())
  assert "forward -> direct (not measured: fixed rule)" in caplog.text
  with cpu.measuring("a test"):
    logits_and_input_grad()
  assert len(calls) == len(made)
  records = cpu_tuning._made.values()
  assert {r["source"] for r in records} == {"measured"}
  assert all(r["choice"] == "winograd" for r in records)
  n = len(made)
  assert f"cpu_ops: a test: {n} convolution programs chosen ({n} measured)" in caplog.text


def test_measuring_first_call_measures_on_the_first_call_only():
  measuring_now = cpu_tuning._measuring_here  # pylint: disable=protected-access
  inside = []
  step = cpu.measuring_first_call(lambda a: inside.append(measuring_now()) or a, "a step")
  assert [step(1), step(2), step(3)] == [1, 2, 3]
  assert inside == [True, False, False] and not measuring_now()
