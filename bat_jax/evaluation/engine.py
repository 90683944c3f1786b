"""The evaluation engine: any per-example metric over a whole data set, on all devices.

A metric is a per-device function ``(logits_fn, x, labels, valid, keys, eps,
step_size) -> {output: [B, ...] array}``. :class:`Evaluator` feeds it padded,
masked batches spread over every local device (and host), gathers the
outputs, and returns one row per example, each computed exactly once. Every
example gets its own PRNG key from its index in the data set, so results do
not depend on the batch size or the number of devices. Each metric compiles
once: the model variables are a device-resident argument, ``eps`` and
``step_size`` ride in the batch.
"""

import time
from typing import Any, Callable, Dict

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import input_pipeline, parallel

Array = jax.Array
# (logits_fn, x, labels, valid, keys, eps, step_size) -> {output: [B, ...] array}.
MetricFn = Callable[..., Dict[str, Array]]
# (metric name, example indices [B]) -> one PRNG key per example.
KeyFn = Callable[[str, Array], Array]
# Seconds between progress lines on long runs.
PROGRESS_EVERY_S = 60.0


def per_example_keys(seed: int, metric_id: int, indices: Array) -> Array:
  """``fold_in(fold_in(PRNGKey(seed), metric_id), index)`` for each index."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), metric_id)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, indices)


def as_unit_float(images: Array) -> Array:
  """uint8 pixels -> float32 in [0, 1]; float inputs pass as float32."""
  if images.dtype == jnp.uint8:
    return input_pipeline.to_float(images)
  return images.astype(jnp.float32)


class Evaluator:
  """Runs per-example metrics of one model over data sets on all local devices."""

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
      out = dict(out, mask=batch["mask"], index=batch["index"])
      # Every device returns the whole (global) batch: works for pmap and shard_map.
      return jax.lax.all_gather(out, parallel.AXIS)

    return step

  def _batches(self, images, labels, eps, step_size):
    """Padded, masked batches carrying each example's index, eps and step size."""
    n_dev = len(self.par.devices)
    indices = np.arange(len(images), dtype=np.int32)
    for batch in input_pipeline.eval_batches(
        images, indices, self.batch_size, n_dev,
        process_index=jax.process_index(), process_count=jax.process_count()):
      batch["index"] = batch.pop("label")
      batch["label"] = np.where(batch["mask"], labels[batch["index"]], 0).astype(np.int32)
      batch["eps"] = np.full((n_dev,), eps, np.float32)
      batch["step_size"] = np.full((n_dev,), step_size, np.float32)
      yield batch

  def run(self, name: str, images: np.ndarray, labels: np.ndarray, *,
          eps: float = 0.0, step_size: float = 0.0) -> Dict[str, np.ndarray]:
    """Metric ``name`` on ``images`` [N, H, W, C] (uint8, or float in [0, 1]).

    Returns ``{output: [N, ...] array}`` in the order of the examples.
    """
    if self.variables is None:
      raise ValueError("Evaluator.run: set the model's variables first.")
    if name not in self._compiled:
      self._compiled[name] = self.par.compile(self._per_device(name))
    compiled = self._compiled[name]
    labels = np.asarray(labels, np.int32)
    num, results = len(images), {}
    seen = np.zeros((num,), np.int64)
    began = last_log = time.time()
    for batch in self._batches(np.asarray(images), labels, eps, step_size):
      out = jax.device_get(self.par.get_output(
          compiled(self.variables, self.par.put_batch(batch))))
      mask = np.asarray(out.pop("mask")).reshape(-1)
      index = np.asarray(out.pop("index")).reshape(-1)[mask]
      np.add.at(seen, index, 1)
      for key, value in out.items():
        value = np.asarray(value)
        value = value.reshape((-1,) + value.shape[2:])  # [devices, per_device, ...]
        if key not in results:
          results[key] = np.zeros((num,) + value.shape[1:], value.dtype)
        results[key][index] = value[mask]
      if time.time() - last_log > PROGRESS_EVERY_S:
        last_log, done = time.time(), int(np.sum(seen > 0))
        rate = done / (last_log - began)
        logging.info("%s: %d/%d examples, %.1f examples/s, ETA %.0fs", name, done,
                     num, rate, (num - done) / max(rate, 1e-9))
    if num and not np.all(seen == 1):
      raise RuntimeError(f"{name}: examples evaluated {sorted(set(seen.tolist()))} "
                         "times; expected each exactly once (a batching bug).")
    return results

  def accuracy(self, name: str, images, labels, **kwargs) -> float:
    """Fraction of examples with ``correct`` (clean, FGSM, PGD metrics)."""
    return float(np.mean(self.run(name, images, labels, **kwargs)["correct"]))
