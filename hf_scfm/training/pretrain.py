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
  unpickles a file (under FSDP/DeepSpeed that module falls back to Accelerate's pickled ``save_state`` with a
  warning; see its docstring). ``--resume`` restores all of it, re-creates the same stream (same seed, same epoch,
  so the same shuffle) and skips the batches already consumed, before collating them. Collator masks depend only
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
from .pretrain_data import BatchStream, build_streams, corpus_tokenizer, record_batches
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
                                                           "help": "auto: bf16 on a GPU that supports it, no on CPU"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the shuffle and the masks"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "streaming shuffle buffer, in cells"})
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
    stop_after_steps: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})
    hang_after_steps: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})

    def __post_init__(self):
        problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})"
                    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps")
                    if getattr(self, name) < 1]
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

    from ..modeling.configuration_utils import check_tokenizer_matches
    from .families import get_family

    started = time.time()
    family = get_family(args.model)
    family.objective(args.objective)  # an unknown objective fails here, naming the known ones
    args = dataclasses.replace(args, objective=args.objective or family.default_objective)
    out = Path(args.out)

    # -- the run, and where it resumes from
    accelerator = Accelerator(mixed_precision=_mixed_precision(args.mixed_precision),
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    run = {key: getattr(args, key) for key in RUN_STATE_KEYS if key != "world_size"}
    run["world_size"] = accelerator.num_processes
    resume_from = find_resume_checkpoint(args.resume, out)
    resume_state = None
    if resume_from is not None:
        resume_state = read_run_state(resume_from)
        check_resume_compatible(resume_state, run, resume_from)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    # -- tokenizer, model, optimizer, schedule
    tokenizer = corpus_tokenizer(args.corpus)
    if tokenizer.encoding != family.encoding:
        raise ValueError(
            f"The corpus {args.corpus} was tokenized with the {tokenizer.encoding!r} encoding, but {family.name} "
            f"reads the {family.encoding!r} encoding. Build the corpus with "
            f"GeneTokenizer.from_species(..., encoding={family.encoding!r}) or pick the matching --model."
        )
    set_seed(args.seed)
    config = family.config_cls.from_preset(args.preset, vocab_size=len(tokenizer),
                                           vocab_checksum=tokenizer.vocab_checksum)
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

    # -- data: this rank's train stream and held-out cells, collated by the objective's collator
    collator = family.make_collator(tokenizer, objective=args.objective, seed=args.seed)
    train_ds, held_ds = build_streams(args.corpus, tokenizer, eval_fraction=args.eval_fraction, seed=args.seed,
                                      shuffle_buffer=args.shuffle_buffer, rank=accelerator.process_index,
                                      world_size=accelerator.num_processes)
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

    # -- the loop
    bar = tqdm(total=args.max_steps, initial=step, disable=not args.progress or not accelerator.is_local_main_process,
               desc=f"pretrain {family.name}", dynamic_ncols=True)
    batches = iter(stream)
    window: list[float] = []
    last_loss = eval_loss = grad_norm = None
    while step < args.max_steps:
        micro_losses = []
        for _ in range(args.gradient_accumulation_steps):
            batch = _to_device(next(batches), accelerator.device)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                micro_losses.append(loss.detach().float())
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:  # cannot happen: one optimizer step per accumulation group
            raise RuntimeError("gradient accumulation fell out of step with the optimizer")
        step += 1
        last_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        window.append(last_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")

        if step % args.logging_steps == 0 or step == args.max_steps:
            record = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                      "epoch": stream.epoch}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.log(record)
            window = []
        if (args.eval_steps and step % args.eval_steps == 0) or step == args.max_steps:
            eval_loss = evaluate_loss(model, held_ds, collator, args.batch_size, args.eval_batches, accelerator)
            if eval_loss is not None:
                metrics.log({"step": step, "eval_loss": eval_loss})
        if step % args.save_steps == 0 and step < args.max_steps:
            folder = save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, family, run, out, step,
                                     stream.state())
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

    # -- the final model, its card and loss curve, the push
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"final_step": step, "final_loss": last_loss, "eval_loss": eval_loss, "out": str(out)}
    _save_model_files(accelerator, model, tokenizer, out, family)
    if accelerator.is_main_process:
        metrics.close()
        png = plot_loss_curve(out / METRICS_FILE, out / LOSS_CURVE, f"{family.name} ({args.preset}) pretraining")
        summary["loss_curve"] = str(png) if png else None
        summary["wall_time_s"] = round(time.time() - started, 1)
        _write_card(out, accelerator.unwrap_model(model).config, tokenizer, family, args, run["world_size"], summary)
        if pusher is not None:
            staged = _top_level_copy(out)
            try:
                pusher.finish(Path(staged.name) / out.name)
            finally:
                staged.cleanup()
        print(f"Done: step {step}, loss {last_loss:.4f}; model in {out}"
              + (f", loss curve {summary['loss_curve']}" if summary["loss_curve"] else ""))
    accelerator.end_training()
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the pieces the loop calls
# ---------------------------------------------------------------------------------------------------------------


def _mixed_precision(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def evaluate_loss(model, held, collator, batch_size: int, max_batches: int, accelerator) -> float | None:
    """Mean held-out loss (batches weighted equally) over at most ``max_batches`` batches, across ranks."""
    import torch

    if held is None:
        return None
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for index, records in enumerate(record_batches(held, batch_size)):
            if index >= max_batches:
                break
            out = model(**_to_device(collator(records), accelerator.device))
            total += torch.tensor([float(out.loss), 1.0], device=accelerator.device, dtype=torch.float64)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else None


def _save_model_files(accelerator, model, tokenizer, folder: Path, family) -> None:
    """``save_pretrained`` of model + tokenizer (which write the remote code too). Call on every process: the full
    state dict is gathered collectively (needed under FSDP/DeepSpeed ZeRO-3), then only the main process writes."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)


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


def _write_card(out: Path, config, tokenizer, family, args: PretrainArguments, world_size: int, summary: dict) -> None:
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
            "batch_size_per_device": args.batch_size, "processes": world_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay, "schedule": "linear warmup + cosine decay", "optimizer": "AdamW",
            "max_grad_norm": args.max_grad_norm, "seed": args.seed, "final_train_loss": summary.get("final_loss"),
        },
        "eval_results": results or None,
    }
    render_model_card(config, tokenizer=tokenizer, repo_id=args.hub_model_id, **kwargs).save(out / "README.md")
    write_card_metadata(out, **kwargs)
