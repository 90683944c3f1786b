"""The L2 threat model end to end: training with config.norm='l2' for every method,
evaluation (FGSM, PGD, AutoAttack) with Protocol(norm='l2'), and the threat
model (norm and eps) in every output: results, tables, aggregates, figures."""

import glob
import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import analysis, attacks, configlib, datasets, evaluate, methods, naming
from bat_jax import parallel, plots, train, train_state, train_step
from bat_jax.errors import UserError
from bat_jax.plots import figures as plot_figures
from test_train import run_steps, tiny_config

EPS = 1.5


@pytest.fixture(scope="module")
def data():
  return datasets.load_split("mnist_subset", "train", num_examples=64)


@pytest.mark.slow
@pytest.mark.parametrize("method", tuple(methods.METHODS))
def test_every_method_trains_in_l2(method, data):
  images, labels = data
  config = tiny_config(method=method, norm="l2", eps=EPS, attack_step_size=0.5)
  configlib.validate(config, num_devices=1)
  state, metrics = run_steps(config, parallel.Pmap(jax.local_devices()[:1]), images,
                             labels, 1)
  assert np.isfinite(metrics[0]["train/loss"])
  # The training attack stays in the L2 ball and the box.
  setup = train_state.setup(config, images.shape[1:], 10, 10)
  x = jnp.asarray(images[:8], jnp.float32) / 255.0
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  x_adv = train_step.training_attack(config, setup.model, setup.state, x,
                                     jnp.asarray(labels[:8]), keys)
  norms = np.sqrt(np.sum(np.square(np.asarray(x_adv - x)), axis=(1, 2, 3)))
  assert norms.max() <= EPS + 1e-4 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  if method != "standard":
    assert norms.max() > 0.3  # it moved, inside a ball L-inf sign steps would leave


def test_l2_eps_above_one_is_allowed_only_in_l2():
  configlib.validate(tiny_config(norm="l2", eps=2.0), num_devices=4)
  with pytest.raises(configlib.ConfigError, match="config.eps"):
    configlib.validate(tiny_config(norm="linf", eps=2.0), num_devices=4)
  with pytest.raises(configlib.ConfigError, match="config.norm"):
    configlib.validate(tiny_config(norm="l1"), num_devices=4)


@pytest.mark.slow
def test_evaluation_in_l2(data):
  images, labels = data
  x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
  w = np.linalg.lstsq(x, np.eye(10)[labels], rcond=None)[0].astype(np.float32)
  apply_fn = lambda v, z: z.reshape(z.shape[0], -1) @ v["w"]
  protocol = evaluate.Protocol(norm="L2", pgd_steps=5, pgd_restarts=1,
                               autoattack=evaluate.AutoAttackOptions(
                                   version="custom", attacks=("apgd-ce", "apgd-t"),
                                   settings=dict(apgd_iters=5, n_target_classes=2)))
  results = evaluate.evaluate(apply_fn, {"w": jnp.asarray(w)}, images[:32], labels[:32],
                              eps=EPS, pgd_step_size=0.5, protocol=protocol,
                              batch_size=16, sanity_examples=16)
  # Written canonical, whatever the spelling given ('L2' above).
  assert results["protocol"]["norm"] == "l2" and results["norm"] == "l2"
  clean, fgsm, pgd, aa = (results[k] for k in ("clean_acc", "fgsm_acc", "pgd_acc",
                                                "autoattack_acc"))
  assert clean > 0.5 and aa <= pgd <= fgsm <= clean and pgd < clean
  # The large-eps check uses the box's diagonal, sqrt(784) = 28, in L2.
  assert results["sanity"]["large_eps"] == pytest.approx(28.0)
  # The eps sweep is not cut at L-inf's 1: L2 radii of the box's scale.
  assert [p["eps"] for p in results["sanity"]["pgd_eps_sweep"]] == [0, 0.75, EPS, 3.0]
  # The L2 fast gradient step stays in the ball.
  xj = jnp.asarray(x[:8].reshape(8, 28, 28, 1))
  x_adv = attacks.fgsm(lambda z: apply_fn({"w": jnp.asarray(w)}, z), xj,
                       jnp.asarray(labels[:8]), EPS, norm="l2")
  assert np.sqrt(np.sum(np.square(np.asarray(x_adv - xj)), axis=(1, 2, 3))).max() <= EPS + 1e-5


