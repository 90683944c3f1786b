"""The package's shape (docs/LAYOUT.md): no import cycle, counting imports inside functions."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bat_jax"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, modules) -> set:
  """bat_jax modules that ``path`` imports anywhere (top level or in a function)."""
  found = set()
  package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      # `from a import b`: the module a.b if there is one, else a itself.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
               for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name and name.startswith("bat_jax"):
        found.add(name)
  return found


def import_graph():
  paths = sorted(PACKAGE.rglob("*.py"))
  modules = {module_name(p) for p in paths}
  return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert "bat_jax.train" in graph and "bat_jax.rundir" in graph["bat_jax.analysis"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_floors_do_not_import_the_programs():
  graph = import_graph()
  programs = {"bat_jax.train", "bat_jax.evaluate", "bat_jax.analysis", "bat_jax.plots",
              "bat_jax.export", "bat_jax.experiment", "bat_jax.main", "bat_jax.sweep",
              "bat_jax.reproduce"}
  for module in ("bat_jax.losses", "bat_jax.attacks", "bat_jax.rundir",
                 "bat_jax.train_step", "bat_jax.watch", "bat_jax.evaluation.engine",
                 "bat_jax.methods", "bat_jax.datasets", "bat_jax.extra_data",
                 "bat_jax.input_pipeline"):
    assert not graph[module] & programs, (module, graph[module] & programs)
  # The data readers (docs/LAYOUT.md, "definitions"): the pure floor and each other only.
  data = {"bat_jax.datasets", "bat_jax.extra_data", "bat_jax.input_pipeline"}
  for module in data:
    assert graph[module] <= data | {"bat_jax.errors", "bat_jax.fs"}, (module, graph[module])
  assert "bat_jax.extra_data" in graph["bat_jax.data.convert_extra"]
  # losses, attacks and AWP stay importable into any JAX project: no Flax, no trainer.
  pure = {m for m in graph if m.startswith("bat_jax.attacks")} | {"bat_jax.losses",
                                                                  "bat_jax.awp"}
  for module in pure:
    assert graph[module] <= pure, (module, graph[module] - pure)


def test_models_know_no_backend_and_the_cpu_layers_stay_on_the_definitions_floor():
  graph = import_graph()
  package = lambda name: {m for m in graph if m == name or m.startswith(name + ".")}
  model_modules, cpu_modules = package("bat_jax.models"), package("bat_jax.cpu")
  assert "bat_jax.models.layers" in model_modules and "bat_jax.cpu.tuning" in cpu_modules
  for module in model_modules:  # models take layer factories; which ones is not theirs
    assert not graph[module] & cpu_modules, (module, graph[module] & cpu_modules)
  # bat_jax.cpu (docs/LAYOUT.md, "definitions"): the pure floor and the models' Layers.
  allowed = cpu_modules | {"bat_jax.errors", "bat_jax.fs", "bat_jax.machine",
                           "bat_jax.models.layers"}
  for module in cpu_modules:
    assert graph[module] <= allowed, (module, graph[module] - allowed)
