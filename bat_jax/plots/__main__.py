"""`python -m bat_jax.plots --workdirs=a,b --out_dir=figs`: every figure the runs have data for."""

from absl import flags, logging

from bat_jax import checkpointing, errors, fs, plots, util
from bat_jax.evaluation import stages


def robust_keys():
  """The accuracies in eval/{which}_results.json that Figure 3 can draw."""
  return tuple(s.result_key for s in stages.STAGES.values() if s.name != "clean")


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("workdirs", None, "Run directories (metrics.jsonl, config.json, "
                    "analysis/, eval/), comma-separated.", **fv)
  flags.DEFINE_string("out_dir", None, "Where the PNGs go.", **fv)
  flags.DEFINE_string("which", "best", "Checkpoint name of the analysis/eval files: "
                      f"one of {list(checkpointing.CHOICES)}.", **fv)
  flags.DEFINE_string("robust_key", "pgd_acc", "Robust accuracy key of "
                      f"eval/{{which}}_results.json for Figure 3: one of {list(robust_keys())}.",
                      **fv)
  flags.mark_flags_as_required(["workdirs", "out_dir"], flag_values=flag_values)


def check_flags(fv: flags.FlagValues) -> None:
  """Refuses an unknown choice, a missing workdir or a file as --out_dir (a UserError)."""
  errors.choose("--which", fv.which, checkpointing.CHOICES)
  errors.choose("--robust_key", fv.robust_key, robust_keys())
  if not fv.workdirs:
    raise errors.UserError("--workdirs is empty; give run directories, comma-separated.")
  missing = [w for w in fv.workdirs if not fs.is_dir(w)]
  if missing:
    raise errors.UserError(f"--workdirs: {missing} not found (no such folder).")
  errors.output_dir("--out_dir", fv.out_dir)


def run_from_flags(fv: flags.FlagValues = FLAGS):
  """Draws the figures the flags ask for; returns the PNG paths."""
  check_flags(fv)
  return plots.make_all_figures(fv.workdirs, fv.out_dir, which=fv.which,
                                robust_key=fv.robust_key)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  logging.set_verbosity(logging.INFO)
  paths = run_from_flags(FLAGS)
  if not paths:
    raise errors.UserError(
        f"nothing to draw: no run in --workdirs has metrics.jsonl, eval/{FLAGS.which}"
        f"_results.json or analysis/{FLAGS.which}_measures.npz (is --which right?).")
  for path in paths:
    print(path, flush=True)


if __name__ == "__main__":
  define_flags()
  util.run(main)
