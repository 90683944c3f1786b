"""CIFAR-10 with 500K pseudo-labelled extra images (the paper's Table 3, "RST").

The extra data is an .npz with uint8 `image` [N, 32, 32, 3] and int `label` [N]
(read into memory) or a directory of array_record shards (streamed), e.g. Carmon
et al.'s ti_500K_pseudo_labeled.pickle converted; half of each batch comes from
it. Cosine lr, 200 epochs. Run:
  python -m bat_jax.data.convert_extra --input=ti_500K_pseudo_labeled.pickle \
      --output_dir=/data/ti500k
  python -m bat_jax.main --config=configs/cifar10_rst.py \
      --config.extra_data_path=/data/ti500k --workdir=runs/c10_rst_bat
"""

import os

from bat_jax import configlib

_cifar10 = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  configlib.check_arg_keys(args, ("eps", "model", "runlocal"), "configs/cifar10_rst.py")
  base_arg = ",".join(f"{k}={v}" if v is not True else k for k, v in args.items())
  c = _cifar10.get_config(base_arg + ("," if base_arg else "") + "schedule=step")
  c.extra_data_path = configlib.REQUIRED  # refused until --config.extra_data_path=...
  c.extra_fraction = 0.5
  c.schedule = "cosine"
  c.learning_rate = 0.1
  c.num_epochs = 200
  return c
