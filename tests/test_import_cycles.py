"""No import cycles among the modules of brpo.tasks: the loaders (brpo.tasks.data) dispatch to the
tasks, which build the leaf module's Example (brpo.tasks.example), never the other way round.

Imports are read with ast from the source, those inside functions too: a cycle that a
function-local import hides from `import` still ties the files together."""

from __future__ import annotations

import ast
import graphlib
import os

import pytest
from conftest import ROOT


def package_sources(package: str) -> dict[str, tuple[str, bool]]:
  """{dotted module name: (source text, is a package __init__)} for every .py file under
  `package` ("brpo.tasks"), read from the repository."""
  base = os.path.join(ROOT, *package.split("."))
  out = {}
  for folder, _, files in os.walk(base):
    for f in sorted(files):
      if f.endswith(".py"):
        parts = os.path.relpath(os.path.join(folder, f[:-3]), ROOT).split(os.sep)
        is_pkg = parts[-1] == "__init__"
        with open(os.path.join(folder, f), encoding="utf-8") as fh:
          out[".".join(parts[:-1] if is_pkg else parts)] = (fh.read(), is_pkg)
  return out


def imported_modules(name: str, source: str, is_pkg: bool, known: set[str]) -> set[str]:
  """The modules of `known` that module `name` imports anywhere in `source` (module level or
  inside a function): `import a.b`, `from a import b` (a.b when that is a module, else a), and
  relative imports."""
  out = set()
  package = name if is_pkg else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in known else base)
  return {m for m in out if m in known and m != name}


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
  """{module: modules of `sources` it imports}."""
  known = set(sources)
  return {name: imported_modules(name, text, is_pkg, known)
          for name, (text, is_pkg) in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` ([a, b, ..., a]), or None when it has none."""
  try:
    graphlib.TopologicalSorter(graph).prepare()
  except graphlib.CycleError as e:
    return list(e.args[1])
  return None


def test_brpo_tasks_has_no_import_cycle():
  graph = import_graph(package_sources("brpo.tasks"))
  # The walk found the modules, and the edges that tie them.
  assert {"brpo.tasks.data", "brpo.tasks.example", "brpo.tasks.arith.task"} <= set(graph)
  assert graph["brpo.tasks.data"] >= {"brpo.tasks.arith.task", "brpo.tasks.example"}
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The shape of the cycle this replaced: the loader imported the task inside a function, the task
# imported the loader's Example at module level. And a relative-import cycle.
OLD = {
    "brpo.tasks.data": ("def load_dataset(spec):\n"
                        "  from brpo.tasks.arith import task as arith\n"
                        "  return arith.load(spec)\n"
                        "class Example: pass\n", False),
    "brpo.tasks.arith.task": ("from brpo.tasks.data import Example\n", False),
    "brpo.tasks.arith": ("", True),
}
RELATIVE = {
    "p": ("from . import a\n", True),
    "p.a": ("from .b import f\n", False),
    "p.b": ("import p.c\n", False),
    "p.c": ("def g():\n  from .a import h\n", False),
}


@pytest.mark.parametrize("sources,cycle", [
    (OLD, {"brpo.tasks.data", "brpo.tasks.arith.task"}),
    (RELATIVE, {"p.a", "p.b", "p.c"}),
], ids=["function_local", "relative"])
def test_the_check_finds_cycles(sources, cycle):
  found = find_cycle(import_graph(sources))
  assert found is not None and found[0] == found[-1] and set(found) == cycle, found


@pytest.mark.parametrize("package", ["models", "brpo"])
def test_package_has_no_import_cycle(package):
  """The same for the model library (models.decoder imports the attention kernels, which keep
  the dense reference beside them instead of importing the decoder back) and all of brpo."""
  graph = import_graph(package_sources(package))
  assert len(graph) > 10
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
