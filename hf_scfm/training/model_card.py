"""Model cards for hf-scfm checkpoints: Hub metadata (``huggingface_hub.ModelCardData``) + a Markdown body.

The body comes from the Jinja templates shipped in ``hf_scfm/model_cards/`` (one per family and one for
fine-tuned models; shared sections live in ``_*.md`` partials); the YAML front matter is
``ModelCardData.to_yaml()``, so the metadata is exactly what ``huggingface_hub`` writes and parses.

Metadata choices, and why:

* ``library_name: transformers``. The checkpoints are ``transformers`` checkpoints (``config.json`` with a
  ``model_type``, safetensors weights, ``AutoModel.from_pretrained``), and with ``auto_map`` (the model's code
  and the tokenizer's travel with the checkpoint) the Hub's "Use this model" button then shows a working
  ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` snippet, counts downloads through ``config.json`` and
  reads the parameter count from the safetensors header. ``hf-scfm`` is not a library the Hub knows: declaring
  it would show no snippet at all and drop that integration. The package is named instead in ``tags``
  (``hf-scfm``) and in the card's usage section (``import hf_scfm``).
* ``tags``: ``single-cell``, ``scRNA-seq``, ``biology``, ``hf-scfm``, the family (``mouse-genemamba``,
  ``sc-mamba2``, ``cellfm``), the species and the cell encoding, plus any the caller adds.
* ``pipeline_tag``: ``feature-extraction`` for the pretrained foundation models (their product is a cell
  embedding); ``tabular-classification`` for cell-type annotation models (a cell is a row of gene
  expression values, the output a label). No Hub widget can run these inputs; the tag is for search.
* ``model-index`` only from evaluation results that exist: nothing is claimed that was not measured.
* ``datasets`` only for Hub dataset ids the caller names; a local corpus is described in the body instead.
* **Training data is named with its licence, read from the data**: a local ``.h5ad`` named in ``training_data``
  (``reference``, ``train``, ``data``) gives its ``uns["source"]`` (the bundled datasets carry their source and
  licence there), a local corpus (``corpus``) the ``uns["source"]`` of each AnnData it was built from (recorded
  in its shards by ``build_corpus``). When the data does not say, the card says "not recorded" rather than guess.
* **Snippets use a valid repo id**: the pushed repo's id, or the explicit placeholder ``your-org/<family>[-<task>]``
  (e.g. ``your-org/scmamba2-annotate``); an invalid ``repo_id`` is an error. The snippet passes
  ``trust_remote_code=True`` when the config has an ``auto_map`` (the code is in the repository), and
  ``import hf_scfm`` otherwise. No URL is written that the project does not own (it has no public repository).
* ``license`` defaults to ``apache-2.0`` (the code's licence and that of weights we train); pass another when the
  training data demands it.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

#: Written beside a checkpoint by :func:`write_card_metadata`, read back by :func:`card_from_folder`.
CARD_METADATA_FILE = "hf_scfm_card.json"

FAMILIES: dict[str, dict[str, Any]] = {
    "mouse_genemamba": {
        "name": "Mouse-GeneMamba",
        "tag": "mouse-genemamba",
        "template": "mouse_genemamba.md",
        "pretraining_class": "MouseGeneMambaForCausalLM",
        "encoding": "rank",
        "species": "mouse",
        "objective": "next-gene prediction (causal language modelling) over rank-ordered cell sentences, "
        "cross-entropy over the gene vocabulary",
        "citation": (
            "@misc{mouse_genemamba,\n"
            "  title = {Mouse-GeneMamba},\n"
            "  note  = {Japanese-language paper: Mouse-Geneformer with its Transformer encoder replaced by Mamba "
            "blocks; authors and venue are not given in the text this implementation follows}\n"
            "}\n"
            "@article{ito2025mousegeneformer,\n"
            "  title   = {Mouse-Geneformer: A deep learning model for mouse single-cell transcriptome and its "
            "cross-species utility},\n"
            "  author  = {Ito, Keita and others},\n"
            "  journal = {PLOS},\n"
            "  year    = {2025}\n"
            "}\n"
            "@inproceedings{gu2024mamba,\n"
            "  title     = {Mamba: Linear-Time Sequence Modeling with Selective State Spaces},\n"
            "  author    = {Gu, Albert and Dao, Tri},\n"
            "  booktitle = {Conference on Language Modeling (COLM)},\n"
            "  year      = {2024}\n"
            "}"
        ),
    },
    "scmamba2": {
        "name": "SC-MAMBA2",
        "tag": "sc-mamba2",
        "template": "scmamba2.md",
        "pretraining_class": "ScMamba2ForMaskedExpression",
        "encoding": "binned",
        "species": "human",
        "objective": "masked expression modelling: a fraction of the binned expression values is masked and "
        "predicted by an MLP head, MSE on the masked positions",
        "citation": (
            "@article{zhao2024scmamba2,\n"
            "  title   = {SC-MAMBA2: Leveraging State-Space Models for Efficient Single-Cell Ultra-Long "
            "Transcriptome Modeling},\n"
            "  author  = {Zhao, Yalong and Zhao, Bowen and Zhang, Fan and He, Chenfeng and Wu, Wendao and "
            "Lai, Lipeng},\n"
            "  journal = {bioRxiv},\n"
            "  year    = {2024},\n"
            "  doi     = {10.1101/2024.09.30.615775}\n"
            "}"
        ),
    },
    "cellfm": {
        "name": "CellFM",
        "tag": "cellfm",
        "template": "cellfm.md",
        "pretraining_class": "CellFMForMaskedRegression",
        "encoding": "continuous",
        "species": "human",
        "objective": "masked value regression: 20% of the expressed genes get a learned mask vector and their "
        "log1p expression is regressed (MSE) from the last hidden states, plus a cell-level term from <cls>",
        "citation": (
            "@article{zeng2025cellfm,\n"
            "  title   = {CellFM: a large-scale foundation model pre-trained on transcriptomics of 100 million "
            "human cells},\n"
            "  author  = {Zeng, Yuansong and Xie, Jiancong and Shangguan, Ningyuan and Wei, Zhuoyi and Li, Wenbing "
            "and Su, Yun and Yang, Shuangyu and Zhang, Chengyang and Zhang, Jinbo and Fang, Nan and Zhang, Hongyu "
            "and Lu, Yutong and Zhao, Huiying and Fan, Jue and Yu, Weijiang and Yang, Yuedong},\n"
            "  journal = {Nature Communications},\n"
            "  volume  = {16},\n"
            "  year    = {2025},\n"
            "  doi     = {10.1038/s41467-025-59926-5}\n"
            "}"
        ),
    },
}

#: Fine-tuning tasks: Hub ``pipeline_tag`` and the ``model-index`` task type/name used for their results.
TASKS: dict[str, dict[str, str]] = {
    "annotate": {"pipeline_tag": "tabular-classification", "task_type": "tabular-classification",
                 "task_name": "Cell-type annotation"},
    "pretrain": {"pipeline_tag": "feature-extraction", "task_type": "feature-extraction",
                 "task_name": "Pretraining objective (held-out cells)"},
    "integrate": {"pipeline_tag": "feature-extraction", "task_type": "feature-extraction",
                  "task_name": "Batch integration"},
    "perturb": {"pipeline_tag": "tabular-regression", "task_type": "tabular-regression",
                "task_name": "Perturbation response prediction"},
}

ENCODING_DESCRIPTIONS = {
    "rank": "expressed genes ranked by x_norm divided by each gene's non-zero median over the pretraining corpus "
    "(ties by token id); `<bos>` first, `<eos>` last; value per token = log1p(x_norm)",
    "binned": "expressed genes in vocabulary order (a seeded random sample beyond max_length); `<cls>` first; "
    "value per token = the cell's quantile bin of log1p(x_norm) (0 = not expressed)",
    "continuous": "expressed genes in vocabulary order (a seeded random sample beyond max_length); `<cls>` first; "
    "value per token = log1p(x_norm) as a float",
}


def _template_dir() -> Path:
    return Path(str(resources.files("hf_scfm") / "model_cards"))


def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return dict(vars(obj))


def _tokenizer_settings(tokenizer, config: dict) -> dict[str, Any]:
    """Encoding settings from a tokenizer object or its ``tokenizer_config.json`` dict (missing keys -> None)."""
    if tokenizer is None:
        tok: dict = {}
    elif isinstance(tokenizer, dict):
        tok = tokenizer
    else:
        tok = dict(getattr(tokenizer, "init_kwargs", {}) or {})
        for key in ("encoding", "species", "max_length", "model_max_length", "vocab_checksum", "n_bins"):
            value = getattr(tokenizer, key, None)
            if value is not None and not callable(value):
                tok[key] = value
        try:
            tok.setdefault("vocab_size", len(tokenizer))
        except TypeError:
            pass
    max_length = tok.get("max_length") or tok.get("model_max_length")
    if isinstance(max_length, (int, float)) and max_length > 10**9:  # transformers' "no limit" sentinel
        max_length = None
    return {
        "encoding": tok.get("encoding"),
        "species": tok.get("species"),
        "max_length": max_length,
        "n_bins": tok.get("n_bins"),
        "vocab_checksum": tok.get("vocab_checksum") or config.get("vocab_checksum"),
        "vocab_size": tok.get("vocab_size") or config.get("vocab_size"),
        "tokenizer_class": tok.get("tokenizer_class"),
    }


def _eval_results(results, task: str, model_name: str):
    """``EvalResult`` objects from dicts ``{"metric", "value", "dataset", ["dataset_name", "split", "task"]}``."""
    from huggingface_hub import EvalResult

    out = []
    for item in results or []:
        if isinstance(item, EvalResult):
            out.append(item)
            continue
        missing = [key for key in ("metric", "value", "dataset") if key not in item]
        if missing:
            raise ValueError(
                f"Evaluation result {item!r} lacks {missing}: each result needs 'metric' (e.g. 'accuracy'), "
                "'value' (a number) and 'dataset' (an id such as 'baron_human')."
            )
        spec = TASKS.get(item.get("task", task), TASKS["pretrain"])
        out.append(
            EvalResult(
                task_type=spec["task_type"],
                task_name=spec["task_name"],
                dataset_type=str(item["dataset"]),
                dataset_name=str(item.get("dataset_name", item["dataset"])),
                dataset_split=item.get("split"),
                metric_type=str(item["metric"]),
                metric_name=item.get("metric_name", str(item["metric"])),
                metric_value=float(item["value"]),
            )
        )
    return out


def _label_names(label_names, cfg: dict, finetuned: bool) -> list[str]:
    if label_names:
        return [str(name) for name in label_names]
    if not finetuned:
        return []
    id2label = cfg.get("id2label") or {}
    return [str(id2label[key]) for key in sorted(id2label, key=lambda k: int(k))]


def _looks_like_hub_id(value: str | None) -> bool:
    return bool(value) and value.count("/") == 1 and not os.path.exists(value) and not value.startswith((".", "/"))


def _snippet_repo_id(repo_id: str | None, family: str, task: str, finetuned: bool) -> str:
    """The id the usage snippet loads: ``repo_id`` (validated; a bare name gets the ``your-org/`` placeholder
    namespace) or ``your-org/<family>[-<task>]``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id is None:
        return f"your-org/{family.replace('_', '-')}" + (f"-{task}" if finetuned else "")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id ({err}). Pass 'namespace/name' (letters, "
                         "digits, '-', '_', '.'), or no repo_id for a your-org/... placeholder.") from err
    return repo_id if "/" in repo_id else f"your-org/{repo_id}"


