"""The package's import graph, read statically (every import statement, function-local ones
included): no cycle, the layer rule between folders, and every imported name exists.

Layers (docs/architecture.md): commands -> (train/, eval/) -> (inference/, weights/, data/,
convert/) -> models/ -> foundations (sharding, paths, schedule, cli, ops/, configs/).
"""
import ast
import importlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "detailflow_jax"
# Command modules: what `python -m detailflow_jax.X` runs. Library code never imports them.
COMMANDS = {"detailflow_jax.sample", "detailflow_jax.reconstruct", "detailflow_jax.generate",
            "detailflow_jax.evaluate", "detailflow_jax.export", "detailflow_jax.app", "detailflow_jax.__main__",
            "detailflow_jax.convert.__main__", "detailflow_jax.demo", "detailflow_jax.demo.__main__",
            "detailflow_jax.demo.run"}
LOWER_LAYERS = ("data", "models", "inference", "weights")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, modules) -> list[tuple[str, str, int]]:
  """(module imported, name imported from it or '', line) for every import statement."""
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("detailflow_jax")]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      if not target.startswith("detailflow_jax"):
        continue
      for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append((sub, "", node.lineno) if sub in modules else (target, alias.name, node.lineno))
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: {m for m, _, _ in _imports(name, path, modules)} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), plus self-imports."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in graph.get(v, ()):
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle():
  assert not _cycles(_graph()), f"import cycles: {_cycles(_graph())}"


def test_cycle_detector_finds_function_local_cycles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]


def test_layer_rule():
  graph, bad = _graph(), []
  for module, targets in graph.items():
    parts = module.split(".")
    folder = parts[1] if len(parts) > 2 else None
    for target in targets:
      if folder in LOWER_LAYERS and (target.startswith(("detailflow_jax.train", "detailflow_jax.eval"))
                                     or target in COMMANDS):
        bad.append(f"{module} imports {target}")
      if folder == "eval" and target.startswith("detailflow_jax.train"):
        bad.append(f"{module} imports {target}")
      if module not in COMMANDS and target in COMMANDS:
        bad.append(f"{module} (library) imports the command {target}")
  assert not bad, "\n".join(bad)


def test_every_imported_name_exists():
  """Function-local imports run late: a moved name fails only when that path runs. Each one
  in the package, tests, benchmarks and launch scripts is checked here by importing its module."""
  modules, bad = _modules(), []
  users = dict(modules)
  for folder in ("tests", "benchmarks", "launch"):  # their absolute imports of the package too
    users.update({f"_{p.relative_to(ROOT)}": p for p in (ROOT / folder).rglob("*.py")})
  for name, path in users.items():
    for target, attr, line in _imports(name, path, modules):
      if target not in modules:
        bad.append(f"{path.relative_to(ROOT)}:{line}: no module {target}")
      elif attr and attr != "*" and not hasattr(importlib.import_module(target), attr):
        bad.append(f"{path.relative_to(ROOT)}:{line}: {target} has no {attr}")
  assert not bad, "\n".join(bad)
