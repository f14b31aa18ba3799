"""Hub-native checkpoints: every family (base + every head) saved with plain ``save_pretrained``, pushed with plain
``push_to_hub`` to the local Hub (``tests/hub_server.py``), loads with ``trust_remote_code=True`` in a Python that
cannot import hf_scfm (``python -I``, fixture ``python_without_hf_scfm``) and gives the original's outputs.

One parametrised test per family: the tokenizer half (the tokenizer pushed to the same repos and encoding an AnnData
there) plugs into :func:`_push_family` / the subprocess code without a second test.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_scfm.modeling import FAMILIES, auto_map, family_package

IDS = {"mouse_genemamba": [[5, 7, 8, 9, 11, 3, 0], [5, 12, 6, 3, 0, 0, 0]],
       "scmamba2": [[2, 7, 8, 9, 11, 13, 0], [2, 12, 6, 10, 0, 0, 0]],
       "cellfm": [[2, 7, 8, 9, 11, 13, 0], [2, 12, 6, 10, 0, 0, 0]]}
VALUES = [[0.0, 1.5, 2.0, 0.5, 3.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
FLAGS = [[0, 1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0]]
#: The files each family's checkpoint must carry (the modeling file and everything it imports, recursively).
CODE_FILES = {
    "mouse_genemamba": {"configuration_mouse_genemamba.py", "modeling_mouse_genemamba.py", "special_tokens.py",
                        "selective_scan.py", "conv.py", "dispatch.py"},
    "scmamba2": {"configuration_scmamba2.py", "modeling_scmamba2.py", "special_tokens.py", "ssd.py", "conv.py",
                 "dispatch.py"},
    "cellfm": {"configuration_cellfm.py", "modeling_cellfm.py", "special_tokens.py", "retention.py"},
}

# The subprocess: load every pushed repo the way a user without hf_scfm would, run the same inputs, print outputs.
LOADER = r"""
import json, torch, transformers
from transformers import AutoConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

repos, ids, values, flags = json.loads(PAYLOAD)
result = {}
for repo, (auto_class, reference) in repos.items():
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    if hasattr(transformers, auto_class):  # a transformers Auto class
        model = getattr(transformers, auto_class).from_pretrained(repo, trust_remote_code=True)
    else:  # hf_scfm's own Auto classes need hf_scfm: the class is named under the same key of auto_map
        model = get_class_from_dynamic_module(config.auto_map[auto_class], repo).from_pretrained(repo)
    model.eval()
    ids_t = torch.tensor(ids)
    kwargs = dict(input_ids=ids_t, values=torch.tensor(values), attention_mask=(ids_t != 0).long())
    if "perturbation_flags" in model.forward.__code__.co_varnames:
        kwargs["perturbation_flags"] = torch.tensor(flags)
    with torch.no_grad():
        out = model(**kwargs, return_dict=True)
    result[repo] = {"class": type(model).__name__, "modules": [type(config).__module__, type(model).__module__],
                    "outputs": {k: v.double().flatten().tolist() for k, v in out.items() if torch.is_tensor(v)}}
print("RESULT" + json.dumps(result))
"""


def _classes(model_type: str) -> dict[str, str]:
    """class name -> the first Auto class the family registers it under (every head of the family once)."""
    classes: dict[str, str] = {}
    for auto_class, reference in auto_map(model_type).items():
        if auto_class != "AutoConfig":
            classes.setdefault(reference.rsplit(".", 1)[1], auto_class)
    return classes


def _outputs(model, model_type: str) -> dict[str, list[float]]:
    ids = torch.tensor(IDS[model_type])
    kwargs = dict(input_ids=ids, values=torch.tensor(VALUES), attention_mask=(ids != 0).long())
    if "perturbation_flags" in model.forward.__code__.co_varnames:
        kwargs["perturbation_flags"] = torch.tensor(FLAGS)
    with torch.no_grad():
        out = model(**kwargs, return_dict=True)
    return {k: v.double().flatten().tolist() for k, v in out.items() if torch.is_tensor(v)}


def _push_family(model_type: str, tmp_path, hub_server) -> tuple[dict, dict]:
    """Build, save and push every class of the family; returns ``(repos, expected outputs)``."""
    import importlib

    package = importlib.import_module(family_package(model_type))
    config_class = getattr(package, auto_map(model_type)["AutoConfig"].rsplit(".", 1)[1])
    repos, expected = {}, {}
    for i, (class_name, auto_class) in enumerate(_classes(model_type).items()):
        torch.manual_seed(i)
        config = config_class.from_preset("tiny", vocab_size=32, num_labels=3)
        model = getattr(package, class_name)(config).eval()
        folder = tmp_path / class_name
        model.save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["auto_map"] == auto_map(model_type), class_name
        code = {p.name for p in folder.glob("*.py")}
        assert code == CODE_FILES[model_type], (class_name, code)
        for path in folder.glob("*.py"):  # flat folder: only same-folder relative imports
            assert "from .." not in path.read_text(), path.name
        repo = f"hf-scfm/{class_name.lower()}"
        model.push_to_hub(repo)
        repos[repo] = (auto_class, auto_map(model_type)[auto_class])
        expected[repo] = (class_name, _outputs(model, model_type))
    return repos, expected


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_head_loads_from_the_hub_with_remote_code_without_hf_scfm(model_type, tmp_path, hub_server,
                                                                       python_without_hf_scfm):
    repos, expected = _push_family(model_type, tmp_path, hub_server)
    payload = json.dumps([repos, IDS[model_type], VALUES, FLAGS])
    proc = python_without_hf_scfm(f"PAYLOAD = {payload!r}\n" + LOADER, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert set(result) == set(expected)
    for repo, (class_name, outputs) in expected.items():
        got = result[repo]
        assert got["class"] == class_name
        assert all(m.startswith("transformers_modules.") for m in got["modules"]), got["modules"]
        assert set(got["outputs"]) == set(outputs), repo
        for key, values in outputs.items():
            diff = (torch.tensor(got["outputs"][key]) - torch.tensor(values)).abs().max().item()
            assert diff <= 1e-6, (repo, key, diff)
    assert hub_server.unhandled == []


def test_hidden_package_really_is_hidden(python_without_hf_scfm):
    proc = python_without_hf_scfm("import hf_scfm", timeout=60)
    assert proc.returncode != 0 and "No module named 'hf_scfm'" in proc.stderr
    proc = python_without_hf_scfm("import sys; print(sys.flags.isolated)", timeout=60)
    assert proc.stdout.strip() == "1"  # python -I


def test_save_pretrained_writes_the_whole_auto_map_and_code_for_a_bare_config(tmp_path):
    """A plain config save carries the family's Auto mapping too (configs default ``auto_map`` to it)."""
    from hf_scfm import CellFMConfig

    CellFMConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == auto_map("cellfm")
    assert {"configuration_cellfm.py", "special_tokens.py"} <= {p.name for p in tmp_path.glob("*.py")}