#: ``training_data`` keys that may name a local ``.h5ad`` of the training cells, and the one naming a corpus.
_H5AD_KEYS = ("reference", "train", "data")
_CORPUS_KEY = "corpus"


def _h5ad_source(path: str) -> str | None:
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    try:
        source = adata.uns.get("source")
    finally:
        adata.file.close()
    return str(source) if source else None


def _corpus_sources(folder: Path) -> dict[str, str | None]:
    """``{source file: uns["source"] of that AnnData or None}`` from a local corpus's shard footers."""
    from ..data.loading import DATA_DIR, read_shard_metadata

    sources: dict[str, str | None] = {}
    for shard in sorted((folder / DATA_DIR).glob("*.parquet")):
        info, _ = read_shard_metadata(str(shard))
        sources.setdefault(str(info.get("source_file")), info.get("source_description"))
    return sources


def training_data_with_sources(training_data: dict) -> dict:
    """``training_data`` plus ``source and licence``: what the named local data says about itself (see the module
    docstring); unchanged when it already has that key or names no local data."""
    data = dict(training_data)
    if "source and licence" in data:
        return data
    found = None
    for key in _H5AD_KEYS:
        value = data.get(key)
        if isinstance(value, (str, os.PathLike)) and str(value).endswith(".h5ad") and os.path.isfile(value):
            found = {Path(value).name: _h5ad_source(str(value))}
            break
    corpus = data.get(_CORPUS_KEY)
    if found is None and isinstance(corpus, (str, os.PathLike)) and os.path.isdir(corpus):
        found = _corpus_sources(Path(corpus))
    if found:
        unknown = "not recorded in the data (uns['source']): name the dataset and its licence before publishing"
        data["source and licence"] = "; ".join(f"{name}: {text or unknown}" for name, text in found.items())
    return data


