"""A run's directory: its files, the guard that keeps one run per workdir, and restoring it.

  WORKDIR/config.json        the config that trained the checkpoints in WORKDIR
  WORKDIR/.lock              held (``fcntl.flock``) while a trainer runs in WORKDIR
  WORKDIR/metrics.jsonl      training metrics (``metrics_writer``)
  WORKDIR/checkpoints/, best/  the train states (``checkpointing``)
  WORKDIR/eval/{which}_results.json  evaluations (``bat_jax.evaluate``)
  WORKDIR/cpu_ops_choices.json  the convolution programs chosen on the CPU,
                             pinned on resume (written and read by ``bat_jax.cpu``)

Before it writes anything, the trainer refuses a path that is a file, takes
the lock (:func:`workdir_lock`: two trainers never share a workdir) and,
when checkpoints exist, compares the new config with the stored one
(:func:`check_and_write_config`), refusing any difference that would mix two
runs (another method, model, optimiser, eps, ...): only
:data:`HARMLESS_FIELDS` may change on resume, and the run's length may grow.
The readers below are shared by evaluation, analysis, plots and export;
:func:`restore_model` gives back a trained model.
"""

import contextlib
import json
import os
import time
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import ml_collections

from bat_jax import checkpointing, configlib, errors, fs, train_state
from bat_jax.errors import CheckpointError, WorkdirError

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = ".lock"

# Fields that may differ between a run and its resumption: where the data
# lives, how often to log / checkpoint / evaluate and with what budget, and
# how the same step is compiled. Everything else changes what is trained.
HARMLESS_FIELDS = frozenset({
    "data_dir", "data_file", "extra_data_path",
    "log_every_steps", "checkpoint_every_steps", "diagnostics_every_steps",
    "eval_every_epochs", "eval_batch_size", "num_eval_examples",
    "eval_attack_steps", "eval_attack_step_size",
    "parallel", "ops",
})
# The run's length: may grow on resume (never below the restored step), unless
# the learning-rate schedule is shaped by the length.
LENGTH_FIELDS = ("num_epochs", "num_train_steps")
LENGTH_SHAPED_SCHEDULES = ("onecycle", "cosine")


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def read_config_json(workdir: str) -> Dict[str, Any]:
  """The stored config as a plain dict; WorkdirError if missing or unreadable."""
  path = config_path(workdir)
  if not fs.exists(path):
    raise WorkdirError(f"{path} not found: is {workdir!r} a bat_jax workdir?")
  try:
    loaded = json.loads(fs.read_text(path))
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} cannot be read ({e}); restore it from a backup "
                       "or copy it from the run's launch command.") from None
  if not isinstance(loaded, dict):
    raise WorkdirError(f"{path} does not hold a JSON object.")
  return loaded


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config: stored fields over :func:`configlib.base_config` defaults."""
  config = configlib.base_config()
  stored = dict(configlib.LEGACY_DEFAULTS, **read_config_json(workdir))
  for key, value in stored.items():
    if key in config and isinstance(config[key], tuple):
      value = tuple(value)
    config[key] = value
  return config


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (a crash never leaves half a file)."""
  fs.write_text(config_path(workdir), config.to_json_best_effort(indent=2, sort_keys=True))


def _comparable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(list(value) if isinstance(value, tuple) else value))


def resume_conflicts(stored: Dict[str, Any],
                     config: ml_collections.ConfigDict) -> List[str]:
  """Why ``config`` may not continue the run stored with ``stored`` ([] if it may).

  A field missing from ``stored`` (a run from an older bat_jax) counts as
  its legacy value (``configlib.LEGACY_DEFAULTS``), else its default.
  """
  defaults = configlib.base_config()
  new = json.loads(config.to_json_best_effort())
  conflicts = []
  for field in sorted(new):
    if field in HARMLESS_FIELDS:
      continue
    old_value = stored.get(field, configlib.LEGACY_DEFAULTS.get(
        field, _comparable(defaults.get(field))))
    new_value = new[field]
    if _comparable(old_value) == _comparable(new_value):
      continue
    if field in LENGTH_FIELDS:
      if new.get("schedule") in LENGTH_SHAPED_SCHEDULES:
        conflicts.append(f"{field}: {old_value!r} -> {new_value!r} (the "
                         f"{new['schedule']!r} learning-rate schedule is shaped by "
                         "the run's length)")
      continue  # a longer or shorter run: checked against the step below
    conflicts.append(f"{field}: {old_value!r} -> {new_value!r}")
  return conflicts


