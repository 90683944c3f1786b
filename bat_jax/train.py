"""The trainer: ``train_and_evaluate(config, workdir)``, the loop around the fused step.

Read top-down:
  1. the data: host-sharded, resumable train batches and the test split;
  2. periodic evaluation through the evaluation engine (clean and PGD-k
     accuracy; the paper's early-stopping metric on the first test batch);
  3. ``train_and_evaluate``: claim the workdir (``rundir``), resume, loop,
     checkpoint (before the step's evaluation), evaluate, log.

The step itself is ``train_step.make_train_step`` (attack, forward passes,
loss from ``methods``, update), compiled by ``bat_jax.parallel`` (pmap by
default, or ``jax.jit(jax.shard_map(...))``); ``bat_jax.watch`` watches the
loop for divergence and preemption.
"""

import contextlib
import time
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from bat_jax import (checkpointing, configlib, cpu, datasets, errors, extra_data,
                     input_pipeline, parallel, rundir, watch)
from bat_jax.errors import OutputError
from bat_jax.evaluation import engine, metrics as eval_metrics
from bat_jax.metrics_writer import MetricWriter
from bat_jax.train_state import setup
from bat_jax.train_step import make_diagnostics_step, make_train_step

# --------------------------------------------------------------------------
# 1. Data.
# --------------------------------------------------------------------------


class Data(NamedTuple):
  train: Any  # input_pipeline.TrainBatches
  test_images: np.ndarray
  test_labels: np.ndarray
  image_shape: Tuple[int, ...]


def load_data(config, par) -> Data:
  """Train batches (host-sharded, resumable) and the evaluation split."""
  source = dict(data_dir=config.data_dir or None,
                data_file=config.data_file or None)  # a local .npz replaces TFDS
  limit = lambda count: count if count > 0 else None  # -1: the whole split
  train_x, train_y = datasets.load_split(
      config.dataset, "train", num_examples=limit(config.num_train_examples), **source)
  test_x, test_y = datasets.load_split(
      config.dataset, "test", num_examples=limit(config.num_eval_examples), **source)
  extra = None
  if config.extra_data_path:  # an .npz read whole, or array_record shards streamed
    info = datasets.get_dataset_info(config.dataset)
    extra = extra_data.open_extra_data(config.extra_data_path, info.image_shape,
                                       info.num_classes)
  train = input_pipeline.TrainBatches(
      train_x, train_y, batch_size=config.batch_size, seed=config.seed, extra=extra,
      extra_fraction=config.extra_fraction if extra is not None else 0.0,
      local_device_count=len(par.devices))
  return Data(train, test_x, test_y, tuple(train_x.shape[1:]))


def check_data(config) -> None:
  """Refuses a missing data set or unfitting extra data (its metadata or headers only)."""
  datasets.check_available(config.dataset, data_dir=config.data_dir or None,
                           data_file=config.data_file or None)
  _check_extra_data(config.dataset, config.extra_data_path)


def _check_extra_data(dataset: str, path: str) -> None:
  if path:
    info = datasets.get_dataset_info(dataset)
    extra_data.check_extra_data(path, info.image_shape, info.num_classes)


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


# --------------------------------------------------------------------------
# 2. Periodic evaluation.
# --------------------------------------------------------------------------


def _clean_and_pgd_metric(num_steps: int, norm: str) -> engine.MetricFn:
  """Clean and PGD-k (CE, uniform start, one restart) correctness per example."""
  pgd = eval_metrics.make_pgd_metric(num_steps, num_restarts=1, norm=norm)

  def metric(logits_fn, x, labels, valid, keys, eps, step_size):
    return {"clean": eval_metrics.clean_metric(logits_fn, x, labels, valid, keys, eps,
                                               step_size)["correct"],
            "pgd": pgd(logits_fn, x, labels, valid, keys, eps, step_size)["correct"]}

  return metric


