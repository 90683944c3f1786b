"""One process of the two-process evaluation test; see test_evaluate_scale.py.

Usage: python multihost_eval_worker.py PORT PROCESS_ID INPUT.npz OUT_DIR OUT.npz

Evaluates the linear model in INPUT.npz on 2 processes x 2 CPU devices:
stopped after three batches, resumed to the end (this process's
per-example flags and results go to OUT.npz), then evaluated again through
evaluate_model, which loads every saved batch and writes the result files
in OUT_DIR (process 0 only).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

EPS, STEP = 0.1, 0.04


def apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def protocol():
  from bat_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.Protocol(
      pgd_steps=3, pgd_restarts=2, autoattack=evaluate.AutoAttackOptions(
          version="custom", attacks=("apgd-ce", "apgd-t"),
          settings=dict(apgd_iters=3, n_target_classes=2)))


def main(port, process_id, input_path, out_dir, out_path):
  jax.config.update("jax_disable_most_optimizations", True)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=int(process_id),
                             local_device_ids=[0, 1])
  # After initialize.  # pylint: disable=g-import-not-at-top
  from bat_jax import evaluate
  from bat_jax.evaluation import external, record, suite
  assert jax.process_count() == 2 and jax.device_count() == 4
  data = np.load(input_path)
  images, labels = data["images"], data["labels"]
  params = {"w": data["w"], "b": data["b"]}
  kwargs = dict(eps=EPS, pgd_step_size=STEP, protocol=protocol(), batch_size=8,
                out_dir=out_dir, sanity_examples=8)
  # 1. Stopped after three batches (their outputs saved by process 0).
  try:
    evaluate.evaluate_model((apply, params), images, labels, max_chunks_this_run=3,
                            **kwargs)
    raise AssertionError("expected an EvaluationInterrupted")
  except evaluate.EvaluationInterrupted:
    pass
  # 2. Resumed with the lower-level API, which returns each example's flags.
  probe = external.check_logits(apply, params, images, labels)
  model = {"spec": "python", "variables_sha256": record.tree_sha256(params),
           "probe_logits_sha256": record.arrays_sha256(probe)}
  examples = record.data_record(images, labels, np.arange(len(images)), split="test")
  store = suite.progress_store(os.path.join(out_dir, "progress"), model=model,
                               examples=examples, protocol=protocol(), eps=EPS,
                               pgd_step_size=STEP, sanity_examples=8)
  evaluator = suite.make_evaluator(apply, params, protocol(), batch_size=8)
  resumed = suite.run_evaluation(evaluator, images, labels, eps=EPS, pgd_step_size=STEP,
                                 protocol=protocol(), sanity_examples=8,
                                 examples=examples, store=store, show_progress=False)
  # 3. Everything saved: evaluate_model loads it all and writes the files.
  final = evaluate.evaluate_model((apply, params), images, labels, **kwargs)
  stages = lambda r, what: {k: v[what] for k, v in r["run"]["stages"].items()}
  np.savez(out_path, **resumed.per_example,
           results=json.dumps({k: v for k, v in resumed.results.items() if k != "run"},
                              sort_keys=True),
           resumed_loaded=json.dumps(stages(resumed.results, "loaded")),
           resumed_computed=json.dumps(stages(resumed.results, "computed")),
           final_computed=json.dumps(stages(final, "computed")),
           final_acc=json.dumps([final[f"{a}_acc"] for a in ("clean", "fgsm", "pgd",
                                                             "autoattack")]))


if __name__ == "__main__":
  main(*sys.argv[1:])
