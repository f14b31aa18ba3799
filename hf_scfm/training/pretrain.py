"""Pretraining with Accelerate: ``hf-scfm pretrain`` / ``accelerate launch -m hf_scfm.training.pretrain``.

One readable loop, in this order: load the tokenized corpus as a *streaming* dataset, hold out a deterministic
fraction of cells for evaluation, give each rank its own part (:func:`hf_scfm.data.split_by_node`: its own
shards when their number divides evenly), shuffle through a seeded buffer, collate with the family's objective
collator (:mod:`hf_scfm.training.families`), and train with AdamW + linear warmup / cosine decay
(``transformers.get_cosine_schedule_with_warmup``), gradient accumulation, gradient clipping and Accelerate's
mixed precision (bf16 on GPU, none on CPU). Distribution (DDP, FSDP, DeepSpeed) is Accelerate's, chosen by
``accelerate config``/``accelerate launch``; nothing here is specific to one of them.

Choices, and why:

* **The data loader is not ``accelerator.prepare``-d.** Accelerate would make rank 0 read every batch and
  dispatch it for an iterable dataset; here each rank reads only its own shards. Batches are moved to the device
  by hand.
* **Exact resume.** Every ``--save-steps`` steps the run writes ``checkpoint-N/`` with
  :func:`hf_scfm.training.checkpoint.save_training_state`: optimizer and scheduler state, RNG states of every rank
  and, per rank, its position in the data stream (epoch and batches consumed in it), as safetensors + JSON -- no
  pickle, so ``--resume`` never unpickles a file (under FSDP/DeepSpeed that module falls back to Accelerate's
  pickled ``save_state`` with a warning; see its docstring). ``--resume`` restores all of it, re-creates
  the same stream (same seed, same epoch, so the same shuffle) and skips the batches already consumed -- before
  collating them, so the skip costs reading only. Collator masks depend only on seed and cell content, so the
  resumed run sees exactly the batches the uninterrupted run would have: the final weights are equal (tested).
  A checkpoint is written to a hidden ``.checkpoint-N.partial`` folder and renamed when complete, so a run
  killed mid-save never leaves a checkpoint that looks whole; ``hf_scfm_training_state.json`` (written last)
  records the family, preset, objective and step, and ``--resume`` refuses a checkpoint of another family.
* **Checkpoints are loadable models.** ``save_pretrained`` of model and tokenizer goes into the same folder, so
  ``from_pretrained("out/checkpoint-N")`` works and the Hub pusher can validate and upload it; the resume reads
  the weights from that same ``model.safetensors``. The optimizer/scheduler/RNG files (``optimizer.*``,
  ``scheduler.json``, ``rng_state_rank*``) stay local: the Hub push leaves them out.
* **Eval split by cell id.** A cell is held out when a CRC32 of its ``cell_id`` falls below
  ``--eval-fraction``: stable across runs, ranks, shard layouts and streaming, with no index to store.
* **Outputs.** ``out/metrics.jsonl`` (one JSON object per logging step and evaluation), TensorBoard event files
  when ``tensorboard`` is installed, a tqdm bar on the main process, and at the end ``save_pretrained`` of the
  pretraining model + tokenizer, the rendered model card (``README.md``), ``loss_curve.png`` and the flattened
  modeling code for ``trust_remote_code`` loading (:mod:`hf_scfm.training.remote_code`).
* **Hub.** ``--push-to-hub --hub-model-id ORG/NAME`` queues each checkpoint on a background uploader
  (:class:`hf_scfm.training.hub.CheckpointPusher`, ``--hub-strategy every_save|end``) so training never waits,
  and pushes the final folder (its top-level files: no checkpoints) at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATE_FILE = "hf_scfm_training_state.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed (missing, partial, or from another run configuration)."""


