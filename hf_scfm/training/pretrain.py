"""Pretraining with Accelerate: ``pretrain(PretrainArguments(...))``, ``hf-scfm pretrain``, or on several GPUs or
nodes ``accelerate launch -m hf_scfm.cli pretrain ...``.

:func:`pretrain` is one loop you can read top to bottom: the corpus's tokenizer and the family's model, AdamW with
linear warmup and cosine decay (``transformers.get_cosine_schedule_with_warmup``), this rank's streams
(:mod:`.pretrain_data`: a held-out fraction of cells by cell id, its own shards, a seeded shuffle buffer) collated
with the family's objective collator (:mod:`.families`), then steps with gradient accumulation, clipping and
Accelerate's mixed precision (bf16 on GPU, none on CPU), logging (:mod:`.run_log`), evaluation and checkpoints.
Distribution (DDP, FSDP, DeepSpeed) is Accelerate's, chosen by ``accelerate config``/``accelerate launch``.

Choices, and why:

* **The data loader is not ``accelerator.prepare``-d.** Accelerate would make rank 0 read every batch and
  dispatch it for an iterable dataset; here each rank reads only its own shards. Batches are moved to the device
  by hand.
* **Exact resume.** Every ``save_steps`` steps the run writes ``checkpoint-N/`` with
  :func:`hf_scfm.training.checkpoint.save_training_state`: optimizer and scheduler state, RNG states of every rank
  and, per rank, its position in the data stream, as safetensors + JSON -- no pickle, so ``--resume`` never
  unpickles a file (FSDP included: the full optimizer state is gathered by name; under DeepSpeed/Megatron-LM that
  module falls back to Accelerate's pickled ``save_state`` with a warning; see its docstring). ``--resume``
  restores all of it, re-creates the same streams (same seed, same epoch, so the same shuffle) and skips the cells
  already consumed, before collating them. Collator masks depend only
  on seed and cell content, so the resumed run sees exactly the batches the uninterrupted run would have: the
  final weights are equal (tested). A checkpoint is written to a hidden ``.checkpoint-N.partial`` folder and
  renamed when complete; its ``hf_scfm_training_state.json`` (written last) records the family, preset, objective
  and step, and ``--resume`` refuses a checkpoint of another run configuration.
* **Checkpoints are loadable models.** ``save_pretrained`` of model and tokenizer goes into the same folder, so
  ``from_pretrained("out/checkpoint-N")`` works and the Hub pusher can validate and upload it. The optimizer,
  scheduler and RNG files stay local: the Hub push leaves them out.
* **Outputs.** ``out/metrics.jsonl``, TensorBoard event files when ``tensorboard`` is installed, a tqdm bar on the
  main process, and at the end ``save_pretrained`` of the pretraining model + tokenizer, the rendered model card
  (``README.md``), ``loss_curve.png`` and the modeling code for ``trust_remote_code`` loading.
* **Hub.** ``push_to_hub`` with ``hub_model_id`` queues each checkpoint on a background uploader
  (:class:`hf_scfm.training.hub.CheckpointPusher`, ``hub_strategy`` ``every_save`` | ``end``) so training never
  waits, and pushes the final folder (its top-level files: no checkpoints) at the end.

The recipe knobs (learning rate, warmup, weight decay, schedule, mask fractions of the collators) are the
:class:`PretrainArguments` defaults and the collators' ``default_fraction``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import (
    RUN_STATE_KEYS,
    STATE_FILE,
    ResumeError,
    check_resume_compatible,
    find_resume_checkpoint,
    read_run_state,
)
from .families import FAMILIES
from .hub import write_weights_manifest
from .pretrain_data import (EVAL_MASK_EPOCH, CorpusParts, StepStream, collate_step, corpus_tokenizer,
                            held_out_batches)
from .run_log import LOSS_CURVE, METRICS_FILE, MetricsLogger, plot_loss_curve

__all__ = ["PretrainArguments", "pretrain", "ResumeError", "evaluate_loss", "save_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class PretrainArguments:
    """What ``hf-scfm pretrain`` takes (``--max-steps`` or ``--max_steps`` for ``max_steps``, and so on)."""

    model: str = field(metadata={"help": "model family", "choices": sorted(FAMILIES)})
    corpus: str = field(metadata={"help": "corpus built by build_corpus (a folder or a Hub dataset repo id)"})
    out: str = field(metadata={"help": "output folder"})
    preset: str = field(default="tiny", metadata={"help": "config preset of the family (e.g. tiny)"})
    objective: str | None = field(default=None, metadata={"help": "pretraining objective (default: the family's)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "cells per device per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps (default: 5%% of "
                                                                     "max_steps), then cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    mixed_precision: str = field(default="auto", metadata={"choices": ["auto", "no", "bf16", "fp16"],
                                                           "help": "auto: accelerate launch's --mixed_precision if given, else bf16 on a "
                                                                   "GPU that supports it, no on CPU"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the shuffle and the masks"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "streaming shuffle buffer, in cells (split "
                                                                   "over the data parts)"})
    data_parts: int | None = field(default=None, metadata={
        "metavar": "N", "help": "read the corpus as N interleaved parts of whole shards, each step taking cells from "
                                "every part; a process reads only its parts, so N >= processes (default: the largest "
                                "divisor of the global batch up to min(shards, 8); fixed for a run, whatever the number "
                                "of processes)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "cells held out (by cell_id hash)"})
    eval_steps: int = field(default=200, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_batches: int = field(default=50, metadata={"help": "max batches per evaluation"})
    logging_steps: int = field(default=10, metadata={"help": "log the mean loss every N steps"})
    save_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps"})
    resume: str | None = field(default=None, metadata={
        "nargs": "?", "const": "latest", "metavar": "CHECKPOINT",
        "help": "resume from the latest checkpoint in --out (--resume), or from the given checkpoint folder"})
    push_to_hub: bool = field(default=False, metadata={"help": "push checkpoints and the final model"})
    hub_model_id: str | None = field(default=None, metadata={"metavar": "ORG/NAME", "help": "Hub repo to push to"})
    hub_strategy: str = field(default="every_save", metadata={"choices": ["every_save", "end"],
                                                              "help": "push every checkpoint, or only the end"})
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repo private"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm bar (--no-progress: none)"})
    # Test hooks: stop cleanly after N steps (as if killed right after), or hang there until killed for real.
    # hang_in_step: the last process stops inside step N (after a forward pass), the others block in the
    # gradient all-reduce: a kill mid-step.
    stop_after_steps: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})
    hang_after_steps: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})
    hang_in_step: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})

    def __post_init__(self):
        problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})"
                    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps")
                    if getattr(self, name) < 1]
        if self.data_parts is not None and self.data_parts < 1:
            problems.append(f"--data-parts must be >= 1 (got {self.data_parts})")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.model not in FAMILIES:
            problems.append(f"--model {self.model!r} is not a model family ({', '.join(sorted(FAMILIES))})")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("--push-to-hub needs --hub-model-id ORG/NAME")
        if problems:
            raise ValueError("; ".join(problems) + ".")


def pretrain(args: PretrainArguments) -> dict[str, Any]:
    """Pretrain as ``args`` says; returns ``final_step``, ``final_loss``, ``eval_loss``, ``out``, ``loss_curve``,
    ``wall_time_s`` (or ``stopped`` with the ``stop_after_steps`` test hook)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ..data.partition import cells_per_part, check_parts, rank_parts
    from ..modeling.configuration_utils import check_tokenizer_matches
    from .distributed import accelerator_kwargs, needs_own_fsdp, shard_model
    from .families import get_family

    started = time.time()
    family = get_family(args.model)
    objective = family.objective(args.objective)  # an unknown objective fails here, naming the known ones
    args = dataclasses.replace(args, objective=args.objective or family.default_objective)
    out = Path(args.out)

    # -- the run: its processes, its global batch and data parts, and where it resumes from
    accelerator = Accelerator(mixed_precision=_mixed_precision(args.mixed_precision),
                              gradient_accumulation_steps=args.gradient_accumulation_steps, **accelerator_kwargs())
    world, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    global_batch = args.batch_size * world * accumulation
    resume_from = find_resume_checkpoint(args.resume, out)
    resume_state = read_run_state(resume_from) if resume_from is not None else None
    tokenizer = corpus_tokenizer(args.corpus)
    if resume_from is not None:
        saved = json.loads((resume_from / "config.json").read_text(encoding="utf-8"))
        if (saved.get("vocab_checksum") not in (None, tokenizer.vocab_checksum)
                or saved.get("vocab_size") != len(tokenizer)):
            raise ResumeError(
                f"{resume_from} was trained on a vocabulary of {saved.get('vocab_size')} tokens (checksum "
                f"{str(saved.get('vocab_checksum'))[:12]}...), but the corpus {args.corpus} was tokenized with another "
                f"one ({len(tokenizer)} tokens, checksum {tokenizer.vocab_checksum[:12]}...). Resume with the corpus "
                "of that run, or start a new run in another --out."
            )
    if tokenizer.encoding != family.encoding:
        raise ValueError(
            f"The corpus {args.corpus} was tokenized with the {tokenizer.encoding!r} encoding, but {family.name} "
            f"reads the {family.encoding!r} encoding. Build the corpus with "
            f"GeneTokenizer.from_species(..., encoding={family.encoding!r}) or pick the matching --model."
        )
    parts = CorpusParts(args.corpus, tokenizer, global_batch=global_batch, eval_fraction=args.eval_fraction,
                        num_parts=args.data_parts or (resume_state or {}).get("data_parts"), seed=args.seed,
                        shuffle_buffer=args.shuffle_buffer)
    run = {key: getattr(args, key) for key in RUN_STATE_KEYS if hasattr(args, key)}
    run.update(world_size=world, global_batch_size=global_batch, data_parts=parts.num_parts)
    if resume_state is not None:
        check_resume_compatible(resume_state, run, resume_from)
    check_parts(parts.num_parts, world, global_batch, accumulation, parts.part_cells)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    # -- model (sharded first under FSDP on CPU), optimizer, schedule
    set_seed(args.seed)
    config = family.config_cls.from_preset(args.preset, vocab_size=len(tokenizer),
                                           vocab_checksum=tokenizer.vocab_checksum)
    model = family.pretraining_cls(args.objective)(config)
    check_tokenizer_matches(model.config, tokenizer)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    own_fsdp = needs_own_fsdp(accelerator)
    if own_fsdp:
        model = shard_model(model)
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
    if own_fsdp:  # Accelerate would wrap the sharded model in DDP: only the optimizer is prepared
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: a prepared scheduler steps once per process per step. Saved by save_checkpoint.

    # -- data: this process's parts of every step, collated by the objective's collator
    collator = family.make_collator(tokenizer, objective=args.objective, seed=args.seed)
    my_parts = rank_parts(parts.num_parts, accelerator.process_index, world)
    positions, step = None, 0
    if resume_from is not None:
        from .checkpoint import TrainingStateError, load_training_state, read_rank_extras

        try:
            load_training_state(resume_from, accelerator, model, optimizer, scheduler)
            positions = _part_positions(read_rank_extras(resume_from), parts.num_parts, resume_from)
        except TrainingStateError as err:
            raise ResumeError(f"Cannot resume from {resume_from}: {err}") from err
        step = int(resume_state["step"])
        logger.info("Resumed from %s at step %d", resume_from, step)
    stream = StepStream(parts, my_parts, cells_per_part(global_batch, parts.num_parts), positions)
    eval_cells = math.ceil(args.eval_batches * args.batch_size * world / parts.num_parts)

    metrics = MetricsLogger(out, accelerator.is_main_process, step if resume_from is not None else None)
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        from .hub import CheckpointPusher

        pusher = CheckpointPusher(args.hub_model_id, hub_strategy=args.hub_strategy, private=args.hub_private)

    # -- the loop: a step's loss is the mean over all its label positions, on whichever process they are
    bar = tqdm(total=args.max_steps, initial=step, disable=not args.progress or not accelerator.is_local_main_process,
               desc=f"pretrain {family.name}", dynamic_ncols=True)
    window: list[float] = []
    last_loss = eval_loss = grad_norm = None
    micro: list[dict] = []
    while step < args.max_steps:
        micro = [_to_device(batch, accelerator.device)
                 for batch in collate_step(collator, stream.next_step(), step, accumulation)]
        items = torch.stack([objective.loss_items(batch) for batch in micro]).to(torch.float64)
        total = accelerator.reduce(items.sum(), reduction="sum")
        if total <= 0:
            raise ValueError(f"Step {step + 1} has no label positions on any process: the collator masked nothing.")
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for index, (batch, n) in enumerate(zip(micro, items)):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(**batch).loss
                if args.hang_in_step is not None and step + 1 == args.hang_in_step and index == 0 \
                        and accelerator.process_index == world - 1:
                    _hang(out / f"hanging-in-step-{step + 1}-rank-{accelerator.process_index}")
                # DDP/FSDP average gradients over processes and Accelerate divides by the accumulation steps:
                # weighting by n * world * accumulation / total makes the gradient that of the step's mean loss.
                accelerator.backward(loss * (n * world * accumulation / total).to(loss.dtype))
                step_loss += loss.detach().double() * n
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:  # cannot happen: one optimizer step per accumulation group
            raise RuntimeError("gradient accumulation fell out of step with the optimizer")
        step += 1
        last_loss = (accelerator.reduce(step_loss, reduction="sum") / total).item()
        window.append(last_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")

        if step % args.logging_steps == 0 or step == args.max_steps:
            record = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                      "epoch": stream.epoch}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            metrics.log(record)
            window = []
        if (args.eval_steps and step % args.eval_steps == 0) or step == args.max_steps:
            eval_loss = evaluate_loss(model, parts, my_parts, collator, objective, args.batch_size, eval_cells,
                                      accelerator, filler=micro[0])
            if eval_loss is not None:
                metrics.log({"step": step, "eval_loss": eval_loss})
        if step % args.save_steps == 0 and step < args.max_steps:
            folder = save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, family, run, out, step,
                                     {"parts": stream.state()})
            if pusher is not None:
                pusher.on_save(folder, step)

        if args.hang_after_steps is not None and step >= args.hang_after_steps:
            _hang(out / f"hanging-at-step-{step}")
        if args.stop_after_steps is not None and step >= args.stop_after_steps:
            bar.close()
            metrics.close()
            if pusher is not None:
                pusher.wait()
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return {"final_step": step, "final_loss": last_loss, "stopped": True, "out": str(out)}
    bar.close()

    # -- the final model, its card and loss curve, the push
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"final_step": step, "final_loss": last_loss, "eval_loss": eval_loss, "out": str(out)}
    _save_model_files(accelerator, model, tokenizer, out, family)
    if accelerator.is_main_process:
        metrics.close()
        png = plot_loss_curve(out / METRICS_FILE, out / LOSS_CURVE, f"{family.name} ({args.preset}) pretraining")
        summary["loss_curve"] = str(png) if png else None
        summary["wall_time_s"] = round(time.time() - started, 1)
        _write_card(out, accelerator.unwrap_model(model).config, tokenizer, family, args, run, summary)
        if pusher is not None:
            staged = _top_level_copy(out)
            try:
                pusher.finish(Path(staged.name) / out.name)
            finally:
                staged.cleanup()
        print(f"Done: step {step}, loss {last_loss:.4f}; model in {out}"
              + (f", loss curve {summary['loss_curve']}" if summary["loss_curve"] else ""))
    accelerator.wait_for_everyone()  # every process returns with the output folder complete
    accelerator.end_training()
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the pieces the loop calls
# ---------------------------------------------------------------------------------------------------------------


