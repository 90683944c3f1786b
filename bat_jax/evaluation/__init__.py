"""Evaluation: per-example metrics, the one engine that runs them, sanity checks, reports.

  metrics.py  per-example metric functions (clean, FGSM, PGD, AutoAttack, ...)
  engine.py   :class:`Evaluator`: padded, masked, device-parallel batches with
              per-example keys; the trainer, ``bat_jax.evaluate`` and
              ``bat_jax.analysis`` all run their metrics through it
  sanity.py   checks against broken evaluations and gradient masking
  suite.py    :func:`evaluate`: clean / FGSM / PGD / AutoAttack of one model
  report.py   the Markdown report of a run and the paper-style tables over runs
"""
