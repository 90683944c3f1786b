"""The train state and what builds it: the model, the optimiser and its schedule.

One pytree (:class:`TrainState`) holds everything that changes in training
and is checkpointed whole; :func:`setup` builds the config's model, the
optimiser with its learning-rate schedule (docs/ALGORITHMS.md, "Settings") and
a fresh state. Used by the trainer and by everything that restores a run.
"""

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bat_jax import configlib, cpu, datasets, models, parallel


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; one pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  batch_stats: Any  # {} for models without BatchNorm.
  opt_state: Any
  rng: jax.Array  # the root key; step keys are fold_in(rng, step).
  # The weight average (config.ema_decay > 0): {'params', 'batch_stats'?}, the
  # inference variables of the averaged model. None when off: no leaves, so the
  # checkpoints of runs without it keep their layout.
  ema: Any = None

  def inference_variables(self):
    """``{'params', 'batch_stats'?}`` for ``model.apply(..., train=False)``."""
    variables = {"params": self.params}
    if self.batch_stats:
      variables["batch_stats"] = self.batch_stats
    return variables

  def evaluated_variables(self):
    """The variables a run evaluates: the weight average when kept, else the raw ones."""
    return self.ema if self.ema is not None else self.inference_variables()


def ema_decay_at(decay: float, step):
  """The averaging decay at step ``step`` (the count before the update).

  ``min(decay, (1 + t) / (10 + t))``: the warm-up of Gowal et al. 2020 and
  DeepMind's adversarial_robustness, so early averages forget the random init.
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema, variables, decay):
  """``decay * ema + (1 - decay) * variables``, leaf by leaf."""
  return jax.tree_util.tree_map(lambda a, v: decay * a + (1.0 - decay) * v, ema, variables)


def build_model(config: ml_collections.ConfigDict,
                bn_axis_name: Optional[str] = parallel.AXIS):
  """The config's model; BatchNorm statistics are synced over ``bn_axis_name``.

  Its layers are chosen here, once: ``config.ops`` names the stock Flax ones or
  ``bat_jax.cpu``'s (``cpu.layers_for``: 'auto' takes the latter on the CPU backend).
  ``config.activation`` sets the nonlinearity of the models that have one.
  """
  info = datasets.get_dataset_info(config.dataset)
  kwargs = {}
  if models.has_batch_norm(config.model):
    kwargs["bn_axis_name"] = bn_axis_name
  return models.create_model(
      config.model, info.num_classes,
      mean=info.mean if config.normalize else None,
      std=info.std if config.normalize else None,
      dtype=jnp.dtype(config.dtype), layers=cpu.layers_for(config.ops),
      activation=config.get("activation", "relu"), **kwargs)


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int):
  """Constant, step decay, one-cycle (triangular) or cosine."""
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "step":
    boundaries = {int(e * steps_per_epoch): config.lr_decay_factor
                  for e in config.lr_decay_epochs}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if config.schedule == "onecycle":
    return lambda step: lr * onecycle_fraction(step, total_steps)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  raise configlib.ConfigError(f"config.schedule={config.schedule!r} is unknown.")


def onecycle_fraction(step, total_steps: int):
  """PyTorch's ``CyclicLR`` triangle over one cycle of ``total_steps``: 0 -> 1 -> 0.

  ``CyclicLR(base_lr=0, max_lr=lr, step_size_up=step_size_down=total_steps/2)``,
  as the reference builds it, scales the step-``t`` update by this (the
  half-cycle is ``total_steps / 2``, a float for an odd length).
  """
  x = jnp.asarray(step) / max(total_steps, 1)
  return jnp.where(x <= 0.5, 2.0 * x, 2.0 * (1.0 - x))


def momentum_schedule(config, total_steps: int):
  """SGD's momentum: cycling max -> base -> max with onecycle, else constant.

  ``CyclicLR``'s ``cycle_momentum`` (on by default, base 0.8, max 0.9): the
  momentum falls as the learning rate rises, ``max - (max - base) * fraction``.
  """
  top, low = config.momentum, config.base_momentum
  if config.schedule == "onecycle" and config.cycle_momentum and top > 0:
    return lambda step: top - (top - low) * onecycle_fraction(step, total_steps)
  return top


def make_optimizer(config, schedule, total_steps: int = 1) -> optax.GradientTransformation:
  """Adam, or SGD with momentum and PyTorch-style (coupled) weight decay.

  SGD's momentum buffer follows PyTorch (``buf = momentum * buf + grad``, the
  first step's ``buf = grad``), with the momentum of :func:`momentum_schedule`.
  """
  if config.optimizer == "adam":
    tx = optax.adam(schedule)
    if config.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx
  momentum = momentum_schedule(config, total_steps)
  if callable(momentum):
    sgd = optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))(
        learning_rate=schedule, momentum=momentum, nesterov=config.nesterov)
  else:
    sgd = optax.sgd(schedule, momentum=momentum or None, nesterov=config.nesterov)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)


def init_state(config, model, tx, image_shape) -> TrainState:
  """A fresh train state from ``config.seed`` (the same on every host)."""
  root = jax.random.PRNGKey(config.seed)
  init_key, train_key = jax.random.split(root)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  @jax.jit
  def init(key):
    # The init runs outside any parallel axis: build the model without one.
    variables = without_axis(model).init(key, dummy, train=False)
    params = variables["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}),
                       opt_state=tx.init(params), rng=train_key)
    if config.ema_decay > 0:  # the average starts at the initial weights
      state = state.replace(ema=state.inference_variables())
    return state

  return init(init_key)


def without_axis(model):
  """``model`` with no cross-device BatchNorm axis (callable outside a parallel map)."""
  return model.clone(bn_axis_name=None) if hasattr(model, "bn_axis_name") else model


class Setup(NamedTuple):
  model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  state: TrainState


def setup(config, image_shape, steps_per_epoch: int, total_steps: int) -> Setup:
  """The model, optimiser, lr schedule and a fresh state for ``config``."""
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule, total_steps)
  model = build_model(config)
  return Setup(model, tx, schedule, init_state(config, model, tx, image_shape))


def abstract_state(config) -> TrainState:
  """The shapes of ``config``'s train state, without computing it (for restoring)."""
  model = build_model(config, bn_axis_name=None)
  tx = make_optimizer(config, learning_rate_schedule(config, 1, 1), 1)
  image_shape = datasets.get_dataset_info(config.dataset).image_shape
  return jax.eval_shape(lambda: init_state(config, model, tx, image_shape))
