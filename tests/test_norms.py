"""The L2 threat model end to end: training with config.norm='l2' for every method,
and evaluation (FGSM, PGD, AutoAttack) with Protocol(norm='L2')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import attacks, configlib, datasets, evaluate, methods, parallel, train_state
from bat_jax import train_step
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
  assert results["protocol"]["norm"] == "L2"
  clean, fgsm, pgd, aa = (results[k] for k in ("clean_acc", "fgsm_acc", "pgd_acc",
                                                "autoattack_acc"))
  assert clean > 0.5 and aa <= pgd <= fgsm <= clean and pgd < clean
  # The large-eps check uses the box's diagonal, sqrt(784) = 28, in L2.
  assert results["sanity"]["large_eps"] == pytest.approx(28.0)
  # The L2 fast gradient step stays in the ball.
  xj = jnp.asarray(x[:8].reshape(8, 28, 28, 1))
  x_adv = attacks.fgsm(lambda z: apply_fn({"w": jnp.asarray(w)}, z), xj,
                       jnp.asarray(labels[:8]), EPS, norm="l2")
  assert np.sqrt(np.sum(np.square(np.asarray(x_adv - xj)), axis=(1, 2, 3))).max() <= EPS + 1e-5
