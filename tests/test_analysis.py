"""bat_jax.analysis against NumPy references on a tiny fixed-weight model."""

import json
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import analysis, configlib, datasets, diagnostics, rundir
from bat_jax import attacks

N, H, W, C = 13, 4, 4, 5  # N is not a multiple of the batch size below.
BATCH = 5
EPS, STEP = 0.1, 0.03


# ----------------------------------------------------------------------------
# NumPy references (float64), written from docs/ALGORITHMS.md section 3.
# ----------------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_margin(z, y):
  p = np.exp(np_log_softmax(z))
  rows = np.arange(len(y))
  p_true = p[rows, y].copy()
  p[rows, y] = -np.inf
  return p_true - p.max(-1)


def np_measures(clean, adv, y):
  rows = np.arange(len(y))
  lp, lq = np_log_softmax(clean), np_log_softmax(adv)
  q_other = np.exp(lq)
  q_other[rows, y] = -np.inf
  target = q_other.argmax(-1)
  return {
      "margin_clean": np_margin(clean, y),
      "margin_adv": np_margin(adv, y),
      "kl": (np.exp(lp) * (lp - lq)).sum(-1),
      "log_alpha_true": (lp - lq)[rows, y],
      "log_alpha_target": (lp - lq)[rows, target],
      "target": target,
      "correct_clean": clean.argmax(-1) == y,
      "correct_adv": adv.argmax(-1) == y,
  }


# ----------------------------------------------------------------------------
# A tiny model with fixed random weights.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(H * W, C)) * 3.0, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  images = rng.uniform(size=(N, H, W, 1)).astype(np.float32)
  labels = rng.integers(0, C, size=(N,)).astype(np.int32)

  def logits_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ weights) * 4.0 + bias

  return logits_fn, images, labels


def test_analyse_matches_numpy(tiny):
  logits_fn, images, labels = tiny
  measures, summary = analysis.analyse(
      logits_fn, images, labels, eps=EPS, step_size=STEP, num_steps=10,
      seed=1, batch_size=BATCH)

  # Every example appears once, in order: the clean logits are the model's.
  np.testing.assert_allclose(measures["clean_logits"],
                             np.asarray(logits_fn(jnp.asarray(images))),
                             rtol=1e-5, atol=1e-5)
  assert measures["adv_logits"].shape == (N, C)
  np.testing.assert_array_equal(measures["labels"], labels)

  ref = np_measures(measures["clean_logits"], measures["adv_logits"], labels)
  for name, expected in ref.items():
    assert measures[name].shape == (N,), name
    if expected.dtype == bool or name == "target":
      np.testing.assert_array_equal(measures[name], expected, err_msg=name)
    else:
      np.testing.assert_allclose(measures[name], expected, rtol=1e-4,
                                 atol=1e-5, err_msg=name)

  r_nat = np.mean(~ref["correct_clean"])
  r_bdy = np.mean(ref["correct_clean"] & ~ref["correct_adv"])
  assert summary["num_examples"] == N
  assert summary["R_nat"] == pytest.approx(r_nat)
  assert summary["R_bdy"] == pytest.approx(r_bdy)
  assert summary["R_rob"] == pytest.approx(summary["R_nat"] + summary["R_bdy"])
  assert summary["robust_acc"] == pytest.approx(1 - r_nat - r_bdy)
  assert summary["mean_kl"] == pytest.approx(ref["kl"].mean(), rel=1e-4)
  assert summary["mean_margin_adv"] == pytest.approx(ref["margin_adv"].mean(),
                                                     abs=1e-5)
  assert summary["frac_high_margin_clean"] == pytest.approx(
      np.mean(ref["margin_clean"] > 0.9))
  quadrants = [summary[f"quadrant_{q}"] for q in ("I", "II", "III", "IV")]
  assert sum(quadrants) == pytest.approx(1.0)
  # The attack hurts: the adversarial margins are no larger on average.
  assert summary["mean_margin_adv"] < summary["mean_margin_clean"]
  assert np.all(ref["kl"] >= -1e-6)