class PeriodicEvaluation:
  """Clean / PGD accuracy on the evaluation split, and the early-stopping metric.

  Both run through the evaluation engine on the trainer's device-resident
  state: its weight average when the run keeps one (``config.ema_decay``),
  else its weights. Attack keys come from ``config.seed + 1`` and each
  example's position in its evaluation batch.
  """

  def __init__(self, config, model, par, data: Data):
    self.config, self.data = config, data
    apply_fn = lambda variables, x: model.apply(variables, x, train=False)
    root = jax.random.PRNGKey(config.seed + 1)

    def evaluator(batch_size, num_steps):
      def key_fn(name, indices):
        del name
        return jax.vmap(jax.random.fold_in, (None, 0))(root, indices % batch_size)
      return engine.Evaluator(apply_fn, batch_size=batch_size, par=par, key_fn=key_fn,
                              metrics={"eval": _clean_and_pgd_metric(num_steps,
                                                                     config.norm)})

    self.full = evaluator(config.eval_batch_size, config.eval_attack_steps)
    self.first_batch = evaluator(config.batch_size, config.early_stopping_attack_steps)

  def accuracies(self, device_state) -> Dict[str, Any]:
    """``{'clean_acc', 'pgd_acc', 'count'}`` on the evaluation split."""
    self.full.set_device_variables(device_state.evaluated_variables())
    out = self.full.run("eval", self.data.test_images, self.data.test_labels,
                        eps=self.config.eps, step_size=self.config.eval_attack_step_size)
    return {"clean_acc": float(np.mean(out["clean"])), "pgd_acc": float(np.mean(out["pgd"])),
            "count": int(len(out["pgd"]))}

  def early_stopping_accuracy(self, device_state) -> float:
    """The paper's early-stopping metric: PGD-10 accuracy on the first test batch."""
    n = self.config.batch_size
    self.first_batch.set_device_variables(device_state.evaluated_variables())
    out = self.first_batch.run("eval", self.data.test_images[:n],
                               self.data.test_labels[:n], eps=self.config.eps,
                               step_size=self.config.eval_attack_step_size)
    return float(np.mean(out["pgd"]))


# --------------------------------------------------------------------------
# 3. Training and evaluation.
# --------------------------------------------------------------------------


