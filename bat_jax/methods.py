"""The training methods: one registry that the config, the train step, tables and plots read.

A method is its objective (a function of the clean inputs, the adversarial
ones and the model's training-mode forward pass; docs/ALGORITHMS.md, section 1),
the objective of its inner attack, how it is shown (name, colour) and which
of its logged terms the gradient diagnostics leave out.
Adding a method is one :func:`register` call with its loss; nothing else
names methods. An unknown name is refused by ``configlib.validate`` (it lists
:data:`METHODS`), so it can never reach the step.
"""

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Tuple

import jax.numpy as jnp

from bat_jax import losses

Array = Any
# (config, forward, x, x_adv, labels) -> (loss, aux metrics, {name: logits}).
# ``forward(x)`` is one training-mode forward pass; ``forward.many([a, b, ...])``
# several, in order (one batched pass with ``config.fused_forward``).
LossFn = Callable[..., Tuple[Array, Dict[str, Array], Dict[str, Array]]]

# The inner attack's random start follows its objective unless the config
# names one: CE-PGD starts uniformly in the ball (Madry et al.), KL-PGD
# ("TPGD", TRADES's inner maximisation) at x + 0.001 N(0, 1), clipped.
START_FOR_OBJECTIVE = {"ce": "uniform", "kl": "normal"}


class Paper(NamedTuple):
  """Where a method comes from (model cards and RobustBench exports cite it)."""
  title: str = ""
  authors: str = ""
  link: str = ""
  venue: str = ""


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method.

  Attributes:
    name: the ``config.method`` value.
    loss: its objective (:data:`LossFn`).
    attack_objective: the inner attack's objective, 'ce' or 'kl'; '' for
      none (the clean inputs are used as they are).
    display_name: the name in tables and figure legends.
    color: its matplotlib colour in figures.
    long_name: the name in model cards.
    hyperparameters: the config fields of its objective (shown with its name).
    paper: its paper.
    diagnostic_exclude: the loss's aux metrics that the gradient diagnostics
      leave out: logged values that are no term of the objective of their own
      (e.g. a part of a term already shown).
    label_smoothing: whether its loss reads ``config.label_smoothing`` (smoothed
      targets in its CE terms); ``configlib.validate`` refuses a smoothing > 0
      for a method whose loss would ignore it.
  """
  name: str
  loss: LossFn
  attack_objective: str
  display_name: str
  color: str
  long_name: str = ""
  hyperparameters: Tuple[str, ...] = ()
  paper: Paper = Paper()
  diagnostic_exclude: Tuple[str, ...] = ()
  label_smoothing: bool = False


METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f"method {method.name!r} is already registered.")
  if method.attack_objective not in ("", *START_FOR_OBJECTIVE):
    raise ValueError(f"method {method.name!r}: attack_objective must be '', 'ce' or "
                     f"'kl'; got {method.attack_objective!r}.")
  if not (isinstance(method.diagnostic_exclude, tuple)
          and all(isinstance(n, str) for n in method.diagnostic_exclude)):
    raise ValueError(f"method {method.name!r}: diagnostic_exclude must be a tuple of "
                     f"aux metric names; got {method.diagnostic_exclude!r}.")
  METHODS[method.name] = method
  return method


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; the methods are {list(METHODS)}.")
  return METHODS[name]


def display_name(name: str) -> str:
  """'bat' -> 'BAT'; an unregistered name is shown as it is."""
  return METHODS[name].display_name if name in METHODS else name


def color(name: str) -> str:
  return METHODS[name].color if name in METHODS else "black"


def describe(config) -> str:
  """'BAT (beta = 5, num_bridges = 2)': the method with its objective's settings
  (and 'label_smoothing = 0.1' when its CE targets are smoothed); 'BAT-AWP
  (..., awp_gamma = 0.005)' with adversarial weight perturbation."""
  method = get(config.method)
  awp = bool(config.get("awp_gamma"))
  fields = method.hyperparameters + (
      ("label_smoothing",) if config.get("label_smoothing") else ()) + (
      ("awp_gamma",) if awp else ())
  settings = ", ".join(f"{field} = {config[field]:g}" if isinstance(config[field], float)
                       else f"{field} = {config[field]}" for field in fields)
  name = method.long_name or method.display_name
  if awp:
    name = f"{method.display_name}-AWP"
  return f"{name} ({settings})" if settings else name


