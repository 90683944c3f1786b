"""The trainer's configuration: every field with its default, and validation.

Config files in ``configs/`` start from :func:`base_config` and change what
their experiment needs; :func:`validate` checks a finished config up front so
that a bad value fails with a message naming the field and the allowed values,
not with a traceback from deep inside JAX. Fields are plain numbers, strings
and booleans so that every one can be overridden from the command line
(``--config.eps=0.45``).
"""

import copy
import difflib
import importlib.util
import math
import pathlib
from typing import Sequence

import ml_collections

from bat_jax import errors, extra_data, fs, methods, naming
from bat_jax.errors import UserError

DATASETS = ("mnist", "cifar10", "cifar100", "mnist_subset")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "onecycle", "cosine")
ATTACK_OBJECTIVES = ("", "ce", "kl")
ATTACK_STARTS = ("", "uniform", "normal", "none")
PARALLEL = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")
OPS = ("auto", "xla", "cpu_fast")
NORMS = naming.NORMS  # read in any spelling (naming.canonical_norm)


# Values that reproduce runs saved before a field existed: a stored config.json
# without the field is read with these (defaults above would change the run).
LEGACY_DEFAULTS = {"cycle_momentum": False}


class ConfigError(UserError):
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
  # Extra data (RST, generated images): an .npz with uint8 `image` and int `label`
  # (read into memory) or a directory of array_record shards with extra_data.json
  # (streamed; python -m bat_jax.data.convert_extra writes one).
  c.extra_data_path = ""
  c.extra_fraction = 0.5  # fraction of each batch drawn from the extra data.
  # Model.
  c.model = "lenet"  # a registered model, or any wrn{depth}_{width} (e.g. wrn70_16)
  # The nonlinearity of models with an activation field (the Wide ResNets):
  # "relu", or "silu" ("swish": x * sigmoid(x)). Others keep their ReLU.
  c.activation = "relu"
  c.normalize = False  # (x - mean) / std inside the model with the dataset's stats.
  c.dtype = "float32"  # compute dtype; parameters always stay float32.
  # Weight averaging: an exponential moving average of the parameters and the
  # BatchNorm statistics, decay min(ema_decay, (1 + t) / (10 + t)) at step t
  # (Gowal et al. 2020), evaluated instead of the raw weights. 0.0: off.
  c.ema_decay = 0.0
  # The layers' programs (same function): "xla" (Flax's), "cpu_fast" (bat_jax/cpu/,
  # ~2x faster steps on XLA:CPU) or "auto" (cpu_fast on the CPU backend).
  c.ops = "auto"
  # Objective.
  c.method = "bat"
  # Per-method settings of this experiment family, applied by `resolve` when the
  # method is chosen (fields named on the command line win), e.g. the paper's
  # SGD for MART on MNIST: method_settings.mart = {optimizer: sgd, ...}.
  c.method_settings = ml_collections.ConfigDict()
  # s in [0, 1): the CE terms of the objective take (1 - s) * onehot + s / C as
  # target (the inner attack's CE keeps the plain labels). 0.0: off.
  c.label_smoothing = 0.0
  c.beta = 5.0
  c.num_bridges = 2
  c.stop_gradient_target = False
  # One forward pass over [x, bridges / x*] instead of m + 1 (faster; changes
  # BatchNorm semantics: joint batch statistics, one running-stat update).
  c.fused_forward = False
  # Adversarial weight perturbation (AWP, Wu et al. 2020; 0.0: off): each conv /
  # dense kernel moved by awp_gamma * ||w|| along the loss's gradient before the
  # update, from the first step of epoch awp_warmup_epochs (counted from 0).
  c.awp_gamma = 0.0
  c.awp_warmup_epochs = 0
  # Inner attack (training).
  c.eps = 0.3
  c.norm = "linf"  # the threat model of training and evaluation: "linf" or "l2" (any case)
  c.attack_steps = 40
  c.attack_step_size = 0.02
  c.attack_objective = ""  # "" = the method's (bat_jax/methods.py).
  c.attack_start = ""  # "" = the objective's: uniform for ce, normal (TPGD) for kl.
  # Optimisation.
  c.batch_size = 128  # global, over all devices and hosts.
  c.num_epochs = 50
  c.num_train_steps = -1  # > 0 overrides num_epochs (tests, smoke runs).
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.momentum = 0.9  # SGD's; with the onecycle schedule, its peak (see below)
  c.nesterov = False
  # onecycle + SGD: momentum cycles momentum -> base_momentum -> momentum as the
  # learning rate rises and falls (PyTorch CyclicLR's cycle_momentum, which the
  # reference uses); cycle_momentum=False keeps it constant.
  c.cycle_momentum = True
  c.base_momentum = 0.8
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
    _fail(field, c[field],
          f"must be one of {list(allowed)}{errors.did_you_mean(c[field], allowed)}")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first bad field and what it may be.

  ``norm`` is read in any spelling ('L2', 'Linf', ...) and rewritten in its
  canonical one ('l2', 'linf'), so config.json and everything downstream
  spell it one way.
  """
  from bat_jax import models  # Deferred: keeps this module light to import.
  missing = set(base_config().keys()) - set(c.keys())
  if missing:
    raise ConfigError(f"config is missing fields {sorted(missing)}; start config "
                      "files from bat_jax.configlib.base_config().")
  unset = [field for field, value in c.items() if value == REQUIRED]
  if unset:
    raise ConfigError(f"config.{unset[0]} is required by this config file: set it with "
                      f"--config.{unset[0]}=...")
  _one_of(c, "method", tuple(methods.METHODS))  # the registry, bat_jax/methods.py
  _one_of(c, "dataset", DATASETS)
  try:  # the registry, bat_jax/models/registry.py (its names and families)
    known_model = models.find(c.model)
  except UserError as e:
    _fail("model", c.model, str(e).rstrip("."))
  if known_model is None:
    _one_of(c, "model", models.registry.names())
  try:
    c.activation = models.canonical_activation(c.activation)
  except ValueError:
    _fail("activation", c.activation,
          f"must be one of {list(models.ACTIVATIONS)} ('swish' is 'silu')")
  if c.activation not in models.activations(c.model):
    takers = [n for n in models.MODELS if len(models.activations(n)) > 1]
    _fail("activation", c.activation,
          f"model {c.model!r} has ReLU activations only; {c.activation!r} is for the "
          f"models {takers + list(models.FAMILIES)}")
  _one_of(c, "optimizer", OPTIMIZERS)
  _one_of(c, "schedule", SCHEDULES)
  _one_of(c, "attack_objective", ATTACK_OBJECTIVES)
  _one_of(c, "attack_start", ATTACK_STARTS)
  _one_of(c, "parallel", PARALLEL)
  _one_of(c, "dtype", DTYPES)
  _one_of(c, "ops", OPS)
  try:
    c.norm = naming.canonical_norm(c.norm)
  except UserError:
    _fail("norm", c.norm, "must be linf (L-inf) or l2 (L2), in any case")
  eps_error = naming.eps_range_error(c.eps, c.norm)
  if eps_error:
    _fail("eps", c.eps, eps_error)
  attacks = bool(methods.get(c.method).attack_objective)
  if not c.attack_step_size > 0 and attacks:
    _fail("attack_step_size", c.attack_step_size, "must be > 0")
  if c.attack_steps < 1 and attacks:
    _fail("attack_steps", c.attack_steps, f"must be >= 1 for method={c.method!r}")
  _check_numbers_finite(c)
  if c.num_bridges < 1:
    _fail("num_bridges", c.num_bridges, "must be an integer >= 1 (the paper uses 2)")
  if c.beta < 0:
    _fail("beta", c.beta, "must be >= 0")
  if not 0 <= c.label_smoothing < 1:
    _fail("label_smoothing", c.label_smoothing, "must be in [0, 1) (0: off; e.g. 0.1)")
  if c.label_smoothing and not methods.get(c.method).label_smoothing:
    _fail("label_smoothing", c.label_smoothing,
          f"method={c.method!r} has no smoothed CE term; set label_smoothing=0 or train "
          f"one of {[m for m, v in methods.METHODS.items() if v.label_smoothing]}")
  if c.batch_size < 1 or c.batch_size % num_devices:
    _fail("batch_size", c.batch_size,
          f"must be a positive multiple of the number of devices ({num_devices})")
  if c.eval_batch_size < 1 or c.eval_batch_size % num_devices:
    _fail("eval_batch_size", c.eval_batch_size,
          f"must be a positive multiple of the number of devices ({num_devices})")
  if c.learning_rate <= 0:
    _fail("learning_rate", c.learning_rate, "must be > 0")
  if not 0 <= c.momentum < 1:
    _fail("momentum", c.momentum, "must be in [0, 1) (0: plain SGD)")
  if not 0 <= c.base_momentum <= c.momentum:
    _fail("base_momentum", c.base_momentum,
          f"must be in [0, momentum={c.momentum}] (the low point of onecycle's momentum)")
  _check_method_settings(c)
  if not 0 < c.lr_decay_factor <= 1:
    _fail("lr_decay_factor", c.lr_decay_factor, "must be in (0, 1] (0.1: divide by 10)")
  if c.schedule == "step":
    epochs = list(c.lr_decay_epochs)
    if any(e <= 0 for e in epochs) or epochs != sorted(epochs):
      _fail("lr_decay_epochs", c.lr_decay_epochs, "must be increasing epochs > 0")
    if c.num_train_steps < 1 and any(e >= c.num_epochs for e in epochs):
      _fail("lr_decay_epochs", c.lr_decay_epochs,
            f"every decay must fall inside the run's {c.num_epochs} epochs "
            "(a later one never happens)")
  for field in ("num_train_examples", "num_eval_examples"):
    if c[field] == 0 or c[field] < -1:
      _fail(field, c[field], "must be -1 (the whole split) or a positive count")
  if c.eval_attack_steps < 1:
    _fail("eval_attack_steps", c.eval_attack_steps, "must be >= 1")
  if not c.eval_attack_step_size > 0:
    _fail("eval_attack_step_size", c.eval_attack_step_size,
          "must be > 0 (pixel units, e.g. 2/255 or 0.01)")
  if c.early_stopping and c.early_stopping_attack_steps < 1:
    _fail("early_stopping_attack_steps", c.early_stopping_attack_steps,
          "must be >= 1 (or set early_stopping=False)")
  if c.seed < 0:
    _fail("seed", c.seed, "must be >= 0")
  if c.num_train_steps == 0 or c.num_train_steps < -1:
    _fail("num_train_steps", c.num_train_steps,
          "must be -1 (train num_epochs epochs) or a positive number of steps")
  if c.num_epochs < 1 and c.num_train_steps < 1:
    _fail("num_epochs", c.num_epochs, "must be >= 1 (or set num_train_steps > 0)")
  if c.data_file and not _is_file(c.data_file):
    _fail("data_file", c.data_file, "must be an existing .npz file (train_image, "
          "train_label, test_image, test_label; make one with `python -m "
          "bat_jax.data.export_npz`) or '' for TFDS")
  if not 0 <= c.extra_fraction < 1:
    _fail("extra_fraction", c.extra_fraction, "must be in [0, 1)")
  if not 0 <= c.ema_decay < 1:
    _fail("ema_decay", c.ema_decay, "must be in [0, 1) (0: no weight averaging; "
          "e.g. 0.995 to 0.999 per step)")
  if c.awp_gamma < 0:
    _fail("awp_gamma", c.awp_gamma, "must be >= 0 (0: off; e.g. 0.005 TRADES, 0.01 AT)")
  if c.awp_warmup_epochs < 0:
    _fail("awp_warmup_epochs", c.awp_warmup_epochs, "must be >= 0 (epochs before AWP)")
  if c.weight_decay < 0:
    _fail("weight_decay", c.weight_decay, "must be >= 0")
  if c.diagnostics_every_steps < 0:
    _fail("diagnostics_every_steps", c.diagnostics_every_steps, "must be >= 0 (0: off)")
  for field in ("log_every_steps", "checkpoint_every_steps"):
    if c[field] < 1:
      _fail(field, c[field], "must be >= 1")
  if not c.eval_every_epochs > 0:
    _fail("eval_every_epochs", c.eval_every_epochs, "must be > 0")
  if c.extra_data_path and not _is_file(c.extra_data_path):
    if not fs.is_dir(c.extra_data_path):
      _fail("extra_data_path", c.extra_data_path,
            "must name an existing .npz file or a directory of array_record shards "
            "(or be '' for no extra data)")
    if not fs.exists(fs.join(c.extra_data_path, extra_data.METADATA_FILE)):
      _fail("extra_data_path", c.extra_data_path,
            f"is a directory without {extra_data.METADATA_FILE}; write a shard set "
            f"into it with `{extra_data.CONVERT_COMMAND}`, or give an .npz file")


def _check_method_settings(c: ml_collections.ConfigDict) -> None:
  fields = set(base_config().keys()) - {"method", "method_settings"}
  for method, settings in c.method_settings.items():
    if method not in methods.METHODS:
      _fail("method_settings", method, f"names no method; methods: {list(methods.METHODS)}")
    for field in settings.keys():
      if field not in fields:
        _fail(f"method_settings.{method}", field, "is not a config field it may set")


def method_settings(**per_method) -> ml_collections.ConfigDict:
  """``method_settings(mart=dict(optimizer="sgd", learning_rate=0.01))`` for a config file."""
  return ml_collections.ConfigDict({m: dict(s) for m, s in per_method.items()})


def resolve(config: ml_collections.ConfigDict,
            explicit: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of its method: ``config.method_settings[config.method]`` applied.

  Fields in ``explicit`` (those the user set on the command line) keep their
  values. The result records the applied values and an empty
  ``method_settings``, so resolving twice changes nothing; ``config.json``
  holds the resolved config.
  """
  resolved = copy.deepcopy(config)
  settings = config.method_settings.get(config.method) if "method_settings" in config else None
  if settings is None:
    return resolved
  _check_method_settings(config)
  for field, value in settings.items():
    if field not in explicit:
      resolved[field] = tuple(value) if isinstance(resolved[field], tuple) else value
  resolved.method_settings = ml_collections.ConfigDict()
  return resolved


