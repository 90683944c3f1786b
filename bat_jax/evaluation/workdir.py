"""Evaluations that write files: a training run's checkpoints, or a model from elsewhere.

:func:`evaluate_workdir` restores a run's checkpoints, evaluates each with
the suite (``evaluation.suite``: every stage of the protocol, the sanity
checks) and writes ``WORKDIR/eval/{which}_results.json`` (with the protocol
record), ``{which}_per_example.npz`` and ``WORKDIR/eval/results.md``;
:func:`evaluate_model` does the same for a model trained elsewhere
(``evaluation.external``) into ``out_dir``. Both save progress batch by
batch and a rerun continues it (``evaluation.resume``). ``bat_jax.evaluate``
is their command line and re-exports them.

Every number is made at its threat model: the run's ``config.eps`` is the
default eps only in the norm it trained in (:func:`eps_for_norm`).
"""

import os
from typing import Any, Dict, Optional, Sequence

from absl import logging
import jax
import numpy as np

from bat_jax import checkpointing, datasets, errors, fs, naming, parallel, rundir
from bat_jax.errors import UserError
from bat_jax.evaluation import external, record
from bat_jax.evaluation.report import results_markdown, runs_markdown
from bat_jax.evaluation.stages import Protocol
from bat_jax.evaluation.suite import (Evaluation, make_evaluator, progress_store,
                                      run_evaluation)


def _write_outputs(out_dir: str, stem: str, evaluation: Evaluation,
                   results: Dict[str, Any]) -> None:
  """``{stem}_results.json`` and ``{stem}_per_example.npz`` (process 0 only)."""
  if jax.process_index() != 0:
    return
  fs.write_json(os.path.join(out_dir, f"{stem}_results.json"), results, indent=2)
  fs.save_npz(os.path.join(out_dir, f"{stem}_per_example.npz"), **evaluation.per_example)


def _kept(store) -> str:
  """What an evaluation stopped by an unwritable output keeps (for the error)."""
  if store is None:
    return ("This evaluation saved no progress (--resume=false); the model and its "
            "checkpoints are untouched.")
  return (f"Every finished batch is saved in {store.dir}; the model and its "
          "checkpoints are untouched: make room (or fix the permissions) and rerun the "
          "same command to continue.")


def _sanity_options(options: Dict[str, Any]) -> Dict[str, Any]:
  """The evaluation options that change the numbers, for the progress fingerprint."""
  return {k: v for k, v in options.items() if k in ("sanity_examples", "large_eps")}


class _ChunkBudget:
  """``--max_chunks_this_run`` over several checkpoints' evaluations."""

  def __init__(self, limit: Optional[int]):
    self.limit, self.stores = limit, []

  def store(self, root: str, **kwargs):
    used = sum(s.new_chunks for s in self.stores)
    left = None if self.limit is None else max(self.limit - used, 0)
    store = progress_store(root, max_new_chunks=left, **kwargs)
    self.stores.append(store)
    return store


def default_pgd_step_size(config, eps: float, protocol: Protocol) -> float:
  """PGD's step when none is given: the run's ``eval_attack_step_size``; under
  another threat model (eps or norm) scaled by ``eps / config.eps``, so that the
  step keeps its size relative to the ball (an L-inf run's 0.0375 would be a
  crawl in an L2 ball of radius 2); ``2.5 eps / steps`` if the run had no eps."""
  same = eps == float(config.eps) and protocol.norm == naming.norm_of(config)
  if same:
    return float(config.eval_attack_step_size)
  if not float(config.eps) > 0:
    return 2.5 * eps / protocol.pgd_steps
  return float(config.eval_attack_step_size) * eps / float(config.eps)


def eps_for_norm(config, norm: str, eps: Optional[float]) -> float:
  """The radius to evaluate a run at in ``norm``: ``eps``, else the run's own.

  The run's ``config.eps`` is a radius in the norm it trained in; in another
  norm it means something else (an L-inf 0.3 is no L2 radius), so there a
  UserError asks for ``--eps``. ``eps`` is checked against the norm's range.
  """
  trained = naming.norm_of(config)
  if eps is None:
    if naming.canonical_norm(norm) != trained:
      wanted = naming.norm_label(norm)
      raise UserError(
          f"--norm={norm}: the run trained in {naming.norm_label(trained)} at eps "
          f"{float(config.eps):g}, which is no {wanted} radius; give the {wanted} "
          "radius with --eps (e.g. --eps=0.5 on CIFAR-10, --eps=2 on MNIST; eps= "
          "from Python).")
    eps = config.eps
  eps = float(eps)
  error = naming.eps_range_error(eps, norm)
  if error:
    raise UserError(f"--eps={eps:g}: {error}.")
  return eps


