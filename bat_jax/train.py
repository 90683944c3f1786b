"""The trainer: one fused, device-parallel train step for every method.

Read top-down:
  1. the train state and the optimiser (SPEC.md section 4),
  2. the per-device train step: inner attack (``fori_loop`` PGD, BatchNorm in
     inference mode) -> training-mode forward passes -> loss from
     ``bat_jax.losses`` -> gradients ``pmean``-ed over devices -> optax update,
  3. the per-device evaluation step (clean and PGD accuracy, masked, ``psum``),
  4. ``train_and_evaluate(config, workdir)``: data, auto-resume, the loop,
     periodic evaluation, early stopping, checkpoints and metrics,
  5. ``restore_model(workdir, which)`` for evaluation and analysis.

Both steps are written per device and compiled by ``bat_jax.parallel`` (pmap
by default, or ``jax.jit(jax.shard_map(...))``).
"""

import contextlib
import math
import signal
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bat_jax import attacks, checkpointing, configlib, input_pipeline, losses
from bat_jax import models, parallel, rundir
from bat_jax.errors import DivergenceError
from bat_jax.metrics_writer import MetricWriter

AXIS = parallel.AXIS

# Incremented each time a step function is traced (tests assert "compiles once").
TRACE_COUNTS: Dict[str, int] = {}


def _count_trace(name: str) -> None:
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


# --------------------------------------------------------------------------
# 1. State, model, optimiser.
# --------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; one pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  batch_stats: Any  # {} for models without BatchNorm.
  opt_state: Any
  rng: jax.Array  # the root key; step keys are fold_in(rng, step).


def build_model(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = AXIS):
  """The config's model; BatchNorm statistics are synced over ``bn_axis_name``."""
  info = input_pipeline.get_dataset_info(config.dataset)
  kwargs = {}
  if models.has_batch_norm(config.model):
    kwargs["bn_axis_name"] = bn_axis_name
  return models.create_model(
      config.model, info.num_classes,
      mean=info.mean if config.normalize else None,
      std=info.std if config.normalize else None,
      dtype=jnp.dtype(config.dtype), ops=config.ops, **kwargs)


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int):
  """SPEC.md section 4: constant, step decay, one-cycle (triangular) or cosine."""
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "step":
    boundaries = {int(e * steps_per_epoch): config.lr_decay_factor
                  for e in config.lr_decay_epochs}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if config.schedule == "onecycle":
    # The reference's cyclic lr: 0 -> max at half of training -> 0 at the end.
    half = max(total_steps // 2, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, half),
         optax.linear_schedule(lr, 0.0, max(total_steps - half, 1))], [half])
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  raise configlib.ConfigError(f"config.schedule={config.schedule!r} is unknown.")


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """Adam, or SGD with momentum and PyTorch-style (coupled) weight decay."""
  if config.optimizer == "adam":
    tx = optax.adam(schedule)
    if config.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None,
                nesterov=config.nesterov))


def init_state(config, model, tx, image_shape) -> TrainState:
  """A fresh train state from ``config.seed`` (the same on every host)."""
  root = jax.random.PRNGKey(config.seed)
  init_key, train_key = jax.random.split(root)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  @jax.jit
  def init(key):
    # The init runs outside any parallel axis: build the model without one.
    variables = model.clone(**_no_axis(model)).init(key, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=train_key)

  return init(init_key)


def _no_axis(model) -> dict:
  return {"bn_axis_name": None} if hasattr(model, "bn_axis_name") else {}


class Setup(NamedTuple):
  model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  state: TrainState


def setup(config, image_shape, steps_per_epoch: int, total_steps: int) -> Setup:
  """The model, optimiser, lr schedule and a fresh state for ``config``."""
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)
  model = build_model(config)
  return Setup(model, tx, schedule, init_state(config, model, tx, image_shape))


def resolved_attack(config) -> Tuple[str, str]:
  """(objective, start) of the training attack: the config's, else the defaults.

  The objective defaults to the method's; the start to the objective's
  (``configlib.DEFAULT_START``: 'kl' -> TPGD's 'normal', 'ce' -> 'uniform').
  """
  objective = config.attack_objective or configlib.DEFAULT_ATTACK[config.method][0]
  return objective, config.attack_start or configlib.DEFAULT_START[objective]


