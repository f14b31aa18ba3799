"""The ``hf-scfm`` command line (hf_scfm.cli): light help, the Python API's dataclasses, one clean error line.

* ``hf-scfm --help`` imports neither torch nor transformers (a fresh process; the commands' modules are imported
  only for the command that runs);
* every command parses into the dataclasses its Python function takes, with their defaults, and every command
  line the README documents parses;
* a bad input ends with one ``hf-scfm <command>: error: ...`` line and exit status 2 (1 for an unexpected error),
  the traceback only with ``--debug``; ``tokenize`` names an empty cell by its obs name and reads ``--layer``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from hf_scfm import cli

REPO = Path(__file__).resolve().parents[1]

#: Runs ``hf-scfm --help`` with the root package's ``__init__`` skipped (a bare package object), so the check is of
#: the command line's own imports whatever ``hf_scfm/__init__.py`` imports.
_HELP_ALONE = """
import sys, types, io, contextlib
pkg = types.ModuleType("hf_scfm"); pkg.__path__ = [{path!r}]; sys.modules["hf_scfm"] = pkg
from hf_scfm import cli
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "numpy", "datasets") if m in sys.modules)
print("HEAVY=" + ",".join(heavy)); print(buf.getvalue())
"""


def test_help_imports_nothing_heavy():
    code = _HELP_ALONE.format(path=str(REPO / "hf_scfm"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY=\n" in out, out
    for command in cli.COMMANDS:
        assert command in out


def test_hf_scfm_help_does_not_import_torch():
    """The whole path, as a user runs it (``python -m hf_scfm.cli --help`` = ``hf-scfm --help``), one process."""
    code = ("import runpy, sys\nimport hf_scfm\nroot = 'torch' in sys.modules\nsys.argv = ['hf-scfm', '--help']\n"
            "try:\n    runpy.run_module('hf_scfm.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('ROOT', root, 'TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    if "ROOT True" in out:
        pytest.xfail("`import hf_scfm` itself imports torch (the lazy hf_scfm/__init__ lands with the modeling "
                     "branch); the command line adds nothing: test_help_imports_nothing_heavy")
    assert "TORCH False" in out, out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_a_parser_and_help(command):
    parser, function = cli.command_parser(command)
    text = parser.format_help()
    assert "usage: hf-scfm" in text and len(text) > 200
    module, name, dataclass_names, _ = cli.COMMANDS[command]
    if name is not None:  # the function takes exactly the dataclasses the parser fills, in that order
        params = list(inspect.signature(function).parameters)
        assert len(params) == len(dataclass_names)


def test_parsing_gives_the_dataclass_defaults():
    from hf_scfm.training.finetune import FinetuneArguments, FinetuneTrainingArguments, finetune
    from hf_scfm.training.pretrain import PretrainArguments, pretrain

    function, (args,) = cli.parse(["pretrain", "--model", "cellfm", "--corpus", "c", "--out", "o"])
    assert function is pretrain and args == PretrainArguments(model="cellfm", corpus="c", out="o")
    _, (args,) = cli.parse(["pretrain", "--model", "cellfm", "--corpus", "c", "--out", "o", "--resume", "--no-progress",
                            "--max_steps", "7"])
    assert (args.resume, args.progress, args.max_steps) == ("latest", False, 7)
    function, (args, training) = cli.parse(["finetune", "--model", "m", "--train", "t.h5ad", "--label-key", "cell_type",
                                            "--out", "o", "--max-steps", "5", "--batch-size", "4", "--no-lora"])
    assert function is finetune and isinstance(args, FinetuneArguments) and not args.lora
    assert isinstance(training, FinetuneTrainingArguments)
    assert (training.output_dir, training.max_steps, training.per_device_train_batch_size) == ("o", 5, 4)
    assert (training.learning_rate, training.seed, training.remove_unused_columns) == (1e-3, 0, False)


def test_tokenize_arguments_are_build_corpus_keywords():
    from hf_scfm.data.corpus import TokenizeArguments, build_corpus

    names = {f.name for f in dataclasses.fields(TokenizeArguments)}
    assert names <= set(inspect.signature(build_corpus).parameters), names - set(inspect.signature(build_corpus).parameters)
    _, (args,) = cli.parse(["tokenize", "a.h5ad", "b.h5ad", "--tokenizer", "tok", "--out", "corpus", "--obs-columns",
                            "cell_type", "batch"])
    assert (args.inputs, args.out_dir, args.obs_columns) == (["a.h5ad", "b.h5ad"], "corpus", ["cell_type", "batch"])


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("&&")[-1].strip()
            if line.startswith("hf-scfm "):
                lines.append(shlex.split(line)[1:])
    return lines


def test_every_command_line_in_the_readme_parses():
    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"quickstart", "tokenize", "pretrain", "finetune", "push", "annotate", "embed",
                                        "perturb"}
    for argv in commands:
        cli.parse(argv)  # an unknown option or a bad value exits (SystemExit) or raises


# --------------------------------------------------------------------------- errors
def _counts_file(path: Path, *, empty_cell: str | None = None, log_x: bool = False) -> Path:
    """Baron human cells (raw counts); one all-zero cell named ``empty_cell``; with ``log_x``, X log-normalised and
    the raw counts in ``layers["counts"]``."""
    from hf_scfm.data import load_example

    adata = load_example("baron_human")[:24].copy()
    if empty_cell is not None:
        x = adata.X.tolil()
        x[5, :] = 0
        adata.X = sp.csr_matrix(x)
        adata.obs_names = [empty_cell if i == 5 else n for i, n in enumerate(adata.obs_names)]
    if log_x:
        adata.layers["counts"] = adata.X.copy()
        lib = np.asarray(adata.X.sum(1)).ravel()
        adata.X = sp.csr_matrix(np.log1p(adata.X.toarray() / lib[:, None] * 1e4).astype(np.float32))
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from hf_scfm.tokenization import GeneTokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    GeneTokenizer.from_species("human", encoding="binned").save_pretrained(folder)
    return folder


def _run(argv, capsys):
    capsys.readouterr()  # what came before
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_tokenize_errors_are_one_line_and_name_the_cell(tmp_path, tokenizer_dir, capsys):
    h5ad = _counts_file(tmp_path / "cells.h5ad", empty_cell="AAACCTG-empty")
    code, err = _run(["tokenize", str(h5ad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c"),
                      "--no-progress"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("hf-scfm tokenize: error: ") and "have no counts" in err[0]
    assert "e.g. AAACCTG-empty" in err[0] and "e.g. 5" not in err[0]
    with pytest.raises(ValueError, match="AAACCTG-empty"):  # --debug: the exception itself, with its traceback
        cli.main(["tokenize", str(h5ad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c"),
                  "--no-progress", "--debug"])

    code, err = _run(["tokenize", str(tmp_path / "missing.h5ad"), "--tokenizer", str(tokenizer_dir), "--out",
                      str(tmp_path / "c")], capsys)
    assert code == 2 and err == [f"hf-scfm tokenize: error: Input {str(tmp_path / 'missing.h5ad')!r} does not exist."]


def test_tokenize_reads_a_layer(tmp_path, tokenizer_dir, capsys):
    from hf_scfm.data import load_corpus

    h5ad = _counts_file(tmp_path / "logged.h5ad", log_x=True)
    code, err = _run(["tokenize", str(h5ad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c1"),
                      "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "Expected raw counts" in err[0] and "layer='counts'" in err[0]
    assert cli.main(["tokenize", str(h5ad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c2"),
                     "--layer", "counts", "--no-progress"]) == 0
    raw = _counts_file(tmp_path / "raw.h5ad")
    assert cli.main(["tokenize", str(raw), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c3"),
                     "--no-progress"]) == 0
    assert load_corpus(tmp_path / "c2")["input_ids"] == load_corpus(tmp_path / "c3")["input_ids"]
    code, err = _run(["tokenize", str(raw), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c4"),
                      "--layer", "spliced"], capsys)
    assert code == 2 and len(err) == 1 and "has no layer 'spliced'" in err[0]


def test_pretrain_errors_are_one_line(tmp_path, capsys):
    code, err = _run(["pretrain", "--model", "cellfm", "--corpus", str(tmp_path / "nothing"), "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("hf-scfm pretrain: error: ") and "nothing" in err[0]
    code, err = _run(["pretrain", "--model", "cellfm", "--corpus", "c", "--out", "o", "--max-steps", "0"], capsys)
    assert code == 2 and err == ["hf-scfm pretrain: error: --max-steps must be >= 1 (got 0)."]


def test_unexpected_errors_exit_1_with_their_type(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "parse", lambda argv: (boom, (None,)))
    code, err = _run(["quickstart"], capsys)
    assert code == 1 and err == ["hf-scfm quickstart: error: RuntimeError: disk on fire second line (run again with "
                                 "--debug for the traceback)"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["quickstart", "--debug"])


def test_unknown_command_and_bad_option_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["tokenise"])
    assert info.value.code == 2 and "invalid choice: 'tokenise'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["pretrain", "--model", "bert", "--corpus", "c", "--out", "o"])
    assert info.value.code == 2 and "invalid choice: 'bert'" in capsys.readouterr().err