def test_padded_batches_equal_one_full_batch(tiny):
  """Deterministic PGD (no random start): batching must not change any example."""
  logits_fn, images, labels = tiny
  measures, _ = analysis.analyse(
      logits_fn, images, labels, eps=EPS, step_size=STEP, num_steps=5,
      seed=0, batch_size=BATCH, start="none")
  x_adv = attacks.pgd(logits_fn, jnp.asarray(images), jnp.asarray(labels),
                      eps=EPS, step_size=STEP, num_steps=5, start="none")
  # Batches of 5 vs one of 13: rounding may differ, and a near-zero gradient
  # component flip a PGD step, so at most one example may differ.
  close = np.all(np.isclose(measures["adv_logits"], np.asarray(logits_fn(x_adv)),
                            rtol=1e-5, atol=1e-5), axis=1)
  assert close.sum() >= N - 1


def test_analyse_compiles_once(tiny, monkeypatch):
  """Two batches over 4 devices (the last one padded) trace the attack once."""
  logits_fn, images, labels = tiny
  shapes = []

  def recording_logits_fn(x):
    shapes.append(x.shape[0])
    return logits_fn(x)

  monkeypatch.setattr(attacks, "pgd", chex.assert_max_traces(attacks.pgd, n=1))
  measures, _ = analysis.analyse(
      recording_logits_fn, images, labels, eps=EPS, step_size=STEP,
      num_steps=1, seed=0, batch_size=BATCH)
  assert len(set(shapes)) == 1  # one per-device batch shape: one program
  assert measures["margin_clean"].shape == (N,)


def test_analyse_accepts_params_and_uint8(tiny):
  logits_fn, images, labels = tiny
  pixels = np.round(images * 255).astype(np.uint8)
  scale = jnp.float32(2.0)
  measures, _ = analysis.analyse(
      lambda s, x: logits_fn(x) * s, pixels, labels, params=scale, eps=EPS,
      step_size=STEP, num_steps=1, seed=0, batch_size=BATCH)
  expected = 2.0 * np.asarray(logits_fn(jnp.asarray(pixels / 255.0, jnp.float32)))
  np.testing.assert_allclose(measures["clean_logits"], expected, rtol=1e-5,
                             atol=1e-5)


def test_measures_stable_for_extreme_logits():
  clean = jnp.array([[300.0, -300.0, 0.0]])
  adv = jnp.array([[-300.0, 300.0, 0.0]])
  measures = analysis.per_example_measures(clean, adv, jnp.array([0]))
  assert float(measures["log_alpha_true"][0]) == pytest.approx(600.0)
  assert float(measures["log_alpha_target"][0]) == pytest.approx(-600.0)
  assert int(measures["target"][0]) == 1
  assert np.isfinite(float(measures["kl"][0]))
  assert float(measures["margin_clean"][0]) == pytest.approx(1.0)
  assert float(measures["margin_adv"][0]) == pytest.approx(-1.0)


def test_summarize_hand_case():
  measures = {
      "margin_clean": np.array([0.95, 0.5, -0.2, 0.3]),
      "margin_adv": np.array([0.92, -0.4, -0.6, 0.1]),
      "kl": np.array([0.0, 1.0, 2.0, 0.5]),
      "log_alpha_true": np.array([0.1, 1.0, 0.5, -0.2]),
      "log_alpha_target": np.array([-0.1, -1.0, 0.5, -0.2]),
      "correct_clean": np.array([True, True, False, True]),
      "correct_adv": np.array([True, False, False, True]),
  }
  s = analysis.summarize(measures)
  assert (s["R_nat"], s["R_bdy"], s["R_rob"]) == (0.25, 0.25, 0.5)
  assert (s["clean_acc"], s["robust_acc"], s["adv_acc"]) == (0.75, 0.5, 0.5)
  assert (s["quadrant_I"], s["quadrant_II"], s["quadrant_III"],
          s["quadrant_IV"]) == (0.5, 0.0, 0.25, 0.25)
  assert s["frac_high_margin_clean"] == 0.25
  assert s["frac_high_margin_adv"] == 0.25
  assert s["mean_kl"] == pytest.approx(0.875)
  assert s["frac_log_alpha_true_positive"] == 0.75
  assert s["frac_log_alpha_target_negative"] == 0.75