# --------------------------------------------------------------------------
# 2. The per-device train step.
# --------------------------------------------------------------------------


def example_keys(key, per_device_batch: int):
  """One key per example of this device's share, from its global batch position."""
  positions = jax.lax.axis_index(AXIS) * per_device_batch + jnp.arange(per_device_batch)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, positions)


class _TrainingForward:
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


def method_loss(config, forward: Callable, x, x_adv, labels):
  """The objective of ``config.method`` (SPEC.md section 1) -> (loss, aux, logits)."""
  method, beta = config.method, config.beta
  stop = config.stop_gradient_target
  if method == "standard":
    clean = forward(x)
    loss, aux = losses.standard_loss(clean, labels)
    return loss, aux, {"clean": clean}
  if method == "at":
    adv = forward(x_adv)
    loss, aux = losses.at_loss(adv, labels)
    return loss, aux, {"adv": adv}
  if method == "bat":
    points = losses.bridge_points(x, x_adv, config.num_bridges)
    clean, *bridges = forward.many([x] + [points[k] for k in range(config.num_bridges)])
    bridge_logits = jnp.stack(bridges)
    loss, aux = losses.bat_loss(clean, bridge_logits, labels, beta, stop)
    return loss, aux, {"clean": clean, "adv": bridge_logits[-1]}
  clean, adv = forward.many([x, x_adv])
  objective = losses.trades_loss if method == "trades" else losses.mart_loss
  loss, aux = objective(clean, adv, labels, beta, stop)
  return loss, aux, {"clean": clean, "adv": adv}


def inference_variables(state: TrainState) -> Dict[str, Any]:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


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


def training_attack(config, model, state: TrainState, x, labels, keys):
  """The method's inner maximisation, with BatchNorm in inference mode."""
  if config.method == "standard":
    return x
  objective, start = resolved_attack(config)
  variables = inference_variables(state)
  return attacks.pgd(lambda z: model.apply(variables, z, train=False), x, labels,
                     eps=config.eps, step_size=config.attack_step_size,
                     num_steps=config.attack_steps, key=keys,
                     objective=objective, start=start)


