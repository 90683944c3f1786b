"""Evaluation: per-example metrics, the one engine that runs them, sanity checks, reports.

  progress_bar.py  done / total, examples/s and ETA of each stage
  metrics.py   per-example metric functions (clean, FGSM, PGD, each AutoAttack
               attack, ...) and the :class:`Protocol` that names them
  engine.py    :class:`Evaluator`: padded, masked batches over every device of
               every host, with per-example keys; the trainer,
               ``bat_jax.evaluate`` and ``bat_jax.analysis`` all run their
               metrics through it
  record.py    the protocol record of an evaluation; digests of models and data
  resume.py    stages whose batches are saved as they finish and skipped on a rerun
  sanity.py    checks against broken evaluations and gradient masking
  suite.py     :func:`evaluate`: clean / FGSM / PGD / AutoAttack of one model
  report.py    the Markdown report of a run and the paper-style tables over runs
  external.py  a model trained elsewhere, from ``file.py:function``
"""
