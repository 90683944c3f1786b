"""The evaluation engine: any per-example metric over a whole data set, on all devices.

A metric is a per-device function ``(logits_fn, x, labels, valid, keys, eps,
step_size) -> {output: [B, ...] array}``. :class:`Evaluator` feeds it padded,
masked batches spread over every device of every host (each host feeds its
local devices its share of the global batch; ``all_gather`` over the pmap
axis, which spans all hosts, gives every host the whole batch's outputs),
and returns one row per example, each computed exactly once. Every example
gets its own PRNG key from its index in the data set, so results do not
depend on the batch size or the number of devices or hosts (up to the rare
flip that float rounding under another batch shape can cause). Each metric
compiles once: the model variables are a device-resident argument, ``eps``
and ``step_size`` ride in the batch. :meth:`Evaluator.run_batches` hands out
each batch's rows as it finishes (``evaluation.resume`` saves them).
"""

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import datasets, input_pipeline, parallel
from bat_jax.errors import UserError
from bat_jax.evaluation.progress_bar import ProgressBar

Array = jax.Array
# (logits_fn, x, labels, valid, keys, eps, step_size) -> {output: [B, ...] array}.
MetricFn = Callable[..., Dict[str, Array]]
# (metric name, example indices [B]) -> one PRNG key per example.
KeyFn = Callable[[str, Array], Array]


def per_example_keys(seed: int, metric_id: int, indices: Array) -> Array:
  """``fold_in(fold_in(PRNGKey(seed), metric_id), index)`` for each index."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), metric_id)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, indices)


def check_logits(logits: np.ndarray, labels: np.ndarray, *, model: str,
                 num_classes: Optional[int] = None, source: str = "the labels",
                 indices: Optional[np.ndarray] = None) -> None:
  """Refuses a model whose clean logits on the first examples are unusable.

  Run on the first batch, before any attack: the logits must be ``[B,
  classes]`` with as many classes as the data set (``num_classes``, None:
  not known) and every label below that, and finite. A UserError names
  ``model`` (its spec, or its workdir and checkpoint), both numbers or the
  examples (by data-set index, ``indices``) and the fix.
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or len(logits) != len(labels):
    raise UserError(f"{model} must return logits [B, num_classes]; for a batch of "
                    f"{len(labels)} it returned shape {logits.shape}.")
  classes = logits.shape[1]
  if num_classes is not None and classes != num_classes:
    raise UserError(f"{model} returns {classes} logits per example, but the data set "
                    f"has {num_classes} classes: evaluate it on the data set it was "
                    "trained for, or fix its output layer. Nothing was attacked.")
  datasets.check_labels(labels, classes, f"{source} (the model gives {classes} "
                        "logits per example)")
  bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=1))
  if len(bad):
    where = bad if indices is None else np.asarray(indices)[bad]
    shown = ", ".join(f"#{int(i)}" for i in where[:5])
    raise UserError(f"{model} returns non-finite logits (NaN or inf) on {len(bad)} of "
                    f"the first {len(logits)} clean examples (examples {shown}); "
                    "nothing was attacked. Fix the model (its weights, its input "
                    "normalisation, a log or a division by zero) before evaluating it.")


def as_unit_float(images: Array) -> Array:
  """uint8 pixels -> float32 in [0, 1]; float inputs pass as float32."""
  if images.dtype == jnp.uint8:
    return input_pipeline.to_float(images)
  return images.astype(jnp.float32)


