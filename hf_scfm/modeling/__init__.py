"""The model families and their registration with transformers' Auto classes.

Each family lives in its own folder, ``hf_scfm/modeling/<model_type>/``, the way transformers' models do:
``configuration_<model_type>.py``, ``modeling_<model_type>.py`` and the op files they use, importing only torch,
transformers, huggingface_hub and each other (``from .x import y``). That folder is what ``save_pretrained`` /
``push_to_hub`` ship as remote code. Code shared between families is copied into each folder and kept equal to its
original by ``utils/check_copies.py``: objects marked ``# Copied from hf_scfm.<module>.<Name>``, whole files
(``special_tokens.py``, SC-MAMBA2's ``conv.py`` / ``dispatch.py``) listed in its ``FILE_COPIES``.

**One Auto mapping.** Each family defines its Auto classes once, as ``<MODEL_TYPE>_AUTO_MAP`` in its configuration
file (the ``auto_map`` every ``config.json`` gets). This module reads those maps and registers them:

* **lazily**, like transformers' own models: ``import hf_scfm`` imports neither torch nor transformers. A post-import
  hook waits for transformers' Auto modules; when ``transformers.models.auto.configuration_auto`` is imported the
  configs are registered (``AutoConfig.register``), when ``modeling_auto`` is imported every Auto class of
  transformers that a family names gets the family *by name* (the model class is imported on its first lookup,
  through transformers' own lazy ``_LazyAutoMapping``), and when ``tokenization_auto`` is imported
  ``GeneTokenizer`` is registered with ``AutoTokenizer``. Modules already imported are handled at once.
* hf_scfm's own Auto classes, ``AutoModelForMaskedExpression`` (heads that regress one value per token:
  SC-MAMBA2's masked expression, CellFM's masked regression) and ``AutoModelForPerturbationPrediction``, are built
  with transformers' ``_BaseAutoModelClass`` / ``auto_class_update`` in :mod:`hf_scfm.modeling.auto`.

The transformers internals this relies on (``_LazyAutoMapping._reverse_config_mapping``, ``._model_mapping``,
``._modules``) are pinned by ``tests/test_auto_registration.py``, which fails if a transformers release changes them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

#: The model families (``model_type`` = folder name).
FAMILIES: tuple[str, ...] = ("mouse_genemamba", "scmamba2", "cellfm")

#: transformers' Auto modules and what registering with each of them means.
_AUTO_MODULES = {
    "transformers.models.auto.configuration_auto": "_register_configs",
    "transformers.models.auto.modeling_auto": "_register_models",
    "transformers.models.auto.tokenization_auto": "_register_tokenizer",
}


def family_package(model_type: str) -> str:
    """``"scmamba2"`` -> ``"hf_scfm.modeling.scmamba2"``; a ``ValueError`` names the known families."""
    if model_type not in FAMILIES:
        raise ValueError(f"Unknown model family {model_type!r}: hf-scfm knows {list(FAMILIES)}.")
    return f"{__name__}.{model_type}"


def auto_map(model_type: str) -> dict[str, str]:
    """The family's Auto mapping (``"AutoModel"`` -> ``"modeling_<model_type>.<Class>"``, ...). Imports the family's
    configuration module (transformers' config machinery, not its models)."""
    module = importlib.import_module(f"{family_package(model_type)}.configuration_{model_type}")
    return dict(getattr(module, f"{model_type.upper()}_AUTO_MAP"))


def auto_class_name(model_type: str, auto_class: str) -> str | None:
    """The class name the family registers for ``auto_class`` (``"AutoModel"`` -> ``"ScMamba2Model"``), or ``None``."""
    reference = auto_map(model_type).get(auto_class)
    return None if reference is None else reference.rsplit(".", 1)[1]


# -------------------------------------------------------------------------------------------------------------------
# lazy exports of the family packages (they must not import torch until a class is asked for)
# -------------------------------------------------------------------------------------------------------------------


def _all_of(path: Path) -> list[str]:
    """A module's ``__all__`` read from its source (no import)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def lazy_exports(package: str, file: str, submodules: tuple[str, ...]) -> tuple[Callable[[str], Any], Callable]:
    """PEP 562 ``(__getattr__, __dir__)`` for a package that re-exports its submodules' ``__all__``: a name is
    imported from its submodule on first access. The ``__all__`` lists are read from source, so the package itself
    imports nothing."""
    folder = Path(file).parent
    owner: dict[str, str] = {}
    for sub in submodules:
        for name in _all_of(folder / f"{sub}.py"):
            owner.setdefault(name, sub)

    def __getattr__(name: str) -> Any:
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{owner[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(owner) | set(vars(sys.modules[package])))

    __getattr__.exports = owner  # type: ignore[attr-defined]
    return __getattr__, __dir__


# -------------------------------------------------------------------------------------------------------------------
# registration with transformers' Auto classes
# -------------------------------------------------------------------------------------------------------------------


def _config_class(model_type: str):
    return getattr(importlib.import_module(f"{family_package(model_type)}.configuration_{model_type}"),
                   auto_class_name(model_type, "AutoConfig"))


def _register_configs(configuration_auto) -> None:
    for model_type in FAMILIES:
        configuration_auto.AutoConfig.register(model_type, _config_class(model_type), exist_ok=True)


def add_lazy_model(mapping, model_type: str, config_name: str, class_name: str) -> None:
    """Make ``mapping`` (a transformers ``_LazyAutoMapping``) resolve the config class called ``config_name`` to
    ``class_name`` of the family ``model_type``, imported from the family package on first lookup: the way
    transformers maps its own model types (config name -> model type -> class name -> module)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    mapping._reverse_config_mapping[config_name] = model_type
    mapping._model_mapping[model_type] = class_name
    mapping._modules[model_type_to_module_name(model_type)] = importlib.import_module(family_package(model_type))


def _register_models(modeling_auto) -> None:
    for model_type in FAMILIES:
        names = auto_map(model_type)
        config_name = names.pop("AutoConfig").rsplit(".", 1)[1]
        for auto_class, reference in names.items():
            auto = getattr(modeling_auto, auto_class, None)  # hf_scfm's own Auto classes live in .auto
            if auto is not None:
                add_lazy_model(auto._model_mapping, model_type, config_name, reference.rsplit(".", 1)[1])


def _register_tokenizer(tokenization_auto) -> None:
    from ..tokenization.tokenization_gene import GeneTokenizer

    for model_type in FAMILIES:
        tokenization_auto.AutoTokenizer.register(_config_class(model_type), tokenizer_class=GeneTokenizer,
                                                 exist_ok=True)


def _run(module_name: str, module) -> None:
    try:
        globals()[_AUTO_MODULES[module_name]](module)
    except Exception as err:  # never break the user's transformers import; say what failed instead
        warnings.warn(f"hf_scfm could not register its classes with {module_name}: {type(err).__name__}: {err}. "
                      "AutoConfig/AutoModel*/AutoTokenizer will not know hf-scfm models; import the classes from "
                      "hf_scfm directly.", RuntimeWarning, stacklevel=2)


class _HookedLoader(importlib.abc.Loader):
    """Runs the real loader, then our registration for that module."""

    def __init__(self, loader, module_name: str):
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._module_name, module)

    def __getattr__(self, name: str):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    """A post-import hook: finds transformers' Auto modules with the other finders and wraps their loader."""

    def __init__(self, names):
        self.pending = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            self.pending.discard(fullname)
            spec.loader = _HookedLoader(spec.loader, fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        return spec


_installed = False


def register_auto_classes() -> None:
    """Register every family with transformers' Auto classes, now for the Auto modules already imported and at
    their import for the others. ``import hf_scfm`` calls it; later calls do nothing."""
    global _installed
    if _installed:
        return
    _installed = True
    pending = []
    for name in _AUTO_MODULES:  # in dependency order: configs before models and tokenizer
        if name in sys.modules:
            _run(name, sys.modules[name])
        else:
            pending.append(name)
    if pending:
        sys.meta_path.insert(0, _AutoRegistrationFinder(pending))


__all__ = ["FAMILIES", "add_lazy_model", "auto_class_name", "auto_map", "family_package", "lazy_exports",
           "register_auto_classes"]