# --------------------------------------------------------------------------
# The threat model (norm and eps) in every output, one spelling of the norm.
# --------------------------------------------------------------------------


def test_norm_spellings_are_read_and_written_canonical():
  for spelling, canonical in (("L2", "l2"), ("l2", "l2"), ("Linf", "linf"),
                              ("L-inf", "linf"), ("LINF", "linf"), ("inf", "linf")):
    config = tiny_config(norm=spelling, eps=0.3)
    configlib.validate(config, num_devices=1)
    assert config.norm == canonical, spelling
    assert evaluate.Protocol(norm=spelling).norm == canonical
    assert naming.canonical_norm(spelling) == canonical
  with pytest.raises(UserError, match="--norm='l1'"):
    naming.canonical_norm("l1", "--norm")
  assert naming.threat_model_label("l2", 0.5, "cifar10") == "L2 ε=0.5"
  assert naming.threat_model_label("Linf", 8 / 255, "cifar10") == "L-inf ε=8/255"
  # /255 is an L-inf convention: an L2 radius of 1 is not '255/255'.
  assert naming.format_eps(1.0, "cifar10", "l2") == "1"
  # Records written before the norm had one spelling, or was recorded at all.
  assert naming.norm_of({"protocol": {"norm": "L2"}}) == "l2"
  assert naming.norm_of({"eps": 0.3}) == naming.norm_of(None) == "linf"


def test_eps_range_is_checked_per_norm():
  assert naming.eps_range_error(2.0, "l2") is None
  assert "[0, 1] for an L-inf radius" in naming.eps_range_error(2.0, "linf")
  l2_error = naming.eps_range_error(-1.0, "L2")
  assert "L2 radius" in l2_error and "[0, 1]" not in l2_error
  with pytest.raises(configlib.ConfigError, match="L2 radius"):
    configlib.validate(tiny_config(norm="L2", eps=-1.0), num_devices=1)


def _write_linf_run(root, eps=0.3, *, old_style=False, norm="linf"):
  """A hand-written run (config.json and last_results.json), no checkpoint.

  ``old_style``: as earlier versions wrote them: the norm only in the
  results' protocol, spelt 'Linf' or 'L2' (and absent from an L-inf config).
  """
  path = os.path.join(root, f"at_{norm}" + ("_old" if old_style else ""))
  os.makedirs(os.path.join(path, "eval"))
  base = configlib.base_config()
  config = {"method": "at", "dataset": "mnist_subset", "eps": eps, "seed": 0,
            "model": "tiny_cnn", "beta": base.beta, "num_bridges": base.num_bridges}
  results = {"clean_acc": 0.9, "fgsm_acc": 0.6, "pgd_acc": 0.5, "autoattack_acc": None,
             "eps": eps, "which": "last", "step": 3, "num_examples": 16,
             "sanity_warnings": [], "train_eps": eps}
  if old_style:
    results["protocol"] = {"norm": {"linf": "Linf", "l2": "L2"}[norm], "eps": eps,
                           "eps_255": None, "examples": {
        "dataset": "mnist_subset", "split": "test", "count": 16, "range": [0, 16]}}
    if norm != "linf":
      config["norm"] = norm
  else:
    config["norm"] = results["norm"] = results["train_norm"] = norm
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "eval", "last_results.json"), "w") as f:
    json.dump(results, f)
  return path


def _cli(*args):
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  fv(["prog", *args])
  return evaluate.run_from_flags(fv)


