"""The shape of the package, read from the source with ``ast`` (nothing is imported but llavaq.files).

* Imports flow one way: down the :data:`LAYERS` below, never up (cli → api → tuning → pipeline / verify → the core
  → the shared modules). Nothing imports ``api`` or ``cli``.
* No module imports a private name (``_x``) from another module.
* Imports inside functions only of the optional heavy dependencies in :data:`llavaq.files.OPTIONAL_IMPORTS`.
* Every module stays within 400 lines and every function within 60, but the test-model builders
  (:data:`SIZE_EXEMPT`).

A new top-level module or package must be given a layer here: the test says so.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from llavaq.files import OPTIONAL_IMPORTS

ROOT = Path(__file__).resolve().parent.parent / "llavaq"


@dataclass(frozen=True)
class Layer:
    name: str
    components: tuple[str, ...]
    #: whether the layer's components may import each other (else only themselves and the layers below)
    mutual: bool = False


#: Top to bottom. A component is a top-level module or package of llavaq (``"__init__"``: the package itself).
LAYERS: tuple[Layer, ...] = (
    Layer("shell", ("cli", "__main__", "runners"), mutual=True),
    Layer("facade", ("api",)),
    Layer("commands", ("inspect", "report", "compare", "cache_stats"), mutual=True),
    Layer("tuning", ("tuning",)),
    # evaluation never imports the quantization pipeline, nor the pipeline evaluation
    Layer("stages", ("pipeline", "verify")),
    Layer("builders", ("demo_model", "demo_gguf", "testing"), mutual=True),
    Layer("core", ("calib", "quant", "formats", "model", "algorithms"), mutual=True),
    Layer("shared", ("recipe", "errors", "files", "progress", "device", "memory", "locks", "safety", "__init__"),
          mutual=True),
)

#: Components exempt from the size limits: the builders of test models (one long declarative function each).
SIZE_EXEMPT = ("demo_model", "testing")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Every llavaq module: dotted name -> file."""
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = ("llavaq", *f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()
PACKAGES = {name for name, f in MODULES.items() if f.name == "__init__.py"}


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer_index(comp: str) -> int:
    for i, layer in enumerate(LAYERS):
        if comp in layer.components:
            return i
    raise AssertionError(f"llavaq.{comp} is in no layer: add it to LAYERS in {Path(__file__).name}")


def allowed(src: str, dst: str) -> bool:
    """May a module of component ``src`` import one of component ``dst``?"""
    if src == dst:
        return True
    i, j = _layer_index(src), _layer_index(dst)
    return j > i or (i == j and LAYERS[i].mutual)


@dataclass(frozen=True)
class Edge:
    path: Path
    line: int
    target: str  # the llavaq module imported
    names: tuple[str, ...]  # the names taken from it (from-imports)
    in_function: bool


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _function_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a function."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def imports(module: str, path: Path) -> list[Edge]:
    """Every import of ``module``, llavaq's and others', as edges (a from-import of a submodule names it)."""
    tree = ast.parse(path.read_text(), str(path))
    inside = _function_nodes(tree)
    edges = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            edges += [Edge(path, n.lineno, a.name, (), id(n) in inside) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            target = _resolve(module, n)
            names = tuple(a.name for a in n.names)
            subs = [f"{target}.{a}" for a in names if f"{target}.{a}" in MODULES]
            edges.append(Edge(path, n.lineno, target, names, id(n) in inside))
            edges += [Edge(path, n.lineno, s, (), id(n) in inside) for s in subs]
    return edges


def _where(e: Edge) -> str:
    return f"{e.path.relative_to(ROOT.parent)}:{e.line}"


def test_every_component_has_a_layer():
    for module in MODULES:
        _layer_index(component(module))


def test_imports_flow_one_way():
    backward = []
    for module, path in MODULES.items():
        for e in imports(module, path):
            if e.target.split(".")[0] != "llavaq":
                continue
            dst = component(e.target)
            if not allowed(component(module), dst):
                backward.append(f"{_where(e)}: {component(module)} imports {e.target} ({dst} is not below it)")
    assert backward == []


def test_no_private_name_is_imported_from_another_module():
    private = []
    for module, path in MODULES.items():
        for e in imports(module, path):
            for name in e.names:
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
                        and e.target.split(".")[0] == "llavaq" and e.target != module:
                    private.append(f"{_where(e)}: {name} from {e.target}")
    assert private == []


def _lazy_by_design(module: str, target: str) -> bool:
    """The two other places an import may wait for its function: the shell imports the library (torch) only in
    the command that needs it, so ``llavaq --help`` starts without torch; the runners are scripts that other
    interpreters run (the vLLM venv's python), never imported by llavaq."""
    return (component(module) == "cli" and target.split(".")[0] == "llavaq") or component(module) == "runners"


def test_imports_inside_functions_are_only_optional_dependencies():
    assert OPTIONAL_IMPORTS and all("." not in m for m in OPTIONAL_IMPORTS)
    inside = [f"{_where(e)}: {e.target}" for module, path in MODULES.items() for e in imports(module, path)
              if e.in_function and e.target.split(".")[0] not in OPTIONAL_IMPORTS
              and not _lazy_by_design(module, e.target)]
    assert inside == []


def _too_long(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = str(path.relative_to(ROOT.parent))
    found = []
    lines = len(path.read_text().splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{where}: {lines} lines")
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{where}:{fn.lineno}: {fn.name} has {n} lines")
    return found


def test_redesigned_packages_stay_small():
    found = [msg for module, path in MODULES.items() if component(module) not in SIZE_EXEMPT
             for msg in _too_long(path)]
    assert found == []


# ------------------------------------------------------------------------------------------- the rule itself
def test_the_rule_refuses_what_the_issue_forbids():
    assert not allowed("verify", "api") and not allowed("tuning", "api") and not allowed("pipeline", "cli")
    assert not allowed("verify", "pipeline") and not allowed("pipeline", "verify")  # evaluation stays apart
    assert not allowed("pipeline", "tuning") and not allowed("verify", "tuning")
    assert not allowed("formats", "verify") and not allowed("model", "pipeline") and not allowed("recipe", "model")
    assert allowed("cli", "api") and allowed("api", "tuning") and allowed("tuning", "pipeline")
    assert allowed("tuning", "verify") and allowed("verify", "formats") and allowed("pipeline", "calib")
    assert allowed("calib", "formats") and allowed("formats", "quant") and allowed("quant", "errors")


def test_the_reader_sees_backward_and_private_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from llavaq import api\n\n\ndef f():\n    import json\n    from llavaq.calib.cache import _x\n")
    edges = imports("llavaq.verify.bad", bad)
    assert [(e.target, e.names, e.in_function) for e in edges] == [
        ("llavaq", ("api",), False), ("llavaq.api", (), False), ("json", (), True),
        ("llavaq.calib.cache", ("_x",), True)]
    assert not allowed(component("llavaq.verify.bad"), component("llavaq.api"))
