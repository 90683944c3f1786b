"""THE registry of models: one entry per model, read by the config, the trainer and the export.

A :class:`ModelSpec` is all bat_jax knows about a model: its Flax class and
default fields, whether it has BatchNorm, its names in model cards and export
file names, and its PyTorch twin (:class:`TorchTwin`: the class the export
writes, how its arguments and parameter names follow from the Flax module,
and the RobustBench class computing the same function, if one does).
Adding a model is one :func:`register_model` call (``zoo.py`` holds the
shipped ones); nothing else names models. A :class:`ModelFamily` names many
models by a pattern (``wrn{depth}_{width}``): :func:`get` registers a name it
makes on first use. PyTorch appears here only as text (class names, source)
and data (renames): nothing here imports torch.
"""

import dataclasses
import re
import textwrap
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

from flax import linen as nn

from bat_jax import errors
from bat_jax.models import common

# The PyTorch classes of the module file the export ships (torch_models.py.txt).
TEMPLATE_CLASSES = ("LeNet", "ResNet", "PreActResNet", "WideResNet")
# Fields every model class has: ``create_model`` passes them.
REQUIRED_FIELDS = ("num_classes", "mean", "std", "dtype", "layers")
# ...and a model with BatchNorm also this one (cross-device statistics).
BATCH_NORM_FIELD = "bn_axis_name"

