"""Entry point: `python -m bat_jax.main --config=configs/cifar10.py --workdir=DIR`.

Trains (and evaluates) the config's method; on a TPU pod or a multi-host GPU
cluster, launch the same command on every host (see launch/README.md).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from bat_jax import train, util

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/ (its docstring shows the run command).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; "
                               "an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  util.setup_runtime()
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", {k: v for k, v in summary.items() if k != "final_state"})
  if summary["clean_acc"] is None:
    print(f"Stopped at step {summary['steps']} (checkpointed); rerun the same "
          "command to resume.", flush=True)
    return
  print(f"Final test accuracy on {summary['num_eval_examples']} examples: clean "
        f"{summary['clean_acc']:.4f}, PGD-{_CONFIG.value.eval_attack_steps} "
        f"{summary['pgd_acc']:.4f} (eps={_CONFIG.value.eps:g}, "
        f"method={_CONFIG.value.method})", flush=True)


if __name__ == "__main__":
  app.run(main)