def _mixed_precision(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):  # accelerate launch --mixed_precision / accelerate config
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _hang(marker: Path) -> None:
    """Test hook: write ``marker`` (holding this process's id) and wait to be killed."""
    marker.write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(1)


def _part_positions(extras: list[dict], num_parts: int, checkpoint: Path) -> dict[int, dict]:
    """Every data part's position, from the ``extra`` dicts of all processes that wrote ``checkpoint``."""
    positions = {}
    for extra in extras:
        positions.update({int(p): where for p, where in (extra.get("parts") or {}).items()})
    missing = [p for p in range(num_parts) if p not in positions]
    if missing:
        raise ResumeError(
            f"{checkpoint} holds no stream position for data part(s) {missing} of {num_parts}: it was written by an "
            "older hf-scfm or with other --data-parts. Resume it with the version and settings that wrote it."
        )
    return positions


def evaluate_loss(model, parts, part_ids, collator, objective, batch_size: int, max_cells_per_part: int,
                  accelerator, filler: dict | None = None) -> float | None:
    """Held-out loss: the mean over the label positions of the first ``max_cells_per_part`` held-out cells of
    every data part (this process's parts here, summed over processes), so the same for any number of processes.

    Under FSDP every forward pass is collective, so processes with fewer batches run ``filler`` (a batch of
    theirs), weighted 0, until all have run the same number."""
    import torch

    from .distributed import is_fsdp_model

    if parts.eval_fraction <= 0:
        return None
    fsdp = is_fsdp_model(model)
    net = model if fsdp else accelerator.unwrap_model(model)  # no collectives in a plain forward
    if hasattr(collator, "set_epoch"):
        collator.set_epoch(EVAL_MASK_EPOCH)  # the same held-out masks at every evaluation
    batches = held_out_batches(parts, part_ids, batch_size, max_cells_per_part)
    rounds = None
    if fsdp:
        batches = [_to_device(collator(records), accelerator.device) for records in batches]
        rounds = int(accelerator.reduce(torch.tensor(len(batches), device=accelerator.device), reduction="max"))
        batches = batches + [None] * (rounds - len(batches))
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        for batch in batches:
            weight = 1.0
            if batch is None:
                batch, weight = filler, 0.0
            elif not fsdp:
                batch = _to_device(collator(batch), accelerator.device)
            with accelerator.autocast():
                loss = net(**batch).loss
            n = objective.loss_items(batch).double() * weight
            total += torch.stack([loss.double() * n, n])
    net.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else None


