"""Make a checkpoint loadable without hf-scfm: ``from_pretrained(folder_or_repo, trust_remote_code=True)``.

transformers loads "remote code" from the checkpoint folder: ``config.json``'s ``auto_map`` names
``"<module>.<Class>"`` for each Auto class, and the loader imports ``<module>.py`` from the folder together with
the files it imports *relatively and from the same folder* (``from .x import y``; see
``transformers.dynamic_module_utils.get_relative_imports``). Our modeling files import across the package
(``from ..ops import ...``, ``from ...tokenization.special_tokens import ...``,
``from ..configuration_utils import ...``), which that loader cannot follow, and ``ops`` is a package, not a file.
``register_for_auto_class`` + ``save_pretrained`` would therefore copy files that cannot be imported.

So :func:`export_remote_code` writes a *flat* copy of exactly the source files a family needs into the
checkpoint folder and rewrites every relative import to the flat form (``from ..ops import a`` ->
``from .ops import a``; ``from ...tokenization.special_tokens import X`` -> ``from .special_tokens import X``),
with ``ops/__init__.py`` becoming ``ops.py`` beside ``conv.py``, ``ssd.py``, .... The files are found by
following the relative imports from the family's configuration and modeling modules (so a new dependency of a
modeling file travels automatically), and the export fails loudly if two of them would land on the same flat
name. The package's own files are never modified. ``auto_map`` is then added to ``config.json``.

With hf-scfm installed, the registered local classes still win (transformers prefers local code unless
``trust_remote_code=True``), so the extra files cost nothing in the normal case.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

from .families import Family, family_of_config

__all__ = ["export_remote_code", "remote_code_files"]

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../hf_scfm
_RELATIVE_FROM = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s", re.MULTILINE)


def _resolve(module_file: Path, dots: int, dotted: str) -> Path:
    """The file a relative import ``from <dots><dotted> import ...`` in ``module_file`` refers to."""
    base = module_file.parent
    for _ in range(dots - 1):
        base = base.parent
    target = base.joinpath(*dotted.split(".")) if dotted else base
    if target.with_suffix(".py").is_file():
        return target.with_suffix(".py")
    if (target / "__init__.py").is_file():
        return target / "__init__.py"
    raise FileNotFoundError(f"{module_file}: cannot resolve relative import {'.' * dots}{dotted}")


def _flat_name(path: Path) -> str:
    """``ops/__init__.py`` -> ``ops``; ``ops/ssd.py`` -> ``ssd``; ``special_tokens.py`` -> ``special_tokens``."""
    return path.parent.name if path.name == "__init__.py" else path.stem


def _relative_imports(path: Path) -> list[tuple[int, str]]:
    """``(level, module)`` of every relative ``from ... import`` in the file (``ast``: docstrings are not code)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.level, node.module or "") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0]


def remote_code_files(family: Family) -> dict[str, Path]:
    """Flat file name (``"ops.py"``) -> source file, for everything the family's config and modeling import."""
    package_dir = _PACKAGE_ROOT / "modeling" / family.package.rsplit(".", 1)[-1]
    roots = [package_dir / f"configuration_{family.name}.py", package_dir / f"modeling_{family.name}.py"]
    found: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        path = todo.pop()
        name = _flat_name(path) + ".py"
        if name in found:
            if found[name] != path:
                raise RuntimeError(
                    f"Remote-code export of {family.name!r}: {found[name]} and {path} would both become {name}. "
                    "Rename one of them (the checkpoint folder is flat)."
                )
            continue
        found[name] = path
        for level, module in _relative_imports(path):
            if module == "":
                raise RuntimeError(f"{path}: `from {'.' * level} import ...` cannot be flattened; import a module.")
            todo.append(_resolve(path, level, module))
    return found


def _flatten_source(text: str) -> str:
    def repl(match: re.Match) -> str:
        indent, _dots, dotted = match.groups()
        return f"{indent}from .{dotted.rsplit('.', 1)[-1]} import "

    return _RELATIVE_FROM.sub(repl, text)


def export_remote_code(folder: str | os.PathLike, family: Family | None = None) -> list[str]:
    """Copy the family's source (flattened) into ``folder`` and add ``auto_map`` to its ``config.json``.

    ``folder`` must already hold ``config.json`` (call after ``save_pretrained``). Returns the file names
    written. The ``auto_map`` covers ``AutoConfig`` and every Auto class the family registers
    (:attr:`Family.auto_classes`).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    family = family or family_of_config(config, source=str(folder))
    written = []
    for name, source in sorted(remote_code_files(family).items()):
        (folder / name).write_text(_flatten_source(source.read_text(encoding="utf-8")), encoding="utf-8")
        written.append(name)
    modeling = f"modeling_{family.name}"
    auto_map = {"AutoConfig": f"configuration_{family.name}.{family.config_class}"}
    auto_map.update({auto: f"{modeling}.{cls}" for auto, cls in family.auto_classes.items()})
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written
