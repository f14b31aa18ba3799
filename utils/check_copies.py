"""Check (or fix) every ``# Copied from`` copy in hf_scfm against its original, like transformers'
``utils/check_copies.py``.

    python utils/check_copies.py          # list the copies that differ from their original; exit 1 if any
    python utils/check_copies.py --fix    # rewrite those copies from their original

Why copies at all: each model family's folder (``hf_scfm/modeling/<family>/``) ships as remote code next to the
weights (``save_pretrained`` copies a modeling file and the files it imports with ``from .x import y``), so it can
import nothing else of ours. Code that several families share is therefore copied into each folder, and this
script keeps every copy equal to its one original.

Two kinds of copy:

* **An object**: a comment line ``# Copied from hf_scfm.<module>.<Name>`` directly above a ``def``, a ``class``
  (decorators included) or an assignment, at any indentation. ``<Name>`` may be dotted (``Class.method``). The
  statement below the marker must equal the original statement defining ``<Name>`` (re-indented to the copy's
  indentation), after the replacements ``with A->B, C->D`` (applied to the original, in order) when the marker
  ends with them: ``# Copied from hf_scfm.modeling.x.XRMSNorm with X->Y``.
* **A whole file**, listed in :data:`FILE_COPIES` (copy -> original): the copy must be byte-identical to the
  original. No marker line in the file, on purpose: a model checkpoint and its tokenizer are saved into one flat
  folder, and both ship ``special_tokens.py``; identical bytes mean it does not matter which is written last.

Originals are read as text (``ast`` finds the statements), nothing is imported, so the check needs no torch.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_scfm"
#: Whole-file copies (path of the copy -> path of the original, relative to the repository).
FILE_COPIES = {
    **{f"hf_scfm/modeling/{family}/special_tokens.py": "hf_scfm/tokenization/special_tokens.py"
       for family in ("mouse_genemamba", "scmamba2", "cellfm")},
    "hf_scfm/modeling/scmamba2/conv.py": "hf_scfm/modeling/mouse_genemamba/conv.py",
    "hf_scfm/modeling/scmamba2/dispatch.py": "hf_scfm/modeling/mouse_genemamba/dispatch.py",
}
MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<target>hf_scfm(?:\.\w+)+)(?: with (?P<replace>.+))?\s*$")


@dataclass
class Copy:
    """One marked copy: ``path`` lines ``start``..``end`` (0-based, end exclusive) hold the copy's text."""

    path: Path
    marker_line: int
    start: int
    end: int
    target: str
    replacements: list[tuple[str, str]]
    indent: str


def _replacements(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    pairs = []
    for part in text.split(","):
        if "->" not in part:
            raise ValueError(f"Replacement {part.strip()!r} is not of the form A->B.")
        old, new = part.split("->", 1)
        pairs.append((old.strip(), new.strip()))
    return pairs


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _statement_span(tree: ast.Module, names: list[str]) -> tuple[int, int] | None:
    """0-based ``[start, end)`` line span of the statement defining ``names`` (``["Class", "method"]``)."""
    body = tree.body
    node = None
    for depth, name in enumerate(names):
        node = None
        for stmt in body:
            defined = []
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined = [stmt.name]
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    elts = target.elts if isinstance(target, ast.Tuple) else [target]
                    defined += [e.id for e in elts if isinstance(e, ast.Name)]
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                defined = [stmt.target.id]
            if name in defined:
                node = stmt
        if node is None:
            return None
        if depth < len(names) - 1:
            if not isinstance(node, ast.ClassDef):
                return None
            body = node.body
    decorators = getattr(node, "decorator_list", [])
    start = min([node.lineno] + [d.lineno for d in decorators]) - 1
    return start, node.end_lineno


def _resolve(target: str, root: Path) -> tuple[Path, list[str]]:
    """``hf_scfm.a.b.Name.attr`` -> (file of ``hf_scfm.a.b``, ``["Name", "attr"]``); ``[]`` for a module."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:cut]), root)
        if path is not None:
            return path, parts[cut:]
    raise ValueError(f"No module of {target!r} exists under {root}.")


def _dedent(lines: list[str]) -> tuple[list[str], str]:
    first = next((line for line in lines if line.strip()), "")
    indent = first[: len(first) - len(first.lstrip())]
    return [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines], indent


def find_copies(path: Path, root: Path = ROOT) -> list[Copy]:
    """Every ``# Copied from`` marker of a file, with the span of the text it marks."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    copies = []
    tree = None
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        target, indent = match["target"], match["indent"]
        replacements = _replacements(match["replace"])
        if tree is None:
            tree = ast.parse("".join(lines))
        start = i + 1
        node = next((n for n in ast.walk(tree) if isinstance(n, ast.stmt)
                     and min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1 == start), None)
        if node is None:
            raise ValueError(f"{path}:{i + 1}: '# Copied from' must stand directly above a def, class or assignment.")
        copies.append(Copy(path, i, start, node.end_lineno, target, replacements, indent))
    return copies


def expected_text(copy: Copy, root: Path = ROOT) -> str:
    """What the copy's text must be: the original, replaced and re-indented."""
    source_path, names = _resolve(copy.target, root)
    original = source_path.read_text(encoding="utf-8")
    if not names:
        raise ValueError(f"{copy.path}:{copy.marker_line + 1}: {copy.target!r} is a module; name an object (whole "
                         "files are listed in FILE_COPIES).")
    span = _statement_span(ast.parse(original), names)
    if span is None:
        raise ValueError(f"{copy.path}:{copy.marker_line + 1}: {copy.target!r} is not defined in {source_path}.")
    body, _ = _dedent(original.splitlines(keepends=True)[span[0]:span[1]])
    text = "".join(copy.indent + line if line.strip() else line for line in body)
    for old, new in copy.replacements:
        text = text.replace(old, new)
    return text


def check(paths=None, fix: bool = False, root: Path = ROOT, file_copies: dict[str, str] | None = None) -> list[str]:
    """``"<file>:<line>: <target>"`` for every copy that differs from its original (rewritten with ``fix``)."""
    paths = sorted((root / PACKAGE).rglob("*.py")) if paths is None else [Path(p) for p in paths]
    problems = []
    for copy_path, original_path in (FILE_COPIES if file_copies is None else file_copies).items():
        original = (root / original_path).read_text(encoding="utf-8")
        target = root / copy_path
        if not target.exists() or target.read_text(encoding="utf-8") != original:
            problems.append(f"{copy_path}:1: differs from {original_path}")
            if fix:
                target.write_text(original, encoding="utf-8")
    for path in paths:
        copies = find_copies(path, root)
        if not copies:
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        changed = False
        for copy in sorted(copies, key=lambda c: -c.start):  # bottom up: earlier spans stay valid when fixing
            want = expected_text(copy, root)
            have = "".join(lines[copy.start:copy.end])
            if have != want:
                problems.append(f"{path.relative_to(root) if path.is_relative_to(root) else path}:"
                                f"{copy.marker_line + 1}: differs from {copy.target}")
                if fix:
                    lines[copy.start:copy.end] = want.splitlines(keepends=True)
                    changed = True
        if changed:
            path.write_text("".join(lines), encoding="utf-8")
    return sorted(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite the copies that differ from their original")
    args = parser.parse_args(argv)
    problems = check(fix=args.fix)
    for line in problems:
        print(("fixed " if args.fix else "") + line)
    if problems and not args.fix:
        print(f"{len(problems)} copies differ from their original; run `python utils/check_copies.py --fix`.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
