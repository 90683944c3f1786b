"""CIFAR-10 (docs/ALGORITHMS.md section 4): WRN-28-10 (or ResNet-18), SGD, PGD^10 step 2/255.

Variants (comma-separated after the file name):
  eps=8|12|16          training/evaluation radius in /255 units (default 8; eps=8/255 too)
  model=NAME           wrn28_10 (default), wrn34_10, wrn70_16, any wrn{depth}_{width},
                       resnet18, preact_resnet18 (--config.activation=silu: SiLU WRNs)
  schedule=onecycle    30 epochs, cyclic lr with max 0.3 (the paper's main setting)
  schedule=step        100 epochs, lr 0.1 /10 at 40, 60, 80 + early stopping (appendix B.2)
  runlocal             a CPU-sized smoke run (tiny ResNet, few steps)

Run (needs CIFAR-10 prepared by TFDS in --config.data_dir):
  python -m bat_jax.main --config=configs/cifar10.py --workdir=runs/c10_bat
  python -m bat_jax.main --config=configs/cifar10.py:eps=16,model=resnet18 \
      --config.method=trades --config.beta=5 --workdir=runs/c10_trades_16
CPU smoke run:
  python -m bat_jax.main --config=configs/cifar10.py:runlocal --workdir=/tmp/c10_local
"""

from bat_jax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  configlib.check_arg_keys(args, ("eps", "model", "schedule", "runlocal"),
                           "configs/cifar10.py")
  return cifar_config(args, dataset="cifar10", model="wrn28_10", schedule="onecycle",
                      config_file="configs/cifar10.py")


def cifar_config(args, *, dataset, model, schedule, config_file):
  """The paper's CIFAR training of ``dataset`` (also configs/cifar100.py's).

  ``model`` and ``schedule`` are the defaults of the ``model=`` and
  ``schedule=`` arguments; ``config_file`` names the file in errors.
  """
  c = configlib.base_config()
  c.dataset = dataset
  c.model = args.get("model", model)
  c.normalize = False  # the reference WRN sees raw [0, 1] inputs
  c.augment = True
  c.method = "bat"
  c.beta = 5.0
  c.num_bridges = 2
  c.eps = configlib.eps_from_arg(args, 8, config_file)  # eps=8 or eps=8/255
  c.attack_steps = 10
  c.attack_step_size = 2 / 255
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.batch_size = 128
  schedule = args.get("schedule", schedule)
  if schedule == "onecycle":
    c.schedule, c.learning_rate, c.num_epochs = "onecycle", 0.3, 30
  elif schedule == "step":
    c.schedule, c.learning_rate, c.num_epochs = "step", 0.1, 100
    c.lr_decay_epochs = (40, 60, 80)
  else:
    raise configlib.ConfigError(
        f"{config_file}: schedule={schedule!r}; use onecycle or step.")
  # The best checkpoint by PGD^10 on the first test batch, kept with the step
  # schedule (appendix B.2, the "(ES)" rows); Table 2 (onecycle) reports the final models.
  c.early_stopping = schedule == "step"
  c.early_stopping_attack_steps = 10
  c.eval_attack_steps = 20
  c.eval_attack_step_size = 2 / 255
  c.num_eval_examples = 1000
  c.eval_batch_size = 500
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
