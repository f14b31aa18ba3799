"""Checkpoints load with ``trust_remote_code=True`` where hf_scfm cannot be imported (hf_scfm.training.remote_code).

Each family's pretraining model is saved with ``save_pretrained`` + ``export_remote_code`` (the flattened
configuration/modeling/ops files and ``auto_map``), then loaded with ``AutoConfig``/``AutoModel``/
``AutoModelForSequenceClassification`` in a subprocess whose import system hides ``hf_scfm``
(fixture ``python_without_hf_scfm``). The hidden-package run must give the same hidden states as the package.
"""

from __future__ import annotations

import json

import torch

from hf_scfm.training.families import FAMILIES
from hf_scfm.training.remote_code import export_remote_code, remote_code_files

IDS = {"mouse_genemamba": [[5, 7, 8, 9, 11, 3, 0], [5, 12, 6, 3, 0, 0, 0]],
       "scmamba2": [[2, 7, 8, 9, 11, 13, 0], [2, 12, 6, 10, 0, 0, 0]],
       "cellfm": [[2, 7, 8, 9, 11, 13, 0], [2, 12, 6, 10, 0, 0, 0]]}
VALUES = [[0.0, 1.5, 2.0, 0.5, 3.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]]


def test_flattened_files_cover_every_relative_import():
    files = remote_code_files(FAMILIES["cellfm"])
    assert {"configuration_cellfm.py", "modeling_cellfm.py", "ops.py", "retention.py", "special_tokens.py",
            "configuration_utils.py"} <= set(files)
    assert files["ops.py"].name == "__init__.py" and files["ops.py"].parent.name == "ops"


def test_checkpoints_load_with_trust_remote_code_without_hf_scfm(tmp_path, python_without_hf_scfm):
    expected = {}
    for name, family in FAMILIES.items():
        torch.manual_seed(0)
        config = family.config_cls.from_preset("tiny", vocab_size=32)
        model = family.pretraining_cls()(config).eval()
        folder = tmp_path / name
        model.save_pretrained(folder)
        written = export_remote_code(folder, family)
        assert f"modeling_{name}.py" in written
        flat = (folder / f"modeling_{name}.py").read_text()
        assert "from .." not in flat and "from .ops import" in flat
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModel"] == f"modeling_{name}.{family.model_class}"
        ids, values = torch.tensor(IDS[name]), torch.tensor(VALUES)
        with torch.no_grad():
            base = getattr(model, model.base_model_prefix)
            out = base(input_ids=ids, values=values, attention_mask=(ids != 0).long())
        expected[name] = out.last_hidden_state[ids != 0].tolist()

    code = f"""
import json, torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
result = {{}}
for name, ids in {IDS!r}.items():
    folder = {str(tmp_path)!r} + "/" + name
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3)
    ids = torch.tensor(ids)
    with torch.no_grad():
        out = model(input_ids=ids, values=torch.tensor({VALUES!r}), attention_mask=(ids != 0).long())
    result[name] = {{"modules": [type(config).__module__, type(model).__module__],
                     "clf": type(clf).__name__, "hidden": out.last_hidden_state[ids != 0].tolist()}}
print("RESULT" + json.dumps(result))
"""
    proc = python_without_hf_scfm(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, family in FAMILIES.items():
        got = result[name]
        assert all(m.startswith("transformers_modules.") for m in got["modules"]), got["modules"]
        assert got["clf"] == family.classification_class
        torch.testing.assert_close(torch.tensor(got["hidden"]), torch.tensor(expected[name]), rtol=0, atol=1e-6)


def test_hidden_package_really_is_hidden(python_without_hf_scfm):
    proc = python_without_hf_scfm("import hf_scfm", timeout=60)
    assert proc.returncode != 0 and "No module named 'hf_scfm'" in proc.stderr