# ----------------------------------------------------------------------------
# Gradient diagnostics.
# ----------------------------------------------------------------------------


def test_gradient_diagnostics_linear_hand_case():
  """Linear functions of theta: every gradient is a known constant vector."""
  a = jnp.array([1.0, 0.0, 0.0])
  b = jnp.array([0.0, 2.0, 0.0])
  c = jnp.array([1.0, 1.0, 1.0])
  theta = {"w": jnp.array([1.0, 2.0, 3.0])}
  terms = {"ce": lambda p: a @ p["w"], "kl": lambda p: b @ p["w"]}
  total = lambda p: a @ p["w"] + 2.0 * (b @ p["w"])  # grad a + 2b = (1, 4, 0)
  margin = lambda p: c @ p["w"]
  out = jax.jit(
      lambda p: diagnostics.gradient_diagnostics(terms, total, margin, p))(theta)
  sqrt3 = np.sqrt(3.0)
  assert float(out["cos_ce_margin"]) == pytest.approx(-1.0 / sqrt3, rel=1e-6)
  assert float(out["cos_kl_margin"]) == pytest.approx(-2.0 / (2.0 * sqrt3), rel=1e-6)
  assert float(out["margin_increase"]) == pytest.approx(-5.0)
  assert float(out["margin_increase_ce"]) == pytest.approx(-1.0)
  assert float(out["margin_increase_kl"]) == pytest.approx(-2.0)
  # total = 1 + 2 * 4 = 9; ||(1, 4, 0)|| = sqrt(17).
  assert float(out["grad_norm_ratio"]) == pytest.approx(np.sqrt(17.0) / 9.0)
  assert float(out["grad_norm_ratio_ce"]) == pytest.approx(1.0 / 1.0)
  assert float(out["grad_norm_ratio_kl"]) == pytest.approx(2.0 / 4.0)
  assert float(out["margin"]) == pytest.approx(6.0)
  assert float(out["loss"]) == pytest.approx(9.0)
  assert float(out["cos_total_margin"]) == pytest.approx(-5.0 / (np.sqrt(17.0) * sqrt3))


