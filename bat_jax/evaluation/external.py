"""Models trained elsewhere: a function in a Python file or module gives the logits.

``--model=path/to/file.py:make_model`` (or ``package.module:make_model``)
names a function that builds the model; with ``--checkpoint=PATH`` it is
called as ``make_model(PATH)``, else ``make_model()``. It returns either

* ``(apply_fn, variables)`` with ``apply_fn(variables, x) -> logits``: the
  variables (any pytree of arrays: Flax variables, Haiku params, an Equinox
  model's array leaves from ``eqx.partition``) are put on the devices once
  and name the model in the fingerprint of saved progress; or
* ``logits_fn(x) -> logits``: the weights live inside the function (compiled
  in as constants).

``x`` is float32 ``[B, H, W, C]`` in ``[0, 1]`` (normalise inside the
model), the logits ``[B, num_classes]``; the model runs in inference mode.
"""

import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from bat_jax import datasets, fs
from bat_jax.errors import UserError, did_you_mean
from bat_jax.evaluation import record
from bat_jax.evaluation.engine import check_logits as check_logits_of_batch


class ModelCodeError(UserError):
  """The user's model file raised: its own lines and message, not bat_jax's stack."""


def _user_code_error(what: str, error: BaseException) -> ModelCodeError:
  """``error`` as the user's: the message and the frames of the user's own code
  (file, line, code), without those of bat_jax, the standard library or
  installed packages."""
  not_users = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               os.path.dirname(os.path.abspath(os.__file__))]
  not_users += [p for p in sys.path if os.path.basename(p) in ("site-packages",
                                                              "dist-packages")]
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith("<")
            and not any(os.path.abspath(f.filename).startswith(os.path.abspath(p) + os.sep)
                        for p in not_users)]
  lines = traceback.format_list(frames)
  if isinstance(error, SyntaxError):  # the file itself: its line has no frame
    lines.append(f'  File "{error.filename}", line {error.lineno}\n'
                 f"    {(error.text or '').strip()}\n")
    message = error.msg
  else:
    message = str(error)
  return ModelCodeError(f"{what} raised {type(error).__name__}: {message}\n"
                        + "".join(lines).rstrip())


def _import(target: str):
  """The module a spec names: a ``.py`` path, or a dotted module name."""
  if target.endswith(".py") or os.sep in target:
    if not os.path.isfile(target):
      raise UserError(f"--model: no Python file {target!r}.")
    name = "bat_jax_user_model_" + record.arrays_sha256(
        np.frombuffer(os.path.abspath(target).encode(), np.uint8))[:12]
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own folder first, so it can import its neighbours.
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # the user's code: show it as theirs
      raise _user_code_error(f"--model: importing {target}", e) from None
    finally:
      sys.path.pop(0)
    return module
  try:
    return importlib.import_module(target)
  except ModuleNotFoundError as e:
    if not target.startswith(e.name or "\0"):  # the module itself imports a missing one
      raise _user_code_error(f"--model: importing {target}", e) from None
    raise UserError(f"--model: cannot import module {target!r} ({e}); give a file "
                    "path (path/to/file.py:function) or an importable module.") from None
  except Exception as e:
    raise _user_code_error(f"--model: importing {target}", e) from None


def as_apply_fn(made: Any, what: str = "the model function") -> Tuple[Callable, Any]:
  """``(apply_fn, variables)`` from ``(apply_fn, variables)`` or a ``logits_fn``."""
  if isinstance(made, (tuple, list)) and len(made) == 2 and callable(made[0]):
    return made[0], made[1]
  if callable(made):
    return (lambda variables, x: made(x)), {}
  raise UserError(f"{what} returned {type(made).__name__}; it must return "
                  "(apply_fn, variables) with apply_fn(variables, x) -> logits, or a "
                  "logits_fn(x) -> logits.")


def load_model(spec: str, checkpoint: Optional[str] = None
               ) -> Tuple[Callable, Any, Dict[str, Any]]:
  """``(apply_fn, variables, model record)`` from ``'file.py:function'`` or
  ``'module:function'``; the record (spec, source and checkpoint digests, the
  variables' digest) names the model in saved progress and in the results."""
  target, _, function = spec.rpartition(":")
  if not target or not function:
    raise UserError(f"--model={spec!r}: expected path/to/file.py:function or "
                    "package.module:function.")
  if checkpoint is not None and not fs.exists(checkpoint):
    raise UserError(f"--checkpoint={checkpoint}: no such file or directory.")
  module = _import(target)
  make = getattr(module, function, None)
  if not callable(make):
    found = sorted(k for k, v in vars(module).items()
                   if callable(v) and not k.startswith("_"))
    raise UserError(f"--model: {target!r} has no function {function!r}"
                    f"{did_you_mean(function, found)}; it has "
                    f"{', '.join(found) or 'none'}.")
  try:
    made = make(checkpoint) if checkpoint is not None else make()
  except Exception as e:  # the user's code: show it as theirs
    raise _user_code_error(f"--model={spec}", e) from None
  apply_fn, variables = as_apply_fn(made, f"{spec}")
  source = getattr(module, "__file__", None)
  model = {"spec": spec, "source_sha256": record.path_sha256(source) if source else None,
           "checkpoint": os.fspath(fs.path(checkpoint)) if checkpoint else None,
           "checkpoint_sha256": record.path_sha256(checkpoint) if checkpoint else None,
           "variables_sha256": record.tree_sha256(variables)}
  return apply_fn, variables, model


def check_logits(apply_fn: Callable, variables: Any, images: np.ndarray,
                 labels: np.ndarray, *, model: str = "the model",
                 num_classes: Optional[int] = None,
                 source: str = "the labels") -> np.ndarray:
  """The model's logits on two examples; a UserError says what is wrong with them
  (``engine.check_logits``: shape, class count, labels in range, finite)."""
  x = np.asarray(images[:2], np.float32) / 255.0
  try:
    logits = jax.jit(apply_fn)(variables, x)
  except Exception as e:  # the user's code: report it in one message
    raise UserError(f"the model fails on a batch of shape {x.shape} (float32 in "
                    f"[0, 1], [B, H, W, C]): {type(e).__name__}: {e}") from e
  shape = getattr(logits, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != len(x):
    raise UserError(f"{model} must return logits [B, num_classes]; for B={len(x)} "
                    f"it returned shape {shape}.")
  check_logits_of_batch(np.asarray(logits), labels[:len(x)], model=model,
                        num_classes=num_classes, source=source)
  datasets.check_labels(labels, shape[1], f"{source} (the model gives {shape[1]} "
                        "logits per example)")
  return np.asarray(logits)