# ---------------------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------------------


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .families import FAMILIES

    parser.add_argument("--model", required=True, choices=sorted(FAMILIES), help="model family")
    parser.add_argument("--preset", default="tiny", help="config preset of the family (e.g. tiny)")
    parser.add_argument("--objective", default=None, help="pretraining objective (default: the family's own)")
    parser.add_argument("--corpus", required=True, metavar="PATH_OR_REPO", help="corpus built by build_corpus")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="cells per device per micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                        help="auto: bf16 on a GPU that supports it, no on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000, help="streaming shuffle buffer, in cells")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="cells held out (by cell_id hash)")
    parser.add_argument("--eval-steps", type=int, default=200, help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--eval-batches", type=int, default=50, help="max batches per evaluation")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from the latest checkpoint in --out, or from the given checkpoint folder")
    parser.add_argument("--push-to-hub", action="store_true", help="push checkpoints and the final model")
    parser.add_argument("--hub-model-id", default=None, metavar="ORG/NAME")
    parser.add_argument("--hub-strategy", default="every_save", choices=["every_save", "end"])
    parser.add_argument("--hub-private", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # Test hooks: stop cleanly after N steps (as if killed right after), or hang there until killed for real.
    parser.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hang-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def build_pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-scfm pretrain", description=__doc__.split("\n\n")[0])
    return add_pretrain_arguments(parser)


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``pretrain`` to an ``argparse`` subparsers object (handler: :func:`pretrain_command`)."""
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a model family on a tokenized corpus (Accelerate)",
        description="Pretrain a model on a corpus built by build_corpus. Runs on one device as is, and on "
        "several GPUs or nodes with `accelerate launch -m hf_scfm.training.pretrain ...`.",
    )
    add_pretrain_arguments(parser)
    parser.set_defaults(func=pretrain_command)
    return parser


def _check_args(args) -> None:
    problems = []
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0.0 <= args.eval_fraction < 1.0:
        problems.append(f"--eval-fraction must be in [0, 1) (got {args.eval_fraction})")
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push-to-hub needs --hub-model-id ORG/NAME")
    if problems:
        raise ValueError("; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def is_eval_cell(cell_id: str, fraction: float) -> bool:
    """Deterministic held-out membership of a cell: CRC32 of its id, compared with ``fraction``."""
    return (zlib.crc32(str(cell_id).encode("utf-8")) & 0xFFFFFFFF) < fraction * 2**32


def _load_tokenizer(corpus: str, cache_dir: str | None = None):
    from ..tokenization import GeneTokenizer

    local = Path(corpus) / "tokenizer"
    if local.is_dir():
        return GeneTokenizer.from_pretrained(str(local))
    if Path(corpus).exists():
        raise FileNotFoundError(
            f"{corpus} has no tokenizer/ folder: it is not a corpus written by hf_scfm.data.build_corpus. "
            "Build one with build_corpus(inputs, tokenizer, out_dir)."
        )
    from huggingface_hub import snapshot_download

    folder = snapshot_download(corpus, repo_type="dataset", allow_patterns=["tokenizer/*"], cache_dir=cache_dir)
    return GeneTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))


def build_streams(args, tokenizer, rank: int, world_size: int):
    """(train, eval or None) streaming datasets for this rank, rows ``{input_ids, values}``."""
    from ..data import load_corpus, split_by_node

    ds = load_corpus(args.corpus, streaming=True, tokenizer=tokenizer, columns=["input_ids", "values", "cell_id"])
    fraction = args.eval_fraction
    train = ds.filter(lambda cid: not is_eval_cell(cid, fraction), input_columns=["cell_id"])
    held = ds.filter(lambda cid: is_eval_cell(cid, fraction), input_columns=["cell_id"]) if fraction > 0 else None
    if world_size > 1:
        train = split_by_node(train, rank, world_size)
        held = split_by_node(held, rank, world_size) if held is not None else None
    train = train.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    train = train.remove_columns(["cell_id"])
    held = held.remove_columns(["cell_id"]) if held is not None else None
    return train, held


def _loader(dataset, batch_size: int):
    """Uncollated batches (lists of records): collation happens only for batches actually used (see resume)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, collate_fn=list, num_workers=0)


