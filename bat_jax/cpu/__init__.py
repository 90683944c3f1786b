"""Layers that XLA:CPU runs fast, the convolution programs under them, and their choices.

The same functions and variables as Flax's ``Conv``, ``BatchNorm`` and
``max_pool``, written as programs XLA:CPU runs 1.3-2.5x faster in adversarial
training (docs/PERFORMANCE.md); on GPU and TPU the stock ones are the fast
ones. The models know nothing of them: they take ``models.layers.Layers``,
and ``train_state.build_model`` passes ``layers_for(config.ops)``
('auto': these on the CPU backend, the stock ones elsewhere).

  layers.py    ``Conv``, ``BatchNorm``, ``max_pool``, ``LAYERS``, ``layers_for``
  conv.py      ``conv_general_dilated``: the convolution programs and their gradients
  winograd.py  Winograd F(2x2, 3x3) and F(4x4, 3x3)
  tuning.py    which program a large convolution takes on this machine: measured
               only inside ``measuring()``, cached per machine, pinned from a
               run's workdir (``pin_workdir_choices`` / ``record_workdir_choices``)
"""

from bat_jax.cpu.conv import conv_general_dilated, conv_program
from bat_jax.cpu.layers import (LAYERS, OPS, BatchNorm, Conv, layers_for,
                                max_pool)
from bat_jax.cpu.tuning import (WORKDIR_FILE, choices_made, measuring,
                                measuring_first_call, pin_workdir_choices,
                                record_workdir_choices)

__all__ = ["BatchNorm", "Conv", "LAYERS", "OPS", "WORKDIR_FILE", "choices_made",
           "conv_general_dilated", "conv_program", "layers_for", "max_pool",
           "measuring", "measuring_first_call", "pin_workdir_choices",
           "record_workdir_choices"]