def render_model_card(
    config,
    *,
    tokenizer=None,
    repo_id: str | None = None,
    family: str | None = None,
    base_model: str | None = None,
    task: str | None = None,
    label_names: list[str] | None = None,
    datasets: list[str] | None = None,
    training_data: dict | str | None = None,
    hyperparameters: dict | None = None,
    eval_results: list | None = None,
    license: str = "apache-2.0",
    pipeline_tag: str | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    **template_kwargs,
):
    """Render the model card of a checkpoint; returns a ``huggingface_hub.ModelCard`` (``.save(path)``, ``str()``).

    Args:
        config: the model config (a ``PretrainedConfig`` or its dict, i.e. ``config.json``).
        tokenizer: the ``GeneTokenizer`` (or its ``tokenizer_config.json`` dict): encoding, species, max_length,
            vocabulary checksum go into the preprocessing section.
        repo_id: the Hub id, used in the usage snippet and as the model-index name.
        family: ``mouse_genemamba`` | ``scmamba2`` | ``cellfm``; default from ``config["model_type"]``.
        base_model, task: set for fine-tuned models (``task`` = ``annotate`` | ``integrate`` | ``perturb``); a
            fine-tuned model uses the ``finetuned.md`` template. ``label_names`` lists the classes.
        datasets: Hub dataset ids for the metadata. ``training_data``: a dict (e.g. ``{"corpus": ..., "cells":
            ..., "species": ...}``) or text describing the data, shown in the body.
        hyperparameters: shown as a table (learning rate, steps, batch size, ...).
        eval_results: measured results, dicts ``{"metric": "accuracy", "value": 0.93, "dataset": "baron_human",
            "split": "test"}`` (optional ``task``, ``dataset_name``) or ``huggingface_hub.EvalResult``.
        license, pipeline_tag, tags, model_name: metadata overrides (see the module docstring for defaults).
        template_kwargs: extra variables for a custom template.
    """
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    cfg = _as_dict(config)
    family = family or cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown model family {family!r} (config model_type {cfg.get('model_type')!r}). hf-scfm model cards "
            f"cover {sorted(FAMILIES)}; pass family= explicitly if the config is from one of them."
        )
    fam = FAMILIES[family]
    finetuned = bool(base_model or (task and task != "pretrain"))
    task = task or ("annotate" if finetuned else "pretrain")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASKS)}.")
    settings = _tokenizer_settings(tokenizer, cfg)
    settings["encoding"] = settings["encoding"] or fam["encoding"]
    species = settings["species"] or fam["species"]
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{fam['name']} ({task})")

    all_tags = ["single-cell", "scRNA-seq", "biology", "hf-scfm", fam["tag"], species, f"{settings['encoding']}-encoding"]
    if finetuned:
        all_tags.append(task)
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    results = _eval_results(eval_results, task, model_name)
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=all_tags,
        pipeline_tag=pipeline_tag or TASKS[task]["pipeline_tag"],
        datasets=list(datasets) if datasets else None,
        base_model=base_model if _looks_like_hub_id(base_model) else None,
        model_name=model_name if results else None,
        eval_results=results or None,
        metrics=sorted({r.metric_type for r in results}) or None,
    )
    if isinstance(training_data, str):
        training_data = {"description": training_data}
    training_data = training_data_with_sources(training_data or {})
    architectures = cfg.get("architectures") or [fam["pretraining_class"]]
    context = {
        "card_data": card_data.to_yaml(),
        "family": fam,
        "model_type": family,
        "repo_id": _snippet_repo_id(repo_id, family, task, finetuned),
        "remote_code": bool(cfg.get("auto_map")),
        "model_name": model_name,
        "architecture": architectures[0],
        "config": cfg,
        "architecture_fields": {
            key: cfg[key]
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "expand", "head_dim", "state_size", "n_groups", "conv_kernel", "chunk_size",
                        "value_embedding_size", "max_input_length", "n_bins", "use_expression", "num_labels")
            if key in cfg
        },
        "preprocessing": {**settings, "species": species,
                          "encoding_description": ENCODING_DESCRIPTIONS.get(settings["encoding"], "")},
        "training_data": training_data or {},
        "hyperparameters": hyperparameters or {},
        "eval_results": results,
        "task": task,
        "task_name": TASKS[task]["task_name"],
        "base_model": base_model,
        "label_names": _label_names(label_names, cfg, finetuned),
        "license": license,
        **template_kwargs,
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_template_dir())),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    template = env.get_template("finetuned.md" if finetuned else fam["template"])
    return ModelCard(template.render(**context))


