"""Imports only run downward: io, metrics -> tokenization -> data -> modeling -> training -> tasks -> cli.

Every module of the package is parsed (``ast``: each ``import`` / ``from ... import`` statement, including the lazy
ones inside functions), every import of an ``hf_scfm`` module is resolved, and an import of a module on a higher
level than the importer's fails the test. Importing ``a.b.c`` also runs the package ``a.b``'s ``__init__``, so the
packages above an imported module count as imported too (the root ``hf_scfm/__init__.py`` is the lazy public API,
on top; it is not counted for imports below it). Levels (``LEVELS``, checked by prefix, longest first):

====  ==========================================================================
0     io (``hf_scfm.tokenization.anndata_io``), metrics (``hf_scfm.metrics``)
1     tokenization
2     data
3     modeling
4     training
5     tasks
6     quickstart, cli
7     ``hf_scfm/__init__.py``
====  ==========================================================================
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_scfm"

LEVELS = {
    "hf_scfm.tokenization.anndata_io": 0,
    "hf_scfm.metrics": 0,
    "hf_scfm.tokenization": 1,
    "hf_scfm.data": 2,
    "hf_scfm.modeling": 3,
    "hf_scfm.training": 4,
    "hf_scfm.tasks": 5,
    "hf_scfm.quickstart": 6,
    "hf_scfm.cli": 6,
    "hf_scfm": 7,
}

#: (importer, imported) pairs allowed to run upward for now, each with the reason. The test fails when one of them
#: no longer occurs, so the list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def level(module: str) -> int:
    for prefix in sorted(LEVELS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LEVELS[prefix]
    raise AssertionError(f"{module} is on no level: add its prefix to LEVELS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``hf_scfm`` module an import statement of the file ``path`` names."""
    return imported_by_source(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imported_by_source(source: str, name: str, is_package: bool) -> set[str]:
    """Every ``hf_scfm`` module the import statements of ``source`` (module ``name``) name, at any depth:
    ``import x``: ``x``; ``from x import y``: ``x``, and ``x.y`` when that is a module of ours; relative forms
    resolved against ``name``'s package."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_module(sub):
                    found.add(sub)
    return {m for m in found if m == "hf_scfm" or m.startswith("hf_scfm.")}


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def with_parents(module: str) -> set[str]:
    """``module`` and the packages above it whose ``__init__`` an import runs (not the root)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}


def upward_imports() -> dict[tuple[str, str], int]:
    """``{(importer, imported): levels up}`` over the whole package."""
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for target in imported_modules(path):
            for imported in with_parents(target):
                if imported == importer or importer.startswith(imported + "."):
                    continue  # a module's own package, already being imported
                if level(imported) > level(importer):
                    bad[importer, imported] = level(imported) - level(importer)
    return bad


def module_levels() -> dict[str, int]:
    return {module_name(p): level(module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_on_a_level():
    levels = module_levels()
    assert len(levels) > 40 and levels["hf_scfm"] == 7 and levels["hf_scfm.cli"] == 6


def test_imports_only_run_downward():
    bad = {pair: up for pair, up in upward_imports().items() if pair not in KNOWN_EXCEPTIONS}
    assert not bad, "imports running up a level (importer -> imported: levels up):\n" + "\n".join(
        f"  {a} -> {b}: {up}" for (a, b), up in sorted(bad.items()))


def test_known_exceptions_still_occur():
    stale = set(KNOWN_EXCEPTIONS) - set(upward_imports())
    assert not stale, f"these exceptions no longer occur, remove them from KNOWN_EXCEPTIONS: {sorted(stale)}"


def test_the_walk_sees_lazy_and_relative_imports():
    """The resolver itself: lazy imports inside functions, relative imports at each depth, submodules named in
    ``from package import module``, and the levels of the io module inside the tokenization package."""
    source = (
        "import numpy\n"
        "import hf_scfm.data.loading as loading\n"
        "def f():\n"
        "    if True:\n"
        "        from ..tasks.integration import integration_metrics\n"
        "    from . import checkpoint, not_a_module\n"
        "    from ...hf_scfm import cli\n"
    )
    names = imported_by_source(source, "hf_scfm.training.finetune", False)
    assert names == {"hf_scfm.data.loading", "hf_scfm.tasks.integration", "hf_scfm.training",
                     "hf_scfm.training.checkpoint", "hf_scfm", "hf_scfm.cli"}
    assert imported_by_source("from .collators import x", "hf_scfm.data", True) == {"hf_scfm.data.collators"}
    assert level("hf_scfm.tokenization.anndata_io") == 0 and level("hf_scfm.tokenization.encodings") == 1
    assert level("hf_scfm.metrics.annotation.annotation") == 0 and level("hf_scfm.quickstart") == 6
    assert with_parents("hf_scfm.data.collators") == {"hf_scfm.data", "hf_scfm.data.collators"}


if __name__ == "__main__":  # print the levels and the upward imports (for reports)
    by_level: dict[int, list[str]] = {}
    for mod, lev in module_levels().items():
        by_level.setdefault(lev, []).append(mod)
    for lev in sorted(by_level):
        print(f"{lev}: {', '.join(by_level[lev])}")
    for (a, b), up in sorted(upward_imports().items()):
        print(f"UP {up}: {a} -> {b}")