def _save_model_files(accelerator, model, tokenizer, folder: Path, family) -> None:
    """``save_pretrained`` of model + tokenizer (which write the remote code too). Call on every process: the full
    state dict is gathered collectively (needed under FSDP/DeepSpeed ZeRO-3), then only the main process writes."""
    from .distributed import full_model_state_dict, own_class

    state_dict = full_model_state_dict(accelerator, model)
    if accelerator.is_main_process:
        with own_class(accelerator.unwrap_model(model)) as unwrapped:  # not torch's FSDP<Class> under FSDP2
            unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_weights_manifest(folder)  # sha256 of the weights, verified whenever the checkpoint is loaded


def save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, family, run: dict, out: Path, step: int,
                    position: dict) -> Path:
    """``out/checkpoint-<step>/``: training state (safetensors + JSON, this rank's data ``position`` in ``extra``),
    save_pretrained, and the ``run`` description (:data:`~hf_scfm.training.checkpoint.RUN_STATE_KEYS`), renamed
    into place when whole."""
    from .checkpoint import save_training_state

    final = out / f"checkpoint-{step}"
    partial = out / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_training_state(partial, accelerator, model, optimizer, scheduler, extra={**position, "step": step},
                        save_model=False)  # model.safetensors: written by save_pretrained just below
    _save_model_files(accelerator, model, tokenizer, partial, family)
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**run, "step": step}, indent=2, sort_keys=True) + "\n")
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


def _write_card(out: Path, config, tokenizer, family, args: PretrainArguments, run: dict, summary: dict) -> None:
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
            "batch_size_per_device": args.batch_size, "processes": run["world_size"],
            "global_batch_size": run["global_batch_size"], "data_parts": run["data_parts"],
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay, "schedule": "linear warmup + cosine decay", "optimizer": "AdamW",
            "max_grad_norm": args.max_grad_norm, "seed": args.seed, "final_train_loss": summary.get("final_loss"),
        },
        "eval_results": results or None,
    }
    render_model_card(config, tokenizer=tokenizer, repo_id=args.hub_model_id, **kwargs).save(out / "README.md")
    write_card_metadata(out, **kwargs)
