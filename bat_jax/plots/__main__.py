"""`python -m bat_jax.plots --workdirs=a,b --out_dir=figs`: every figure the runs have data for."""

from absl import flags, logging

from bat_jax import plots, util

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("workdirs", None, "Run directories (metrics.jsonl, config.json, "
                    "analysis/, eval/), comma-separated.", **fv)
  flags.DEFINE_string("out_dir", None, "Where the PNGs go.", **fv)
  flags.DEFINE_string("which", "best", "Checkpoint name of the analysis/eval files.", **fv)
  flags.DEFINE_string("robust_key", "pgd_acc", "Robust accuracy key of "
                      "eval/{which}_results.json for Figure 3 (e.g. autoattack_acc).", **fv)
  flags.mark_flags_as_required(["workdirs", "out_dir"], flag_values=flag_values)


def run_from_flags(fv: flags.FlagValues = FLAGS):
  """Draws the figures the flags ask for; returns the PNG paths."""
  return plots.make_all_figures(fv.workdirs, fv.out_dir, which=fv.which,
                                robust_key=fv.robust_key)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  for path in run_from_flags(FLAGS):
    print(path, flush=True)


if __name__ == "__main__":
  define_flags()
  util.run(main)
