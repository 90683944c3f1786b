"""Entry point: `python -m bat_jax.main --config=configs/cifar10.py --workdir=DIR`.

Trains (and evaluates) the config's method; on a TPU pod or a multi-host GPU
cluster, launch the same command on every host (see launch/README.md).
Exit codes (``bat_jax.errors``): 0 done; 2 bad input (nothing trained);
3 diverged (no non-finite checkpoint was saved); 75 stopped early by
SIGTERM / Ctrl-C / a time slice, checkpointed: rerun the command to resume.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from bat_jax import configlib, errors, naming, train, util

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/ (its docstring shows the run command).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; "
                               "an existing run there is resumed.")
_ALLOW = flags.DEFINE_list(
    "allow_config_changes", [], "Config fields that may differ from the stored run's "
    "when resuming it on purpose (e.g. learning_rate after a divergence).")
_MAX_STEPS = flags.DEFINE_integer(
    "max_steps_this_run", None, "Stop (checkpointed, exit code 75) after this many "
    "steps, for time-sliced jobs; rerun to continue.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  if _MAX_STEPS.value is not None:
    errors.at_least("--max_steps_this_run", _MAX_STEPS.value, 1)
  errors.output_dir("--workdir", _WORKDIR.value)
  if _ALLOW.value:
    errors.choose_each("--allow_config_changes", _ALLOW.value,
                       sorted(configlib.base_config().keys()))
  util.setup_runtime()
  # The config file's per-method settings, unless set on the command line.
  config = configlib.resolve(_CONFIG.value, util.overridden_fields(sys.argv))
  summary = train.train_and_evaluate(config, _WORKDIR.value,
                                     max_steps_this_run=_MAX_STEPS.value,
                                     allow_config_changes=_ALLOW.value)
  logging.info("Done: %s", {k: v for k, v in summary.items() if k != "final_state"})
  if summary["stopped"]:
    print(f"Stopped at step {summary['steps']} ({summary['stopped']}; checkpointed); "
          "rerun the same command to resume.", flush=True)
    sys.exit(errors.EXIT_PREEMPTED)
  print(f"Final test accuracy on {summary['num_eval_examples']} examples: clean "
        f"{summary['clean_acc']:.4f}, PGD-{config.eval_attack_steps} "
        f"{summary['pgd_acc']:.4f} ({naming.threat_model_label(config.norm, config.eps)}, "
        f"method={config.method})",
        flush=True)


if __name__ == "__main__":
  util.run(main)
