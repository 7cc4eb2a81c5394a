"""The package's structure, read from its imports: no import circles, layers point down.

LAYERS lists the package from the ground up; a module may import modules of
its own layer or below, never above (each import is read from the source with
`ast`, top-level or inside a function). A registry that loads a module by its
name (importlib) draws no arrow: that is how the evaluators and dataset
sources stay out of the generic code.
"""

import ast
import fnmatch
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "monoformer_jax"

# From the ground up. A module's layer is the one that names it, else the first
# whose pattern matches it.
LAYERS = (
  ("ground", ("errors", "config", "config.*", "paths", "hub", "lock", "perf", "layout")),
  ("runtime", ("cli", "parallel", "parallel.*", "safetensors_io", "torch_files", "ops", "ops.*")),
  ("model", ("model", "model.*")),
  (
    "parts",
    (
      "checkpoints",
      "checkpoints.*",
      "diffusion",
      "diffusion.*",
      "text",
      "text.*",
      "vae",
      "vae.*",
      "vision",
      "vision.*",
    ),
  ),
  ("data", ("data", "data.*")),
  ("inference", ("inference",)),
  ("evaluation", ("eval", "eval.*", "digits", "digits.*")),
  ("training", ("train", "train.*", "convert", "convert.*")),
  (
    "entry points",
    ("", "train.__main__", "convert.__main__", "sample", "evaluate", "compile", "data.prepare"),
  ),
)

# Imports that run up a layer, each with why it stays.
UPWARD = {}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(modules) -> dict[str, set[str]]:
  """{module: the package's modules it imports}, names relative to the package."""

  def owner(name):
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name if name in modules else None

  edges = {}
  for name, path in modules.items():
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          anchor = package[: len(package) - node.level + 1]
          base = ".".join(["monoformer_jax"] + anchor + ([node.module] if node.module else []))
        else:
          base = node.module or ""
        # `from pkg import submodule` imports the submodule; `from pkg import name`, pkg.
        targets = [f"{base}.{a.name}" for a in node.names]
      for target in targets:
        if target == "monoformer_jax" or target.startswith("monoformer_jax."):
          module = owner(target.removeprefix("monoformer_jax").removeprefix("."))
          if module is not None and module != name:
            found.add(module)
    edges[name] = found
  return edges


def _layer(module: str) -> int:
  for k, (_, patterns) in enumerate(LAYERS):
    if module in patterns:
      return k
  for k, (_, patterns) in enumerate(LAYERS):
    if any(fnmatch.fnmatchcase(module, p) for p in patterns):
      return k
  raise AssertionError(f"monoformer_jax.{module} is on no layer: add it to LAYERS")


def _circles(edges) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, circles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return circles


@pytest.fixture(scope="module")
def edges():
  return _imports(_modules())


def test_the_reader_sees_the_imports_there_are(edges):
  # An independent check of the reader on imports we know: a relative import, a
  # function-level one and a package's own.
  assert "config.schema" in edges["config.files"]
  assert "errors" in edges["config.fields"]
  assert "config.files" in edges["config"] and "config.schema" in edges["config"]
  assert "config.fields" in edges["config.schema"] and "config" not in edges["config.schema"]


def test_no_module_imports_itself_back(edges):
  assert _circles(edges) == []


def test_every_module_is_on_a_layer_and_imports_only_its_layer_or_below(edges):
  upward = sorted((a, b) for a, targets in edges.items() for b in targets if _layer(b) > _layer(a))
  unexplained = [
    f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})"
    for a, b in upward
    if (a, b) not in UPWARD
  ]
  assert unexplained == []
  stale = sorted(set(UPWARD) - set(upward))
  assert stale == [], "UPWARD lists imports that are gone or no longer run up"
