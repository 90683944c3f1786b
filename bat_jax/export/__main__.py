"""`python -m bat_jax.export --workdir=DIR --which=best --out=DIR`: PyTorch + RobustBench files."""

from absl import flags

from bat_jax import checkpointing, errors, export, fs, util

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags; defined on demand, so importing has no side effects."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints, "
                      "eval/).", **fv)
  flags.DEFINE_string("which", "best", f"Checkpoint to export: one of "
                      f"{list(checkpointing.CHOICES)}; 'best' falls back to 'last'; 'ema': the "
                      "weight average of a run trained with config.ema_decay > 0.", **fv)
  flags.DEFINE_string("out", None, "Export folder (created; its files are replaced).", **fv)
  flags.DEFINE_enum("extra_data", None, list(export.EXTRA_DATA_KINDS),
                    "What the run's config.extra_data_path holds: 'real' images "
                    "(RobustBench's additional_data: true; the default) or "
                    "'generated' ones (additional_data: false, said in the footnote).",
                    **fv)


def check_flags(fv: flags.FlagValues) -> None:
  """Refuses missing or conflicting flags before anything is read or written."""
  if not fv.workdir or not fv.out:
    raise errors.UserError("Pass --workdir=DIR (a training run) and --out=DIR.")
  if not fs.is_dir(fv.workdir):
    raise errors.UserError(f"--workdir={fv.workdir} is not a folder.")
  errors.choose("--which", fv.which, checkpointing.CHOICES)
  errors.output_dir("--out", fv.out)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written "
                           "--name=value.")
  check_flags(FLAGS)
  util.setup_runtime()
  paths = export.export_workdir(FLAGS.workdir, FLAGS.which, FLAGS.out, FLAGS.extra_data)
  for path in paths.values():
    print(f"{len(fs.read_bytes(path)):>12,d}  {path}", flush=True)


if __name__ == "__main__":
  define_flags()
  util.run(main)