def _tiny_trades_problem():
  """A small MLP with TRADES-style CE and KL terms on fixed x, x*."""
  from bat_jax import losses
  rng = np.random.default_rng(3)
  params = {"dense1": {"w": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
                       "b": jnp.zeros((8,), jnp.float32)},
            "dense2": {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  x = jnp.asarray(rng.uniform(size=(7, 6)), jnp.float32)
  x_adv = x + jnp.asarray(rng.uniform(-0.3, 0.3, size=x.shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=(7,)))

  def logits(p, inputs):
    hidden = jax.nn.relu(inputs @ p["dense1"]["w"] + p["dense1"]["b"])
    return hidden @ p["dense2"]["w"]

  terms = {"ce": lambda p: jnp.mean(losses.cross_entropy(logits(p, x), y)),
           "kl": lambda p: jnp.mean(losses.kl_divergence(logits(p, x),
                                                         logits(p, x_adv)))}
  total = lambda p: terms["ce"](p) + 5.0 * terms["kl"](p)
  margin = lambda p: jnp.mean(losses.margin(logits(p, x), y))
  return params, terms, total, margin


def _explicit_reference(fns, params):
  """Values and flattened float64 gradients of each function, one jit."""
  def value_and_flat_grad(fn, p):
    value, grads = jax.value_and_grad(fn)(p)
    return value, jnp.concatenate([jnp.ravel(g) for g in
                                   jax.tree_util.tree_leaves(grads)])
  out = jax.jit(lambda p: {k: value_and_flat_grad(f, p) for k, f in fns.items()}
                )(params)
  return {k: (float(v), np.asarray(g, np.float64)) for k, (v, g) in out.items()}


def test_gradient_diagnostics_matches_explicit_grads_under_pmap():
  """Inside a pmapped step (as the trainer calls it), against jax.grad + NumPy."""
  params, terms, total, margin = _tiny_trades_problem()
  num_devices = min(2, jax.local_device_count())
  replicated = jax.tree.map(lambda a: jnp.stack([a] * num_devices), params)
  per_device = jax.pmap(
      lambda p: diagnostics.gradient_diagnostics(terms, total, margin, p)
  )(replicated)
  ref = _explicit_reference(dict(terms, total=total, margin=margin), params)
  _, g_m = ref["margin"]
  for device in range(num_devices):
    out = jax.tree.map(lambda a: float(a[device]), per_device)
    for name in list(terms) + ["total"]:
      value, g = ref[name]
      suffix = "" if name == "total" else f"_{name}"
      cosine = -g @ g_m / (np.linalg.norm(g) * np.linalg.norm(g_m))
      assert out[f"cos_{name}_margin"] == pytest.approx(cosine, abs=1e-5)
      assert out["margin_increase" + suffix] == pytest.approx(
          -g @ g_m, rel=1e-4, abs=1e-7)
      assert out["grad_norm_ratio" + suffix] == pytest.approx(
          np.linalg.norm(g) / abs(value), rel=1e-4)
    assert out["margin"] == pytest.approx(ref["margin"][0], rel=1e-5)
    assert out["loss"] == pytest.approx(ref["total"][0], rel=1e-5)


# ----------------------------------------------------------------------------
# analyse_workdir with stand-ins for the restored run and the data set.
# ----------------------------------------------------------------------------


def test_analyse_workdir_writes_outputs(tiny, tmp_path, monkeypatch):
  logits_fn, images, labels = tiny
  config = configlib.base_config()
  config.update(dataset="mnist", eps=EPS, attack_step_size=STEP,
                eval_attack_step_size=0.05, data_dir="/nowhere", method="bat")

  class FakeModel:
    def apply(self, variables, x, train):
      assert train is False
      return logits_fn(x) * variables["scale"]

  restored = types.SimpleNamespace(config=config, model=FakeModel(), step=7,
                                   variables={"scale": jnp.float32(1.0)}, weights="raw")
  calls = {}

  def fake_restore(workdir, which):
    calls["restore"] = (workdir, which)
    return restored

  def fake_load_split(dataset, split, data_dir, num_examples, data_file):
    calls["load"] = (dataset, split, data_dir, num_examples, data_file)
    return np.round(images * 255).astype(np.uint8), labels

  monkeypatch.setattr(rundir, "restore_model", fake_restore)
  monkeypatch.setattr(datasets, "load_split", fake_load_split)

  summary = analysis.analyse_workdir(str(tmp_path), which="last",
                                     num_examples=N, num_steps=3,
                                     batch_size=BATCH)
  assert calls["restore"] == (str(tmp_path), "last")
  assert calls["load"] == ("mnist", "test", "/nowhere", N, None)
  assert summary["eps"] == pytest.approx(EPS)
  assert summary["step_size"] == pytest.approx(0.05)  # the evaluation step
  assert summary["method"] == "bat" and summary["num_examples"] == N
  assert summary["weights"] == "raw"  # which weights the files report

  with open(tmp_path / "analysis" / "last_summary.json") as f:
    assert json.load(f)["R_rob"] == pytest.approx(summary["R_rob"])
  with np.load(tmp_path / "analysis" / "last_measures.npz") as data:
    assert data["margin_clean"].shape == (N,)
    assert {"kl", "log_alpha_true", "log_alpha_target", "correct_adv",
            "clean_logits", "adv_logits", "labels"} <= set(data.files)
