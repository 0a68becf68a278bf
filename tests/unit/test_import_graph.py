"""The import rules of DESIGN.md, read from the source with `ast` (no module is imported).

Every import counts: at module level, inside functions (lazy imports) and relative ones. A rule
forbids what a package imports directly and through the project modules it imports (importing a
module also runs its packages' `__init__.py`).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("rec_train", "rec_serve")

# package -> what it must not import, directly or through other project modules
RULES: dict[str, tuple[str, ...]] = {
    "rec_train.model": ("rec_train.train", "rec_serve"),
    "rec_serve": ("rec_train.train", "deepspeed"),
    "rec_train.data": ("rec_train.model", "rec_train.train"),
    "rec_train.storage": ("rec_train.data",),
}


@dataclass(frozen=True)
class Import:
    """One imported module: `importer` imports `target` at `path:line` with `text`."""

    importer: str
    target: str
    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.importer} -> {self.target} ({self.path}:{self.line}: {self.text})"


def module_name(path: Path, root: Path) -> str:
    """`rec_train/model/sizes.py` -> `rec_train.model.sizes`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path = REPO) -> dict[str, Path]:
    """module name -> source file, for every module of the project's packages."""
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str], root: Path = REPO) -> list[Import]:
    """The modules that `name` (source at `path`) imports anywhere in its code; `from a import b` is
    module `a.b` when that is a project module, else `a`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[tuple[str, int], Import] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `.` is the importer's package, each further dot one level up
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            targets = [
                f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names
            ]
        else:
            continue
        for target in targets:
            found[target, node.lineno] = Import(
                name, target, path.relative_to(root).as_posix(), node.lineno, ast.unparse(node)
            )
    return list(found.values())


def import_graph(root: Path = REPO) -> dict[str, list[Import]]:
    """module -> its imports, for every project module."""
    files = project_files(root)
    return {name: imports_of(name, path, set(files), root) for name, path in files.items()}


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def loaded_by(target: str) -> list[str]:
    """The modules that importing `target` runs: its packages, outermost first, then itself."""
    parts = target.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def chains_to(
    graph: dict[str, list[Import]], starts: list[str], forbidden: tuple[str, ...]
) -> list[list[Import]]:
    """For each forbidden import reached from `starts` through project modules, the shortest chain to it."""
    parent: dict[str, Import | None] = dict.fromkeys(starts)
    queue = deque(starts)
    chains = []
    while queue:
        for imp in graph[queue.popleft()]:
            if any(under(imp.target, f) for f in forbidden):
                chain = [imp]
                while (step := parent[chain[0].importer]) is not None:
                    chain.insert(0, step)
                chains.append(chain)
                continue
            for module in loaded_by(imp.target):
                if module in graph and module not in parent:
                    parent[module] = imp
                    queue.append(module)
    return chains


def cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One import cycle per strongly connected group of project modules (Tarjan), as its imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imp in graph[module]:
            if imp.target not in graph:
                continue
            if imp.target not in index:
                visit(imp.target)
                low[module] = min(low[module], low[imp.target])
            elif imp.target in stack:
                low[module] = min(low[module], index[imp.target])
        if low[module] == index[module]:
            group = {stack.pop()}
            while module not in group:
                group.add(stack.pop())
            if len(group) > 1 or any(imp.target == module for imp in graph[module]):
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [shortest_cycle(graph, min(group), group) for group in groups]


def shortest_cycle(graph: dict[str, list[Import]], start: str, group: set[str]) -> list[Import]:
    """The shortest chain of imports from `start` back to itself within `group`."""
    parent: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for imp in graph[module]:
            if imp.target not in group or imp.target in parent:
                continue
            parent[imp.target] = imp
            if imp.target == start:
                chain = [imp]
                while chain[0].importer != start:
                    chain.insert(0, parent[chain[0].importer])
                return chain
            queue.append(imp.target)
    raise AssertionError(f"{start} is in an import cycle but none was found")


GRAPH = import_graph()


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_nothing_it_must_not(package: str) -> None:
    modules = [m for m in GRAPH if under(m, package)]
    assert modules, f"no module of {package} found under {REPO}"
    found = chains_to(GRAPH, modules, RULES[package])
    if found:
        pytest.fail(
            f"{package} must not import {', '.join(RULES[package])}:\n"
            + "\n".join("  " + "\n    then ".join(map(str, chain)) for chain in found)
        )


def test_project_modules_import_each_other_without_cycles() -> None:
    found = cycles(GRAPH)
    if found:
        pytest.fail(
            "import cycles:\n"
            + "\n".join(
                "  "
                + " -> ".join([chain[0].importer, *(imp.target for imp in chain)])
                + "".join(f"\n    {imp.path}:{imp.line}: {imp.text}" for imp in chain)
                for chain in found
            )
        )


def test_lazy_relative_and_from_imports_are_all_read(tmp_path: Path) -> None:
    package = tmp_path / "rec_train" / "train"
    package.mkdir(parents=True)
    (tmp_path / "rec_train" / "__init__.py").write_text("")
    (tmp_path / "rec_train" / "storage.py").write_text("")
    (package / "a.py").write_text(
        "import deepspeed\n"
        "from . import b\n"
        "from .. import storage\n"
        "from ..model import RecModel\n"
        "def f():\n"
        "    from rec_train.train.b import g\n"
    )
    (package / "b.py").write_text("def g():\n    import rec_train.train.a\n")
    graph = import_graph(tmp_path)
    assert [(i.target, i.line) for i in graph["rec_train.train.a"]] == [
        ("deepspeed", 1),
        ("rec_train.train.b", 2),
        ("rec_train.storage", 3),
        ("rec_train.model", 4),
        ("rec_train.train.b", 6),
    ]
    [cycle] = cycles(graph)
    assert [(i.importer, i.target) for i in cycle] == [
        ("rec_train.train.a", "rec_train.train.b"),
        ("rec_train.train.b", "rec_train.train.a"),
    ]
    [chain] = chains_to(graph, ["rec_train.train.b"], ("deepspeed",))
    assert [i.target for i in chain] == ["rec_train.train.a", "deepspeed"]