class BatchStream:
    """Endless micro-batches of this rank's training stream, epoch after epoch, with a resumable position.

    Each epoch also goes to the collator (``collator.set_epoch``), so a masking objective draws new masks every
    epoch (dynamic masking, as RoBERTa and scGPT do): with the same masks every epoch, a corpus of a few thousand
    cells is seen with one fixed set of targets, which a model can memorise within a few hundred steps. Masks
    still depend only on (seed, epoch, cell), so a resumed run sees the same batches.
    """

    def __init__(self, dataset, batch_size: int, collator, epoch: int = 0, consumed: int = 0):
        self.dataset, self.batch_size, self.collator = dataset, batch_size, collator
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.epoch)
            if hasattr(self.collator, "set_epoch"):  # dynamic masking: fresh masks every epoch (RoBERTa's)
                self.collator.set_epoch(self.epoch)
            skip, produced = self.consumed, 0
            for index, records in enumerate(_loader(self.dataset, self.batch_size)):
                produced += 1
                if index < skip:  # already consumed before the resume: skipped before collation
                    continue
                self.consumed = index + 1
                yield self.collator(records)
            if produced == 0:
                raise ValueError(
                    "The training stream of this process is empty: the corpus has too few cells for this many "
                    "processes and this --eval-fraction. Use a larger corpus or fewer processes."
                )
            self.epoch, self.consumed = self.epoch + 1, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_batches": self.consumed}


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    if out.is_dir():
        for child in out.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """The run description of a complete checkpoint; :class:`ResumeError` if it is partial or corrupt."""
    path = checkpoint / STATE_FILE
    if not checkpoint.is_dir():
        raise ResumeError(f"{checkpoint} is not a folder: pass a checkpoint-N folder written by hf-scfm pretrain.")
    if not path.is_file():
        raise ResumeError(
            f"{checkpoint} has no {STATE_FILE}: the checkpoint is partial (the run stopped while saving it) or was "
            "not written by hf-scfm pretrain. Resume from an earlier checkpoint-N, or start again without --resume."
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResumeError(f"{path} is not valid JSON ({err}): the checkpoint is corrupt.") from err
    from .hub import CheckpointError, validate_checkpoint

    try:
        validate_checkpoint(checkpoint, require_tokenizer=True)
    except CheckpointError as err:
        raise ResumeError(f"Cannot resume from {checkpoint}: {err}") from err
    return state


def find_resume_checkpoint(args) -> Path | None:
    if args.resume is None:
        return None
    out = Path(args.out)
    if args.resume != "latest":
        return Path(args.resume)
    found = _checkpoints(out)
    if not found:
        raise ResumeError(f"--resume: {out} holds no checkpoint-N folder. Start without --resume.")
    return found[-1][1]


def _check_resume_compatible(state: dict, args, checkpoint: Path) -> None:
    mismatches = [
        f"--{key.replace('_', '-')} {getattr(args, key)!r} (checkpoint: {state.get(key)!r})"
        for key in ("model", "preset", "objective", "batch_size", "gradient_accumulation_steps", "seed")
        if state.get(key) != getattr(args, key)
    ]
    if mismatches:
        raise ResumeError(
            f"{checkpoint} was written by a run with other settings: {'; '.join(mismatches)}. Resume with the "
            "settings of that run (an exact resume replays its data order), or start a new run in another --out."
        )
    if state.get("world_size") != args.world_size:
        raise ResumeError(
            f"{checkpoint} was written with {state.get('world_size')} processes, this run has {args.world_size}: "
            "each rank's data position cannot be carried over. Launch with the same number of processes."
        )


# ---------------------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------------------


class MetricsLogger:
    """Append-only JSONL (``metrics.jsonl``) plus TensorBoard when installed; main process only."""

    def __init__(self, out: Path, enabled: bool, resumed_step: int | None):
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if resumed_step is not None and self.path.exists():  # drop lines written after the checkpoint
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "runs"))
        except ImportError:
            self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> Path | None:
    """Training (and evaluation) loss against step, from ``metrics.jsonl``; matplotlib is imported here."""
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib).", png_path.name)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------


