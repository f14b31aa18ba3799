"""The dataset card (``README.md``) of a corpus, written from the shards' footers alone (no cell data is read)."""

from __future__ import annotations

import json
import os
from collections import Counter

from .loading import DATA_DIR
from .shards import TMP_PREFIX

#: Label columns with more distinct values than this are not tabulated in the card.
MAX_LABELS_IN_CARD = 200


def write_card(out_dir: str, features, settings, shard_infos, total_bytes, dataset_name, obs_kinds):
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    n_cells = sum(i["n_cells"] for i in shard_infos)
    per_source: dict[str, int] = {}
    labels: dict[str, Counter] = {}
    for info in shard_infos:
        per_source[info["source_file"]] = per_source.get(info["source_file"], 0) + info["n_cells"]
        for col, counts in info.get("label_counts", {}).items():
            labels.setdefault(col, Counter()).update(counts)
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=total_bytes, num_examples=n_cells))
    info = DatasetInfo(features=features, splits=splits)
    card_data = DatasetCardData(
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*.parquet"}]}],
        tags=["single-cell", "scRNA-seq", "hf-scfm", "tokenized"],
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    yaml = card_data.to_yaml()

    lines = [
        "---", yaml, "---", "",
        f"# {dataset_name}", "",
        f"A tokenized single-cell corpus built with `hf_scfm.data.build_corpus`: {n_cells:,} cells from "
        f"{len(per_source)} source(s) in {len(shard_infos)} Parquet shard(s). One row per cell: `input_ids` and "
        "`values` (unpadded), `length` (tokens including special tokens), `cell_id` (obs name), "
        + (", ".join(f"`{c}`" for c in obs_kinds) + ", " if obs_kinds else "")
        + "`source_file`.",
        "",
        "## Loading",
        "",
        "```python",
        "from hf_scfm.data import load_corpus, DataCollatorForMaskedExpression",
        "ds = load_corpus(\"<this folder or repo id>\", streaming=True, shuffle=True)",
        "# or, with datasets alone:",
        "from datasets import load_dataset",
        "ds = load_dataset(\"<this folder or repo id>\", split=\"train\", streaming=True)",
        "```",
        "",
        "The tokenizer is saved in `tokenizer/` (`GeneTokenizer.from_pretrained(\"<folder>/tokenizer\")`).",
        "",
        "## Tokenizer settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
        "## Cells per source",
        "",
        "| source | cells |",
        "|---|---:|",
        *(f"| {name} | {count:,} |" for name, count in per_source.items()),
        "",
    ]
    for col, counts in labels.items():
        lines += [f"## Cells per `{col}`", ""]
        if len(counts) > MAX_LABELS_IN_CARD:
            lines += [f"{len(counts):,} distinct values (not tabulated).", ""]
            continue
        lines += [f"| {col} | cells |", "|---|---:|"]
        lines += [f"| {label} | {count:,} |" for label, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        lines.append("")
    text = "\n".join(lines)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}README.md")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(out_dir, "README.md"))
    return per_source, {c: dict(v) for c, v in labels.items()}
