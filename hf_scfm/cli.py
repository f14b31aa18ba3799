"""The ``hf-scfm`` command line. Each subcommand's work lives in the module named beside it;
this file only parses arguments and dispatches, importing the heavy parts lazily."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-scfm",
        description="Single-cell foundation models (Mouse-GeneMamba, SC-MAMBA2, CellFM) on Hugging Face.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .quickstart import add_quickstart_arguments, quickstart_command

    q = sub.add_parser("quickstart", help="the main job on bundled real data (start here)",
                       description="Corpus -> pretrain a tiny model -> fine-tune on one donor split -> annotate the "
                       "held-out donor, next to a logistic-regression baseline; everything in --out.")
    add_quickstart_arguments(q)
    q.set_defaults(func=quickstart_command)

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

    from .tasks.annotation import add_annotate_parser
    from .tasks.embedding import add_embed_parser
    from .tasks.perturbation import add_perturb_parser

    add_annotate_parser(sub)
    add_embed_parser(sub)
    add_perturb_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
