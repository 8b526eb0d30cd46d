"""trainer/'s layers: docs/code-map.md names every part of the tree, and no module imports a part
of a higher layer (read from the source, every import, including those inside functions)."""

import ast
import glob
import os
import re

from helpers import REPO

TRAINER = os.path.join(REPO, "trainer")
CODE_MAP = os.path.join(REPO, "docs", "code-map.md")
_ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*?)\|")


def code_map() -> dict:
  """{part: layer} from the code map's table: a part is a subpackage ('rundir') or a top-level
  module ('flags'), as `trainer/rundir/` or `trainer/flags.py` in the 'where' column."""
  parts = {}
  with open(CODE_MAP, encoding="utf-8") as f:
    for line in f:
      row = _ROW.match(line)
      if row:
        for where in re.findall(r"`trainer/([\w.]+/?)`", row.group(2)):
          parts[where.rstrip("/").removesuffix(".py")] = int(row.group(1))
  return parts


def tree() -> set:
  """The parts trainer/ has: its subpackages and its top-level modules."""
  parts = set()
  for entry in os.listdir(TRAINER):
    path = os.path.join(TRAINER, entry)
    if os.path.isfile(os.path.join(path, "__init__.py")):
      parts.add(entry)
    elif entry.endswith(".py") and entry != "__init__.py":
      parts.add(entry[:-3])
  return parts


def part_of(module: str) -> str:
  """'trainer.rundir.storage' -> 'rundir'; 'trainer.flags' -> 'flags'; 'trainer' -> ''."""
  return module.split(".")[1] if module.count(".") else ""


def imports(path: str, module: str) -> set:
  """The trainer modules (dotted) that the file at `path`, the module `module`, imports."""
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
  return {m for m in found if m == "trainer" or m.startswith("trainer.")}


def modules() -> dict:
  """{dotted name: path} of every module in trainer/."""
  found = {}
  for path in glob.glob(os.path.join(TRAINER, "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    found[rel.removesuffix(".__init__")] = path
  return found


def upward_imports(layers: dict) -> list:
  """(importer, imported) pairs where a module imports a part of a higher layer than its own."""
  known = modules()
  bad = []
  for module, path in sorted(known.items()):
    own = layers.get(part_of(module), 0)
    for target in sorted(imports(path, module)):
      if target not in known:
        continue  # a name imported from a module, e.g. trainer.errors.UsageError
      if part_of(target) and layers.get(part_of(target), 0) > own:
        bad.append((module, target))
  return bad


def test_the_code_map_names_every_part_of_the_tree_and_nothing_else():
  assert set(code_map()) == tree()


def test_every_subpackage_says_what_its_layer_is_for():
  for part in tree():
    init = os.path.join(TRAINER, part, "__init__.py")
    if os.path.isfile(init):
      doc = ast.get_docstring(ast.parse(open(init, encoding="utf-8").read()))
      assert doc and f"Layer {code_map()[part]}" in doc, part


def test_no_module_imports_a_higher_layer():
  assert upward_imports(code_map()) == []


def test_an_upward_import_is_found():
  layers = code_map()
  assert ("trainer.job", "trainer.rundir.lease") not in upward_imports(layers)
  # With the run's folder put above the job, the job's use of it is an upward import.
  layers["rundir"] = layers["job"] + 1
  bad = upward_imports(layers)
  assert ("trainer.job", "trainer.rundir.lease") in bad
  assert ("trainer.job.runtime", "trainer.rundir.storage") in bad