def resolved_attack(config) -> Tuple[str, str]:
  """(objective, start) of the training attack: the config's, else the method's.

  The start defaults to the one of the objective (:data:`START_FOR_OBJECTIVE`),
  so choosing ``attack_objective='kl'`` also switches to TPGD's start, as the
  reference code does.
  """
  objective = config.attack_objective or get(config.method).attack_objective or "ce"
  return objective, config.attack_start or START_FOR_OBJECTIVE[objective]


# --------------------------------------------------------------------------
# The objectives (docs/ALGORITHMS.md, section 1). ``config.label_smoothing``
# smooths the targets of their CE terms; the inner attack's CE stays plain.
# --------------------------------------------------------------------------


def standard(config, forward, x, x_adv, labels):
  del x_adv
  clean = forward(x)
  loss, aux = losses.standard_loss(clean, labels, label_smoothing=config.label_smoothing)
  return loss, aux, {"clean": clean}


def adversarial_training(config, forward, x, x_adv, labels):
  del x
  adv = forward(x_adv)
  loss, aux = losses.at_loss(adv, labels, label_smoothing=config.label_smoothing)
  return loss, aux, {"adv": adv}


def trades(config, forward, x, x_adv, labels):
  clean, adv = forward.many([x, x_adv])
  loss, aux = losses.trades_loss(clean, adv, labels, config.beta,
                                 config.stop_gradient_target,
                                 label_smoothing=config.label_smoothing)
  return loss, aux, {"clean": clean, "adv": adv}


def mart(config, forward, x, x_adv, labels):
  """MART; label smoothing applies to the CE part of its BCE only."""
  clean, adv = forward.many([x, x_adv])
  loss, aux = losses.mart_loss(clean, adv, labels, config.beta,
                               config.stop_gradient_target,
                               label_smoothing=config.label_smoothing)
  return loss, aux, {"clean": clean, "adv": adv}


def bat(config, forward, x, x_adv, labels):
  """CE at x + beta * the KL divergences between consecutive bridge points."""
  points = losses.bridge_points(x, x_adv, config.num_bridges)
  clean, *bridges = forward.many([x] + [points[k] for k in range(config.num_bridges)])
  bridge_logits = jnp.stack(bridges)
  loss, aux = losses.bat_loss(clean, bridge_logits, labels, config.beta,
                              config.stop_gradient_target,
                              label_smoothing=config.label_smoothing)
  return loss, aux, {"clean": clean, "adv": bridge_logits[-1]}


register(Method(
    "standard", standard, "", "Standard", "tab:gray", long_name="Standard training",
    label_smoothing=True,
    paper=Paper("Standard (non-robust) training")))
register(Method(
    "at", adversarial_training, "ce", "AT", "tab:orange",
    long_name="AT (PGD adversarial training)", label_smoothing=True,
    paper=Paper("Towards Deep Learning Models Resistant to Adversarial Attacks",
                "Aleksander Madry, Aleksandar Makelov, Ludwig Schmidt, Dimitris Tsipras, "
                "Adrian Vladu", "https://arxiv.org/abs/1706.06083", "ICLR 2018")))
register(Method(
    "trades", trades, "kl", "TRADES", "tab:blue", hyperparameters=("beta",),
    label_smoothing=True,
    paper=Paper("Theoretically Principled Trade-off between Robustness and Accuracy",
                "Hongyang Zhang, Yaodong Yu, Jiantao Jiao, Eric P. Xing, "
                "Laurent El Ghaoui, Michael I. Jordan",
                "https://arxiv.org/abs/1901.08573", "ICML 2019")))
register(Method(
    "mart", mart, "ce", "MART", "tab:purple", hyperparameters=("beta",),
    label_smoothing=True,
    paper=Paper("Improving Adversarial Robustness Requires Revisiting Misclassified "
                "Examples", "Yisen Wang, Difan Zou, Jinfeng Yi, James Bailey, Xingjun Ma, "
                "Quanquan Gu", "https://openreview.net/forum?id=rklOg6EFwS", "ICLR 2020")))
register(Method(
    "bat", bat, "ce", "BAT", "tab:red", hyperparameters=("beta", "num_bridges"),
    diagnostic_exclude=("kl_last_bridge",),  # a part of "kl", the bridges' sum
    label_smoothing=True,
    paper=Paper("Bridged Adversarial Training",
                "Hoki Kim, Woojin Lee, Sungyoon Lee, Jaewook Lee",
                "https://arxiv.org/abs/2108.11135", "arXiv, Aug 2021")))