def test_another_norm_needs_an_explicit_eps_before_any_work(tmp_path):
  workdir = _write_linf_run(str(tmp_path))
  before = sorted(os.listdir(os.path.join(workdir, "eval")))
  for norm in ("L2", "l2"):
    with pytest.raises(UserError, match="--eps") as error:
      _cli(f"--workdir={workdir}", f"--norm={norm}")
    assert "L-inf" in str(error.value) and "0.3" in str(error.value)
  with pytest.raises(UserError, match="--eps"):
    evaluate.evaluate_workdir(workdir, protocol=evaluate.Protocol(norm="l2"))
  with pytest.raises(UserError, match=r"--eps=3: must lie in \[0, 1\] for an L-inf"):
    _cli(f"--workdir={workdir}", "--eps=3")
  with pytest.raises(UserError, match="--norm='l1'"):
    _cli(f"--workdir={workdir}", "--norm=l1")
  assert sorted(os.listdir(os.path.join(workdir, "eval"))) == before  # nothing ran


def test_old_style_files_are_read_and_their_progress_resumed(tmp_path):
  old = _write_linf_run(str(tmp_path), old_style=True)
  new = _write_linf_run(str(tmp_path))
  table = evaluate.aggregate([old, new], which="last")
  # The same threat model however it was spelt: one group of two runs.
  assert "| **MNIST (subset) (L-inf ε=0.3)** |" in table
  assert "| AT | 90.00±0.00 | 60.00±0.00 | 50.00±0.00 | 2 |" in table
  assert "| L-inf | 0.3 |" in evaluate.results_markdown(old)
  # Another norm is another group, labelled, never averaged in.
  old_l2 = _write_linf_run(str(tmp_path), 0.3, old_style=True, norm="l2")
  lines = evaluate.aggregate([old, new, old_l2], which="last").splitlines()
  l2_head = lines.index("| **MNIST (subset) (L2 ε=0.3)** | | | | |")
  assert lines[l2_head + 1] == "| AT | 90.00 | 60.00 | 50.00 | 1 |"
  assert "| **MNIST (subset) (L-inf ε=0.3)** | | | | |" in lines
  assert "trained at L2 ε=0.3" in evaluate.results_markdown(old_l2)
  assert "| L2 | 0.3 |" in evaluate.results_markdown(old_l2)
  # Progress saved with the norm spelt 'Linf' is continued, not started again.
  from bat_jax.evaluation import resume, suite  # pylint: disable=g-import-not-at-top
  args = dict(model={"step": 3}, examples={"count": 16}, eps=0.3, pgd_step_size=0.1)
  store = suite.progress_store(str(tmp_path / "progress"),
                               protocol=evaluate.Protocol(norm="linf"), **args)
  assert store.record["norm"] == "linf"
  earlier = resume.ProgressStore(str(tmp_path / "progress2"),
                                 dict(store.record, norm="Linf"))
  again = suite.progress_store(str(tmp_path / "progress2"),
                               protocol=evaluate.Protocol(norm="Linf"), **args)
  assert again.dir == earlier.dir != os.path.join(str(tmp_path / "progress2"),
                                                  again.fingerprint)


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
  """A tiny AT run trained with norm='L2' (any spelling) at eps 1.5."""
  path = str(tmp_path_factory.mktemp("l2") / "at_l2")
  train.train_and_evaluate(tiny_config(method="at", norm="L2", eps=EPS,
                                       attack_step_size=0.5, num_eval_examples=16), path)
  return path