def _is_file(path: str) -> bool:
  return fs.exists(path) and not fs.is_dir(path)


def check_schedule_fits(c: ml_collections.ConfigDict, steps_per_epoch: int,
                        total_steps: int) -> None:
  """The step decays and AWP's start fall inside the run (once its length is known)."""
  awp_start = int(c.awp_warmup_epochs * steps_per_epoch)
  if c.awp_gamma > 0 and awp_start >= total_steps:
    _fail("awp_warmup_epochs", c.awp_warmup_epochs, f"starts AWP at step {awp_start} of a "
          f"run of {total_steps} steps ({steps_per_epoch} per epoch): it would never run")
  if c.schedule != "step":
    return
  late = [e for e in c.lr_decay_epochs if int(e * steps_per_epoch) >= total_steps]
  if late:
    _fail("lr_decay_epochs", c.lr_decay_epochs,
          f"decays at epochs {late} fall after the run's last step {total_steps} "
          f"({steps_per_epoch} steps per epoch): they would never happen")


def _check_numbers_finite(c: ml_collections.ConfigDict) -> None:
  for field, value in c.items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, float) and not math.isfinite(v):
        _fail(field, value, "must be a finite number")


# Config-file arguments that are switches: ``:runlocal`` or ``:runlocal=false``.
SWITCH_ARGS = ("runlocal",)
_SWITCH_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}