def check_length(config: ml_collections.ConfigDict, total_steps: int,
                 restored_step: int) -> None:
  """A resumed run may grow, but not end before the step it resumes from."""
  if total_steps < restored_step:
    raise WorkdirError(
        f"the run is at step {restored_step} but this config ends at step "
        f"{total_steps} (num_epochs={config.num_epochs}, num_train_steps="
        f"{config.num_train_steps}); lengthen it, or evaluate the trained run with "
        "`python -m bat_jax.evaluate --workdir=...`.")


# --------------------------------------------------------------------------
# The lock and the claim.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds ``WORKDIR/.lock`` exclusively; WorkdirError if another process holds it.

  ``fs.WorkdirLock``: ``fcntl.flock`` on a local workdir (released by the
  operating system when its holder exits, even when killed, so a crashed run
  never leaves a stale lock), a heartbeat object in Cloud Storage.
  """
  try:
    lock = fs.WorkdirLock(os.path.join(workdir, LOCK_FILE))
    lock.__enter__()
  except fs.LockHeld as held:
    raise WorkdirError(
        f"{workdir} is in use by {held}: two trainers must never share a "
        "workdir. Wait for that run to end (or stop it), or pass another "
        "--workdir.") from None
  try:
    yield
  finally:
    lock.__exit__(None, None, None)


def prepare(workdir: str) -> None:
  """Creates ``workdir`` and tries a write there (an OutputError if it cannot be
  written); WorkdirError if the path is a file. Every host of a run calls it
  on the same workdir at once: the folder is kept from the first try on."""
  if fs.exists(workdir) and not fs.is_dir(workdir):
    raise WorkdirError(f"--workdir={workdir} is an existing file, not a directory; "
                       "pass a directory path (it is created if missing).")
  fs.check_writable(workdir, "workdir", keep=True)
  fs.makedirs(workdir)


def check_and_write_config(workdir: str, config: ml_collections.ConfigDict,
                           has_checkpoint: bool, *, allow_changes: Sequence[str] = (),
                           write: bool = True) -> None:
  """Refuses a config that would mix runs; then records ``config`` as the run's.

  Without checkpoints there is nothing to protect and config.json is
  (re)written. With checkpoints, the stored config must exist and agree with
  ``config`` up to :data:`HARMLESS_FIELDS`, the run's length, and the fields
  named in ``allow_changes`` (a deliberate change, e.g. ``learning_rate``
  after a divergence: logged and appended to ``WORKDIR/config_changes.jsonl``).
  Only the process with ``write`` writes.
  """
  unknown = set(allow_changes) - set(configlib.base_config().keys())
  if unknown:
    raise WorkdirError(f"--allow_config_changes names unknown fields {sorted(unknown)}.")
  if has_checkpoint:
    try:
      stored = read_config_json(workdir)
    except WorkdirError as e:
      raise WorkdirError(
          f"{workdir} holds checkpoints but its config cannot be checked ({e}); "
          "nothing was changed. Use a new --workdir, or restore config.json.") from None
    conflicts = resume_conflicts(stored, config)
    allowed = [c for c in conflicts if c.split(":")[0] in allow_changes]
    conflicts = [c for c in conflicts if c not in allowed]
    if conflicts:
      raise WorkdirError(
          f"{workdir} holds checkpoints of another run; resuming it with this config "
          "would mix two runs. Fields that differ (stored -> now):\n  "
          + "\n  ".join(conflicts)
          + "\nUse a new --workdir for the new run, rerun with the stored config "
          f"({config_path(workdir)}), or, to change a field of this run on purpose, "
          "pass --allow_config_changes=FIELD,...")
    if allowed:
      logging.warning("Continuing %s with deliberate config changes: %s", workdir,
                      "; ".join(allowed))
      if write:
        fs.append_text(os.path.join(workdir, CHANGES_FILE), json.dumps(
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": allowed}) + "\n")
    changed = [f for f in sorted(HARMLESS_FIELDS | set(LENGTH_FIELDS))
               if f in stored and _comparable(stored[f]) != _comparable(config.get(f))]
    if changed:
      logging.info("Resuming %s with new values of %s.", workdir, ", ".join(changed))
  if write:
    write_config(workdir, config)


# --------------------------------------------------------------------------
# Readers of a run's files.
# --------------------------------------------------------------------------


def read_json(path: str) -> Optional[Any]:
  """The JSON in ``path``, or None if there is no such file."""
  if not fs.exists(path):
    return None
  return json.loads(fs.read_text(path))


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """The records of ``WORKDIR/metrics.jsonl``; blank or cut-off lines are skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if not fs.exists(path):
    return rows
  for line_number, line in enumerate(fs.read_text(path).splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      logging.warning("%s:%d is not valid JSON; skipped.", path, line_number)
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


def load_results(workdir: str) -> Dict[str, Dict[str, Any]]:
  """``{which: results}`` from ``WORKDIR/eval/*_results.json`` (best first)."""
  found = {}
  for path in fs.glob(os.path.join(workdir, "eval"), "*_results.json"):
    results = read_json(path)
    which = os.path.basename(path)[:-len("_results.json")]
    found[results.get("which") or which] = results
  # best first (the default), then last, then the weight average.
  order = {w: i for i, w in enumerate(checkpointing.WHICH[::-1] + ("ema",))}
  return dict(sorted(found.items(), key=lambda item: order.get(item[0], 99)))


def read_run_results(workdir: str, which: str) -> Optional[Tuple[Dict, Dict]]:
  """``(config, results)`` of checkpoint ``which`` of a run, None if not evaluated."""
  config = read_json(config_path(workdir))
  results = read_json(os.path.join(workdir, "eval", f"{which}_results.json"))
  if config is None or results is None:
    return None
  return config, results


# --------------------------------------------------------------------------
# Restoring a trained model.
# --------------------------------------------------------------------------


class RestoredModel(NamedTuple):
  config: ml_collections.ConfigDict
  model: Any  # a Flax module without a parallel axis: call it anywhere
  variables: Dict[str, Any]
  step: int
  checkpoint: str  # what was restored: 'best', 'last' ('best' fell back) or 'ema'
  weights: str = "raw"  # 'ema': the weight average, 'raw': the trained weights

  def logits_fn(self, x):
    return self.model.apply(self.variables, x, train=False)


def resolve_checkpoint(workdir: str, which: str) -> Tuple[str, int]:
  """What ``which`` restores ('best', 'last' or 'ema') and its step.

  'best' falls back to 'last' when the run kept no best checkpoint; 'ema'
  is the weight average kept in the 'last' checkpoint.
  """
  errors.choose("which", which, checkpointing.CHOICES)
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  try:
    source = which
    if which == "best" and ckpts.latest_step("best") is None:
      source = "last"
    step = ckpts.latest_step(_series(source))
  finally:
    ckpts.close()
  if step is None:
    raise CheckpointError(f"No {which!r} checkpoint in {workdir}: train first with "
                          "`python -m bat_jax.main --config=... --workdir=...`.")
  return source, int(step)


def _series(source: str) -> str:
  return "last" if source == "ema" else source


def weights_of(source: str, config: ml_collections.ConfigDict) -> str:
  """'ema' when ``source`` restores the weight average, else 'raw'.

  A run with weight averaging evaluates, and early-stops on, the average: its
  'best' checkpoint is the average that early stopping selected.
  """
  has_ema = float(config.get("ema_decay", 0.0)) > 0
  return "ema" if source == "ema" or (source == "best" and has_ema) else "raw"


def check_which(workdir: str, config: ml_collections.ConfigDict, which: str) -> None:
  """Refuses (UserError) a ``which`` the run cannot restore: an unknown one, or
  'ema' of a run trained without weight averaging."""
  errors.choose("which", which, checkpointing.CHOICES)
  if which == "ema" and not float(config.get("ema_decay", 0.0)) > 0:
    raise CheckpointError(
        f"{workdir} kept no weight average (its config.ema_decay is 0), so it has "
        "no 'ema' model: choose 'last' or 'best', or train with "
        "--config.ema_decay=0.999 (e.g.).")


def restore_model(workdir: str, which: str = "best") -> RestoredModel:
  """The model trained in ``workdir``: its 'best' (early stopping), 'last' or 'ema' state.

  Falls back from 'best' to 'last' when the run kept no best checkpoint.
  'ema' (the weight average of the last checkpoint) needs a run trained with
  ``config.ema_decay > 0``; with it, 'best' is the average early stopping chose.
  """
  config = load_config(workdir)
  check_which(workdir, config, which)
  source, _ = resolve_checkpoint(workdir, which)
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  try:
    state, _ = ckpts.restore(_series(source), train_state.abstract_state(config))
  finally:
    ckpts.close()
  model = train_state.build_model(config, bn_axis_name=None)
  weights = weights_of(source, config)
  variables = state.ema if weights == "ema" else state.inference_variables()
  return RestoredModel(config, model, variables, int(state.step), source, weights)
