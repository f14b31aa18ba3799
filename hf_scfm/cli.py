"""The ``hf-scfm`` command line: the Python API's own argument objects, parsed from the command line.

Each command is a Python function taking dataclasses (``pretrain(PretrainArguments)``,
``finetune(FinetuneArguments, FinetuneTrainingArguments)``, ...); the command line parses the same dataclasses
with transformers' ``HfArgumentParser`` (``--max-steps`` and ``--max_steps`` both work) and calls the function.
So whatever the command line can do, ``pretrain(PretrainArguments(...))`` does in Python, and the defaults live
in one place, the dataclass.

* ``hf-scfm --help`` imports nothing but this file: the commands' modules (torch, transformers) are imported
  only for the command that runs.
* A bad input ends with one line, ``hf-scfm <command>: error: <what is wrong and the fix>`` on stderr and exit
  status 2 (a wrong value, a missing file, a corrupt checkpoint); anything unexpected with exit status 1 and the
  exception's type. ``--debug`` (anywhere on the line) shows the full traceback instead.
* ``accelerate launch -m hf_scfm.cli pretrain ...`` runs pretraining on several GPUs or nodes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, function, argument dataclasses (names in that module), one-line help). A function of
#: ``None`` marks a command whose module builds its own argparse parser (``add_<command>_parser``).
COMMANDS: dict[str, tuple[str, str | None, tuple[str, ...], str]] = {
    "quickstart": ("hf_scfm.quickstart", "quickstart", ("QuickstartArguments",),
                   "the main job on bundled real data (start here)"),
    "tokenize": ("hf_scfm.data.corpus", "tokenize", ("TokenizeArguments",),
                 "h5ad files -> tokenized Parquet corpus (a Hub dataset folder)"),
    "pretrain": ("hf_scfm.training.pretrain", "pretrain", ("PretrainArguments",),
                 "pretrain a model family on a tokenized corpus (Accelerate)"),
    "finetune": ("hf_scfm.training.finetune", "finetune", ("FinetuneArguments", "FinetuneTrainingArguments"),
                 "fine-tune a pretrained model (cell-type annotation, LoRA by default)"),
    "push": ("hf_scfm.training.hub", None, (), "push a checkpoint folder to the Hugging Face Hub"),
    "annotate": ("hf_scfm.tasks.annotation", "annotate_h5ad", ("AnnotateArguments",),
                 "annotate cell types of an h5ad with a fine-tuned classifier"),
    "embed": ("hf_scfm.tasks.embedding", "embed_h5ad", ("EmbedArguments",),
              "cell (and gene) embeddings of an h5ad, with a UMAP"),
    "perturb": ("hf_scfm.tasks.perturbation", "perturb", ("PerturbArguments",),
                "fine-tune and evaluate perturbation prediction (GEARS/Norman layout)"),
}

#: Errors that mean "the input is wrong": one line, exit status 2.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError, TypeError,
                ImportError)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-scfm",
        description="Single-cell foundation models (Mouse-GeneMamba, SC-MAMBA2, CellFM) on Hugging Face. "
                    "`hf-scfm COMMAND --help` lists a command's options.",
        epilog="--debug (anywhere) shows the full traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(command: str):
    """``(parser, function)`` of one command: an ``HfArgumentParser`` over its dataclasses and the function to call
    with the parsed instances (or, for an argparse command, its parser and the handler it sets)."""
    module_name, function, dataclass_names, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    if function is None:
        parser = argparse.ArgumentParser(prog="hf-scfm")
        getattr(module, f"add_{command}_parser")(parser.add_subparsers(dest="command", required=True))
        return parser, None
    from transformers import HfArgumentParser

    dataclasses = [getattr(module, name) for name in dataclass_names]
    parser = HfArgumentParser(dataclasses, prog=f"hf-scfm {command}", description=help_text)
    return parser, getattr(module, function)


def _positional_first(dataclasses, argv: list[str]) -> list[str]:
    """Leading bare words become the values of the dataclass field named by its ``cli_positional`` attribute
    (``hf-scfm tokenize a.h5ad b.h5ad --out corpus`` = ``--inputs a.h5ad b.h5ad --out corpus``)."""
    field = next((getattr(d, "cli_positional") for d in dataclasses if getattr(d, "cli_positional", None)), None)
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    return [f"--{field}", *argv[:n], *argv[n:]] if field and n else argv


def parse(argv: list[str]):
    """``(function, parsed arguments)`` of a command line (without ``hf-scfm``), e.g. ``parse(["pretrain",
    "--model", "scmamba2", ...])``; nothing runs. For an argparse command, the function takes the namespace."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])  # prints the help, or the error for an unknown command
    command, rest = argv[0], argv[1:]
    parser, function = command_parser(command)
    if function is None:
        args = parser.parse_args([command, *rest])
        return args.func, (args,)
    return function, tuple(parser.parse_args_into_dataclasses(_positional_first(parser.dataclass_types, rest)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "hf-scfm"
    try:
        function, args = parse(argv)
        result = function(*args)
    except KeyboardInterrupt:
        print(f"hf-scfm {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place a command's error becomes a message
        if debug:
            raise
        return _report(command, err)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _report(command: str, err: Exception) -> int:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = " ".join(str(message).split()) or type(err).__name__
    if isinstance(err, INPUT_ERRORS):
        print(f"hf-scfm {command}: error: {message}", file=sys.stderr)
        return 2
    print(f"hf-scfm {command}: error: {type(err).__name__}: {message} (run again with --debug for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
