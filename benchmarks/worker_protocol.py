"""The JSON-lines protocol between compare.py and its benchmark workers.

One request per stdin line, one reply per stdout line. ``setup`` / ``time`` /
``drop`` / ``quit`` are the same for every framework; each worker adds its
own commands (``peak``, ``machine``, evaluation). Standard library only, so
that both the bat_jax venv and the PyTorch venv can import it.
"""

import json
import sys
import traceback
from typing import Any, Callable, Dict


def serve(make_bench: Callable[[dict], Any],
          commands: Dict[str, Callable[[dict], dict]]) -> None:
  """Answers requests until ``quit``; ``commands[cmd](request)`` gives the reply's fields.

  A bench from ``make_bench(case)`` must have ``info()`` and ``time(n)``.
  """
  benches = {}
  out = sys.stdout
  sys.stdout = sys.stderr  # anything printed by libraries goes to stderr
  for line in sys.stdin:
    req = json.loads(line)
    cmd = req["cmd"]
    try:
      if cmd == "quit":
        out.write(json.dumps({"ok": True}) + "\n")
        out.flush()
        return
      if cmd == "setup":
        benches[req["id"]] = make_bench(req["case"])
        reply = {"ok": True, "info": benches[req["id"]].info()}
      elif cmd == "time":
        reply = {"ok": True, "times": benches[req["id"]].time(req["n"])}
      elif cmd == "drop":
        benches.pop(req["id"], None)
        reply = {"ok": True}
      elif cmd in commands:
        reply = {"ok": True, **commands[cmd](req)}
      else:
        reply = {"ok": False, "error": f"unknown cmd {cmd}"}
    except Exception as e:  # pylint: disable=broad-except
      reply = {"ok": False, "error": repr(e), "traceback": traceback.format_exc()}
    out.write(json.dumps(reply) + "\n")
    out.flush()
