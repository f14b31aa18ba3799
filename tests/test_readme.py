"""README.md stays true: the tour's Python blocks run, in order, in a fresh folder, and print what
the README says; the `hf-scfm tokenize` command of the tour runs before the block that loads its
corpus. (`hf-scfm pretrain/finetune/push` are exercised by tests/test_pretrain.py, test_finetune.py
and test_hub.py; the quickstart by .ci/run.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    tour = text[text.index("## A short tour"):]
    tour = tour[: tour.index("\n## ", 3)]
    return re.findall(r"```(python|bash)\n(.*?)```", tour, flags=re.S)


def test_readme_opens_with_the_two_commands_that_ci_runs():
    text = README.read_text()
    install = re.search(r"```bash\n(python3 -m venv .*?hf-scfm quickstart)\n```", text).group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    for step in install.split(" && ")[1:]:
        if step.startswith(". "):
            continue
        assert step.split(" ", 1)[1] in ci or step in ci, f"README install step {step!r} is not in .ci/run"
    assert "python -m pytest -q" in text and "python -m pytest -q" in ci


def test_readme_tour_runs(tmp_path, monkeypatch):
    blocks = _tour_blocks()
    assert sum(kind == "python" for kind, _ in blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    repo = README.parent
    for kind, code in blocks:
        if kind == "bash":
            for line in code.strip().splitlines():
                if line.startswith("hf-scfm tokenize"):
                    args = [a.replace("hf_scfm/", str(repo / "hf_scfm") + "/") for a in shlex.split(line)[1:]]
                    subprocess.run([sys.executable, "-m", "hf_scfm.cli", *args], check=True, cwd=tmp_path)
            continue
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "my_tokenizer" / "tokenizer_config.json").exists()
    assert (tmp_path / "corpus" / "README.md").exists()
    assert namespace["out"].cell_embedding.shape == (8, 64)
    assert namespace["pancreas"].obsm["X_scmamba2"].shape == (268, 64)
    assert set(namespace["pert"].obs["condition"]) >= {"ctrl"} and "grn" in namespace["pert"].uns
