"""Every copy equals its original (``utils/check_copies.py``: ``# Copied from`` objects and the whole files of
``FILE_COPIES``), and the checker really catches a drifted copy (objects, ``with A->B`` replacements, whole files)
and fixes it."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_copies", ROOT / "utils" / "check_copies.py")
check_copies = importlib.util.module_from_spec(spec)
sys.modules["check_copies"] = check_copies  # dataclasses look their module up
spec.loader.exec_module(check_copies)


def test_every_copy_in_the_package_equals_its_original():
    assert check_copies.check() == []


def test_the_family_folders_carry_marked_copies_of_the_shared_pieces():
    markers = {}
    for path in (ROOT / "hf_scfm" / "modeling").rglob("*.py"):
        for copy in check_copies.find_copies(path):
            markers.setdefault(copy.target.rsplit(".", 1)[-1], set()).add(path.parent.name)
    assert markers["PresetMixin"] == {"mouse_genemamba", "scmamba2", "cellfm"}
    assert markers["MouseGeneMambaRMSNorm"] == {"scmamba2"}
    files = check_copies.FILE_COPIES
    assert {files[f"hf_scfm/modeling/{f}/special_tokens.py"] for f in ("mouse_genemamba", "scmamba2", "cellfm")} == {
        "hf_scfm/tokenization/special_tokens.py"}
    assert files["hf_scfm/modeling/scmamba2/conv.py"] == "hf_scfm/modeling/mouse_genemamba/conv.py"
    # every .py of a family folder other than its own configuration/modeling/ops is a checked copy
    for family in ("mouse_genemamba", "scmamba2", "cellfm"):
        for path in (ROOT / "hf_scfm" / "modeling" / family).glob("*.py"):
            rel = str(path.relative_to(ROOT))
            assert path.stem in ("__init__", f"configuration_{family}", f"modeling_{family}", "selective_scan",
                                 "conv", "dispatch", "ssd", "retention") or rel in files, rel
    for shared in ("sequence_classification_loss", "_masked_mse", "_perturbation_flags",
                   "MouseGeneMambaPerturbationEmbedding", "MouseGeneMambaPerturbationOutput"):
        assert markers[shared] == {"scmamba2", "cellfm"}, shared


def _tree(tmp_path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "hf_scfm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return tmp_path


ORIGINAL = """
    import torch


    class ARMSNorm(torch.nn.Module):
        def forward(self, h):
            return self.weight * h.to(torch.float32)  # ARMSNorm


    LIMIT = 3
"""


@pytest.mark.parametrize("body, ok", [
    ("class BRMSNorm(torch.nn.Module):\n    def forward(self, h):\n"
     "        return self.weight * h.to(torch.float32)  # BRMSNorm\n", True),
    ("class BRMSNorm(torch.nn.Module):\n    def forward(self, h):\n"
     "        return (self.weight * h).to(torch.float32)  # BRMSNorm\n", False),  # the drift issue 19 found
])
def test_object_copies_with_replacements_are_checked_and_fixed(tmp_path, body, ok):
    root = _tree(tmp_path, {"a.py": ORIGINAL, "b.py": "import torch\n\n\n# Copied from hf_scfm.a.ARMSNorm with A->B\n"
                            + body + "\n\n# Copied from hf_scfm.a.LIMIT\nLIMIT = 3\n"})
    problems = check_copies.check(root=root, file_copies={})
    assert (problems == []) == ok, problems
    if not ok:
        assert problems == ["hf_scfm/b.py:4: differs from hf_scfm.a.ARMSNorm"]
        check_copies.check(fix=True, root=root, file_copies={})
        assert check_copies.check(root=root, file_copies={}) == []
        assert "return self.weight * h.to(torch.float32)  # BRMSNorm" in (root / "hf_scfm" / "b.py").read_text()


def test_constants_methods_and_whole_files(tmp_path):
    root = _tree(tmp_path, {
        "a.py": ORIGINAL,
        "c.py": textwrap.dedent(ORIGINAL).lstrip("\n"),
        "d.py": "class X:\n    # Copied from hf_scfm.a.ARMSNorm.forward\n    def forward(self, h):\n"
                "        return self.weight * h.to(torch.float32)  # ARMSNorm\n\n\n# Copied from hf_scfm.a.LIMIT\n"
                "LIMIT = 4\n",
    })
    files = {"hf_scfm/c.py": "hf_scfm/a.py"}
    assert check_copies.check(root=root, file_copies=files) == ["hf_scfm/d.py:7: differs from hf_scfm.a.LIMIT"]
    (root / "hf_scfm" / "c.py").write_text("import torch\n")
    assert check_copies.check(root=root, file_copies=files) == ["hf_scfm/c.py:1: differs from hf_scfm/a.py",
                                                                "hf_scfm/d.py:7: differs from hf_scfm.a.LIMIT"]
    check_copies.check(fix=True, root=root, file_copies=files)
    assert check_copies.check(root=root, file_copies=files) == []
    assert (root / "hf_scfm" / "c.py").read_text() == (root / "hf_scfm" / "a.py").read_text()


def test_a_marker_naming_nothing_is_an_error(tmp_path):
    root = _tree(tmp_path, {"a.py": ORIGINAL, "b.py": "# Copied from hf_scfm.a.Missing\nLIMIT = 3\n"})
    with pytest.raises(ValueError, match="Missing.*is not defined"):
        check_copies.check(root=root, file_copies={})
