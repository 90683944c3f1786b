"""The per-device train step, fused: inner attack -> forward passes -> loss -> update.

``make_train_step`` returns ``(state, batch) -> (state, metrics)`` written for
one device with collectives over ``parallel.AXIS``; ``bat_jax.parallel``
compiles it with ``pmap`` (or ``jax.jit(jax.shard_map(...))``), so the whole
step, the ``fori_loop`` attack included, is one program. Read top-down:
per-example keys and inputs, the training-mode forward passes, the method's
inner attack (BatchNorm in inference mode), the step (with AWP's weight
perturbation when ``config.awp_gamma > 0``), and the probe of gradient
diagnostics (paper Figures 4, 6, 7).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from bat_jax import attacks, awp, diagnostics, input_pipeline, losses, methods, parallel
from bat_jax import train_state as train_state_lib
from bat_jax.train_state import TrainState

AXIS = parallel.AXIS


def example_keys(key, per_device_batch: int):
  """One key per example of this device's share, from its global batch position."""
  positions = jax.lax.axis_index(AXIS) * per_device_batch + jnp.arange(per_device_batch)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, positions)


def prepare_batch(config, state: TrainState, batch):
  """Float inputs (augmented if configured), labels and per-example attack keys.

  One key per example from its global position in the batch: random starts
  and augmentations do not depend on how the batch is split across devices.
  """
  keys = example_keys(jax.random.fold_in(state.rng, state.step),
                      batch["label"].shape[0])
  x = input_pipeline.to_float(batch["image"])
  if config.augment:
    augment_keys = attacks.fold_in(keys, 1)
    x = jax.vmap(lambda k, image: input_pipeline.augment(k, image[None])[0])(
        augment_keys, x)
  return x, batch["label"], attacks.fold_in(keys, 0)


class TrainingForward:
  """Training-mode forward passes that thread BatchNorm statistics in order.

  By default each input is its own forward pass, which updates the running
  statistics, as each ``model(x)`` call of the PyTorch reference does (m + 1
  updates per step for BAT). With ``fused=True``, :meth:`many` concatenates
  its inputs into one pass: identical for models without BatchNorm and
  faster; with BatchNorm the batch statistics are those of the joint batch
  and the running statistics are updated once. Trace-time only.
  """

  def __init__(self, model, params, batch_stats, fused: bool = False):
    self.model, self.params, self.batch_stats = model, params, batch_stats
    self.fused = fused

  def __call__(self, x):
    if not self.batch_stats:
      return self.model.apply({"params": self.params}, x, train=True)
    logits, updates = self.model.apply(
        {"params": self.params, "batch_stats": self.batch_stats}, x, train=True,
        mutable=["batch_stats"])
    self.batch_stats = updates["batch_stats"]
    return logits

  def many(self, xs):
    """Logits of each input of ``xs``, in order."""
    if not self.fused:
      return [self(x) for x in xs]
    return jnp.split(self(jnp.concatenate(xs)), len(xs))


def training_attack(config, model, state: TrainState, x, labels, keys):
  """The method's inner maximisation, with BatchNorm in inference mode."""
  if not methods.get(config.method).attack_objective:
    return x
  objective, start = methods.resolved_attack(config)
  variables = state.inference_variables()
  return attacks.pgd(lambda z: model.apply(variables, z, train=False), x, labels,
                     eps=config.eps, step_size=config.attack_step_size,
                     num_steps=config.attack_steps, key=keys,
                     objective=objective, start=start, norm=config.norm)


