"""The package's layout: no import cycle inside edgetok/, and what runs a model never imports what evaluates,
profiles, compares, quantizes or tunes it.

Both checks read the source with ``ast`` (nothing is imported), so they see every import a run could take.
An edge is every ``import``/``from ... import`` of an edgetok module anywhere in a file: at module level, inside
a function (a lazy import still runs, just later: the circle eval → runners → reduction → dtome → eval that
this test was written against took three of its four steps through function-level imports) and under
``if TYPE_CHECKING`` (a dependency for the reader even when it is not one at run time), plus
``importlib.import_module`` of an edgetok name, literal or an f-string (a registry that loads its entries by
name: an edge to every module the f-string can spell). ``from pkg import name`` is an edge to the submodule
``pkg.name`` when there is one, else to ``pkg`` itself. The implicit run of a parent package's ``__init__``
is not an edge of its own: each ``__init__`` is a module here, and its imports are edges like any other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetok"

# What runs a model (loading, patching, the methods, the token transform, FLOPs, ONNX export, the plugins, the
# runners, the engine builder, the LLM decoders) sits below what evaluates, profiles, compares, quantizes or
# tunes it. Each row: a lower package (or module) and the workflow packages none of its modules may import.
WORKFLOWS = ("edgetok.workflows", "edgetok.profile", "edgetok.tune", "edgetok.cli", "edgetok.__main__")
LAYERING = {
    "edgetok.vit": WORKFLOWS,
    "edgetok.onnx": WORKFLOWS,
    "edgetok.plugins": WORKFLOWS,
    "edgetok.runtime": WORKFLOWS,
    "edgetok.engine": WORKFLOWS,
    "edgetok.images": WORKFLOWS,
    "edgetok.sidecar": WORKFLOWS,
    "edgetok.recipe": WORKFLOWS,
    "edgetok.hf": WORKFLOWS,
    "edgetok.atomic": WORKFLOWS,
    "edgetok.errors": WORKFLOWS,
    "edgetok.llm": WORKFLOWS,
    "edgetok.vlm": WORKFLOWS,
    # the workflows are above the model stack, below the command line
    "edgetok.workflows": ("edgetok.tune", "edgetok.cli", "edgetok.__main__"),
    "edgetok.profile": ("edgetok.tune", "edgetok.cli", "edgetok.__main__"),
    # tune searches over everything below it: it runs the workflows, the command line runs it
    "edgetok.tune": ("edgetok.cli", "edgetok.__main__"),
}
# The imports across the line, and why: llm/profile.py is `profile --pair` and vlm/profile.py `profile --vlm`,
# profiling workflows kept with the models they measure; they record the same environment as `profile` does (a
# leaf module: it imports nothing of edgetok).
ALLOWED = {("edgetok.llm.profile", "edgetok.profile.environment"),
           ("edgetok.vlm.profile", "edgetok.profile.environment")}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``root`` by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The edgetok module ``name`` refers to: itself, or the longest known prefix (``pkg.module.attr``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _dynamic(arg: ast.expr, module: str, known: dict[str, Path]) -> list[str]:
    """The modules ``importlib.import_module(arg)`` may import: a literal name, or every module an f-string
    can spell (``f"edgetok.vit.methods.{name}"``: each module directly in that package; ``{__name__}`` is this
    module's name). Any other expression is not followed."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if not isinstance(arg, ast.JoinedStr):
        return []
    pattern = ""
    for part in arg.values:
        if isinstance(part, ast.Constant):
            pattern += re.escape(str(part.value))
        elif isinstance(part.value, ast.Name) and part.value.id == "__name__":
            pattern += re.escape(module)
        else:
            pattern += r"[A-Za-z0-9_]+"
    return [name for name in known if re.fullmatch(pattern, name)]


def imports(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The edgetok modules ``module`` imports, each with the line of its first import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args):
            names = _dynamic(node.args[0], module, known)
        for name in names:
            if name.split(".")[0] != "edgetok":
                continue
            target = _target(name, known)
            if target and target != module:
                found.setdefault(target, node.lineno)
    return found


def graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    known = modules(root)
    return {module: imports(module, path, known) for module, path in known.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str], edges: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    return "; ".join(f"{a} imports {b} (line {line})" for a in component
                     for b, line in sorted(edges[a].items()) if b in inside)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ------------------------------------------------------------------------------------------ the walk itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "edgetok"


def test_walk_finds_a_circle_through_function_level_imports(tmp_path):
    """The issue's circle, in miniature: eval imports the runners at module level, the runners reach a method
    through a lazy import, the method reaches eval through another; a walk of module-level imports alone
    would miss it."""
    root = _write(tmp_path, {
        "edgetok/__init__.py": "",
        "edgetok/vit/__init__.py": "",
        "edgetok/runtime/__init__.py": "",
        "edgetok/vit/evaluate.py": "from edgetok.runtime.runners import ENGINE_SUFFIXES\n",
        "edgetok/runtime/runners.py": "def run():\n    from edgetok.vit.reduction import make_method\n",
        "edgetok/vit/reduction.py": "def make_method():\n    from edgetok.vit import dtome\n",
        "edgetok/vit/dtome.py": "import edgetok.errors\ndef calibrate():\n    from .evaluate import image_folder\n",
        "edgetok/errors.py": "",
    })
    edges = graph(root)
    assert edges["edgetok.vit.reduction"] == {"edgetok.vit.dtome": 2}  # `from pkg import submodule`: the submodule
    assert edges["edgetok.vit.dtome"] == {"edgetok.errors": 1, "edgetok.vit.evaluate": 3}  # relative import resolved
    assert cycles(edges) == [["edgetok.runtime.runners", "edgetok.vit.dtome", "edgetok.vit.evaluate",
                              "edgetok.vit.reduction"]]
    (root / "vit" / "dtome.py").write_text("def calibrate():\n    from edgetok.images import image_folder\n")
    (root / "images.py").write_text("")
    assert cycles(graph(root)) == []


def test_walk_sees_registries_type_checking_and_import_module(tmp_path):
    """A registry that imports its entries while they import it is a circle too; so are imports only made
    for type checking or through ``importlib.import_module("edgetok...")``."""
    root = _write(tmp_path, {
        "edgetok/__init__.py": "",
        "edgetok/spec.py": "def specs():\n    from edgetok import merge  # noqa\n",
        "edgetok/merge.py": "from edgetok.spec import register\n",
        "edgetok/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgetok.b import B\n",
        "edgetok/b.py": "import importlib\ndef f():\n    importlib.import_module('edgetok.a')\n",
        "edgetok/methods/__init__.py": "import importlib\ndef load(name):\n"
                                       "    return importlib.import_module(f'edgetok.methods.{name}')\n",
        "edgetok/methods/tome.py": "from edgetok.methods import load\n",
        "edgetok/methods/evit.py": "",
        "edgetok/kernels/__init__.py": "import importlib\ndef plan(k):\n"
                                       "    return importlib.import_module(f'{__name__}.{k}_plan')\n",
        "edgetok/kernels/merge_plan.py": "",
        "edgetok/kernels/merge.py": "from edgetok.kernels import plan\n",
    })
    edges = graph(root)
    assert set(edges["edgetok.methods"]) == {"edgetok.methods.tome", "edgetok.methods.evit"}
    assert set(edges["edgetok.kernels"]) == {"edgetok.kernels.merge_plan"}  # not merge: no "_plan" suffix
    assert cycles(edges) == [["edgetok.a", "edgetok.b"], ["edgetok.merge", "edgetok.spec"],
                             ["edgetok.methods", "edgetok.methods.tome"]]


# ------------------------------------------------------------------------------------------ edgetok itself
def test_no_import_cycle_in_edgetok():
    edges = graph()
    assert "edgetok.runtime.runners" in edges and "edgetok.workflows.evaluate" in edges  # the walk saw the package
    found = cycles(edges)
    assert not found, "import cycles in edgetok/: " + " | ".join(_describe(c, edges) for c in found)


@pytest.mark.parametrize("lower", sorted(LAYERING))
def test_lower_layers_never_import_the_workflows(lower):
    edges = graph()
    members = [m for m in edges if _within(m, lower)]
    assert members, f"{lower} is in the layering table but not in edgetok/; update the table"
    wrong = [f"{m} imports {t} (line {line})" for m in members for t, line in sorted(edges[m].items())
             if any(_within(t, upper) for upper in LAYERING[lower]) and (m, t) not in ALLOWED]
    assert not wrong, "; ".join(wrong)


def test_the_allowed_crossings_are_still_needed_and_leaves():
    """An exception that no import uses any more, or whose target grew imports of its own, is stale."""
    edges = graph()
    for importer, target in sorted(ALLOWED):
        assert target in edges.get(importer, {}), f"{importer} no longer imports {target}: drop it from ALLOWED"
        assert not edges[target], f"{target} imports {sorted(edges[target])}: no longer a leaf, move it down"


def test_every_package_is_in_the_layering_table():
    """A new top-level package or module has to take its place in the table (or sit above everything)."""
    top = {".".join(m.split(".")[:2]) for m in graph() if m != "edgetok"}
    placed = set(LAYERING) | set(WORKFLOWS)
    assert top <= placed, f"not in LAYERING: {sorted(top - placed)}"


def test_every_package_is_installed():
    """pyproject's package list names every package folder: a non-editable install would miss a new one."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(root).parts) for p in (root / "edgetok").rglob("__init__.py")}
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"