def write_card_metadata(folder: str | os.PathLike, **card_kwargs) -> Path:
    """Save the card's inputs (``training_data``, ``hyperparameters``, ``eval_results``, ``datasets``,
    ``base_model``, ``task``, ``label_names``, ``license`` ...) as JSON beside a checkpoint, so that
    ``hf-scfm push`` renders the same card later (:func:`card_from_folder`)."""
    path = Path(folder) / CARD_METADATA_FILE
    path.write_text(json.dumps(card_kwargs, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


def card_from_folder(folder: str | os.PathLike, *, repo_id: str | None = None, summary: dict | None = None, **overrides):
    """Render the card of a saved checkpoint from its ``config.json``, ``tokenizer_config.json`` and, when
    present, the :data:`CARD_METADATA_FILE` written by :func:`write_card_metadata`; ``overrides`` win."""
    folder = Path(folder)
    config = (summary or {}).get("config") if (summary or {}).get("kind") == "model" else None
    if config is None:
        config_path = folder / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{folder} has no config.json; a model card needs the model config.")
        config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_path = folder / "tokenizer_config.json"
    tokenizer = json.loads(tok_path.read_text(encoding="utf-8")) if tok_path.exists() else None
    if tokenizer is not None and tokenizer.get("tokenizer_class") == "GeneTokenizer":
        # The vocabulary checksum and size live in the vocabulary itself (tokenizer.json), not in the config:
        # load the tokenizer to report them exactly as the model will see them.
        from ..tokenization import GeneTokenizer

        tokenizer = GeneTokenizer.from_pretrained(str(folder))
    meta_path = folder / CARD_METADATA_FILE
    kwargs = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    kwargs.update(overrides)
    return render_model_card(config, tokenizer=tokenizer, repo_id=repo_id, **kwargs)
