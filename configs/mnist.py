"""MNIST, the paper's setting (docs/ALGORITHMS.md section 4): LeNet, Adam, PGD^40 at eps 0.3 or 0.45.

Run (GPU/TPU):
  python -m bat_jax.main --config=configs/mnist.py --workdir=runs/mnist_bat
  python -m bat_jax.main --config=configs/mnist.py:eps=0.45 --config.method=trades \
      --workdir=runs/mnist_trades_045
  --config.data_dir=DIR reads MNIST prepared by TFDS offline; prepare it once
  with `tfds build mnist --data_dir=DIR --file_format=array_record`.
CPU variant (several minutes on 2 cores, 8k training images, 3 epochs, PGD^10):
  python -m bat_jax.main --config=configs/mnist.py:runlocal \
      --config.data_dir=DIR --workdir=/tmp/mnist_runlocal
"""

from bat_jax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  configlib.check_arg_keys(args, ("eps", "runlocal"), "configs/mnist.py")
  c = configlib.base_config()
  c.dataset = "mnist"
  c.model = "lenet"
  c.method = "bat"
  c.beta = 5.0
  c.num_bridges = 2
  c.eps = configlib.parse_number(args.get("eps", 0.3), "configs/mnist.py: eps")  # the paper: 0.3 and 0.45 (sweep 0.1..0.45)
  c.attack_steps = 40
  c.attack_step_size = 0.02
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  # Table 1's footnote: MART trains with SGD from lr 0.01 (with Adam it
  # converges to a constant function); applied whenever method=mart.
  c.method_settings = configlib.method_settings(
      mart=dict(optimizer="sgd", learning_rate=0.01))
  c.schedule = "step"
  c.lr_decay_epochs = (30, 40)
  c.num_epochs = 50
  c.batch_size = 128
  # Evaluation during training: PGD^20 on 1,000 test images; the final
  # PGD^50 x 10 / AutoAttack numbers come from `python -m bat_jax.evaluate`.
  c.eval_attack_steps = 20
  c.eval_attack_step_size = 0.01
  c.num_eval_examples = 1000
  c.early_stopping = False  # the paper uses early stopping on CIFAR only
  if args.get("runlocal"):
    c.num_train_examples = 8000
    c.num_epochs = 3
    c.lr_decay_epochs = (2,)
    c.attack_steps = 10
    c.attack_step_size = max(c.eps / 4, 0.02)
    c.eval_attack_steps = 10
    c.eval_attack_step_size = max(c.eps / 8, 0.01)
    c.num_eval_examples = 1000
    c.log_every_steps = 20
  return c
