"""One process of the two-process (multi-host) training test; see test_multihost.py.

Usage: python multihost_worker.py PORT PROCESS_ID WORKDIR OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(port, process_id, workdir, out_path):
  jax.config.update("jax_disable_most_optimizations", True)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=int(process_id),
                             local_device_ids=[0, 1])
  from bat_jax import configlib, train  # after initialize  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 4
  c = configlib.base_config()
  c.dataset, c.model, c.method = "mnist_subset", "tiny_cnn", "bat"
  c.batch_size, c.num_train_steps, c.num_train_examples = 16, 3, 256
  c.attack_steps, c.attack_step_size = 2, 0.1
  c.num_eval_examples, c.eval_batch_size, c.eval_attack_steps = 40, 16, 2
  c.early_stopping_attack_steps, c.log_every_steps = 2, 1
  c.schedule, c.augment = "constant", True
  summary = train.train_and_evaluate(c, workdir)
  leaves = jax.tree_util.tree_leaves(summary["final_state"].params)
  np.savez(out_path, *[np.asarray(a) for a in leaves],
           pgd_acc=summary["pgd_acc"], clean_acc=summary["clean_acc"],
           steps=summary["steps"])


if __name__ == "__main__":
  main(*sys.argv[1:])
