"""``import hf_scfm`` is light and registers lazily (issue 16): it imports neither torch nor transformers, yet right
after it ``AutoConfig``, every ``AutoModel*`` class a family names, hf_scfm's own Auto classes and ``AutoTokenizer``
resolve our classes (``from_config`` and ``from_pretrained`` of a saved folder), whichever of hf_scfm and
transformers' Auto modules is imported first. Each scenario runs in a fresh interpreter.

The transformers internals the lazy registration uses (``_LazyAutoMapping._reverse_config_mapping``,
``._model_mapping``, ``._modules``; ``PreTrainedModel._auto_class``) are exercised here: a transformers release
that changes them fails these tests (and ``tests/test_remote_code.py``), not a user.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_scfm.modeling import FAMILIES, auto_map


def _run(code: str, tmp_path, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_hf_scfm_imports_neither_torch_nor_transformers(tmp_path):
    got = _run("import json, sys, hf_scfm; names = dir(hf_scfm)\n"
               "print(json.dumps({'heavy': sorted(m for m in ('torch', 'transformers', 'numpy', 'anndata', 'scipy') "
               "if m in sys.modules), 'names': names}))", tmp_path)
    assert got["heavy"] == []
    assert {"ScMamba2Config", "CellFMForMaskedRegression", "MouseGeneMambaForCausalLM", "GeneTokenizer",
            "AutoModelForMaskedExpression", "AutoModelForPerturbationPrediction", "load_example"} <= set(got["names"])


RESOLVE = r"""
import json, sys, tempfile
FIRST
import transformers
from transformers import AutoConfig, AutoTokenizer
lazy = {m: m in sys.modules for m in MODELING}
result = {"lazy_before_lookup": lazy, "classes": {}}
families = FAMILIES_MAPS
for model_type, names in families.items():
    config_class = getattr(hf_scfm, names["AutoConfig"].rsplit(".", 1)[1])
    config = config_class.from_preset("tiny", vocab_size=40, num_labels=3)
    folder = tempfile.mkdtemp()
    config.save_pretrained(folder)
    result["classes"][model_type] = {"AutoConfig": [type(AutoConfig.from_pretrained(folder)).__name__]}
    for auto_class, reference in names.items():
        if auto_class == "AutoConfig":
            continue
        auto = getattr(transformers, auto_class, None) or getattr(hf_scfm, auto_class)
        model = auto.from_config(config)
        model.save_pretrained(folder)
        loaded = auto.from_pretrained(folder)
        result["classes"][model_type][auto_class] = [type(model).__name__, type(loaded).__name__]
tok = hf_scfm.GeneTokenizer.from_genes(["TP53", "GAPDH", "ACTB"], species="human", encoding="binned")
tok.save_pretrained(folder)
result["tokenizer"] = type(AutoTokenizer.from_pretrained(folder)).__name__
print(json.dumps(result))
"""


@pytest.mark.parametrize("first", ["hf_scfm", "transformers"])
def test_auto_classes_resolve_every_head_and_the_tokenizer_lazily(tmp_path, first):
    maps = {model_type: auto_map(model_type) for model_type in FAMILIES}
    modeling = [f"hf_scfm.modeling.{m}.modeling_{m}" for m in FAMILIES]
    imports = ("import hf_scfm" if first == "hf_scfm" else
               "from transformers import AutoModel, AutoConfig, AutoTokenizer\nimport hf_scfm")
    code = (RESOLVE.replace("FIRST", imports).replace("MODELING", repr(modeling))
            .replace("FAMILIES_MAPS", repr(maps)))
    got = _run(code, tmp_path)
    # the Auto modules are imported, our models are not, until a model class is looked up
    assert not any(got["lazy_before_lookup"].values()), got["lazy_before_lookup"]
    for model_type, names in maps.items():
        classes = got["classes"][model_type]
        assert set(classes) == set(names)
        for auto_class, reference in names.items():
            expected = reference.rsplit(".", 1)[1]
            assert set(classes[auto_class]) == {expected}, (model_type, auto_class, classes[auto_class])
    assert got["tokenizer"] == "GeneTokenizer"


def test_masked_expression_heads_are_not_masked_lm(tmp_path):
    """The regression heads are reachable through hf_scfm.AutoModelForMaskedExpression and AutoModelForPreTraining,
    and AutoModelForMaskedLM (vocabulary logits) refuses them with transformers' own error."""
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    import hf_scfm

    config = hf_scfm.CellFMConfig.from_preset("tiny", vocab_size=40)
    assert type(hf_scfm.AutoModelForMaskedExpression.from_config(config)).__name__ == "CellFMForMaskedRegression"
    assert type(AutoModelForPreTraining.from_config(config)).__name__ == "CellFMForMaskedRegression"
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForMaskedLM.from_config(hf_scfm.ScMamba2Config.from_preset("tiny", vocab_size=40))
    mouse = hf_scfm.MouseGeneMambaConfig.from_preset("tiny", vocab_size=40)
    assert type(AutoModelForMaskedLM.from_config(mouse)).__name__ == "MouseGeneMambaForMaskedLM"
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        hf_scfm.AutoModelForMaskedExpression.from_config(mouse)


def test_transformers_internals_we_rely_on_are_there():
    """A direct, readable failure when a transformers release renames what the lazy registration and remote code
    use (the functional tests above would fail too, less clearly)."""
    import inspect

    from transformers import PreTrainedConfig, PreTrainedModel
    from transformers.dynamic_module_utils import custom_object_save
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _LazyAutoMapping
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    mapping = modeling_auto.MODEL_MAPPING
    assert isinstance(mapping, _LazyAutoMapping)
    assert isinstance(mapping._reverse_config_mapping, dict) and isinstance(mapping._modules, dict)
    assert hasattr(mapping._model_mapping, "items") and model_type_to_module_name("scmamba2") == "scmamba2"
    assert "self._modules[module_name]" in inspect.getsource(_LazyAutoMapping._load_attr_from_module)
    assert "_auto_class" in vars(PreTrainedModel) and "_auto_class" in vars(PreTrainedConfig)
    assert "obj._auto_class" in inspect.getsource(custom_object_save)
    assert '"_is_hf_initialized"' in inspect.getsource(PreTrainedModel._init_weights)