@pytest.mark.slow
def test_l2_pipeline_shows_its_threat_model_everywhere(l2_run, tmp_path, monkeypatch):
  """Train (norm=L2), evaluate, aggregate with an L-inf run, analyse, plot."""
  with open(os.path.join(l2_run, "config.json")) as f:
    assert json.load(f)["norm"] == "l2"
  text = _cli(f"--workdir={l2_run}", "--which=last", "--num_examples=16",
              "--attacks=clean,fgsm,pgd", "--pgd_steps=2", "--pgd_restarts=1",
              "--sanity_examples=0", "--norm=L2")  # no --eps: the run's own norm
  with open(os.path.join(l2_run, "eval", "last_results.json")) as f:
    saved = json.load(f)
  assert (saved["norm"], saved["eps"], saved["train_norm"], saved["train_eps"]) == (
      "l2", EPS, "l2", EPS)
  assert saved["protocol"]["norm"] == "l2" and saved["protocol"]["eps_label"] == "1.5"
  fingerprints = glob.glob(os.path.join(l2_run, "eval", "progress", "*",
                                        "fingerprint.json"))
  assert [json.load(open(p))["norm"] for p in fingerprints] == ["l2"]
  assert "| last | 3 | 16 | L2 | 1.5 |" in text
  assert "trained at L2 ε=1.5" in text and "- threat model: L2 (l2), eps 1.5" in text

  # Aggregated with an L-inf run: two groups, each labelled, never averaged.
  linf_run = _write_linf_run(str(tmp_path))
  table = evaluate.aggregate([l2_run, linf_run], which="last")
  lines = table.splitlines()
  assert lines[2] == "| Method | Clean | FGSM | PGD^50 | runs |"
  linf_head = lines.index("| **MNIST (subset) (L-inf ε=0.3)** | | | | |")
  l2_head = lines.index("| **MNIST (subset) (L2 ε=1.5)** | | | | |")
  assert lines[linf_head + 1] == "| AT | 90.00 | 60.00 | 50.00 | 1 |"
  assert lines[l2_head + 1].startswith("| AT |") and lines[l2_head + 1].endswith(" 1 |")

  # The analysis attacks in the run's norm and says so.
  summary = analysis.analyse_workdir(l2_run, which="last", num_examples=16, num_steps=2)
  assert (summary["norm"], summary["eps"]) == ("l2", EPS)

  # Figures: one per threat model, each saying which.
  figures_drawn = {}
  monkeypatch.setattr(plot_figures, "_save", lambda fig, path: figures_drawn.setdefault(
      os.path.basename(path), fig) and path)
  plots.make_all_figures([l2_run, linf_run], str(tmp_path / "figs"), which="last")
  assert sorted(figures_drawn) == [
      "fig2_margin_smoothness_mnist_subset_l2_eps1.5.png",
      "fig3_accuracy_vs_eps_mnist_subset_l2.png",
      "fig3_accuracy_vs_eps_mnist_subset_linf.png",
      "fig5_log_alpha_mnist_subset_l2.png",
      "fig8_quadrants_mnist_subset_l2_eps1.5.png"]
  for norm, label, eps in (("l2", "L2", EPS), ("linf", "L-inf", 0.3)):
    ax = figures_drawn[f"fig3_accuracy_vs_eps_mnist_subset_{norm}.png"].axes[0]
    assert f"{label} ε" in ax.get_xlabel() and label in ax.get_title()
    assert ax.get_legend_handles_labels()[1] == ["AT (clean)", "AT (robust)"]
    assert [list(c.lines[0].get_xdata()) for c in ax.containers] == [[eps], [eps]]
  fig2 = figures_drawn["fig2_margin_smoothness_mnist_subset_l2_eps1.5.png"]
  assert fig2.get_suptitle() == "PGD at L2 ε=1.5"
  fig8 = figures_drawn["fig8_quadrants_mnist_subset_l2_eps1.5.png"]
  assert any("L2 ε=1.5" in ax.get_title() for ax in fig8.axes)
  assert [r.label for r in plots.load_runs([l2_run, linf_run], which="last")] == [
      "AT (L2 ε=1.5)", "AT (L-inf ε=0.3)"]

  # Another norm than the run's: only with an explicit eps, and labelled.
  with pytest.raises(UserError, match="--eps"):
    _cli(f"--workdir={l2_run}", "--norm=linf")
  text = _cli(f"--workdir={l2_run}", "--which=last", "--num_examples=16",
              "--attacks=clean", "--sanity_examples=0", "--norm=Linf", "--eps=0.1")
  assert "| last | 3 | 16 | L-inf | 0.1 |" in text and "trained at L2 ε=1.5" in text
  table = evaluate.aggregate([l2_run], which="last")
  assert "| **MNIST (subset) (L2 ε=1.5, evaluated at L-inf ε=0.1)** |" in table
