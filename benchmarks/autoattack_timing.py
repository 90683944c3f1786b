"""Times AutoAttack "standard" per attack on MNIST with the paper's CNN.

The model is the LeNet of docs/ALGORITHMS.md section 4 (``bat_jax.models.LeNet``),
adversarially trained for a short while (PGD-CE, eps ramped up to 0.3) so
that the attacks have something to do. Then, on the first ``--n_test`` test
images, each AutoAttack stage (APGD-CE, APGD-T, FAB-T, Square; full standard
budgets) is compiled and run on the examples still robust, and its compile
time, run time and the robust accuracy after it are reported.

  python benchmarks/autoattack_timing.py --data_dir=DIR --n_test=1000 --out=aa_timing.json

The trained weights are cached (``--cache``), so a second run skips training.
"""

import argparse
import json
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from bat_jax import attacks, cpu, losses, models, util


def load_mnist(split, n, data_dir):
  src = tfds.data_source("mnist", split=split, data_dir=data_dir)
  rows = src.__getitems__(list(range(n)))
  x = np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0
  return jnp.asarray(x), jnp.asarray(np.array([r["label"] for r in rows], np.int32))


def adversarial_training(model, x, y, *, eps, steps, ramp_steps, pgd_steps,
                         batch_size=128, seed=0):
  """Madry AT with Adam (lr 1e-3); eps grows linearly over ``ramp_steps``."""
  params = jax.jit(model.init)(jax.random.key(seed), x[:1])
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb, key, eps_now):
    logits_fn = lambda z: model.apply(params, z)
    x_adv = attacks.pgd(logits_fn, xb, yb, eps=eps_now,
                        step_size=2.5 * eps_now / pgd_steps, num_steps=pgd_steps,
                        key=key)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(losses.cross_entropy(model.apply(p, x_adv), yb)))(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  order = rng.permutation(x.shape[0])
  start = time.time()
  for i in range(steps):
    idx = order[(i * batch_size) % (len(order) - batch_size):][:batch_size]
    eps_now = eps * min(1.0, (i + 1) / max(ramp_steps, 1))
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx],
                                   jax.random.key(1000 + i), eps_now)
    if i % 50 == 0 or i == steps - 1:
      print(f"  train step {i:4d}/{steps}  eps {eps_now:.3f}  adv CE {float(loss):.3f}"
            f"  ({time.time() - start:.0f} s)", flush=True)
  return params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_test", type=int, default=1000)
  parser.add_argument("--eps", type=float, default=0.3)
  parser.add_argument("--train_steps", type=int, default=400)
  parser.add_argument("--ramp_steps", type=int, default=150)
  parser.add_argument("--train_pgd_steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=250,
                      help="AutoAttack chunk size (the reference's bs)")
  parser.add_argument("--pgd_restarts", type=int, default=1,
                      help="restarts of the PGD^50 baseline (0: skip it)")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir holding "
                      "mnist (`tfds build mnist --data_dir=DIR --file_format=array_record`)")
  parser.add_argument("--cache", default="/tmp/bat_jax_lenet_at.pkl")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--ops", default="auto", choices=("auto", "xla", "cpu_fast"),
                      help="the model's layers: config.ops's values (see bat_jax.cpu)")
  parser.add_argument("--stock_xla_flags", action="store_true",
                      help="skip bat_jax.util.add_default_xla_flags()")
  args = parser.parse_args()
  if not args.stock_xla_flags:
    util.add_default_xla_flags()  # before the first JAX computation, as the trainer

  model = models.create_model("lenet", 10, layers=cpu.layers_for(args.ops))
  print(f"devices: {jax.devices()}")
  x_test, y_test = load_mnist("test", args.n_test, args.data_dir)
  if args.cache and os.path.exists(args.cache):
    with open(args.cache, "rb") as f:
      params = jax.tree.map(jnp.asarray, pickle.load(f))
    print(f"loaded weights from {args.cache}")
    train_seconds = None
  else:
    x_train, y_train = load_mnist("train", 20000, args.data_dir)
    start = time.time()
    params = adversarial_training(model, x_train, y_train, eps=args.eps,
                                  steps=args.train_steps, ramp_steps=args.ramp_steps,
                                  pgd_steps=args.train_pgd_steps, seed=args.seed)
    train_seconds = time.time() - start
    if args.cache:
      with open(args.cache, "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, params), f)

  predict = jax.jit(lambda p, z: jnp.argmax(model.apply(p, z), -1))
  clean = predict(params, x_test) == y_test
  results = {"n_test": args.n_test, "eps": args.eps, "batch_size": args.batch_size,
             "ops": args.ops, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "device": str(jax.devices()[0]), "train_seconds": train_seconds,
             "clean_accuracy": float(jnp.mean(clean)), "stages": []}
  print(f"clean accuracy: {results['clean_accuracy']:.2%}")

  key = jax.random.key(args.seed)
  if args.pgd_restarts:
    pgd = jax.jit(lambda p, z, y: attacks.pgd(
        lambda v: model.apply(p, v), z, y, eps=args.eps, step_size=0.01, num_steps=50,
        key=key, num_restarts=args.pgd_restarts))
    start = time.time()
    x_pgd = jax.block_until_ready(pgd(params, x_test, y_test))
    pgd_acc = float(jnp.mean(predict(params, x_pgd) == y_test))
    results[f"pgd50x{args.pgd_restarts}"] = {"accuracy": pgd_acc,
                                            "seconds": time.time() - start}
    print(f"PGD^50 x {args.pgd_restarts}: {pgd_acc:.2%} ({time.time() - start:.1f} s "
          "incl. compile)")

  robust = clean
  flags = {"clean": np.asarray(clean)}
  total = 0.0
  for name in attacks.STANDARD_ATTACKS:
    stage = jax.jit(lambda p, z, y, r, name=name: attacks.attack_remaining(
        name, lambda v: model.apply(p, v), z, y, r, eps=args.eps, key=key,
        batch_size=args.batch_size))
    attacked = int(jnp.sum(robust))
    start = time.time()
    compiled = stage.lower(params, x_test, y_test, robust).compile()
    compile_seconds = time.time() - start
    start = time.time()
    x_stage, robust = jax.block_until_ready(compiled(params, x_test, y_test, robust))
    run_seconds = time.time() - start
    total += run_seconds
    # Sanity: inside the ball, and the flags agree with the model.
    max_pert = float(jnp.max(jnp.abs(x_stage - x_test)))
    assert max_pert <= args.eps + 1e-6, max_pert
    acc = float(jnp.mean(robust))
    flags[name] = np.asarray(robust)
    results["stages"].append({"attack": name, "attacked": attacked,
                              "robust_accuracy": acc, "run_seconds": run_seconds,
                              "compile_seconds": compile_seconds})
    print(f"{name:8s} attacked {attacked:5d}  robust acc {acc:.2%}  run {run_seconds:7.1f} s"
          f"  compile {compile_seconds:5.1f} s", flush=True)
  results["autoattack_accuracy"] = float(jnp.mean(robust))
  results["total_run_seconds"] = total
  print(f"AutoAttack robust accuracy {results['autoattack_accuracy']:.2%}; "
        f"total run time {total:.1f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    # Images, labels and each stage's robust flags: to compare another implementation
    # example by example.
    np.savez_compressed(os.path.splitext(args.out)[0] + "_flags.npz",
                        x=np.asarray(x_test), y=np.asarray(y_test),
                        **{k.replace("-", "_"): v for k, v in flags.items()})


if __name__ == "__main__":
  main()
