"""docs/architecture.md's module table names every module under detailflow_jax/, and only real paths."""
import itertools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _expand(path: str):
  """`a/{b,c}.py` -> a/b.py, a/c.py (any number of brace groups)."""
  parts = re.split(r"\{([^}]*)\}", path)
  choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
  return ["".join(c) for c in itertools.product(*choices)]


def _table_paths():
  text = (ROOT / "docs" / "architecture.md").read_text()
  section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  assert rows, "no module table under '## Modules'"
  cells = [row.split("|")[1] for row in rows]
  return [p for cell in cells for name in re.findall(r"`([^`]+)`", cell) for p in _expand(name)]


def test_every_module_is_in_the_package_table():
  listed = set(_table_paths())
  modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "detailflow_jax").rglob("*.py")
             if p.name != "__init__.py"}
  assert not sorted(modules - listed), f"modules missing from docs/architecture.md's table: {sorted(modules - listed)}"
  missing = [p for p in listed if not (ROOT / p).exists()]
  assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