def make_train_step(config, model, tx, schedule) -> Callable:
  """The per-device step ``(state, batch) -> (state, metrics)``.

  ``batch`` is this device's share: uint8 ``image`` [b, H, W, C], ``label`` [b].
  """

  def train_step(state: TrainState, batch):
    _count_trace("train_step")
    x, labels, attack_keys = prepare_batch(config, state, batch)
    x_adv = training_attack(config, model, state, x, labels, attack_keys)

    def loss_fn(params):
      forward = _TrainingForward(model, params, state.batch_stats,
                                 config.fused_forward)
      loss, aux, logits = method_loss(config, forward, x, x_adv, labels)
      return loss, (aux, logits, forward.batch_stats)

    (loss, (aux, logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    # BatchNorm already normalises with cross-device statistics (bn_axis_name);
    # averaging keeps the running statistics bit-identical on every device.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
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
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_diagnostics_step(config, model) -> Callable:
  """``(state, batch) -> diagnostics`` of paper Figures 4, 6, 7 on a probe batch.

  Each component of the method's loss (``aux``: CE, KL / bridge KL, ...) and
  the total are compared, through their parameter gradients, with the
  gradient of the mean margin ``M(x)`` (``analysis.gradient_diagnostics``).
  Forward passes run in training mode; their BatchNorm updates are dropped.
  """
  from bat_jax import analysis  # pylint: disable=g-import-not-at-top

  def diagnostics_step(state: TrainState, batch):
    x, labels, attack_keys = prepare_batch(config, state, batch)
    x_adv = training_attack(config, model, state, x, labels, attack_keys)

    def loss_and_aux(params):
      forward = _TrainingForward(model, params, state.batch_stats)
      loss, aux, _ = method_loss(config, forward, x, x_adv, labels)
      return loss, aux

    def mean_margin(params):
      forward = _TrainingForward(model, params, state.batch_stats)
      return jnp.mean(losses.margin(forward(x), labels))

    names = [k for k in loss_and_aux(state.params)[1] if k != "kl_last_bridge"]
    terms = {k: (lambda p, k=k: loss_and_aux(p)[1][k]) for k in names}
    diag = analysis.gradient_diagnostics(terms, lambda p: loss_and_aux(p)[0],
                                         mean_margin, state.params)
    return jax.lax.pmean({f"diag/{k}": v for k, v in diag.items()}, AXIS)

  return diagnostics_step


# --------------------------------------------------------------------------
# 3. The per-device evaluation step.
# --------------------------------------------------------------------------


def make_eval_step(config, model, num_attack_steps: int) -> Callable:
  """``(state, batch) -> sums`` of clean and PGD-k correct counts over real examples.

  PGD here is PGD-CE with a uniform start and ``config.eval_attack_step_size``;
  the padded examples of a last partial batch are masked out.
  """

  def eval_step(state: TrainState, batch):
    _count_trace(f"eval_step_{num_attack_steps}")
    variables = inference_variables(state)
    logits_fn = lambda z: model.apply(variables, z, train=False)
    x = input_pipeline.to_float(batch["image"])
    labels, mask = batch["label"], batch["mask"]
    key = example_keys(jax.random.PRNGKey(config.seed + 1), labels.shape[0])
    x_adv = attacks.pgd(logits_fn, x, labels, eps=config.eps,
                        step_size=config.eval_attack_step_size,
                        num_steps=num_attack_steps, key=key)
    correct = lambda z: jnp.sum((jnp.argmax(logits_fn(z), -1) == labels) & mask)
    sums = {"clean_correct": correct(x), "pgd_correct": correct(x_adv),
            "count": jnp.sum(mask)}
    return jax.lax.psum(sums, AXIS)

  return eval_step


def _run_eval(compiled_eval, par, state_on_device, batches) -> Dict[str, float]:
  totals = {"clean_correct": 0, "pgd_correct": 0, "count": 0}
  for batch in batches:
    sums = par.get_output(compiled_eval(state_on_device, par.put_batch(batch)))
    for k in totals:
      totals[k] += int(sums[k])
  count = max(totals["count"], 1)
  return {"clean_acc": totals["clean_correct"] / count,
          "pgd_acc": totals["pgd_correct"] / count, "count": totals["count"]}


# --------------------------------------------------------------------------
# 4. Training and evaluation.
# --------------------------------------------------------------------------


class Data(NamedTuple):
  train: Any  # input_pipeline.TrainBatches
  test_images: np.ndarray
  test_labels: np.ndarray
  image_shape: Tuple[int, ...]


def load_data(config, par) -> Data:
  """Train batches (host-sharded, resumable) and the evaluation split."""
  data_dir = config.data_dir or None
  train_x, train_y = input_pipeline.load_split(
      config.dataset, "train", data_dir=data_dir,
      num_examples=config.num_train_examples if config.num_train_examples > 0 else None)
  test_x, test_y = input_pipeline.load_split(
      config.dataset, "test", data_dir=data_dir,
      num_examples=config.num_eval_examples if config.num_eval_examples > 0 else None)
  extra_x = extra_y = None
  if config.extra_data_path:
    info = input_pipeline.get_dataset_info(config.dataset)
    extra_x, extra_y = input_pipeline.load_extra_npz(
        config.extra_data_path, image_shape=info.image_shape,
        num_classes=info.num_classes)
  train = input_pipeline.TrainBatches(
      train_x, train_y, batch_size=config.batch_size, seed=config.seed,
      extra_images=extra_x, extra_labels=extra_y,
      extra_fraction=config.extra_fraction if extra_x is not None else 0.0,
      local_device_count=len(par.devices))
  return Data(train, test_x, test_y, tuple(train_x.shape[1:]))


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


# Loss this many times its first logged value (and above 100) looks like divergence.
EXPLODING_LOSS_FACTOR = 100.0


class _StepMetrics:
  """Per-step device metrics, fetched lazily (at log and checkpoint steps only).

  Fetching checks every step's ``train/finite`` flag, so divergence is
  reported at the step it happened, before any checkpoint of that state.
  """

  def __init__(self, par):
    self.par = par
    self._pending: List[Tuple[int, Any]] = []
    self._fetched: List[Tuple[int, Dict[str, float]]] = []
    self.first_loss: Optional[Tuple[int, float]] = None
    self.warned_exploding = False

  def add(self, step: int, device_metrics) -> None:
    self._pending.append((step, device_metrics))

  def fetch(self, last_checkpoint: Optional[int], config) -> None:
    """Moves pending metrics to the host; DivergenceError at the first bad step."""
    for step, device_metrics in self._pending:
      values = {k: float(v) for k, v in
                jax.device_get(self.par.get_output(device_metrics)).items()}
      if values.get("train/finite", 1.0) < 1.0 or not math.isfinite(values["train/loss"]):
        raise DivergenceError(_divergence_message(step, values, last_checkpoint, config))
      self._fetched.append((step, values))
    self._pending = []

  def take_average(self, last_checkpoint: Optional[int], config) -> Dict[str, float]:
    """The mean of every metric since the last call; warns once if the loss explodes."""
    self.fetch(last_checkpoint, config)
    records = [values for _, values in self._fetched]
    averaged = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
    averaged.pop("train/finite", None)
    step, loss = self._fetched[-1][0], averaged["train/loss"]
    self._fetched = []
    if self.first_loss is None:
      self.first_loss = (step, loss)
    elif (not self.warned_exploding and abs(loss) > 100
          and abs(loss) > EXPLODING_LOSS_FACTOR * abs(self.first_loss[1])):
      self.warned_exploding = True
      logging.warning(
          "Training loss %.3g at step %d is over %dx its value at step %d (%.3g): "
          "training is probably diverging; consider a lower config.learning_rate "
          "(now %g).", loss, step, EXPLODING_LOSS_FACTOR, self.first_loss[0],
          self.first_loss[1], config.learning_rate)
    return averaged


def _divergence_message(step: int, values: Dict[str, float],
                        last_checkpoint: Optional[int], config) -> str:
  shown = {k: values[k] for k in ("train/loss", "train/grad_norm") if k in values}
  if last_checkpoint is None:
    saved = "no checkpoint was written yet, so a rerun starts over"
  else:
    saved = (f"the last checkpoint, step {last_checkpoint}, was checked finite when "
             "saved and is intact")
  return (f"training diverged: the state became non-finite at step {step} "
          f"({shown}). Nothing non-finite was saved; {saved}. Lower "
          f"config.learning_rate (now {config.learning_rate:g}) or check the data, "
          "then start over in a new --workdir, or continue this run with "
          "`--allow_config_changes=learning_rate`.")


class _Preemption:
  """Stops the loop at a step boundary, checkpointed, on preemption or Ctrl-C.

  One host: SIGTERM and a first Ctrl-C set a flag (a second Ctrl-C
  interrupts at once). Several hosts must stop at the same step, or the others
  wait forever in the next step's collectives: there JAX's own preemption
  notice is used (``multihost_utils.reached_preemption_sync_point``), which
  every host reaches at the same step, and no Python handler is installed.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.reason = ""
    self._flag = False
    self._previous = {}

  def __enter__(self):
    for sig in () if self.multihost else self._SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler, no flag
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self._flag = True
    self.reason = signal.Signals(signum).name
    if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT,
                                                      signal.default_int_handler))

  def requested(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = "preemption notice"
        return True
      return False
    return self._flag

  def __exit__(self, *_):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       max_steps_this_run: Optional[int] = None,
                       allow_config_changes: Sequence[str] = ()) -> Dict[str, Any]:
  """Trains ``config.method`` and evaluates it; resumes from ``workdir`` if it can.

  Before anything is written, the workdir is claimed (``bat_jax.rundir``):
  locked against a second trainer and, if it holds checkpoints, checked to
  belong to this config (``allow_config_changes`` names fields that may
  differ anyway, e.g. ``learning_rate`` after a divergence).
  ``max_steps_this_run`` stops (after checkpointing) once this call has run
  that many steps, for time-sliced jobs; a later call resumes exactly.
  Returns the final evaluation ({'clean_acc', 'pgd_acc', ...}; None when
  stopped early), the step, ``stopped`` (the reason, or None) and the final
  state.
  """
  par = parallel.make(config.parallel)
  configlib.validate(config, num_devices=len(par.devices) * jax.process_count())
  rundir.prepare(workdir)
  lock = (rundir.workdir_lock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    has_checkpoint = checkpointing.has_checkpoint(workdir)
    rundir.check_and_write_config(workdir, config, has_checkpoint,
                                  allow_changes=allow_config_changes,
                                  write=jax.process_index() == 0)
    return _train(config, workdir, par, has_checkpoint, max_steps_this_run)


def _train(config, workdir: str, par, has_checkpoint: bool,
           max_steps_this_run: Optional[int]) -> Dict[str, Any]:
  """The loop of :func:`train_and_evaluate`, in a claimed workdir."""
  is_chief = jax.process_index() == 0
  data = load_data(config, par)
  steps_per_epoch = data.train.steps_per_epoch
  total_steps = total_train_steps(config, steps_per_epoch)
  configlib.check_schedule_fits(config, steps_per_epoch, total_steps)
  model, tx, schedule, state = setup(config, data.image_shape, steps_per_epoch,
                                     total_steps)
  ckpts = checkpointing.Checkpoints(workdir)
  meta = {"best_pgd_acc": -1.0, "best_step": -1, "evaluated_step": 0}
  if has_checkpoint:
    state, restored_meta = ckpts.restore("last", state)
    meta.update(restored_meta)
    logging.info("Resumed from %s at step %d.", workdir, int(state.step))
  start_step = int(state.step)
  rundir.check_length(config, total_steps, start_step)
  last_checkpoint = start_step if has_checkpoint else None
  # Runs saved before `evaluated_step` existed evaluated every step they saved.
  meta.setdefault("evaluated_step", start_step)

  train_step = par.compile(make_train_step(config, model, tx, schedule),
                           donate_state=True)
  eval_step = par.compile(make_eval_step(config, model, config.eval_attack_steps))
  stop_step = par.compile(make_eval_step(config, model,
                                         config.early_stopping_attack_steps))
  diagnostics_step = (par.compile(make_diagnostics_step(config, model))
                      if config.diagnostics_every_steps > 0 else None)
  eval_every = max(int(config.eval_every_epochs * steps_per_epoch), 1)
  is_eval_step = lambda done: done % eval_every == 0 or done == total_steps
  writer = MetricWriter(workdir, enabled=is_chief)
  device_state = par.put_state(state)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())

  # Records the interrupted run logged after its checkpoint are logged again below.
  reevaluate = start_step > 0 and is_eval_step(start_step) and (
      meta["evaluated_step"] < start_step)

  def keep(record):
    step = record.get("step", 0)
    if step != start_step:
      return step < start_step
    if any(k.startswith("diag/") for k in record):
      return False
    return not (reevaluate and any(k.startswith("eval/") for k in record))

  dropped = writer.rewind(keep)
  if dropped:
    logging.info("Dropped %d metrics records logged after step %d's checkpoint.",
                 dropped, start_step)

  def evaluate(device_state):
    batches = input_pipeline.eval_batches(data.test_images, data.test_labels,
                                          config.eval_batch_size, len(par.devices),
                                          **hosts)
    return _run_eval(eval_step, par, device_state, batches)

  def first_batch_pgd(device_state):
    """The paper's early-stopping metric: PGD-10 accuracy on the first test batch."""
    n = config.batch_size
    first = next(iter(input_pipeline.eval_batches(
        data.test_images[:n], data.test_labels[:n], n, len(par.devices), **hosts)))
    return _run_eval(stop_step, par, device_state, [first])["pgd_acc"]

  def save(which, device_state, meta):
    step = int(par.get_output(device_state.step))
    ckpts.save(which, step, par.get_state(device_state), meta)
    return step

  last_eval = None

  def evaluate_and_select(done, device_state):
    """Periodic evaluation and early stopping, after the step's checkpoint."""
    nonlocal meta, last_eval
    results = evaluate(device_state)
    last_eval = (done, results)
    record = {"eval/clean_acc": results["clean_acc"], "eval/pgd_acc": results["pgd_acc"]}
    meta = dict(meta, evaluated_step=done)
    if config.early_stopping:
      stop_acc = first_batch_pgd(device_state)
      record["eval/early_stopping_pgd_acc"] = stop_acc
      if stop_acc > meta["best_pgd_acc"]:
        meta.update(best_pgd_acc=stop_acc, best_step=done)
        save("best", device_state, meta)
    writer.write(done, {"epoch": done / steps_per_epoch, **record})
    logging.info("step %d: clean acc %.4f, PGD-%d acc %.4f", done,
                 results["clean_acc"], config.eval_attack_steps, results["pgd_acc"])

  if reevaluate:  # the interrupted run saved this step but did not evaluate it
    evaluate_and_select(start_step, device_state)

  step_metrics = _StepMetrics(par)
  stopped = None
  timer, timer_step = time.time(), start_step
  with _Preemption() as preemption:
    for step, batch in zip(range(start_step, total_steps),
                           data.train.batches(start_step=start_step)):
      device_batch = par.put_batch(batch)
      if diagnostics_step is not None and step % config.diagnostics_every_steps == 0:
        diag = jax.device_get(par.get_output(diagnostics_step(device_state, device_batch)))
        writer.write(step, {"epoch": step / steps_per_epoch,
                            **{k: float(v) for k, v in diag.items()}})
      device_state, metrics = train_step(device_state, device_batch)
      if config.parallel == "shard_map":
        jax.block_until_ready(metrics)
      done = step + 1
      step_metrics.add(done, metrics)
      if done % config.log_every_steps == 0 or done == total_steps:
        averaged = step_metrics.take_average(last_checkpoint, config)
        rate = (done - timer_step) / max(time.time() - timer, 1e-9)
        timer, timer_step = time.time(), done
        writer.write(done, {"epoch": done / steps_per_epoch, **averaged,
                            "steps_per_sec": rate})
        eta = (total_steps - done) / max(rate, 1e-9)
        logging.info("step %d/%d | %.2f steps/s | ETA %s | loss %.4f", done,
                     total_steps, rate, _format_seconds(eta), averaged["train/loss"])
      # Asked once per step: on several hosts this is a collective sync point.
      sliced = max_steps_this_run is not None and done - start_step >= max_steps_this_run
      stop = (preemption.requested(done) or sliced) and done < total_steps
      if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
        step_metrics.fetch(last_checkpoint, config)
        last_checkpoint = save("last", device_state, meta)
      if stop:
        stopped = preemption.reason or "max_steps_this_run"
        logging.warning("Stopping at step %d (%s); checkpointed, resume from the "
                        "workdir.", done, stopped)
        break
      if is_eval_step(done):
        evaluate_and_select(done, device_state)

  steps_done = int(par.get_output(device_state.step))
  if stopped:  # evaluation waits for the resumed run
    final = {"clean_acc": None, "pgd_acc": None, "count": 0}
  elif last_eval is not None and last_eval[0] == steps_done:
    final = last_eval[1]
  else:
    final = evaluate(device_state)
  ckpts.close()
  writer.close()
  return {"clean_acc": final["clean_acc"], "pgd_acc": final["pgd_acc"],
          "num_eval_examples": final["count"], "best_step": meta["best_step"],
          "steps": steps_done, "stopped": stopped,
          "final_state": par.get_state(device_state)}


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------
# 5. Restoring a trained model.
# --------------------------------------------------------------------------


class RestoredModel(NamedTuple):
  config: ml_collections.ConfigDict
  model: Any  # a Flax module without a parallel axis: call it anywhere
  variables: Dict[str, Any]
  step: int

  def logits_fn(self, x):
    return self.model.apply(self.variables, x, train=False)


load_config = rundir.load_config


def restore_model(workdir: str, which: str = "best") -> RestoredModel:
  """The model trained in ``workdir``: its 'best' (early stopping) or 'last' state.

  Falls back from 'best' to 'last' when the run kept no best checkpoint.
  """
  config = load_config(workdir)
  model = build_model(config, bn_axis_name=None)
  info = input_pipeline.get_dataset_info(config.dataset)
  schedule = learning_rate_schedule(config, 1, 1)
  tx = make_optimizer(config, schedule)
  abstract = jax.eval_shape(lambda: init_state(config, model, tx, info.image_shape))
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  try:
    if which == "best" and ckpts.latest_step("best") is None:
      which = "last"
    state, _ = ckpts.restore(which, abstract)
  finally:
    ckpts.close()
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return RestoredModel(config, model, variables, int(state.step))