def make_train_step(config, model, tx, schedule,
                    steps_per_epoch: Optional[int] = None) -> Callable:
  """The per-device step ``(state, batch) -> (state, metrics)``.

  ``batch`` is this device's share: uint8 ``image`` [b, H, W, C], ``label`` [b].
  With ``config.awp_gamma > 0`` the gradient is taken at the weights moved by
  :func:`weight_perturbation` (from epoch ``config.awp_warmup_epochs``, which
  ``steps_per_epoch`` turns into a step).
  """
  method_loss = methods.get(config.method).loss
  awp_start = (awp.start_step(config.awp_warmup_epochs, steps_per_epoch)
               if config.awp_gamma > 0 else None)

  def train_step(state: TrainState, batch):
    x, labels, attack_keys = prepare_batch(config, state, batch)
    x_adv = training_attack(config, model, state, x, labels, attack_keys)

    def loss_fn(params):
      forward = TrainingForward(model, params, state.batch_stats, config.fused_forward)
      loss, aux, logits = method_loss(config, forward, x, x_adv, labels)
      return loss, (aux, logits, forward.batch_stats)

    at_params, awp_metrics = state.params, {}
    if config.awp_gamma > 0:
      perturbation, active = weight_perturbation(config, state, loss_fn, awp_start)
      at_params = awp.add(state.params, perturbation)
      awp_metrics["train/awp_active"] = active
    (loss, (aux, logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(at_params)
    grads = jax.lax.pmean(grads, AXIS)
    # BatchNorm already normalises with cross-device statistics (bn_axis_name);
    # averaging keeps the running statistics bit-identical on every device.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    # At the perturbed weights, as the AWP reference steps its optimiser there
    # (coupled weight decay sees w + v); the update then moves the weights w.
    updates, opt_state = tx.update(grads, state.opt_state, at_params)
    params = optax.apply_updates(state.params, updates)

    metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in aux.items()}}
    for name, z in logits.items():
      metrics[f"train/{name}_acc"] = jnp.mean(jnp.argmax(z, -1) == labels)
    metrics = jax.lax.pmean(metrics, AXIS)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    # 1.0 when the new state is finite everywhere: a checkpoint is never written
    # from a non-finite state, and divergence is reported at the step it happens.
    metrics["train/finite"] = _all_finite((loss, params, batch_stats)).astype(jnp.float32)
    metrics["train/learning_rate"] = schedule(state.step)
    metrics.update(awp_metrics)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    if config.ema_decay > 0:  # the weight average, after the update
      decay = train_state_lib.ema_decay_at(config.ema_decay, state.step)
      new_state = new_state.replace(ema=train_state_lib.update_ema(
          state.ema, new_state.inference_variables(), decay))
      metrics["train/ema_decay"] = decay
    return new_state, metrics

  return train_step


def weight_perturbation(config, state: TrainState, loss_fn, start_step: int):
  """AWP's perturbation of ``state.params`` and whether it is on (1.0) at this step.

  The gradient of the method's loss at the weights, over the global batch,
  rescaled per kernel (``awp.perturbation``); the forward passes' BatchNorm
  updates are dropped, as the reference's proxy model drops them. Before
  ``start_step`` (the warm-up) the perturbation is zero and not computed.
  """
  def perturbation(params):
    grads = jax.grad(lambda p: loss_fn(p)[0])(params)
    return awp.perturbation(params, jax.lax.pmean(grads, AXIS), config.awp_gamma)

  if start_step <= 0:
    return perturbation(state.params), jnp.float32(1.0)
  active = state.step >= start_step  # the same on every device
  return (jax.lax.cond(active, perturbation, awp.zeros, state.params),
          active.astype(jnp.float32))


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_diagnostics_step(config, model) -> Callable:
  """``(state, batch) -> diagnostics`` of paper Figures 4, 6, 7 on a probe batch.

  Each component of the method's loss (``aux``: CE, KL / bridge KL, ...; not
  those its registry entry leaves out, ``Method.diagnostic_exclude``) and
  the total are compared, through their parameter gradients, with the
  gradient of the mean margin ``M(x)`` (``diagnostics.gradient_diagnostics``).
  Forward passes run in training mode; their BatchNorm updates are dropped.
  The gradients are taken at the weights themselves, without AWP's perturbation.
  """
  method = methods.get(config.method)
  method_loss = method.loss

  def diagnostics_step(state: TrainState, batch):
    x, labels, attack_keys = prepare_batch(config, state, batch)
    x_adv = training_attack(config, model, state, x, labels, attack_keys)

    def loss_and_aux(params):
      forward = TrainingForward(model, params, state.batch_stats)
      loss, aux, _ = method_loss(config, forward, x, x_adv, labels)
      return loss, aux

    def mean_margin(params):
      forward = TrainingForward(model, params, state.batch_stats)
      return jnp.mean(losses.margin(forward(x), labels))

    names = [k for k in loss_and_aux(state.params)[1]
             if k not in method.diagnostic_exclude]
    terms = {k: (lambda p, k=k: loss_and_aux(p)[1][k]) for k in names}
    diag = diagnostics.gradient_diagnostics(terms, lambda p: loss_and_aux(p)[0],
                                            mean_margin, state.params)
    return jax.lax.pmean({f"diag/{k}": v for k, v in diag.items()}, AXIS)

  return diagnostics_step