def check_runs(runs: Dict[str, ml_collections.ConfigDict]) -> None:
  """Refuses (UserError naming the run) a config or a data set of any of several runs.

  Commands that train many runs (``bat_jax.experiment``, ``bat_jax.reproduce``)
  call it first, so a bad last run does not stop them after hours of training.
  """
  num_devices = jax.device_count()
  for name, config in runs.items():
    try:
      configlib.validate(config, num_devices=num_devices)
    except errors.UserError as e:
      raise errors.UserError(f"run {name}: {e}") from None
  sources = {(c.dataset, c.data_dir, c.data_file) for c in runs.values()}
  for dataset, data_dir, data_file in sorted(sources):
    datasets.check_available(dataset, data_dir=data_dir or None, data_file=data_file or None)
  for dataset, path in sorted({(c.dataset, c.extra_data_path) for c in runs.values()}):
    _check_extra_data(dataset, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       max_steps_this_run: Optional[int] = None,
                       allow_config_changes: Sequence[str] = ()) -> Dict[str, Any]:
  """Trains ``config.method`` and evaluates it; resumes from ``workdir`` if it can.

  A config with per-method settings is resolved first (``configlib.resolve``;
  the entry points resolve before, so that command-line fields win).
  Before anything is written, the workdir is claimed (``bat_jax.rundir``):
  locked against a second trainer and, if it holds checkpoints, checked to
  belong to this config (``allow_config_changes`` names fields that may
  differ anyway, e.g. ``learning_rate`` after a divergence).
  ``max_steps_this_run`` stops (after checkpointing) once this call has run
  that many steps, for time-sliced jobs; a later call resumes exactly. A
  file that cannot be written (a full disk, no permission) ends the run with
  one OutputError naming it and the last checkpoint, which is intact.
  Returns the final evaluation ({'clean_acc', 'pgd_acc', ...}; None when
  stopped early) and which ``weights`` it read ('ema': the weight average of
  ``config.ema_decay``, else 'raw'), the step, ``stopped`` (the reason, or
  None) and the final state.
  """
  par = parallel.make(config.parallel)
  config = configlib.resolve(config)  # entry points resolve first, keeping CLI fields
  configlib.validate(config, num_devices=len(par.devices) * jax.process_count())
  # A missing data set is refused before the workdir is claimed (nothing written).
  check_data(config)
  rundir.prepare(workdir)
  lock = (rundir.workdir_lock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    has_checkpoint = checkpointing.has_checkpoint(workdir)
    rundir.check_and_write_config(workdir, config, has_checkpoint,
                                  allow_changes=allow_config_changes,
                                  write=jax.process_index() == 0)
    try:
      return _train(config, workdir, par, has_checkpoint, max_steps_this_run)
    except OutputError as e:  # a full disk, an unwritable file: say what is kept
      raise e.with_note(checkpointing.intact_note(workdir)) from None


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
  meta = {"best_pgd_acc": -1.0, "best_step": -1}
  cpu_choices = cpu.pin_workdir_choices(workdir) if has_checkpoint else {}
  if has_checkpoint:
    state, restored_meta = ckpts.restore("last", state)
    meta.update(restored_meta)
    logging.info("Resumed from %s at step %d.", workdir, int(state.step))
  start_step = int(state.step)
  rundir.check_length(config, total_steps, start_step)
  last_checkpoint = start_step if has_checkpoint else None
  # Runs saved before `evaluated_step` existed evaluated every step they saved.
  meta.setdefault("evaluated_step", start_step)

  # First calls trace the steps on the training shapes: only there may bat_jax.cpu measure.
  train_step = cpu.measuring_first_call(par.compile(
      make_train_step(config, model, tx, schedule, steps_per_epoch), donate_state=True),
      "the train step")
  periodic = PeriodicEvaluation(config, model, par, data)
  diagnostics_step = (cpu.measuring_first_call(par.compile(make_diagnostics_step(
      config, model)), "the diagnostics step") if config.diagnostics_every_steps > 0 else None)
  eval_every = max(int(config.eval_every_epochs * steps_per_epoch), 1)
  is_eval_step = lambda done: done % eval_every == 0 or done == total_steps
  writer = MetricWriter(workdir, enabled=is_chief)
  device_state = par.put_state(state)

  # Records the interrupted run logged after its checkpoint are logged again below.
  reevaluate = start_step > 0 and is_eval_step(start_step) and (
      meta["evaluated_step"] < start_step)

  def keep(record):
    step = record.get("step", 0)
    if step != start_step:
      return step < start_step
    return not (any(k.startswith("diag/") for k in record)
                or reevaluate and any(k.startswith("eval/") for k in record))

  dropped = writer.rewind(keep)
  if dropped:
    logging.info("Dropped %d metrics records logged after step %d's checkpoint.",
                 dropped, start_step)

  def save(which, device_state, meta):
    nonlocal cpu_choices
    step = int(par.get_output(device_state.step))
    ckpts.save(which, step, par.get_state(device_state), meta)
    if is_chief:
      cpu_choices = cpu.record_workdir_choices(workdir, cpu_choices)
    return step

  last_eval = None
  weights = "ema" if config.ema_decay > 0 else "raw"  # what evaluation reads

  def evaluate_and_select(done, device_state):
    """Periodic evaluation and early stopping, after the step's checkpoint."""
    nonlocal meta, last_eval
    results = periodic.accuracies(device_state)
    last_eval = (done, results)
    # eval/ema_weights: 1 when these accuracies are the weight average's.
    record = {"eval/clean_acc": results["clean_acc"], "eval/pgd_acc": results["pgd_acc"],
              "eval/ema_weights": float(weights == "ema")}
    meta = dict(meta, evaluated_step=done)
    if config.early_stopping:
      stop_acc = periodic.early_stopping_accuracy(device_state)
      record["eval/early_stopping_pgd_acc"] = stop_acc
      if stop_acc > meta["best_pgd_acc"]:
        meta.update(best_pgd_acc=stop_acc, best_step=done)
        save("best", device_state, meta)
    writer.write(done, {"epoch": done / steps_per_epoch, **record})
    logging.info("step %d: clean acc %.4f, PGD-%d acc %.4f (%s weights)", done,
                 results["clean_acc"], config.eval_attack_steps, results["pgd_acc"],
                 weights)

  if reevaluate:  # the interrupted run saved this step but did not evaluate it
    evaluate_and_select(start_step, device_state)

  step_metrics = watch.StepMetrics(par)
  stopped = None
  timer, timer_step = time.time(), start_step
  with watch.Preemption() as preemption:
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
    final = periodic.accuracies(device_state)
  ckpts.close()
  writer.close()
  return {"clean_acc": final["clean_acc"], "pgd_acc": final["pgd_acc"],
          "num_eval_examples": final["count"], "best_step": meta["best_step"],
          "weights": weights, "steps": steps_done, "stopped": stopped,
          "final_state": par.get_state(device_state)}


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
