"""Evaluation: per-example metrics, the one engine that runs them, sanity checks, reports.

  progress_bar.py  done / total, examples/s and ETA of each stage
  metrics.py   per-example metric functions (clean, FGSM, PGD, each AutoAttack
               attack, ...)
  engine.py    :class:`Evaluator`: padded, masked batches over every device of
               every host, with per-example keys; the trainer,
               ``bat_jax.evaluate`` and ``bat_jax.analysis`` all run their
               metrics through it
  record.py    the protocol record of an evaluation; digests of models and data
  resume.py    stages whose batches are saved as they finish and skipped on a rerun
  stages.py    the registry of evaluation stages (clean, FGSM, PGD, AutoAttack):
               metric, column, sanity ordering, records; the :class:`Protocol`
               that picks them
  sanity.py    checks against broken evaluations and gradient masking
  suite.py     :func:`evaluate`: every stage of a protocol on one model
  report.py    the Markdown report of a run and the paper-style tables over runs
  external.py  a model trained elsewhere, from ``file.py:function``
  workdir.py   :func:`evaluate_workdir` and :func:`evaluate_model`: evaluations
               that write the results files
"""