def _mixed_precision(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def evaluate_loss(model, held, collator, args, accelerator) -> float | None:
    """Mean held-out loss (batches weighted equally) over at most ``--eval-batches`` batches, across ranks."""
    import torch

    if held is None:
        return None
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for index, records in enumerate(_loader(held, args.batch_size)):
            if index >= args.eval_batches:
                break
            out = model(**_to_device(collator(records), accelerator.device))
            total += torch.tensor([float(out.loss), 1.0], device=accelerator.device, dtype=torch.float64)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else None


def _save_model_files(accelerator, model, tokenizer, folder: Path, family) -> None:
    """``save_pretrained`` of model + tokenizer + remote code. Call on every process: the full state dict is
    gathered collectively (needed under FSDP/DeepSpeed ZeRO-3), then only the main process writes."""
    from .remote_code import export_remote_code

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        export_remote_code(folder, family)


def save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, family, args, step: int,
                    stream: BatchStream) -> Path:
    """``checkpoint-<step>/``: training state (safetensors + JSON, per-rank data position in ``extra``) +
    save_pretrained, renamed when whole."""
    from .checkpoint import save_training_state

    out = Path(args.out)
    final = out / f"checkpoint-{step}"
    partial = out / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_training_state(partial, accelerator, model, optimizer, scheduler, extra={**stream.state(), "step": step},
                        save_model=False)  # model.safetensors: written by save_pretrained just below
    _save_model_files(accelerator, model, tokenizer, partial, family)
    if accelerator.is_main_process:
        state = {key: getattr(args, key) for key in
                 ("model", "preset", "objective", "batch_size", "gradient_accumulation_steps", "seed", "max_steps",
                  "world_size", "corpus")}
        state["step"] = step
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def _top_level_copy(folder: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder with hard links to ``folder``'s files (not its checkpoint-N subfolders), for the push."""
    tmp = tempfile.TemporaryDirectory(prefix="hf-scfm-final-")
    target = Path(tmp.name) / folder.name
    target.mkdir()
    for item in folder.iterdir():
        if item.is_file() and item.name != METRICS_FILE:
            try:
                os.link(item, target / item.name)
            except OSError:
                shutil.copy2(item, target / item.name)
    return tmp


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Run pretraining as described by parsed ``args`` (see :func:`build_pretrain_parser`); return a summary
    (``final_step``, ``final_loss``, ``eval_loss``, ``out``, ``loss_curve``, ``wall_time_s``)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ..modeling.configuration_utils import check_tokenizer_matches
    from .families import get_family

    started = time.time()
    _check_args(args)
    family = get_family(args.model)
    family.objective(args.objective)  # an unknown objective fails here, naming the known ones
    args.objective = args.objective or family.default_objective
    out = Path(args.out)

    accelerator = Accelerator(
        mixed_precision=_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    args.world_size = accelerator.num_processes
    resume_from = find_resume_checkpoint(args)
    resume_state = None
    if resume_from is not None:
        resume_state = read_training_state(resume_from)
        _check_resume_compatible(resume_state, args, resume_from)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    tokenizer = _load_tokenizer(args.corpus)
    if tokenizer.encoding != family.encoding:
        raise ValueError(
            f"The corpus {args.corpus} was tokenized with the {tokenizer.encoding!r} encoding, but {family.name} "
            f"reads the {family.encoding!r} encoding. Build the corpus with "
            f"GeneTokenizer.from_species(..., encoding={family.encoding!r}) or pick the matching --model."
        )

    set_seed(args.seed)
    config = family.config_cls.from_preset(
        args.preset, vocab_size=len(tokenizer), vocab_checksum=tokenizer.vocab_checksum,
    )
    model = family.pretraining_cls(args.objective)(config)
    check_tokenizer_matches(model.config, tokenizer)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(0.05 * args.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=args.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: a prepared scheduler steps once per process per step. Saved by save_checkpoint.

    collator = family.make_collator(tokenizer, objective=args.objective, seed=args.seed)
    train_ds, held_ds = build_streams(args, tokenizer, accelerator.process_index, accelerator.num_processes)
    stream = BatchStream(train_ds, args.batch_size, collator)
    step = 0
    if resume_from is not None:
        from .checkpoint import TrainingStateError, load_training_state

        try:
            position = load_training_state(resume_from, accelerator, model, optimizer, scheduler)
        except TrainingStateError as err:
            raise ResumeError(f"Cannot resume from {resume_from}: {err}") from err
        stream.epoch, stream.consumed = position["epoch"], position["consumed_batches"]
        step = int(resume_state["step"])
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, stream.epoch, stream.consumed)

    metrics = MetricsLogger(out, accelerator.is_main_process, step if resume_from is not None else None)
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        from .hub import CheckpointPusher

        pusher = CheckpointPusher(args.hub_model_id, hub_strategy=args.hub_strategy, private=args.hub_private)

    bar = tqdm(total=args.max_steps, initial=step, disable=args.no_progress or not accelerator.is_local_main_process,
               desc=f"pretrain {family.name}", dynamic_ncols=True)
    batches = iter(stream)
    window: list[float] = []
    last_loss = eval_loss = None
    while step < args.max_steps:
        micro_losses = []
        for _ in range(args.gradient_accumulation_steps):
            batch = _to_device(next(batches), accelerator.device)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                micro_losses.append(loss.detach().float())
                if accelerator.sync_gradients:
                    grad_norm = None
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:  # cannot happen: one optimizer step per accumulation group
            raise RuntimeError("gradient accumulation fell out of step with the optimizer")
        step += 1
        step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        window.append(step_loss)
        last_loss = step_loss
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if step % args.logging_steps == 0 or step == args.max_steps:
            record = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                      "epoch": stream.epoch}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.log(record)
            window = []
        if (args.eval_steps and step % args.eval_steps == 0) or step == args.max_steps:
            eval_loss = evaluate_loss(model, held_ds, collator, args, accelerator)
            if eval_loss is not None:
                metrics.log({"step": step, "eval_loss": eval_loss})
        if step % args.save_steps == 0 and step < args.max_steps:
            folder = save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, family, args, step,
                                     stream)
            if pusher is not None:
                pusher.on_save(folder, step)
        if args.hang_after_steps is not None and step >= args.hang_after_steps:
            (out / f"hanging-at-step-{step}").touch()
            while True:  # wait for SIGKILL (tests of resuming after a real kill)
                time.sleep(1)
        if args.stop_after_steps is not None and step >= args.stop_after_steps:
            bar.close()
            metrics.close()
            if pusher is not None:
                pusher.wait()
            return {"final_step": step, "final_loss": last_loss, "stopped": True, "out": str(out)}
    bar.close()

    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"final_step": step, "final_loss": last_loss, "eval_loss": eval_loss, "out": str(out)}
    _save_model_files(accelerator, model, tokenizer, out, family)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        metrics.close()
        png = plot_loss_curve(out / METRICS_FILE, out / LOSS_CURVE, f"{family.name} ({args.preset}) pretraining")
        summary["loss_curve"] = str(png) if png else None
        summary["wall_time_s"] = round(time.time() - started, 1)
        _write_card(out, unwrapped.config, tokenizer, family, args, summary)
        if pusher is not None:
            staged = _top_level_copy(out)
            try:
                pusher.finish(Path(staged.name) / out.name)
            finally:
                staged.cleanup()
    accelerator.end_training()
    return summary


