"""AutoAttack "standard" in L-inf and in L2, per stage, on an adversarially trained MNIST MLP.

An MLP (784-256-256-10) is trained with PGD-CE adversarial training (L-inf,
eps ramped up to ``--train_eps``; the pattern of the ``robust`` fixture of
tests/test_autoattack.py, longer). Then, on the first ``--n_test`` test
digits, each stage of the standard AutoAttack (APGD-CE, APGD-T, FAB-T,
Square; full budgets) is compiled and run on the examples still robust, once
in L-inf at ``--linf_eps`` and once in L2 at ``--l2_eps``; the robust
accuracy after each stage, its compile and run times, the largest
perturbation found, and PGD^50 x 10 in the same norm are reported.

  python benchmarks/autoattack_norms_mnist.py --data_dir=DIR --out=benchmarks/results/autoattack_norms_mlp_500.json
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from bat_jax import attacks, losses


def load_mnist(split, n, data_dir):
  src = tfds.data_source("mnist", split=split, data_dir=data_dir)
  rows = src.__getitems__(list(range(n)))
  x = np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0
  return jnp.asarray(x), jnp.asarray(np.array([r["label"] for r in rows], np.int32))


def mlp_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [(jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), jnp.zeros(b))
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return h @ w + b


def adversarial_training(x, y, *, eps, steps, ramp_steps, pgd_steps, batch_size=128,
                         seed=0):
  """Madry AT (L-inf PGD-CE) with Adam (lr 1e-3); eps grows linearly over ``ramp_steps``."""
  params = mlp_init(jax.random.PRNGKey(seed), (784, 256, 256, 10))
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb, key, eps_now):
    x_adv = attacks.pgd(lambda z: mlp_apply(params, z), xb, yb, eps=eps_now,
                        step_size=2.5 * eps_now / pgd_steps, num_steps=pgd_steps, key=key)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(losses.cross_entropy(mlp_apply(p, x_adv), yb)))(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.random.default_rng(seed).permutation(x.shape[0])
  start = time.time()
  for i in range(steps):
    idx = order[(i * batch_size) % (len(order) - batch_size):][:batch_size]
    eps_now = eps * min(1.0, (i + 1) / max(ramp_steps, 1))
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx],
                                   jax.random.PRNGKey(1000 + i), eps_now)
    if i % 500 == 0 or i == steps - 1:
      print(f"  train step {i:5d}/{steps}  eps {eps_now:.3f}  adv CE {float(loss):.3f}"
            f"  ({time.time() - start:.0f} s)", flush=True)
  return params


def run_standard(params, x, y, *, eps, norm, key, batch_size):
  """Each standard stage on the still-robust examples: accuracy and times."""
  predict = lambda z: jnp.argmax(mlp_apply(params, z), -1)
  robust = predict(x) == y
  stages, x_adv = [], x
  for name in attacks.STANDARD_ATTACKS:
    stage = jax.jit(lambda z, yy, r, name=name: attacks.attack_remaining(
        name, lambda v: mlp_apply(params, v), z, yy, r, eps=eps, key=key,
        batch_size=batch_size, norm=norm))
    attacked = int(jnp.sum(robust))
    start = time.time()
    compiled = stage.lower(x, y, robust).compile()
    compile_seconds = time.time() - start
    start = time.time()
    x_stage, still = jax.block_until_ready(compiled(x, y, robust))
    run_seconds = time.time() - start
    x_adv = jnp.where((robust & ~still)[:, None, None, None], x_stage, x_adv)
    robust = still
    stages.append({"attack": name, "attacked": attacked,
                   "robust_accuracy": float(jnp.mean(robust)),
                   "run_seconds": run_seconds, "compile_seconds": compile_seconds})
    print(f"  {norm:4s} {name:8s} attacked {attacked:4d}  robust acc "
          f"{stages[-1]['robust_accuracy']:.2%}  run {run_seconds:7.1f} s  compile "
          f"{compile_seconds:5.1f} s", flush=True)
  delta = np.asarray(x_adv - x).reshape(x.shape[0], -1)
  size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
  assert size.max() <= eps + 1e-5 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  assert float(jnp.mean(predict(x_adv) == y)) == stages[-1]["robust_accuracy"]
  # The baseline AutoAttack must beat: PGD^50 x 10 restarts, step 2.5 eps / 50.
  start = time.time()
  x_pgd = jax.jit(lambda z, yy: attacks.pgd(
      lambda v: mlp_apply(params, v), z, yy, eps=eps, step_size=2.5 * eps / 50,
      num_steps=50, key=key, norm=norm, num_restarts=10))(x, y)
  pgd = {"accuracy": float(jnp.mean(predict(x_pgd) == y)),
         "seconds_with_compile": time.time() - start}
  print(f"  {norm:4s} PGD^50 x 10: {pgd['accuracy']:.2%}", flush=True)
  return {"norm": norm, "eps": eps, "stages": stages, "pgd50x10": pgd,
          "autoattack_accuracy": stages[-1]["robust_accuracy"],
          "total_run_seconds": sum(s["run_seconds"] for s in stages),
          "max_perturbation": float(size.max())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_test", type=int, default=500)
  parser.add_argument("--linf_eps", type=float, default=0.3)
  parser.add_argument("--l2_eps", type=float, default=2.0)
  parser.add_argument("--train_eps", type=float, default=0.3)
  parser.add_argument("--train_steps", type=int, default=2000)
  parser.add_argument("--ramp_steps", type=int, default=500)
  parser.add_argument("--train_pgd_steps", type=int, default=7)
  parser.add_argument("--batch_size", type=int, default=250,
                      help="AutoAttack chunk size (the reference's bs)")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir holding "
                      "mnist (`tfds build mnist --data_dir=DIR --file_format=array_record`)")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  x_test, y_test = load_mnist("test", args.n_test, args.data_dir)
  x_train, y_train = load_mnist("train", 20000, args.data_dir)
  start = time.time()
  params = adversarial_training(x_train, y_train, eps=args.train_eps,
                                steps=args.train_steps, ramp_steps=args.ramp_steps,
                                pgd_steps=args.train_pgd_steps, seed=args.seed)
  train_seconds = time.time() - start
  clean = float(jnp.mean(jnp.argmax(mlp_apply(params, x_test), -1) == y_test))
  print(f"clean accuracy {clean:.2%} (training {train_seconds:.0f} s)")
  cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
         if line.startswith("model name")][:1]
  results = {"n_test": args.n_test, "model": "mlp 784-256-256-10",
             "training": f"PGD-{args.train_pgd_steps} L-inf AT, eps {args.train_eps}, "
                         f"{args.train_steps} steps",
             "train_seconds": train_seconds, "clean_accuracy": clean,
             "cpu": cpu[0] if cpu else platform.processor(),
             "jax": jax.__version__, "load_average": os.getloadavg(), "runs": []}
  key = jax.random.PRNGKey(args.seed)
  for norm, eps in (("linf", args.linf_eps), ("l2", args.l2_eps)):
    results["runs"].append(run_standard(params, x_test, y_test, eps=eps, norm=norm,
                                        key=key, batch_size=args.batch_size))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
