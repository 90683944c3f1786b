"""bat_jax's train step vs the PyTorch reference trainer's, from identical weights, data and noise.

The cheap equivalence test of the reference-gap study (benchmarks/README.md):
bat_jax's initial LeNet (config seed) is copied into the PyTorch LeNet of
``reference_trainer_torch.py``; both then train on bat_jax's batches for
``--steps`` steps, each keeping its own weights and Adam state. At every step
the PyTorch attack starts from bat_jax's start point (same random draw), so
every remaining difference is one of computation, not of randomness. Per step:

  * logits of the clean batch (max abs difference),
  * the attack: fraction of pixels where the two x* differ (a sign flip of a
    near-zero gradient moves a pixel by 2 steps), and mean |difference|,
  * loss and parameter gradients at bat_jax's x* (relative L2 error per layer),
  * after the update (both at bat_jax's x*, so that both stay on one
    trajectory): optax's Adam vs PyTorch's (relative parameter difference),
  * the loss of bat_jax's real compiled train step (its own x*, same keys).

Needs bat_jax and torch in one venv (this script, not bat_jax, imports torch):

  python benchmarks/reference_step_check.py --method=trades --eps=0.3 --steps=5 \\
      --out=benchmarks/results/reference_gap/step_check_trades.json
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

# This checkout's bat_jax and configs (not an installed copy), and the trainer next door.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
# pylint: disable=g-import-not-at-top,wrong-import-position
from bat_jax import attacks, input_pipeline, parallel, train
from configs import quickstart
import reference_trainer_torch as ref
# pylint: enable=g-import-not-at-top,wrong-import-position


def make_config(method, eps, seed, ops):
  c = quickstart.get_config()
  c.num_epochs, c.schedule, c.lr_decay_epochs = 10, "step", (6, 8)
  c.attack_steps, c.attack_step_size = 20, 0.8 * eps / 20
  c.eps, c.method, c.seed, c.ops = eps, method, seed, ops
  return c


# Flax LeNet params <-> PyTorch LeNet tensors (written here, independently of
# bat_jax.export): conv HWIO <-> OIHW, dense [in, out] <-> [out, in], and fc1's
# inputs from the NHWC flatten (h, w, c) to the NCHW flatten (c, h, w).


def to_torch_layout(name, leaf, value):
  value = np.array(value, np.float32)  # a writable copy
  if leaf == "bias":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if name == "fc1":
    value = value.reshape(4, 4, 64, -1).transpose(2, 0, 1, 3).reshape(1024, -1)
  return value.T


def load_into_torch(net, params):
  with torch.no_grad():
    for name in ("conv1", "conv2", "fc1", "fc2"):
      module = getattr(net, name)
      module.weight.copy_(torch.from_numpy(to_torch_layout(name, "kernel",
                                                           params[name]["kernel"])))
      module.bias.copy_(torch.from_numpy(to_torch_layout(name, "bias",
                                                         params[name]["bias"])))


def relative_errors(net, params, use_grad):
  """Per-layer ||torch - jax|| / ||jax|| of weights (or of their .grad)."""
  out = {}
  for name in ("conv1", "conv2", "fc1", "fc2"):
    module = getattr(net, name)
    for leaf, tensor in (("kernel", module.weight), ("bias", module.bias)):
      t = (tensor.grad if use_grad else tensor).detach().numpy()
      j = to_torch_layout(name, leaf, params[name][leaf])
      out[f"{name}.{leaf}"] = float(np.linalg.norm(t - j) / max(np.linalg.norm(j), 1e-30))
  return out


def to_nchw(x):
  return torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", default="trades", choices=("at", "trades", "bat"))
  p.add_argument("--eps", type=float, default=0.3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup_steps", type=int, default=0,
                 help="bat_jax-only steps before the comparison (a partly trained "
                 "model; then both optimisers restart)")
  p.add_argument("--ops", default="auto", help="bat_jax's config.ops")
  p.add_argument("--out", default="")
  args = p.parse_args()
  torch.set_num_threads(2)
  config = make_config(args.method, args.eps, args.seed, args.ops)
  objective, start = train.resolved_attack(config)
  images, labels = input_pipeline.load_split("mnist_subset", "train")
  data = input_pipeline.TrainBatches(images, labels, batch_size=config.batch_size,
                                     seed=config.seed, local_device_count=1)
  s = train.setup(config, images.shape[1:], data.steps_per_epoch,
                  config.num_epochs * data.steps_per_epoch)
  par = parallel.Pmap(jax.local_devices()[:1])
  step_fn = par.compile(train.make_train_step(config, s.model, s.tx, s.schedule))
  state = s.state

  net = ref.LeNet()
  load_into_torch(net, state.params)
  opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate)

  @jax.jit
  def jax_attack_and_grads(params, x, y, keys):
    logits_fn = lambda z: s.model.apply({"params": params}, z)
    x0 = attacks.random_start(keys, x, config.eps, start)
    objective_fn = attacks.get_objective(objective)
    first_grad = jax.grad(lambda z: jnp.sum(objective_fn(
        logits_fn(z), y, jax.lax.stop_gradient(logits_fn(x)))))(x0)
    x_adv = attacks.pgd(logits_fn, x, y, eps=config.eps,
                        step_size=config.attack_step_size,
                        num_steps=config.attack_steps, key=keys,
                        objective=objective, start=start)
    def loss_fn(p):
      forward = train._TrainingForward(s.model, p, {})  # pylint: disable=protected-access
      return train.method_loss(config, forward, x, x_adv, y)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return logits_fn(x), x0, first_grad, x_adv, loss, grads

  def torch_first_grad(model, xt, yt, x0t):
    """The attack's first input gradient in PyTorch (any dtype)."""
    with torch.no_grad():
      target = torch.softmax(model(xt), 1)
    z = x0t.clone().requires_grad_(True)
    logits = model(z)
    if objective == "kl":
      cost = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), target,
                                        reduction="sum")
    else:
      cost = torch.nn.functional.cross_entropy(logits, yt, reduction="sum")
    return torch.autograd.grad(cost, z)[0].numpy()

  def sign_agreement(a, b):
    return float(np.mean(np.sign(a) == np.sign(b)))

  rows = []
  for k in range(args.warmup_steps + args.steps):
    batch = data.batch(k)
    if k < args.warmup_steps:  # bat_jax alone, to check a partly trained model
      state = par.get_state(step_fn(par.put_state(state), par.put_batch(batch))[0])
      if k == args.warmup_steps - 1:
        # Both continue from bat_jax's weights with a fresh Adam (moments, count).
        load_into_torch(net, state.params)
        opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
        state = state.replace(opt_state=s.tx.init(state.params))
        print(f"warmed up {k + 1} bat_jax steps; both restart Adam from there", flush=True)
      continue
    x = input_pipeline.to_float(batch["image"][0])
    y = jnp.asarray(batch["label"][0])
    # The attack keys of train.prepare_batch (one per example, device 0).
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.fold_in(state.rng, state.step), jnp.arange(y.shape[0]))
    keys = attacks.fold_in(keys, 0)
    clean_j, x0, grad_j, x_adv_j, loss_j, grads_j = jax_attack_and_grads(
        state.params, x, y, keys)

    xt, yt = to_nchw(x), torch.from_numpy(np.asarray(y, np.int64))
    x0t = to_nchw(x0)
    net.eval()
    with torch.no_grad():
      clean_t = net(xt).numpy()
    # The first attack gradient: float32 in both frameworks vs float64 PyTorch.
    grad_t = torch_first_grad(net, xt, yt, x0t)
    net64 = ref.LeNet().double()
    net64.load_state_dict(net.state_dict())
    grad_64 = torch_first_grad(net64, xt.double(), yt, x0t.double())
    grad_j = np.asarray(grad_j).transpose(0, 3, 1, 2)
    x_adv_t = ref.pgd(net, xt, yt, config.eps, config.attack_step_size,
                      config.attack_steps, objective, x0=x0t)
    diff = np.abs(x_adv_t.numpy() - np.asarray(x_adv_j).transpose(0, 3, 1, 2))
    # PyTorch trains at bat_jax's x* (so that both stay on one trajectory).
    net.train()
    opt.zero_grad()
    loss_t = ref.method_loss(config.method, net, xt, to_nchw(x_adv_j), yt,
                             config.beta, config.num_bridges)
    loss_t.backward()
    grad_err = relative_errors(net, grads_j, use_grad=True)
    opt.step()
    # bat_jax's real compiled train step: its loss (its own x*, same keys).
    _, metrics = step_fn(par.put_state(state), par.put_batch(batch))
    loss_step_j = float(par.get_output(metrics)["train/loss"])
    # bat_jax's optimiser update from the gradients at x* (as the train step does).
    updates, opt_state = s.tx.update(grads_j, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, opt_state=opt_state,
                          params=optax.apply_updates(state.params, updates))
    param_err = relative_errors(net, state.params, use_grad=False)
    row = {"step": k, "logits_max_abs_diff": float(np.abs(clean_t - np.asarray(clean_j)).max()),
           "first_attack_grad_sign_agreement": {
               "jax_f32_vs_torch_f32": sign_agreement(grad_j, grad_t),
               "jax_f32_vs_torch_f64": sign_agreement(grad_j, grad_64),
               "torch_f32_vs_torch_f64": sign_agreement(grad_t, grad_64)},
           "attack_pixels_differing": float(np.mean(diff > 1e-5)),
           "attack_mean_abs_diff": float(diff.mean()),
           "loss_jax_train_step_own_adv": loss_step_j, "loss_jax_at_jax_adv": float(loss_j),
           "loss_torch_at_jax_adv": float(loss_t.detach()),
           "grad_rel_err_max": max(grad_err.values()),
           "param_rel_err_after_step_max": max(param_err.values()),
           "grad_rel_err": grad_err, "param_rel_err_after_step": param_err}
    rows.append(row)
    agree = row["first_attack_grad_sign_agreement"]
    print(f"step {k}: logits |d| {row['logits_max_abs_diff']:.1e} | first attack grad sign "
          f"agreement jax/torch {agree['jax_f32_vs_torch_f32']:.4f}, jax/f64 "
          f"{agree['jax_f32_vs_torch_f64']:.4f}, torch/f64 {agree['torch_f32_vs_torch_f64']:.4f}"
          f" | x* pixels differing {100 * row['attack_pixels_differing']:.2f}% | loss at "
          f"jax x*: jax {float(loss_j):.6f} torch {row['loss_torch_at_jax_adv']:.6f} (train "
          f"step {loss_step_j:.6f}) | grad rel "
          f"err {row['grad_rel_err_max']:.1e} | params rel err after step "
          f"{row['param_rel_err_after_step_max']:.1e}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"method": config.method, "eps": config.eps, "seed": config.seed,
                 "attack": [objective, start], "ops": config.ops,
                 "warmup_steps": args.warmup_steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
