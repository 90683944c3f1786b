"""How runs are named in tables, figures and exports: one eps format, one set of names.

A robustness number means something only with its threat model, the norm
and the radius together: :func:`threat_model_label` ('L-inf ε=8/255', 'L2 ε=0.5')
is how every table, figure and report shows them. Norms are read in any
spelling (:func:`canonical_norm`: 'L2', 'l2', 'Linf', 'L-inf', 'inf', ...)
and written in one, ``'linf'`` or ``'l2'`` (config.json, results JSON,
evaluation progress), the spelling the attacks take. Method names and
colours come from the method registry (``bat_jax.methods``).
"""

from typing import Any, Mapping, Optional

from bat_jax.errors import UserError

DATASET_NAMES = {"mnist": "MNIST", "mnist_subset": "MNIST (subset)",
                 "cifar10": "CIFAR10", "cifar100": "CIFAR100"}

# The canonical norms (what bat_jax writes) and how people read them.
NORMS = ("linf", "l2")
NORM_LABELS = {"linf": "L-inf", "l2": "L2"}
# Spellings read as each norm, after lower-casing and dropping '-', '_' and spaces.
_NORM_SPELLINGS = {"linf": "linf", "inf": "linf", "linfinity": "linf",
                   "infinity": "linf", "l∞": "linf", "∞": "linf",
                   "l2": "l2", "2": "l2"}
# Results and configs written before the norm was recorded are L-inf.
DEFAULT_NORM = "linf"


def canonical_norm(norm: Any, what: str = "norm") -> str:
  """'linf' or 'l2' for any spelling of them ('Linf', 'L-inf', 'inf', 'L2', ...).

  Anything else raises a UserError naming ``what`` (the field or flag).
  """
  key = "".join(str(norm).split()).lower().replace("-", "").replace("_", "")
  if key in _NORM_SPELLINGS:
    return _NORM_SPELLINGS[key]
  raise UserError(f"{what}={norm!r} is not a threat model bat_jax knows; write linf "
                  "(L-inf) or l2 (L2), in any case.")


def norm_label(norm: Any) -> str:
  """'L-inf' or 'L2': the norm as tables and figures show it."""
  return NORM_LABELS[canonical_norm(norm)]


def eps_255(eps: float) -> Optional[str]:
  """'8/255' when eps is a whole number of 255ths (within 1e-4 of one), else None."""
  scaled = eps * 255
  if eps > 0 and abs(scaled - round(scaled)) < 1e-4:
    return f"{int(round(scaled))}/255"
  return None


def format_eps(eps: Optional[float], dataset: str = "", norm: Any = DEFAULT_NORM) -> str:
  """The radius as the paper writes it: '8/255' for an L-inf radius on image data
  sets in /255 units, '0.3' on MNIST and for L2 radii ('0.5', not '127.5/255').

  A radius that is no whole number of 255ths (0.031) is written as a decimal,
  so 0.031 and 8/255 never look alike; None -> '?'.
  """
  if eps is None:
    return "?"
  per_255 = eps_255(eps)
  if per_255 and canonical_norm(norm) == "linf" and "mnist" not in dataset.lower():
    return per_255
  return f"{eps:g}"


def threat_model_label(norm: Any, eps: Optional[float], dataset: str = "") -> str:
  """'L-inf ε=8/255', 'L-inf ε=0.3', 'L2 ε=0.5': the norm and radius a number was
  made at, as every table, figure and report shows them."""
  return f"{norm_label(norm)} ε={format_eps(eps, dataset, norm)}"


def norm_of(record: Optional[Mapping[str, Any]]) -> str:
  """The canonical norm a config, results or analysis record was made in.

  Reads ``norm`` or ``protocol.norm`` in any spelling (results written by
  earlier versions say 'Linf' / 'L2' in the protocol only); a record without
  one predates the L2 threat model and is L-inf.
  """
  record = record or {}
  norm = record.get("norm") or (record.get("protocol") or {}).get("norm")
  return DEFAULT_NORM if norm is None else canonical_norm(norm)


def eps_range_error(eps: float, norm: Any) -> Optional[str]:
  """Why ``eps`` cannot be a radius in ``norm`` (None when it can), for a message.

  Inputs live in [0, 1]: an L-inf radius lies in [0, 1]; an L2 radius is any
  radius >= 0 (it sums over every pixel: sqrt(784) = 28 spans an MNIST image).
  """
  norm = canonical_norm(norm)
  if norm == "linf" and not 0 <= eps <= 1:
    return ("must lie in [0, 1] for an L-inf radius (inputs live in [0, 1]; write "
            "8/255, not 8)")
  if norm == "l2" and not 0 <= eps < float("inf"):
    return ("must be a finite number >= 0 for an L2 radius (the Euclidean length of "
            "the whole image's perturbation, e.g. 0.5 on CIFAR-10, 2 on MNIST)")
  return None


def dataset_name(dataset: str) -> str:
  return DATASET_NAMES.get(dataset, dataset)
