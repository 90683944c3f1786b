"""`python -m bat_jax.export --workdir=DIR --which=best --out=DIR`: PyTorch + RobustBench files."""

from absl import app, flags

from bat_jax import checkpointing, export, fs, util

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints, "
                      "eval/).", **fv)
  flags.DEFINE_enum("which", "best", list(checkpointing.WHICH),
                    "Checkpoint to export; 'best' falls back to 'last'.", **fv)
  flags.DEFINE_string("out", None, "Export folder (created; its files are replaced).", **fv)
  flags.DEFINE_enum("extra_data", None, list(export.EXTRA_DATA_KINDS),
                    "What the run's config.extra_data_path holds: 'real' images "
                    "(RobustBench's additional_data: true; the default) or "
                    "'generated' ones (additional_data: false, said in the footnote).",
                    **fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("Pass --workdir=DIR and --out=DIR.")
  util.setup_runtime()
  paths = export.export_workdir(FLAGS.workdir, FLAGS.which, FLAGS.out, FLAGS.extra_data)
  for path in paths.values():
    print(f"{len(fs.read_bytes(path)):>12,d}  {path}", flush=True)


if __name__ == "__main__":
  define_flags()
  util.run(main)
