"""The ``hf-scfm`` command line. Each subcommand's work lives in the module named beside it;
this file only parses arguments and dispatches, importing the heavy parts lazily."""

from __future__ import annotations

import argparse
import sys


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(dataset=args.dataset, out_dir=args.out, max_length=args.max_length)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-scfm",
        description="Single-cell foundation models (Mouse-GeneMamba, SC-MAMBA2, CellFM) on Hugging Face.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="the main job on bundled real data (start here)")
    q.add_argument("--dataset", default="baron_human", help="bundled dataset: baron_human, baron_mouse or pbmc68k")
    q.add_argument("--out", default="quickstart_out", help="output folder")
    q.add_argument("--max-length", type=int, default=2048, help="tokens per cell sentence")
    q.set_defaults(func=_quickstart)

    from .data.corpus import add_tokenize_arguments, run_tokenize

    t = sub.add_parser("tokenize", help="h5ad files -> tokenized Parquet corpus (a Hub dataset folder)")
    add_tokenize_arguments(t)
    t.set_defaults(func=run_tokenize)

    from .training.finetune import add_finetune_parser
    from .training.hub import add_push_parser
    from .training.pretrain import add_pretrain_parser

    add_pretrain_parser(sub)
    add_finetune_parser(sub)
    add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
