"""The trainer's configuration: every field with its default, and validation.

Config files in ``configs/`` start from :func:`base_config` and change what
their experiment needs; :func:`validate` checks a finished config up front so
that a bad value fails with a message naming the field and the allowed values,
not with a traceback from deep inside JAX. Fields are plain numbers, strings
and booleans so that every one can be overridden from the command line
(``--config.eps=0.45``).
"""

import os

import ml_collections

METHODS = ("standard", "at", "trades", "mart", "bat")
DATASETS = ("mnist", "cifar10", "cifar100", "mnist_subset")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "onecycle", "cosine")
ATTACK_OBJECTIVES = ("", "ce", "kl")
ATTACK_STARTS = ("", "uniform", "normal", "none")
PARALLEL = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")
OPS = ("auto", "xla", "cpu_fast")

# The inner attack of each method (SPEC.md section 1) when the config leaves
# `attack_objective` / `attack_start` empty.
DEFAULT_ATTACK = {
    "standard": ("ce", "uniform"),
    "at": ("ce", "uniform"),
    "trades": ("kl", "normal"),
    "mart": ("ce", "uniform"),
    "bat": ("ce", "uniform"),
}


class ConfigError(ValueError):
  """A config field has a value the trainer cannot use."""


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the paper's MNIST values as defaults."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "mnist"
  c.data_dir = ""  # TFDS data_dir; "" = TFDS's default (~/tensorflow_datasets).
  # A local .npz that replaces TFDS for `dataset` (no TFDS needed): uint8
  # train_image / test_image [N, H, W, C] and integer train_label / test_label
  # [N], as bat_jax/data/mnist_subset.npz; `dataset` still gives the classes,
  # image shape and normalisation. Make one: python -m bat_jax.data.export_npz.
  c.data_file = ""
  c.num_train_examples = -1  # -1: the whole split.
  c.augment = False  # random crop (pad 4) + horizontal flip, on device.
  c.extra_data_path = ""  # RST: a local .npz with uint8 `image` and int `label`.
  c.extra_fraction = 0.5  # fraction of each batch drawn from the extra data.
  # Model.
  c.model = "lenet"
  c.normalize = False  # (x - mean) / std inside the model with the dataset's stats.
  c.dtype = "float32"  # compute dtype; parameters always stay float32.
  # How convs/max-pools compute gradients (same function): "xla", "cpu_fast"
  # (bat_jax/models/cpu_ops.py, ~2x faster steps on XLA:CPU) or "auto" (by backend).
  c.ops = "auto"
  # Objective.
  c.method = "bat"
  c.beta = 5.0
  c.num_bridges = 2
  c.stop_gradient_target = False
  # One forward pass over [x, bridges / x*] instead of m + 1 (faster; changes
  # BatchNorm semantics: joint batch statistics, one running-stat update).
  c.fused_forward = False
  # Inner attack (training).
  c.eps = 0.3
  c.attack_steps = 40
  c.attack_step_size = 0.02
  c.attack_objective = ""  # "" = the method's default (SPEC.md section 1).
  c.attack_start = ""
  # Optimisation.
  c.batch_size = 128  # global, over all devices and hosts.
  c.num_epochs = 50
  c.num_train_steps = -1  # > 0 overrides num_epochs (tests, smoke runs).
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 0.0
  c.schedule = "step"
  c.lr_decay_epochs = (30, 40)
  c.lr_decay_factor = 0.1
  c.seed = 0
  # Evaluation during training.
  c.eval_every_epochs = 1
  c.eval_batch_size = 500
  c.num_eval_examples = 1000  # -1: the whole test split.
  c.eval_attack_steps = 20
  c.eval_attack_step_size = 0.01
  c.early_stopping = True  # keep the best checkpoint by PGD-10 on the first test batch.
  c.early_stopping_attack_steps = 10
  # Diagnostics (paper Figures 4, 6, 7) on a probe batch, off by default.
  c.diagnostics_every_steps = 0
  # Bookkeeping.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.parallel = "pmap"
  return c


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}. "
                    f"Set it with --config.{field}=...")