# A RobustBench call: (class, positional args, keyword args); a string args
# entry names a class of the RobustBench module (e.g. "BasicBlock").
RobustBenchCall = Tuple[str, List[Any], Dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class RobustBenchClass:
  """RobustBench's class that computes a twin's function, and how it is called.

  Attributes:
    module: its module, e.g. ``'robustbench.model_zoo.architectures.resnet'``.
    call: the twin's keyword arguments (``torch_architecture``'s ``kwargs``)
      -> the :data:`RobustBenchCall`, or a sentence saying why no call
      computes this instance (e.g. another width than RobustBench's).
    image_shape: the one input shape ``(H, W, C)`` its classes take.
  """
  module: str
  call: Callable[[Mapping[str, Any]], Union[RobustBenchCall, str]]
  image_shape: Tuple[int, int, int] = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class TorchTwin:
  """The PyTorch class computing a Flax model's function, as the export writes it.

  Attributes:
    class_name: its class in the exported ``bat_jax_models.py``.
    kwargs: ``(flax_module, image_shape) -> {name: JSON value}``, the class's own
      arguments; ``num_classes``, ``in_channels``, ``mean`` and ``std`` are
      always passed (first). May raise ValueError for a shape it cannot take.
    source: PyTorch source defining ``class_name``, appended to the exported
      module file (which defines ``torch``, ``nn``, ``F``, ``Normalize`` and
      ``batch_norm``); '' for a class of the shipped file (TEMPLATE_CLASSES).
    renames: Flax submodule name -> PyTorch attribute path.
    blocks: ``(regex with two number groups, format)``: numbered Flax blocks
      (1-based) -> PyTorch names ``format.format(first, second - 1)``.
    same_names: Flax submodule names that PyTorch keeps.
    flatten: ``(dense, conv)``: the dense layer that reads the flattened output
      of ``conv``; its rows are reordered from the NHWC to PyTorch's NCHW flatten.
    robustbench: RobustBench's class, or None: RobustBench has none.
  """
  class_name: str
  kwargs: Callable[[nn.Module, Tuple[int, ...]], Dict[str, Any]]
  source: str = ""
  renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
  blocks: Optional[Tuple[str, str]] = None
  same_names: Tuple[str, ...] = ("conv1", "conv2", "bn1", "bn2", "fc1", "fc2")
  flatten: Optional[Tuple[str, str]] = None
  robustbench: Optional[RobustBenchClass] = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model: the ``config.model`` value and everything that depends on it.

  Attributes:
    name: the ``config.model`` value.
    module: the Flax class; it has the fields REQUIRED_FIELDS (and
      BATCH_NORM_FIELD with BatchNorm), is called as ``apply(variables, x,
      train=...)`` on NHWC images in ``[0, 1]`` and returns float32 logits.
    has_batch_norm: whether it carries a 'batch_stats' collection.
    defaults: field values of this model (e.g. ``{'depth': 34}``), overridable
      by ``create_model``'s keyword arguments.
    display_name: its name in model cards and RobustBench's ``architecture``
      ('' : the name).
    export_suffix: the architecture suffix of the exported RobustBench name,
      as RobustBench's ``_R18`` ('': the name without non-word characters).
    torch: its PyTorch twin; None: the twin of another entry of the same Flax
      class (e.g. a resized variant), or if none has one, the export refuses it.
  """
  name: str
  module: Type[nn.Module]
  has_batch_norm: bool
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  display_name: str = ""
  export_suffix: str = ""
  torch: Optional[TorchTwin] = None


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """Models named by a pattern, each registered the first time :func:`get` sees its name.

  Attributes:
    template: the names as people write them, e.g. ``'wrn{depth}_{width}'``.
    pattern: a regular expression matching exactly the family's names.
    spec_for: a match of ``pattern`` -> the name's :class:`ModelSpec`; raises
      errors.UserError when the name's numbers make no model.
  """
  template: str
  pattern: str
  spec_for: Callable[["re.Match[str]"], ModelSpec]


MODELS: Dict[str, ModelSpec] = {}
FAMILIES: Dict[str, ModelFamily] = {}  # by template


def _refuse(spec: ModelSpec, why: str):
  raise ValueError(f"register_model({spec.name!r}): {why}")


def _check_twin(spec: ModelSpec) -> None:
  twin = spec.torch
  if twin.source:
    if twin.class_name in TEMPLATE_CLASSES:
      _refuse(spec, f"the PyTorch class {twin.class_name!r} is one of the exported "
              f"module file's {list(TEMPLATE_CLASSES)}; give yours another name.")
    if not re.search(rf"^class {re.escape(twin.class_name)}\b",
                     textwrap.dedent(twin.source), re.M):
      _refuse(spec, f"torch.source does not define `class {twin.class_name}`.")
  elif twin.class_name not in TEMPLATE_CLASSES:
    _refuse(spec, f"the PyTorch class {twin.class_name!r} is not in the exported module "
            f"file ({list(TEMPLATE_CLASSES)}); give its source as torch.source.")
  for other in MODELS.values():
    if other.module is spec.module and other.torch not in (None, twin):
      _refuse(spec, f"its Flax class {spec.module.__name__} is {other.name!r}'s, whose "
              "PyTorch twin differs; a Flax class has one twin (share the TorchTwin).")
    if (other.torch is not None and other.torch.class_name == twin.class_name
        and other.torch.source != twin.source):
      _refuse(spec, f"the PyTorch class name {twin.class_name!r} is taken by "
              f"{other.name!r}'s twin.")


def register_model(spec: ModelSpec) -> ModelSpec:
  """Adds ``spec`` to :data:`MODELS`: ``config.model=spec.name`` trains, evaluates and
  exports it. Refuses a name already taken and a spec that could not work."""
  if not isinstance(spec.name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", spec.name):
    _refuse(spec, "the name must be a word (letters, digits, '_', '-', '.').")
  if spec.name in MODELS:
    _refuse(spec, f"a model {spec.name!r} is already registered; choose another name "
            f"(registered: {list(MODELS)}).")
  if not (isinstance(spec.module, type) and issubclass(spec.module, nn.Module)):
    _refuse(spec, f"module must be a flax.linen.Module class; got {spec.module!r}.")
  fields = {f.name for f in dataclasses.fields(spec.module)}
  needed = REQUIRED_FIELDS + ((BATCH_NORM_FIELD,) if spec.has_batch_norm else ())
  missing = [f for f in needed + tuple(spec.defaults) if f not in fields]
  if missing:
    _refuse(spec, f"{spec.module.__name__} has no field {missing}; a model has "
            f"{list(needed)} and the fields its defaults set.")
  if spec.torch is not None:
    _check_twin(spec)
  MODELS[spec.name] = spec
  return spec


def register_family(family: ModelFamily) -> ModelFamily:
  """Adds ``family`` to :data:`FAMILIES`: its names are models from then on."""
  if family.template in FAMILIES:
    raise ValueError(f"register_family: {family.template!r} is already registered.")
  re.compile(family.pattern)
  FAMILIES[family.template] = family
  return family


def names() -> Tuple[str, ...]:
  """The registered models' names, then the families' templates (for messages)."""
  return tuple(MODELS) + tuple(FAMILIES)


def find(name: str) -> Optional[ModelSpec]:
  """The entry of model ``name``: registered, or made (and registered) by the family
  whose pattern it matches; None for neither. A family's name whose numbers
  make no model (``wrn30_10``) raises errors.UserError saying why."""
  if name in MODELS:
    return MODELS[name]
  for family in FAMILIES.values():
    match = re.fullmatch(family.pattern, str(name))
    if match:
      spec = family.spec_for(match)
      if spec.name != name:
        raise ValueError(f"{family.template}: spec_for({name!r}) made {spec.name!r}.")
      return register_model(spec)
  return None


def get(name: str) -> ModelSpec:
  """The registry entry of model ``name``; a UserError naming the models otherwise."""
  spec = find(name)
  if spec is None:
    raise errors.UserError(
        f"Unknown model {name!r}{errors.did_you_mean(name, list(MODELS))}; the model "
        f"name must be one of {names()}.")
  return spec


def activations(name: str) -> Tuple[str, ...]:
  """The activations model ``name`` is built with: all of ``common.ACTIVATIONS`` when its
  Flax class has an ``activation`` field, else its own ReLU only."""
  fields = {f.name for f in dataclasses.fields(get(name).module)}
  return tuple(common.ACTIVATIONS) if "activation" in fields else ("relu",)


def torch_twin(module: nn.Module) -> TorchTwin:
  """The PyTorch twin of a Flax ``module``: that of the registered model whose class
  is nearest in ``module``'s class hierarchy (so ``ResNet18`` and resized
  ``ResNet`` instances share one)."""
  for cls in type(module).__mro__:
    for spec in MODELS.values():
      if spec.module is cls and spec.torch is not None:
        return spec.torch
  exportable = [s.name for s in MODELS.values() if s.torch is not None]
  raise ValueError(f"No PyTorch export for {type(module).__name__}: exportable are the "
                   f"models {exportable} (a registry entry with a PyTorch twin) and "
                   "subclasses of their Flax classes.")