# A config file's value for a field the user must set (cifar10_rst.py's
# extra_data_path): :func:`validate` refuses the config until it is set.
REQUIRED = "<required>"


def parse_arg(arg) -> dict:
  """Parses a config-file argument ``"eps=16,model=resnet18,runlocal"`` into a dict.

  Values stay strings, except the switches (:data:`SWITCH_ARGS`): a bare
  ``runlocal`` or ``runlocal=true|yes|on|1`` is True, ``=false|no|off|0``
  False, anything else a ConfigError. Used by ``configs/*.py`` for named
  variants: ``--config=configs/cifar10.py:eps=16,model=resnet18``.
  """
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    key, value = key.strip(), value.strip() if value.strip() else True
    if key in out:
      raise ConfigError(f"config argument {key!r} is given twice in {arg!r}.")
    if key in SWITCH_ARGS and value is not True:
      if value.lower() not in _SWITCH_WORDS:
        raise ConfigError(f"config argument {key}={value} is not a switch value; "
                          f"write {key}, {key}=true or {key}=false.")
      value = _SWITCH_WORDS[value.lower()]
    out[key] = value
  return out


def check_arg_keys(parsed: dict, allowed, config_file: str) -> None:
  """Every parsed argument is one ``config_file`` takes, with a value unless a switch."""
  unknown = sorted(set(parsed) - set(allowed))
  if unknown:
    hint = (f"allowed: {sorted(allowed)}" if allowed else "this file takes none; "
            "override fields with --config.FIELD=VALUE instead")
    close = "".join(errors.did_you_mean(k, sorted(allowed)) for k in unknown)
    raise ConfigError(f"{config_file}: unknown config argument(s) {unknown}{close}; "
                      f"{hint}.")
  for key, value in parsed.items():
    if value is True and key not in SWITCH_ARGS:
      raise ConfigError(f"{config_file}: config argument {key!r} needs a value "
                        f"({key}=...).")