def evaluate_workdir(workdir: str, *, which: Sequence[str] = ("best", "last"),
                     num_examples: Optional[int] = None, eps: Optional[float] = None,
                     pgd_step_size: Optional[float] = None,
                     batch_size: Optional[int] = None, data_dir: Optional[str] = None,
                     data_file: Optional[str] = None, protocol: Optional[Protocol] = None,
                     resume: bool = True, max_chunks_this_run: Optional[int] = None,
                     **options) -> Dict[str, Dict[str, Any]]:
  """Evaluates checkpoints of a training run; writes JSON files and a Markdown table.

  ``which``: checkpoints ('best', 'last', 'ema': the weight average; a
  string or a sequence). A checkpoint with the same step and weights as one
  already evaluated (e.g. 'best' falling back to 'last') is not evaluated
  twice. ``num_examples``: the first N test examples (None: all). ``protocol`` (attacks, budgets, seed,
  norm; None: the default protocol in the run's norm) and ``options`` are
  :func:`evaluate`'s. ``eps`` defaults to the run's ``config.eps`` only in
  the norm the run trained in; under another norm it must be given
  (:func:`eps_for_norm`). ``pgd_step_size`` / ``batch_size`` / ``data_dir``
  default to :func:`default_pgd_step_size`, ``config.eval_batch_size`` and
  ``config.data_dir`` (``data_file``, a local .npz replacing TFDS, to
  ``config.data_file``); all checkpoints share one evaluator, so each
  metric compiles once. Progress is saved in ``WORKDIR/eval/progress/`` and
  a rerun continues it (``resume=False``: neither saved nor resumed);
  ``max_chunks_this_run`` stops (``EvaluationInterrupted``) after that many
  new batches. Writes ``WORKDIR/eval/{which}_results.json``,
  ``{which}_per_example.npz`` and ``results.md``; returns ``{which: results}``.
  """
  which = errors.choose_each("which", [which] if isinstance(which, str) else which,
                             checkpointing.CHOICES)
  config = rundir.load_config(workdir)
  for w in which:  # before any data is read
    rundir.check_which(workdir, config, w)
  protocol = protocol or Protocol(norm=naming.norm_of(config))
  eps = eps_for_norm(config, protocol.norm, eps)
  if pgd_step_size is None:
    pgd_step_size = default_pgd_step_size(config, eps, protocol)
  data_dir = (config.data_dir or None) if data_dir is None else data_dir
  data_file = (config.data_file or None) if data_file is None else data_file
  images, labels = datasets.load_split(
      config.dataset, "test", data_dir=data_dir, data_file=data_file,
      num_examples=num_examples if num_examples and num_examples > 0 else None)
  indices = np.arange(len(images), dtype=np.int64)
  examples = record.data_record(images, labels, indices, dataset=config.dataset,
                                split="test", source=data_file or data_dir)
  par = parallel.make(config.parallel)
  out_dir = os.path.join(workdir, "eval")
  if jax.process_index() == 0:
    fs.check_writable(out_dir, "evaluation folder (WORKDIR/eval)")
  num_classes = datasets.get_dataset_info(config.dataset).num_classes
  budget = _ChunkBudget(max_chunks_this_run)

  all_results, by_checkpoint, evaluator, store = {}, {}, None, None
  for w in which:
    series, step = rundir.resolve_checkpoint(workdir, w)
    weights = rundir.weights_of(series, config)
    if (step, weights) in by_checkpoint:  # Same step, same weights: reuse.
      first, evaluation = by_checkpoint[step, weights]
      logging.info("%s: checkpoint %r is step %d, already evaluated as %r.",
                   workdir, w, step, first["which"])
      results = dict(first, which=w, checkpoint=series, same_as=first["which"])
    else:
      restored = rundir.restore_model(workdir, w)
      logging.info("Evaluating %s checkpoint %r (%s, step %d) on %d examples at %s.",
                   workdir, w, series, restored.step, len(images),
                   naming.threat_model_label(protocol.norm, eps, config.dataset))
      if evaluator is None:
        model = restored.model
        evaluator = make_evaluator(
            lambda v, x: model.apply(v, x, train=False), restored.variables, protocol,
            batch_size=min(batch_size or config.eval_batch_size, len(images)), par=par)
      else:
        evaluator.set_variables(restored.variables)
      store = budget.store(
          os.path.join(out_dir, "progress"),
          model={"series": series, "step": int(restored.step),
                 "variables_sha256": record.tree_sha256(restored.variables)},
          examples=examples, protocol=protocol, eps=eps, pgd_step_size=pgd_step_size,
          **_sanity_options(options)
      ) if resume else None
      evaluation = _guarded(store, lambda: run_evaluation(
          evaluator, images, labels, eps=eps, pgd_step_size=pgd_step_size,
          protocol=protocol, indices=indices, examples=examples, store=store,
          model_name=(f"the model of {workdir} (checkpoint {w!r}, {series} step "
                      f"{int(restored.step)}, {weights} weights)"),
          num_classes=num_classes, **options))
      results = evaluation.results
      results.update(which=w, checkpoint=series, weights=weights, step=int(restored.step))
      results.update(workdir=os.fspath(fs.path(workdir)), dataset=config.dataset,
                     split="test", method=config.method, model=config.model,
                     train_seed=int(config.seed), train_norm=naming.norm_of(config),
                     train_eps=float(config.eps))
      by_checkpoint[step, weights] = results, evaluation
    all_results[w] = results
    _guarded(store if resume else None,
             lambda: _write_outputs(out_dir, w, evaluation, results))
  if jax.process_index() == 0:
    _guarded(None, lambda: fs.write_text(os.path.join(out_dir, "results.md"),
                                         results_markdown(workdir)), whole=True)
  return all_results


