"""CIFAR-100 (docs/ALGORITHMS.md section 4, appendix B.3): ResNet-18, SGD lr 0.1, 100 epochs, eps 8/255.

BAT's beta is searched in {1, 2, 3, 5, 10} on CIFAR-100 (`--config.beta=...`).
Run:
  python -m bat_jax.main --config=configs/cifar100.py --workdir=runs/c100_bat
CPU smoke run:
  python -m bat_jax.main --config=configs/cifar100.py:runlocal --workdir=/tmp/c100_local
"""

from bat_jax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  configlib.check_arg_keys(args, ("eps", "model", "runlocal"), "configs/cifar100.py")
  c = configlib.base_config()
  c.dataset = "cifar100"
  c.model = args.get("model", "resnet18")
  c.augment = True
  c.method = "bat"
  c.beta = 5.0
  c.eps = configlib.eps_from_arg(args, 8, "configs/cifar100.py")
  c.attack_steps = 10
  c.attack_step_size = 2 / 255
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = "step"
  c.lr_decay_epochs = (40, 60, 80)
  c.num_epochs = 100
  c.batch_size = 128
  c.early_stopping = True
  c.eval_attack_steps = 20
  c.eval_attack_step_size = 2 / 255
  c.num_eval_examples = 1000
  if args.get("runlocal"):
    c.model = args.get("model", "tiny_resnet")
    c.num_train_examples = 512
    c.num_train_steps = 20
    c.batch_size = 32
    c.lr_decay_epochs = (1,)  # for a step schedule: inside the 20 steps (16 per epoch)
    c.attack_steps = 3
    c.num_eval_examples = 64
    c.eval_batch_size = 32
    c.eval_attack_steps = 3
    c.log_every_steps = 5
  return c