def unknown_field_message(name: str, fields=None) -> str:
  """"unknown field 'epsilon'; did you mean 'eps'?" for a mistyped override."""
  fields = list(fields if fields is not None else base_config().keys())
  close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
  close += [f for f in fields if f not in close and (f.startswith(name) or name.startswith(f))]
  hint = f"did you mean {' or '.join(repr(f) for f in close[:3])}?" if close else (
      "the fields are listed in bat_jax/configlib.py (base_config)")
  return f"unknown config field {name!r}; {hint}"


def parse_number(text, what: str = "value") -> float:
  """'0.3' -> 0.3 and '8/255' -> 0.0313...; a UserError naming ``what`` otherwise."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    return float(text)
  text = str(text).strip()
  try:
    num, slash, den = text.partition("/")
    value = float(num) / (float(den) if slash else 1.0)
  except (ValueError, ZeroDivisionError):
    raise UserError(f"{what}={text!r} is not a number; write e.g. 0.3 or 8/255.") from None
  if not math.isfinite(value):
    raise UserError(f"{what}={text!r} must be a finite number.")
  return value


def eps_from_arg(args: dict, default_255: float, config_file: str) -> float:
  """A config file's ``eps`` argument in /255 units: ``eps=8`` or ``eps=8/255`` -> 8/255.

  A bare decimal below 1 (``eps=0.031``) is refused: it is ambiguous next to
  the /255 convention, and 0.031 is not 8/255. Such radii are set with
  ``--config.eps=0.031``.
  """
  text = str(args.get("eps", default_255))
  value = parse_number(text, f"{config_file}: eps")
  if "/" in text:
    return value
  if 0 < value < 1:
    raise ConfigError(
        f"{config_file}: eps={text} is read in /255 units (eps=8 means 8/255); write "
        f"eps={round(value * 255):g} or eps={round(value * 255):g}/255, or set an exact "
        f"radius with --config.eps={text}.")
  return value / 255


# --------------------------------------------------------------------------
# Config files: a checkout's configs/ or the copy installed with the package.
# --------------------------------------------------------------------------

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# `pip install .` installs configs/ as bat_jax/configs/ (setup.py); in a
# checkout the files lie in configs/ beside the package.
_CONFIGS_DIRS = (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs")


def configs_dir() -> pathlib.Path:
  """The folder holding bat_jax's config files (installed copy first)."""
  for folder in _CONFIGS_DIRS:
    if (folder / "quickstart.py").is_file():
      return folder
  raise ConfigError("bat_jax's config files were not found in "
                    f"{' or '.join(map(str, _CONFIGS_DIRS))}: reinstall bat_jax "
                    "(`pip install .` from a checkout).")


def load_config_file(path) -> object:
  """The config file at ``path`` as a module (``get_config``): how bat_jax and
  config files that build on another (``configs/cifar100.py``) read one."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_file_path(path: str) -> str:
  """``path`` when it exists; else, for ``configs/NAME.py``, bat_jax's own copy.

  So `--config=configs/quickstart.py` works from any folder once bat_jax is
  installed, as it does in a checkout; a config file of your own is used as given.
  A file found in neither place is refused (ConfigError) with the shipped
  configs listed.
  """
  parts = pathlib.PurePath(path).parts
  if fs.exists(path):
    return path
  shipped = []
  try:
    shipped = sorted(p.name for p in configs_dir().glob("*.py") if p.name != "__init__.py")
    if len(parts) == 2 and parts[0] == "configs" and parts[1] in shipped:
      return str(configs_dir() / parts[1])
  except ConfigError:
    pass
  names = [f"configs/{name}" for name in shipped]
  raise ConfigError(f"--config={path}: no such config file"
                    f"{errors.did_you_mean(path, names)}; bat_jax ships "
                    f"{', '.join(names) or 'none here'}.")
