"""CIFAR-100 (docs/ALGORITHMS.md section 4, appendix B.3): ResNet-18, SGD lr 0.1, 100 epochs, eps 8/255.

BAT's beta is searched in {1, 2, 3, 5, 10} on CIFAR-100 (`--config.beta=...`).
Run:
  python -m bat_jax.main --config=configs/cifar100.py --workdir=runs/c100_bat
CPU smoke run:
  python -m bat_jax.main --config=configs/cifar100.py:runlocal --workdir=/tmp/c100_local
"""

import os

from bat_jax import configlib

_cifar10 = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  configlib.check_arg_keys(args, ("eps", "model", "runlocal"), "configs/cifar100.py")
  # CIFAR-10's training with the step schedule and early stopping (appendix B.3).
  return _cifar10.cifar_config(args, dataset="cifar100", model="resnet18",
                               schedule="step", config_file="configs/cifar100.py")
