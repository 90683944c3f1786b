"""CIFAR-10 with generated data: the recipe of the leading RobustBench entries, with BAT.

Gowal et al. 2021 ("Improving Robustness using Generated Data") and Rebuffi
et al. 2021 ("Fixing Data Augmentation to Improve Adversarial Robustness"):
a WideResNet with SiLU (Swish) activations, 70% of every batch from 1M-20M
images of a generative model (DDPM) labelled by a classifier, a weight
average (EMA 0.995 per step) that is evaluated instead of the raw weights,
label smoothing 0.1, batch 1024, SGD with Nesterov momentum, cosine lr 0.4,
weight decay 5e-4. Their objective is TRADES (beta 6); this file trains BAT
(`--config.method=trades --config.beta=6` for theirs). Optional: AWP
(`--config.awp_gamma=0.005`), WRN-70-16 (`model=wrn70_16`). docs/TRAINING.md
describes each option with its reference.

The extra data: shards made once by the converter (any size; each host reads
only its share, never the whole set), or a small .npz read into memory:
  python -m bat_jax.data.convert_extra --input=cifar10_ddpm.npz --output_dir=DIR
Run (GPU, CIFAR-10 prepared by TFDS in --config.data_dir):
  python -m bat_jax.main --config=configs/cifar10_generated.py \
      --config.extra_data_path=DIR --config.data_dir=TFDS_DIR --workdir=runs/c10_generated
TPU pod slice (launch/README.md; the shards on a filesystem every host mounts,
from which each host reads only its share):
  CONFIG=configs/cifar10_generated.py WORKDIR=gs://BUCKET/runs/c10_generated \
  EXTRA_ARGS="--config.extra_data_path=/mnt/shared/cifar10_ddpm --config.data_dir=/mnt/shared/tfds" \
      launch/tpu_pod.sh train
SLURM GPU cluster:
  CONFIG=configs/cifar10_generated.py WORKDIR=/shared/runs/c10_generated \
  EXTRA_ARGS="--config.extra_data_path=/shared/cifar10_ddpm --config.data_dir=/shared/tfds" \
      sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sbatch
CPU smoke run (tiny SiLU WRN, a few steps; any small extra set):
  python -m bat_jax.main --config=configs/cifar10_generated.py:runlocal \
      --config.extra_data_path=DIR --workdir=/tmp/c10_generated_local
"""

import os

from bat_jax import configlib

_cifar10 = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  configlib.check_arg_keys(args, ("eps", "model", "runlocal"),
                           "configs/cifar10_generated.py")
  base_arg = ",".join(f"{k}={v}" if v is not True else k for k, v in args.items())
  c = _cifar10.get_config(base_arg + ("," if base_arg else "") + "schedule=step")
  c.activation = "silu"
  c.extra_data_path = configlib.REQUIRED  # refused until --config.extra_data_path=...
  c.extra_fraction = 0.7  # 30% CIFAR-10, 70% generated, in every batch
  c.ema_decay = 0.995
  c.label_smoothing = 0.1
  c.schedule = "cosine"
  c.nesterov = True
  if args.get("runlocal"):
    c.model = args.get("model", "tiny_wrn")  # WRN-10-1: the WRN code path at CPU size
  else:
    c.batch_size = 1024
    c.learning_rate = 0.4  # 0.1 x batch / 256
    # An epoch is a pass over CIFAR-10's 50,000 images, 307 per batch: 162 steps.
    # 120 epochs are 19,440 steps, about the 19,531 of Gowal et al.'s 400
    # epochs of 50,000 / 1024 steps.
    c.num_epochs = 120
  c.early_stopping = False  # the average is the final model
  return c