def _one_of(c, field, allowed):
  if c[field] not in allowed:
    _fail(field, c[field], f"must be one of {list(allowed)}")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first bad field and what it may be."""
  from bat_jax import models  # Deferred: keeps this module light to import.
  missing = set(base_config().keys()) - set(c.keys())
  if missing:
    raise ConfigError(f"config is missing fields {sorted(missing)}; start config "
                      "files from bat_jax.configlib.base_config().")
  _one_of(c, "method", METHODS)
  _one_of(c, "dataset", DATASETS)
  _one_of(c, "model", models.MODEL_NAMES)
  _one_of(c, "optimizer", OPTIMIZERS)
  _one_of(c, "schedule", SCHEDULES)
  _one_of(c, "attack_objective", ATTACK_OBJECTIVES)
  _one_of(c, "attack_start", ATTACK_STARTS)
  _one_of(c, "parallel", PARALLEL)
  _one_of(c, "dtype", DTYPES)
  _one_of(c, "ops", OPS)
  if not c.eps >= 0:
    _fail("eps", c.eps, "must be >= 0 (pixel units, inputs in [0, 1], e.g. 8/255)")
  if c.eps > 1:
    _fail("eps", c.eps, "must be <= 1: inputs live in [0, 1] (write 8/255, not 8)")
  if not c.attack_step_size > 0 and c.method != "standard":
    _fail("attack_step_size", c.attack_step_size, "must be > 0")
  if c.attack_steps < 1 and c.method != "standard":
    _fail("attack_steps", c.attack_steps, f"must be >= 1 for method={c.method!r}")
  if c.num_bridges < 1:
    _fail("num_bridges", c.num_bridges, "must be an integer >= 1 (the paper uses 2)")
  if c.beta < 0:
    _fail("beta", c.beta, "must be >= 0")
  if c.batch_size < 1 or c.batch_size % num_devices:
    _fail("batch_size", c.batch_size,
          f"must be a positive multiple of the number of devices ({num_devices})")
  if c.eval_batch_size < 1 or c.eval_batch_size % num_devices:
    _fail("eval_batch_size", c.eval_batch_size,
          f"must be a positive multiple of the number of devices ({num_devices})")
  if c.learning_rate <= 0:
    _fail("learning_rate", c.learning_rate, "must be > 0")
  if c.num_epochs < 1 and c.num_train_steps < 1:
    _fail("num_epochs", c.num_epochs, "must be >= 1 (or set num_train_steps > 0)")
  if c.data_file and not os.path.isfile(c.data_file):
    _fail("data_file", c.data_file, "must be an existing .npz file (train_image, "
          "train_label, test_image, test_label; make one with `python -m "
          "bat_jax.data.export_npz`) or '' for TFDS")
  if not 0 <= c.extra_fraction < 1:
    _fail("extra_fraction", c.extra_fraction, "must be in [0, 1)")
  if c.weight_decay < 0:
    _fail("weight_decay", c.weight_decay, "must be >= 0")
  if c.diagnostics_every_steps < 0:
    _fail("diagnostics_every_steps", c.diagnostics_every_steps, "must be >= 0 (0: off)")
  for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_epochs"):
    if c[field] < 1:
      _fail(field, c[field], "must be >= 1")


def parse_arg(arg) -> dict:
  """Parses a config-file argument ``"eps=16,model=resnet18,runlocal"`` into a dict.

  A bare word maps to True. Used by ``configs/*.py`` for named variants:
  ``--config=configs/cifar10.py:eps=16,model=resnet18``.
  """
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    out[key.strip()] = value.strip() if value else True
  return out


def check_arg_keys(parsed: dict, allowed, config_file: str) -> None:
  unknown = set(parsed) - set(allowed)
  if unknown:
    hint = (f"allowed: {sorted(allowed)}" if allowed else "this file takes none; "
            "override fields with --config.FIELD=VALUE instead")
    raise ConfigError(f"{config_file}: unknown config argument(s) {sorted(unknown)}; "
                      f"{hint}.")
