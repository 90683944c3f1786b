"""Quickstart: BAT on 6,000 real MNIST digits bundled with the package, on a CPU.

Runs offline in about 1.5 minutes on 2 idle CPU cores and prints the clean and
PGD robust test accuracy on 1,000 test digits at eps 0.3 (clean 95.4%, PGD-20
45.8% on AMD EPYC Zen 2 and Zen 3 CPUs; float rounding may differ on others):
  python -m bat_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart
Compare with an undefended model:
  python -m bat_jax.main --config=configs/quickstart.py --config.method=standard \
      --workdir=/tmp/quickstart_standard
For the paper's full MNIST setting see configs/mnist.py.
"""

from bat_jax import configlib


def get_config(arg=None):
  # Already CPU-sized: `:runlocal` is accepted and changes nothing.
  configlib.check_arg_keys(configlib.parse_arg(arg), ("runlocal",),
                           "configs/quickstart.py")
  c = configlib.base_config()
  c.dataset = "mnist_subset"  # 6,000 train / 1,000 test images inside the package
  c.model = "lenet"
  c.method = "bat"
  c.beta = 5.0
  c.num_bridges = 2
  c.eps = 0.3
  # Fewer, larger PGD steps than the paper's PGD^40 / 0.02, to fit a CPU budget.
  c.attack_steps = 7
  c.attack_step_size = 0.06
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.schedule = "constant"
  c.num_epochs = 4
  c.batch_size = 128
  c.num_eval_examples = 1000
  c.eval_batch_size = 500
  c.eval_attack_steps = 20
  c.eval_attack_step_size = 0.03
  c.eval_every_epochs = 2
  c.early_stopping = False
  c.log_every_steps = 10
  return c