def _write_card(out: Path, config, tokenizer, family, args, summary: dict) -> None:
    from .model_card import render_model_card, write_card_metadata

    corpus = str(args.corpus)
    is_hub = not Path(corpus).exists() and corpus.count("/") == 1
    results = []
    if summary.get("eval_loss") is not None:
        results.append({"metric": "loss", "metric_name": "held-out pretraining loss", "value": summary["eval_loss"],
                        "dataset": corpus if is_hub else Path(corpus).name, "split": "held-out", "task": "pretrain"})
    kwargs = {
        "family": family.name,
        "task": "pretrain",
        "datasets": [corpus] if is_hub else None,
        "training_data": {"corpus": corpus, "held_out_fraction": args.eval_fraction,
                          "objective": family.objective(args.objective).description},
        "hyperparameters": {
            "preset": args.preset, "objective": args.objective, "max_steps": args.max_steps,
            "batch_size_per_device": args.batch_size, "processes": args.world_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay, "schedule": "linear warmup + cosine decay", "optimizer": "AdamW",
            "max_grad_norm": args.max_grad_norm, "seed": args.seed, "final_train_loss": summary.get("final_loss"),
        },
        "eval_results": results or None,
    }
    render_model_card(config, tokenizer=tokenizer, repo_id=args.hub_model_id, **kwargs).save(out / "README.md")
    write_card_metadata(out, **kwargs)


def pretrain_command(args: argparse.Namespace) -> int:
    """Handler of ``hf-scfm pretrain``: clear one-line errors for bad inputs, 0 on success."""
    try:
        summary = pretrain(args)
    except (ResumeError, ValueError, FileNotFoundError) as err:
        print(f"hf-scfm pretrain: error: {err}", file=sys.stderr)
        return 2
    if summary.get("loss_curve"):
        print(f"Done: step {summary['final_step']}, loss {summary['final_loss']:.4f}; model in {summary['out']}, "
              f"loss curve {summary['loss_curve']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_scfm.training.pretrain`` / ``accelerate launch -m hf_scfm.training.pretrain``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_pretrain_parser().parse_args(argv)
    return pretrain_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