def _guarded(store, work, whole: bool = False):
  """``work()``; an unwritable output becomes one OutputError saying what was kept."""
  try:
    return work()
  except errors.OutputError as e:
    if whole:  # every results file is written; only the summary is missing
      raise e.with_note("The *_results.json files are written; only results.md is "
                        "missing: make room and rerun to write it.") from None
    raise e.with_note(_kept(store)) from None


def evaluate_model(model: Any, images: np.ndarray, labels: np.ndarray, *, eps: float,
                   pgd_step_size: Optional[float] = None,
                   protocol: Protocol = Protocol(), batch_size: int = 500,
                   out_dir: Optional[str] = None, dataset: str = "", split: str = "test",
                   source: Optional[str] = None, indices: Optional[np.ndarray] = None,
                   model_record: Optional[Dict[str, Any]] = None, par=None,
                   max_chunks_this_run: Optional[int] = None,
                   **options) -> Dict[str, Any]:
  """Evaluates any JAX model, without a bat_jax workdir (models trained elsewhere).

  ``model``: ``(apply_fn, variables)`` with ``apply_fn(variables, x) ->
  logits`` or a ``logits_fn(x) -> logits`` (``evaluation.external``; x
  float32 ``[B, H, W, C]`` in [0, 1]). ``images`` uint8 ``[N, H, W, C]``,
  ``labels`` ``[N]``; ``indices`` their indices in the data set (default
  0..N-1). ``pgd_step_size`` defaults to ``2.5 eps / pgd_steps``. With
  ``out_dir``, writes ``model_results.json``, ``model_per_example.npz``
  and ``results.md`` there and saves progress in ``out_dir/progress/`` (a rerun
  continues it). ``model_record`` describes the model in the results and the
  fingerprint (``external.load_model`` makes one). Other arguments as in
  :func:`evaluate`. Returns the results.
  """
  apply_fn, variables = external.as_apply_fn(model)
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if out_dir and jax.process_index() == 0:
    fs.check_writable(out_dir, "--out_dir")
  num_classes = (datasets.DATASETS[dataset].num_classes if dataset in datasets.DATASETS
                 else None)
  model_name = (f"the model {model_record['spec']}" if model_record
                and model_record.get("spec") else "the model passed to evaluate_model")
  labels_source = (f"the labels of {dataset or 'the data'} ({split}"
                   + (f", {source})" if source else ")"))
  datasets.check_labels(labels, num_classes, labels_source)
  probe = external.check_logits(apply_fn, variables, images, labels, model=model_name,
                                num_classes=num_classes, source=labels_source)
  model_record = dict(model_record or {"spec": "python",
                                       "variables_sha256": record.tree_sha256(variables)},
                      probe_logits_sha256=record.arrays_sha256(probe))
  if pgd_step_size is None:
    pgd_step_size = 2.5 * eps / protocol.pgd_steps
  indices = (np.arange(len(images), dtype=np.int64) if indices is None
             else np.asarray(indices, np.int64))
  examples = record.data_record(images, labels, indices, dataset=dataset, split=split,
                                source=source)
  store = None
  if out_dir:
    store = progress_store(
        os.path.join(out_dir, "progress"), model=model_record, examples=examples,
        protocol=protocol, eps=eps, pgd_step_size=pgd_step_size,
        max_new_chunks=max_chunks_this_run,
        **_sanity_options(options))
  evaluator = make_evaluator(apply_fn, variables, protocol,
                             batch_size=min(batch_size, len(images)), par=par)
  evaluation = _guarded(store, lambda: run_evaluation(
      evaluator, images, labels, eps=eps, pgd_step_size=pgd_step_size,
      protocol=protocol, indices=indices, examples=examples, store=store,
      model_name=model_name, num_classes=num_classes, **options))
  results = evaluation.results
  results.update(which="model", model=model_record.get("spec"), model_record=model_record,
                 dataset=dataset, split=split, step=None)
  if out_dir:
    _guarded(store, lambda: _write_outputs(out_dir, "model", evaluation, results))
    if jax.process_index() == 0:
      _guarded(None, lambda: fs.write_text(os.path.join(out_dir, "results.md"),
                                           runs_markdown(
          {"model": results}, f"Evaluation of `{results['model']}`",
          f"dataset `{dataset or '?'}` ({split})")), whole=True)
  return results