class Evaluator:
  """Runs per-example metrics of one model over data sets on all devices."""

  def __init__(self, apply_fn: Callable, variables: Any = None, *, batch_size: int,
               metrics: Dict[str, MetricFn], key_fn: KeyFn, par=None):
    """``apply_fn(variables, x) -> logits`` in inference mode, x float in [0, 1].

    ``metrics``: the metric functions by name. ``key_fn(name, indices)``:
    the PRNG keys of a metric's examples. ``batch_size`` (global) is rounded
    up to a multiple of the number of devices of all hosts.
    """
    self.par = par or parallel.Pmap()
    shards = len(self.par.devices) * jax.process_count()
    self.batch_size = max(shards, -(-int(batch_size) // shards) * shards)
    self.apply_fn, self.metrics, self.key_fn = apply_fn, dict(metrics), key_fn
    self._compiled: Dict[str, Callable] = {}
    self.variables = None
    if variables is not None:
      self.set_variables(variables)

  def set_variables(self, variables: Any) -> None:
    """Evaluates another model of the same architecture, without recompiling."""
    self.variables = self.par.put_state(variables)

  def set_device_variables(self, variables: Any) -> None:
    """Like :meth:`set_variables` for variables already laid out on the devices
    (e.g. the trainer's replicated state): no copy through the host."""
    self.variables = variables

  def _per_device(self, name: str) -> Callable:
    metric = self.metrics[name]

    def step(variables, batch):
      logits_fn = lambda z: self.apply_fn(variables, z)
      keys = self.key_fn(name, batch["index"])
      out = metric(logits_fn, as_unit_float(batch["image"]), batch["label"],
                   batch["mask"], keys, batch["eps"], batch["step_size"])
      out = dict(out, mask=batch["mask"], position=batch["position"])
      # Every device returns the whole (global) batch: works for pmap and shard_map.
      return jax.lax.all_gather(out, parallel.AXIS)

    return step

  def _compiled_step(self, name: str) -> Callable:
    if self.variables is None:
      raise ValueError("Evaluator.run: set the model's variables first.")
    if name not in self._compiled:
      self._compiled[name] = self.par.compile(self._per_device(name))
    return self._compiled[name]

  def _batches(self, images, labels, indices, eps, step_size):
    """Padded, masked batches: each example's position, data-set index, eps, step."""
    n_dev = len(self.par.devices)
    positions = np.arange(len(images), dtype=np.int32)
    for batch in input_pipeline.eval_batches(
        images, positions, self.batch_size, n_dev,
        process_index=jax.process_index(), process_count=jax.process_count()):
      position = batch.pop("label")  # padding rows point at position 0
      batch["position"] = position
      batch["index"] = np.where(batch["mask"], indices[position], 0).astype(np.int32)
      batch["label"] = np.where(batch["mask"], labels[position], 0).astype(np.int32)
      batch["eps"] = np.full((n_dev,), eps, np.float32)
      batch["step_size"] = np.full((n_dev,), step_size, np.float32)
      yield batch

  def run_batches(self, name: str, images: np.ndarray, labels: np.ndarray, *,
                  indices: Optional[np.ndarray] = None, eps: float = 0.0,
                  step_size: float = 0.0
                  ) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """Metric ``name`` batch by batch: yields ``(positions, outputs)`` per global batch.

    ``positions`` are the real (not padding) examples of the batch, as
    positions in ``images``; ``outputs`` holds their rows, in that order.
    ``indices``: each example's index in its data set, which seeds its key
    (default: its position), so a subset gets the keys it has in the whole.
    """
    compiled = self._compiled_step(name)
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    indices = (np.arange(len(images), dtype=np.int32) if indices is None
               else np.asarray(indices, np.int32))
    if len(indices) != len(images):
      raise ValueError(f"{len(indices)} indices for {len(images)} examples.")
    for batch in self._batches(images, labels, indices, eps, step_size):
      out = jax.device_get(self.par.get_output(
          compiled(self.variables, self.par.put_batch(batch))))
      mask = np.asarray(out.pop("mask")).reshape(-1)
      position = np.asarray(out.pop("position")).reshape(-1)[mask]
      rows = {}
      for key, value in out.items():
        value = np.asarray(value)
        rows[key] = value.reshape((-1,) + value.shape[2:])[mask]  # [devices, per_device]
      yield position, rows

  def run(self, name: str, images: np.ndarray, labels: np.ndarray, *,
          indices: Optional[np.ndarray] = None, eps: float = 0.0,
          step_size: float = 0.0,
          progress: Optional[ProgressBar] = None) -> Dict[str, np.ndarray]:
    """Metric ``name`` on ``images`` [N, H, W, C] (uint8, or float in [0, 1]).

    Returns ``{output: [N, ...] array}`` in the order of the examples.
    ``indices`` as in :meth:`run_batches`; ``progress`` shows the batches
    done (default: a log line every minute on long runs).
    """
    num, results = len(images), {}
    seen = np.zeros((num,), np.int64)
    bar = progress or ProgressBar(name, num, tty=False,
                                  enabled=jax.process_index() == 0)
    for position, rows in self.run_batches(name, images, labels, indices=indices,
                                           eps=eps, step_size=step_size):
      np.add.at(seen, position, 1)
      for key, value in rows.items():
        if key not in results:
          results[key] = np.zeros((num,) + value.shape[1:], value.dtype)
        results[key][position] = value
      bar.update(len(position))
    bar.close()
    if num and not np.all(seen == 1):
      raise RuntimeError(f"{name}: examples evaluated {sorted(set(seen.tolist()))} "
                         "times; expected each exactly once (a batching bug).")
    return results

  def accuracy(self, name: str, images, labels, **kwargs) -> float:
    """Fraction of examples with ``correct`` (clean, FGSM, PGD metrics)."""
    return float(np.mean(self.run(name, images, labels, **kwargs)["correct"]))
