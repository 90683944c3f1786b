"""How runs are named in tables, figures and exports: one eps format, one set of names.

Method names and colours come from the method registry (``bat_jax.methods``).
"""

from typing import Optional

DATASET_NAMES = {"mnist": "MNIST", "mnist_subset": "MNIST (subset)",
                 "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def format_eps(eps: Optional[float], dataset: str = "") -> str:
  """The radius as the paper writes it: '8/255' on image data sets in /255 units, '0.3' on MNIST.

  A radius that is no whole number of 255ths (0.031) is written as a decimal,
  so 0.031 and 8/255 never look alike; None -> '?'.
  """
  if eps is None:
    return "?"
  scaled = eps * 255
  if "mnist" not in dataset.lower() and eps > 0 and abs(scaled - round(scaled)) < 1e-4:
    return f"{int(round(scaled))}/255"
  return f"{eps:g}"


def dataset_name(dataset: str) -> str:
  return DATASET_NAMES.get(dataset, dataset)
