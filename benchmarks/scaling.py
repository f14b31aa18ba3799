"""Scaling benchmark: memory and time of our three linear-cost families against a BERT (Geneformer-style) baseline.

For every (model, mode, length) point this script starts a **fresh Python process** (``scaling.py --point ...``), so
each peak is that point's own. The models:

* ``mouse-genemamba``: ``MouseGeneMambaForCausalLM`` (next-gene prediction over a rank sentence);
* ``scmamba2``: ``ScMamba2ForMaskedExpression`` (masked-bin regression, BiMamba-2);
* ``cellfm``: ``CellFMForMaskedRegression`` (masked-value regression, linear retention);
* ``bert-eager`` / ``bert-sdpa``: transformers' ``BertForMaskedLM`` with ``attn_implementation="eager"`` / ``"sdpa"``,
  Geneformer's shape scaled to the same width and depth (4 heads, feed-forward ``2 * d``, ReLU) and the same
  vocabulary, ``max_position_embeddings`` = the point's length.

Every model gets the same width ``--d-model`` (default 64), depth ``--layers`` (default 2) and vocabulary
``--vocab-size`` (default 4,096 rows, specials included: a reduced vocabulary, identical for all five; it only sizes
the embedding tables and the two gene-logit heads, Mouse-GeneMamba's LM head and BERT's MLM head, which pay the same
``L x V`` logits). The families keep their ``tiny`` presets' inner settings; their ``max_input_length`` is
informational (no position table) but is raised to the length anyway. No dropout anywhere: our backbones have none,
so BERT's is set to 0 too (like for like).

Modes, one cell (``--batch``, default 1) of ``length`` tokens (specials included), all tokens real
(``attention_mask`` of ones passed as a tokenizer would):

* ``train``: one training step, forward + backward of the pretraining loss (15 % / 20 % of positions masked for the
  MLM / regression objectives, next-gene loss on every position). No optimizer step (its state is
  length-independent).
* ``infer``: one no-grad forward of the backbone (``model.backbone`` / ``.scmamba2`` / ``.cellfm`` / ``.bert``): what
  embedding a cell costs.
* ``embed``: like ``infer`` at ``--throughput-batches`` batch sizes, reported as cells/s (throughput).

What is measured, in the child process:

* **warm-up**: one step of the same mode at 256 tokens before measuring, so that one-time costs (lazy imports,
  first-call kernel selection, allocator growth) are not counted;
* **baseline**: the resident set (``/proc/self/statm``) after model construction and the warm-up;
* **peak**: ``getrusage(RUSAGE_SELF).ru_maxrss`` after the step; the CSV keeps both ``peak_rss_mib`` and
  ``baseline_rss_mib``; ``delta_mib = peak - baseline`` (activations, autograd graph, gradients and workspace:
  what grows with the length) is what the tables compare. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
  freed tensors go back to the system and the peak tracks live tensors rather than heap fragmentation;
* **time**: wall (``perf_counter``) and CPU (``process_time``) seconds of the step; when a step is cheap (< 3 s) it is
  repeated (``--repeats``) and the fastest kept. With one thread (``--threads 1``, the default) the CPU time is the
  wall time an idle core would take, and on a shared machine it is the steadier figure (the wall clock also counts
  waiting for a core), so ratios, the time panel and throughput (cells per CPU-second) use it on CPU; both are in
  the CSV. On a GPU they use wall time;
* on CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus the allocated memory after warm-up.

The parent polls each child's resident set from ``/proc/<pid>/statm`` every 20 ms and kills it past
``--memory-limit-gb`` (recorded as ``OOM (> limit)``); a child whose allocation fails outright reports OOM itself.
Past ``--time-limit-s`` a child is killed and recorded as ``timeout``.

Outputs (``--out``, default ``benchmarks/results/scaling``): ``scaling.csv``, ``scaling.png`` (memory and time vs
length, log-log, one colour per model, training solid and inference dashed) and ``scaling.md``, the Markdown printed
at the end: per mode and length, ours : baseline ratios against ``bert-eager`` and ``bert-sdpa``, the linearity check
``delta(16384) / delta(2048)`` of each of our models (8 = linear) and the throughput table.

    .venv/bin/python benchmarks/scaling.py                      # the full run: 50 processes, 32 min on 2 cores shared
                                                                # at load average ~7 (each child spends ~10 CPU-s
                                                                # importing torch + transformers)
    .venv/bin/python benchmarks/scaling.py --quick              # 2048 and 4096 only
    .venv/bin/python benchmarks/scaling.py --from-csv benchmarks/results/scaling/scaling.csv   # redo table + plot
    .venv/bin/python benchmarks/scaling.py --point scmamba2 infer 60530 1 --profile   # one point, torch.profiler

Two quick side-by-side modes run in ONE process (no memory figures; every model and length is timed in turn, round
after round, so a shared machine's load hits all of them alike; min / median over ``--rounds``):

* ``--throughput`` (~3 min here): no-grad embedding throughput of Mouse-GeneMamba, SC-MAMBA2, CellFM and BERT sdpa at
  2,048 and 16,384 tokens (``--throughput-lengths``), batch sizes ``--throughput-batches`` (at 16,384 only the
  first), as cells/s (wall) and cells per CPU-second, with each family : BERT sdpa;
* ``--per-token`` (~5 min here): one training step (forward + backward) of every family at 2,048, 8,192 and 32,768
  tokens (``--per-token-lengths``), as microseconds per token and the growth from the shortest to the longest length
  (linear time = 1.0x; target <= 1.3x), for CPU time (user + system) and user time alone: the system part is the
  kernel's page faults on large fresh buffers (e.g. the ``[L, vocab]`` logits of a gene-prediction head), which
  grows faster than the length on this machine.

    .venv/bin/python benchmarks/scaling.py --throughput --rounds 3
    .venv/bin/python benchmarks/scaling.py --per-token --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

OURS = ("mouse-genemamba", "scmamba2", "cellfm")
BASELINES = ("bert-eager", "bert-sdpa")
MODELS = OURS + BASELINES
MODES = ("train", "infer", "embed")
LABELS = {
    "mouse-genemamba": "Mouse-GeneMamba",
    "scmamba2": "SC-MAMBA2",
    "cellfm": "CellFM",
    "bert-eager": "BERT eager",
    "bert-sdpa": "BERT sdpa",
}
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384)
WHOLE_TRANSCRIPTOME = 60530
WARMUP_LENGTH = 256
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scaling"
CSV_FIELDS = (
    "model", "mode", "length", "batch", "status", "delta_mib", "peak_rss_mib", "baseline_rss_mib",
    "polled_rss_mib", "cuda_delta_mib", "wall_s", "cpu_s", "cells_per_s", "threads", "device", "d_model",
    "layers", "vocab_size", "note", "error",
)


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers (also usable from other benchmarks)
# ----------------------------------------------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set of a process (``/proc/<pid>/statm``), in bytes."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def default_memory_limit_gb() -> float:
    """Half of the machine's RAM (this machine: 23 GiB -> 11.5 GiB), so a point that runs away leaves room for the
    other processes of a shared machine."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8.0
    return round(total / 2**30 / 2, 1)


# ----------------------------------------------------------------------------------------------------------------
# Child: build one model, run one point
# ----------------------------------------------------------------------------------------------------------------


def build_model(name: str, length: int, d_model: int, layers: int, vocab_size: int):
    """The pretraining model of ``name`` at the benchmark's shared width / depth / vocabulary."""
    if name == "mouse-genemamba":
        from hf_scfm.modeling.mouse_genemamba import MouseGeneMambaConfig, MouseGeneMambaForCausalLM

        cfg = MouseGeneMambaConfig.from_preset(
            "tiny", hidden_size=d_model, num_hidden_layers=layers, vocab_size=vocab_size, max_input_length=length
        )
        return MouseGeneMambaForCausalLM(cfg)
    if name == "scmamba2":
        from hf_scfm.modeling.scmamba2 import ScMamba2Config, ScMamba2ForMaskedExpression

        cfg = ScMamba2Config.from_preset(
            "tiny", hidden_size=d_model, num_hidden_layers=layers, vocab_size=vocab_size, max_input_length=length
        )
        return ScMamba2ForMaskedExpression(cfg)
    if name == "cellfm":
        from hf_scfm.modeling.cellfm import CellFMConfig, CellFMForMaskedRegression

        cfg = CellFMConfig.from_preset(
            "tiny", hidden_size=d_model, num_hidden_layers=layers, vocab_size=vocab_size, max_input_length=length
        )
        return CellFMForMaskedRegression(cfg)
    if name in BASELINES:
        from transformers import BertConfig, BertForMaskedLM

        from hf_scfm.tokenization.special_tokens import PAD_TOKEN_ID

        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=layers,
            num_attention_heads=4,  # Geneformer: 4 heads; the L x L score memory scales with the head count
            intermediate_size=2 * d_model,  # Geneformer: 512 = 2 x 256
            hidden_act="relu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=max(length, WARMUP_LENGTH),
            type_vocab_size=1,
            pad_token_id=PAD_TOKEN_ID,
        )
        model = BertForMaskedLM._from_config(cfg, attn_implementation=name.split("-", 1)[1])
        if model.config._attn_implementation != name.split("-", 1)[1]:
            raise RuntimeError(f"asked for {name}, transformers chose {model.config._attn_implementation!r}")
        return model
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def backbone_of(name: str, model):
    """The embedding backbone (no head) used for inference."""
    attr = {"mouse-genemamba": "backbone", "scmamba2": "scmamba2", "cellfm": "cellfm"}.get(name, "bert")
    return getattr(model, attr)


def make_batch(name: str, batch: int, length: int, vocab_size: int, train: bool, seed: int = 0) -> dict:
    """Synthetic tokenizer-like inputs of one family (ids, values, attention mask of ones, and training labels)."""
    import torch

    from hf_scfm.tokenization.special_tokens import (
        BOS_TOKEN_ID, CLS_TOKEN_ID, EOS_TOKEN_ID, IGNORE_INDEX, MASK_TOKEN_ID, MASK_VALUE,
    )

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab_size, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "mouse-genemamba":  # rank sentence: <bos> genes <eos>, log1p values
        ids[:, 0], ids[:, -1] = BOS_TOKEN_ID, EOS_TOKEN_ID
        values = torch.rand(batch, length, generator=g) * 4
        values[:, 0] = values[:, -1] = 0.0
        out["values"] = values
        if train:
            out["labels"] = ids.clone()
        return out
    ids[:, 0] = CLS_TOKEN_ID
    if name in BASELINES:
        if train:
            masked = torch.rand(batch, length, generator=g) < 0.15
            masked[:, 0] = False
            out["labels"] = torch.where(masked, ids, IGNORE_INDEX)
            out["input_ids"] = torch.where(masked, MASK_TOKEN_ID, ids)
        return out
    if name == "scmamba2":  # bins 0..50, ~10 % expressed
        expressed = torch.rand(batch, length, generator=g) < 0.1
        values = torch.where(expressed, torch.randint(1, 51, (batch, length), generator=g), 0).float()
        ratio = 0.15
    else:  # cellfm: log1p values
        values = torch.rand(batch, length, generator=g) * 4
        ratio = 0.2
    values[:, 0] = 0.0
    out["values"] = values
    if train:
        masked = torch.rand(batch, length, generator=g) < ratio
        masked[:, 0] = False
        out["labels"] = torch.where(masked, values, float(IGNORE_INDEX))
        out["values"] = torch.where(masked, MASK_VALUE, values)
    return out


def _run_step(name: str, model, batch: dict, mode: str):
    import torch

    if mode == "train":
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()
    with torch.no_grad():
        return backbone_of(name, model)(**batch)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _measure_step(name, model, inputs, mode, device, repeats, profile_rows=0) -> dict:
    """Peak memory (over the current resident set) and best-of-``repeats`` time of one step on ``inputs``."""
    import gc

    import torch

    cuda = device.startswith("cuda")
    gc.collect()
    baseline = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    profiler = None
    if profile_rows:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        profiler = profile(activities=activities, profile_memory=True, record_shapes=True)
        profiler.__enter__()
    walls, cpus = [], []
    for i in range(max(repeats, 1)):
        start, cpu0 = time.perf_counter(), time.process_time()
        _run_step(name, model, inputs, mode)
        _sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu0)
        if i == 0:
            peak = peak_rss_bytes()
            cuda_peak = torch.cuda.max_memory_allocated() - cuda_base if cuda else None
        if walls[-1] > 3.0 or profiler is not None:
            break
    if profiler is not None:
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        sort = "self_cuda_memory_usage" if cuda else "self_cpu_memory_usage"
        print(averages.table(sort_by=sort, row_limit=profile_rows), file=sys.stderr)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=profile_rows), file=sys.stderr)
    mib = 2**20
    return {
        # max(.., 0): the kernel's per-thread RSS counters lag by up to 64 pages, so a step that adds next to
        # nothing can read a peak a fraction of a MiB under the baseline
        "delta_mib": round(max(peak - baseline, 0) / mib, 1), "peak_rss_mib": round(peak / mib, 1),
        "baseline_rss_mib": round(baseline / mib, 1),
        "cuda_delta_mib": None if cuda_peak is None else round(cuda_peak / mib, 1),
        "wall_s": round(min(walls), 4), "cpu_s": round(min(cpus), 4),
    }


def run_point(args) -> dict:
    """Child process body: build the model, warm up at 256 tokens, measure one step. Returns the result row.

    ``embed`` points take a comma-separated list of batch sizes (``--point cellfm embed 2048 1,8,32``): each is
    warmed up and timed in turn in this one process (the figure of merit is cells/s, not the peak), and the row
    keeps the best, with every batch size's cells/s in ``note``."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, mode, length = args.point[0], args.point[1], int(args.point[2])
    batches = [int(b) for b in str(args.point[3]).split(",")]
    if name not in MODELS or mode not in MODES:
        raise SystemExit(f"--point wants MODEL MODE LENGTH BATCH with MODEL in {MODELS} and MODE in {MODES}")
    if mode != "embed" and len(batches) != 1:
        raise SystemExit("only embed points take several batch sizes")
    device = args.device
    model = build_model(name, length, args.d_model, args.layers, args.vocab_size).to(device)
    model.train(mode == "train")
    step_mode = "train" if mode == "train" else "infer"
    train = mode == "train"

    def inputs_of(batch_size, n, seed):
        return {k: v.to(device) for k, v in make_batch(name, batch_size, n, args.vocab_size, train, seed).items()}

    results = []
    for batch_size in batches:
        _run_step(name, model, inputs_of(batch_size, WARMUP_LENGTH, 1), step_mode)  # warm-up, not measured
        _sync(device)
        res = _measure_step(name, model, inputs_of(batch_size, length, 0), step_mode, device, args.repeats,
                            args.profile_rows if args.profile else 0)
        # throughput per CPU-second on CPU (one thread: what an idle core delivers; a shared machine's wall clock
        # also counts waiting for a core), per wall-clock second on a GPU
        seconds = res["wall_s"] if device.startswith("cuda") else res["cpu_s"]
        results.append({**res, "batch": batch_size, "cells_per_s": round(batch_size / seconds, 3)})
    best = max(results, key=lambda r: r["cells_per_s"])
    note = "; ".join(f"b={r['batch']}: {r['cells_per_s']:.1f} cells/s" for r in results) if len(results) > 1 else ""
    return {
        "model": name, "mode": mode, "length": length, "status": "ok", **best, "note": note,
        "threads": args.threads, "device": device, "d_model": args.d_model, "layers": args.layers,
        "vocab_size": args.vocab_size,
    }


# ----------------------------------------------------------------------------------------------------------------
# Side by side in one process: inference throughput and training time per token
# ----------------------------------------------------------------------------------------------------------------

THROUGHPUT_MODELS = ("mouse-genemamba", "scmamba2", "cellfm", "bert-sdpa")


def _time_once(name, model, inputs, mode) -> tuple[float, float, float]:
    """Wall, CPU (user + system) and user-only seconds of one step. System time is mostly the kernel zeroing the
    fresh pages of large new buffers (page faults), which is why it is kept apart."""
    start, cpu0, user0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    _run_step(name, model, inputs, mode)
    user = resource.getrusage(resource.RUSAGE_SELF).ru_utime - user0
    return time.perf_counter() - start, time.process_time() - cpu0, user


def side_by_side(models, cases, mode: str, *, rounds: int = 3, d_model: int = 64, layers: int = 2,
                 vocab_size: int = 4096, progress: bool = True) -> list[dict]:
    """Time ``mode`` ("infer" or "train") of every model at every ``(length, batch)`` of ``cases`` in this process,
    round after round (A B A B: one warm-up step each first). Returns one row per (model, length, batch) with the
    ``rounds`` wall and CPU times, their min / median, and cells per second of each."""
    import statistics

    import torch

    built = {}
    for length in sorted({length for length, _ in cases}):
        for name in models:
            torch.manual_seed(0)
            model = build_model(name, length, d_model, layers, vocab_size)
            built[name, length] = model.train(mode == "train")
    samples: dict[tuple, list[tuple[float, float]]] = {}
    inputs = {}
    for name in models:
        for length, batch in cases:
            inputs[name, length, batch] = make_batch(name, batch, length, vocab_size, mode == "train")
            _run_step(name, built[name, length], make_batch(name, batch, min(length, WARMUP_LENGTH), vocab_size,
                                                            mode == "train", seed=1), mode)  # warm-up
    total = rounds * len(models) * len(cases)
    done = 0
    for r in range(rounds):
        for length, batch in cases:
            for name in models:
                samples.setdefault((name, length, batch), []).append(
                    _time_once(name, built[name, length], inputs[name, length, batch], mode))
                done += 1
                if progress:
                    wall, cpu, user = samples[name, length, batch][-1]
                    print(f"[{done}/{total}] round {r + 1} {name:16} L={length:<6} b={batch:<3} wall {wall:.3f} s "
                          f"CPU {cpu:.3f} s (user {user:.3f} s)", file=sys.stderr, flush=True)
    rows = []
    for (name, length, batch), times in samples.items():
        walls, cpus, users = [t[0] for t in times], [t[1] for t in times], [t[2] for t in times]
        rows.append({
            "model": name, "mode": mode, "length": length, "batch": batch, "rounds": len(times),
            "wall_min": min(walls), "wall_median": statistics.median(walls),
            "cpu_min": min(cpus), "cpu_median": statistics.median(cpus),
            "user_min": min(users), "user_median": statistics.median(users),
            "cells_per_wall_s": batch / min(walls), "cells_per_cpu_s": batch / min(cpus),
            "cells_per_cpu_s_median": batch / statistics.median(cpus),
        })
    return rows


def throughput_report(rows: list[dict], baseline: str = "bert-sdpa") -> str:
    """Markdown: per length, each model's best batch size by cells per CPU-second (min-time / median-time figures),
    cells/s wall, and model : baseline (same statistic)."""
    lines = ["| genes | model | batch | cells per CPU-s (min / median) | cells/s wall | : BERT sdpa (min / median) |",
             "|---:|---|---:|---:|---:|---:|"]
    for length in sorted({r["length"] for r in rows}):
        best = {}
        for r in rows:
            if r["length"] == length and (r["model"] not in best or r["cells_per_cpu_s"] > best[r["model"]]["cells_per_cpu_s"]):
                best[r["model"]] = r
        base = best.get(baseline)
        for name in [m for m in MODELS if m in best]:
            r = best[name]
            rel = (f"{r['cells_per_cpu_s'] / base['cells_per_cpu_s']:.2f}x / "
                   f"{r['cells_per_cpu_s_median'] / base['cells_per_cpu_s_median']:.2f}x") if base and name != baseline else ""
            lines.append(f"| {length:,} | {LABELS[name]} | {r['batch']} | {r['cells_per_cpu_s']:.2f} / "
                         f"{r['cells_per_cpu_s_median']:.2f} | {r['cells_per_wall_s']:.2f} | {rel} |")
    return "\n".join(lines) + "\n"


def per_token_report(rows: list[dict]) -> str:
    """Markdown: training-step time per token (µs, min / median) at each length and longest : shortest, twice per
    model: CPU (user + system) and user only (the computation; system time is the kernel's page faults)."""
    lengths = sorted({r["length"] for r in rows})
    head = " | ".join(f"{n:,}" for n in lengths)
    lines = [f"| model | time | {head} | {lengths[-1]:,} : {lengths[0]:,} (min / median) |",
             "|---|---|" + "---:|" * (len(lengths) + 1)]
    by = {(r["model"], r["length"]): r for r in rows}
    for name in [m for m in MODELS if any(r["model"] == m for r in rows)]:
        for key, label in (("cpu", "CPU"), ("user", "user")):
            if not all(f"{key}_min" in r for r in rows if r["model"] == name):
                continue
            cells, per = [], {}
            for n in lengths:
                r = by.get((name, n))
                if r is None:
                    cells.append("-")
                    continue
                per[n] = (r[f"{key}_min"] / (n * r["batch"]) * 1e6, r[f"{key}_median"] / (n * r["batch"]) * 1e6)
                cells.append(f"{per[n][0]:.1f} / {per[n][1]:.1f}")
            growth = (f"{per[lengths[-1]][0] / per[lengths[0]][0]:.2f}x / "
                      f"{per[lengths[-1]][1] / per[lengths[0]][1]:.2f}x" if lengths[0] in per and lengths[-1] in per
                      else "-")
            lines.append(f"| {LABELS[name]} | {label} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return "load " + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "load unknown"


def run_side_by_side(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    if args.throughput:
        lengths = args.throughput_lengths
        cases = [(lengths[0], b) for b in args.throughput_batches] + [(n, args.throughput_batches[0]) for n in lengths[1:]]
        models, mode, title = args.models if args.models != list(MODELS) else list(THROUGHPUT_MODELS), "infer", (
            "Inference throughput (no-grad backbone forward, all tokens real)")
    else:
        cases = [(n, args.batch) for n in args.per_token_lengths]
        models, mode, title = args.models if args.models != list(MODELS) else list(OURS), "train", (
            "Training step (forward + backward) time per token, µs, CPU (user + system) and user only")
    before = _load()
    rows = side_by_side(models, cases, mode, rounds=args.rounds, d_model=args.d_model, layers=args.layers,
                        vocab_size=args.vocab_size)
    report = throughput_report(rows) if args.throughput else per_token_report(rows)
    header = (f"**{title}**: d={args.d_model}, {args.layers} layers, vocab {args.vocab_size}, {args.threads} "
              f"thread(s), {args.rounds} rounds side by side; {before} before, {_load()} after\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput" if args.throughput else "per_token"
    (out / f"{stem}.md").write_text(header + report)
    with open(out / f"{stem}.json", "w") as f:
        json.dump(rows, f, indent=1)
    print(header + report)
    print(f"# wrote {out / (stem + '.md')}, {out / (stem + '.json')}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per point, with a memory and a time limit
# ----------------------------------------------------------------------------------------------------------------


def _is_oom_message(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("can't allocate memory", "out of memory", "cannot allocate memory",
                                   "memoryerror", "outofmemoryerror"))


def measure_point(
    model: str, mode: str, length: int, batch: int | str, *, memory_limit_gb: float, time_limit_s: float,
    d_model: int = 64, layers: int = 2, vocab_size: int = 4096, threads: int = 1, device: str = "cpu",
    repeats: int = 3, poll_s: float = 0.02,
) -> dict:
    """Run one point in a fresh process (this script with ``--point``); kill it past the memory or time limit.

    ``batch``: cells per step, or for ``embed`` a comma-separated list of batch sizes to try. Returns the child's
    row, or a row with ``status`` = ``"OOM (> X GiB)"`` / ``"timeout (> X s)"`` / ``"error"``.
    """
    cmd = [
        sys.executable, os.path.abspath(__file__), "--point", model, mode, str(length), str(batch),
        "--d-model", str(d_model), "--layers", str(layers), "--vocab-size", str(vocab_size),
        "--threads", str(threads), "--device", device, "--repeats", str(repeats),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    limit = memory_limit_gb * 2**30
    row = {"model": model, "mode": mode, "length": length, "batch": batch, "threads": threads, "device": device,
           "d_model": d_model, "layers": layers, "vocab_size": vocab_size}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    polled, killed = 0, None
    # drain the pipes in threads so a chatty child never blocks on a full pipe while we poll
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=s, k=k: chunks[k].append(s.read()), daemon=True)
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        try:
            rss = rss_bytes(proc.pid)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            rss = 0
        polled = max(polled, rss)
        if rss > limit:
            killed = f"OOM (> {memory_limit_gb:g} GiB)"
        elif time.monotonic() - start > time_limit_s:
            killed = f"timeout (> {time_limit_s:g} s)"
        if killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(poll_s)
    for r in readers:
        r.join(timeout=10)
    out, err = "".join(chunks["out"]), "".join(chunks["err"])
    row["polled_rss_mib"] = round(polled / 2**20, 1)
    if killed:
        return {**row, "status": killed}
    if proc.returncode != 0:
        if _is_oom_message(err) or proc.returncode in (-signal.SIGKILL, 137):  # allocator refused / kernel OOM killer
            return {**row, "status": f"OOM (> {memory_limit_gb:g} GiB)" if _is_oom_message(err) else "OOM (killed)",
                    "error": err.strip().splitlines()[-1][:200] if err.strip() else ""}
        return {**row, "status": "error", "error": (err.strip().splitlines() or [""])[-1][:300]}
    result = json.loads(out.strip().splitlines()[-1])
    return {**row, **result, "polled_rss_mib": row["polled_rss_mib"]}


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def read_csv(path: str | Path) -> list[dict]:
    """Rows back from :func:`write_csv` with numbers as numbers (empty cells -> ``None``)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                elif k in ("length", "batch", "threads", "d_model", "layers", "vocab_size"):
                    row[k] = int(v)
                elif k.endswith(("_mib", "_s")):
                    row[k] = float(v)
                else:
                    row[k] = v
            rows.append(row)
    return rows


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def _index(rows):
    return {(r["model"], r["mode"], int(r["length"])): r for r in rows if r["mode"] != "embed"}


def _ratio(ours: dict | None, base: dict | None, key: str) -> str:
    """``ours : base`` as ``0.25x``; ``base OOM`` / ``base timeout`` when only ours ran; ``-`` otherwise."""
    if not _ok(ours):
        return "-"
    if base is None:
        return "-"
    if not _ok(base):
        return "base " + base["status"].split(" ")[0]
    b = base.get(key)
    if not b or b <= 0:
        return "-"
    return f"{ours[key] / b:.2f}x"


def _cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "-"
    if not _ok(r):
        return r["status"]
    return format(r[key], fmt)


def linearity(rows: list[dict], mode: str = "train", lo: int = 2048, hi: int = 16384) -> dict[str, float | None]:
    """``delta(hi) / delta(lo)`` per model (8 = linear for 2,048 -> 16,384); ``None`` if a point is missing."""
    idx = _index(rows)
    out = {}
    for m in sorted({r["model"] for r in rows}, key=lambda m: MODELS.index(m) if m in MODELS else 99):
        a, b = idx.get((m, mode, lo)), idx.get((m, mode, hi))
        out[m] = b["delta_mib"] / a["delta_mib"] if _ok(a) and _ok(b) and a["delta_mib"] > 0 else None
    return out


def best_throughput(rows: list[dict]) -> dict[str, dict]:
    """Per model, the ``embed`` row with the most cells/s."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["mode"] == "embed" and _ok(r) and (r["model"] not in best or r["cells_per_s"] > best[r["model"]]["cells_per_s"]):
            best[r["model"]] = r
    return best


def markdown_report(rows: list[dict], memory_key: str = "delta_mib", time_key: str = "cpu_s") -> str:
    """The Markdown tables: per mode and length, each model's memory and time with ours : baseline ratios (memory
    over the baseline; time by ``time_key``, CPU seconds by default: on a shared machine the wall time counts
    waiting for a core too); the linearity check; throughput."""
    idx = _index(rows)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    lines = []
    unit = "CUDA MiB" if memory_key == "cuda_delta_mib" else "MiB"
    tname = "CPU" if time_key == "cpu_s" else "wall"
    for mode, title in (("train", "Training step (forward + backward)"), ("infer", "Inference forward (no grad)")):
        lengths = sorted({int(r["length"]) for r in rows if r["mode"] == mode})
        if not lengths:
            continue
        lines += [f"**{title}**, one cell: memory over the baseline ({unit}), wall and CPU time (s); "
                  f"ratios ours : baseline (memory, {tname} time)", "",
                  f"| genes | model | memory | wall | CPU | mem : eager | mem : sdpa | {tname} : eager "
                  f"| {tname} : sdpa |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for length in lengths:
            eager, sdpa = idx.get(("bert-eager", mode, length)), idx.get(("bert-sdpa", mode, length))
            for m in models:
                r = idx.get((m, mode, length))
                if r is None:
                    continue
                ratios = [_ratio(r, b, k) if m in OURS else "" for k in (memory_key, time_key) for b in (eager, sdpa)]
                lines.append(f"| {length:,} | {LABELS.get(m, m)} | {_cell(r, memory_key, ',.0f')} | "
                             f"{_cell(r, 'wall_s', '.2f') if _ok(r) else ''} | "
                             f"{_cell(r, 'cpu_s', '.2f') if _ok(r) else ''} | " + " | ".join(ratios) + " |")
        lines.append("")
    for mode in ("train", "infer"):
        lin = {m: v for m, v in linearity(rows, mode).items() if m in OURS or v is not None}
        if any(v is not None for v in lin.values()):
            parts = [f"{LABELS.get(m, m)} {v:.2f}" if v is not None else f"{LABELS.get(m, m)} -" for m, v in lin.items()]
            lines.append(f"Linearity ({mode}), memory 16,384 : 2,048 genes (linear = 8; target <= 9): " + ", ".join(parts))
    best = best_throughput(rows)
    if best:
        lines += ["", "**Throughput**: no-grad embedding of 2,048-gene cells, best batch size; cells/s (CPU: per CPU-second of the one thread)", "",
                  "| model | batch | cells/s | : eager | : sdpa |", "|---|---:|---:|---:|---:|"]
        for m in models:
            if m not in best:
                continue
            r = best[m]
            rel = [f"{r['cells_per_s'] / best[b]['cells_per_s']:.2f}x" if b in best and m in OURS else ""
                   for b in BASELINES]
            lines.append(f"| {LABELS.get(m, m)} | {r['batch']} | {r['cells_per_s']:.1f} | {rel[0]} | {rel[1]} |")
    return "\n".join(lines).rstrip() + "\n"


def plot(rows: list[dict], path: str | Path, memory_limit_gb: float | None = None,
         memory_key: str = "delta_mib", time_key: str = "cpu_s") -> None:
    """Two log-log panels (memory, time) vs length: one colour per model, training solid with circles, inference
    dashed with squares. Points that ran out of memory are an x on the memory limit (memory panel only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colours = dict(zip(MODELS, ("tab:blue", "tab:green", "tab:purple", "tab:red", "tab:orange")))
    idx = _index(rows)
    for mode, style, marker in (("train", "-", "o"), ("infer", "--", "s")):
        for m in MODELS:
            pts = sorted((length, r) for (mm, md, length), r in idx.items() if mm == m and md == mode)
            ok = [(length, r) for length, r in pts if _ok(r)]
            oom = [length for length, r in pts if str(r.get("status", "")).startswith("OOM")]
            for ax, key in zip(axes, (memory_key, time_key)):
                if ok:
                    ax.plot([p for p, _ in ok], [max(r[key], 1e-3) for _, r in ok], style, marker=marker,
                            markersize=4, color=colours[m], label=f"{LABELS[m]} {mode}")
            if oom and memory_limit_gb:
                axes[0].plot(oom, [memory_limit_gb * 1024] * len(oom), "x", color=colours[m], markersize=10, mew=2)
    lengths = sorted({int(length) for (_, _, length) in idx})
    if memory_limit_gb:
        axes[0].axhline(memory_limit_gb * 1024, color="grey", ls=":", lw=1)
        axes[0].text(lengths[0] if lengths else 2048, memory_limit_gb * 1024 * 1.12,
                     f"limit {memory_limit_gb:g} GiB (x = out of memory)", fontsize=8, color="grey")
    axes[0].set_ylabel("peak memory over baseline (MiB)" if memory_key == "delta_mib" else "CUDA peak (MiB)")
    axes[1].set_ylabel("CPU time of the step (s), 1 thread" if time_key == "cpu_s" else "wall time (s)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{n:,}" for n in lengths], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("genes per cell (tokens)")
        ax.grid(True, which="major", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("One cell: training step (solid, o) and inference forward (dashed, s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--modes", nargs="+", default=["train", "infer", "embed"], choices=MODES)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--infer-lengths", type=int, nargs="*", default=[WHOLE_TRANSCRIPTOME],
                   help="extra lengths for the inference mode only (default: the whole transcriptome, 60,530)")
    p.add_argument("--throughput-length", type=int, default=2048)
    p.add_argument("--throughput-batches", type=int, nargs="+", default=[1, 8, 32],
                   help="embed points' batch sizes; --throughput: at its first length (the others: the first size)")
    p.add_argument("--quick", action="store_true", help="lengths 2048 and 4096, no extra inference length")
    p.add_argument("--batch", type=int, default=1, help="cells per step of the train / infer points")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="best of N when a step takes < 3 s")
    p.add_argument("--memory-limit-gb", type=float, default=default_memory_limit_gb(),
                   help="kill a point whose resident set exceeds this (default: half the machine's RAM)")
    p.add_argument("--time-limit-s", type=float, default=300.0, help="kill a point that runs longer (wall clock)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (CSV, PNG, Markdown)")
    p.add_argument("--point", nargs=4, metavar=("MODEL", "MODE", "LENGTH", "BATCH"),
                   help="run one point in this process and print its JSON row (what the parent runs)")
    p.add_argument("--from-csv", help="only rebuild the Markdown and PNG from this CSV (of an earlier run)")
    p.add_argument("--throughput", action="store_true",
                   help="side by side in one process: inference cells/s of the families and BERT sdpa")
    p.add_argument("--throughput-lengths", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--per-token", action="store_true",
                   help="side by side in one process: training-step time per token of every family")
    p.add_argument("--per-token-lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--rounds", type=int, default=3, help="--throughput / --per-token: rounds side by side")
    p.add_argument("--profile", action="store_true", help="with --point: print torch.profiler tables to stderr")
    p.add_argument("--profile-rows", type=int, default=15)
    return p


def plan(args) -> list[tuple[str, str, int, int | str]]:
    """The (model, mode, length, batch) points of a run, cheap ones first."""
    lengths = [n for n in args.lengths if n <= 4096] if args.quick else list(args.lengths)
    extra = [] if args.quick else [n for n in args.infer_lengths if n not in lengths]
    points = []
    for length in sorted(lengths):
        for mode in ("train", "infer"):
            if mode in args.modes:
                points += [(m, mode, length, args.batch) for m in args.models]
    if "infer" in args.modes:
        points += [(m, "infer", n, args.batch) for n in sorted(extra) for m in args.models]
    if "embed" in args.modes:
        batches = ",".join(str(b) for b in args.throughput_batches)
        points += [(m, "embed", args.throughput_length, batches) for m in args.models]
    return points


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = build_parser().parse_args(argv)
    if args.point:
        print(json.dumps(run_point(args)))
        return None
    if args.throughput or args.per_token:
        return run_side_by_side(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        rows = read_csv(args.from_csv)
        _write_outputs(rows, out, args)
        return rows
    points = plan(args)
    print(f"# {len(points)} points, each a fresh process; d={args.d_model}, {args.layers} layers, vocab "
          f"{args.vocab_size}, {args.threads} thread(s), {args.device}; limits {args.memory_limit_gb:g} GiB, "
          f"{args.time_limit_s:g} s", flush=True)
    rows, t0 = [], time.monotonic()
    ran_out: dict[tuple[str, str], dict] = {}  # (model, mode) -> the row where it ran out of memory or time
    for model, mode, length, batch in points:
        first = ran_out.get((model, mode))
        if first is not None and mode != "embed" and length > first["length"]:  # would only run out again
            rows.append({"model": model, "mode": mode, "length": length, "batch": batch, "status": first["status"],
                         "note": f"not run: ran out at {first['length']:,} already", "threads": args.threads,
                         "device": args.device, "d_model": args.d_model, "layers": args.layers,
                         "vocab_size": args.vocab_size})
            print(f"[{time.monotonic() - t0:6.0f} s] {model:16} {mode:5} L={length:<6} skipped ({rows[-1]['note']})")
            continue
        r = measure_point(model, mode, length, batch, memory_limit_gb=args.memory_limit_gb,
                          time_limit_s=args.time_limit_s, d_model=args.d_model, layers=args.layers,
                          vocab_size=args.vocab_size, threads=args.threads, device=args.device, repeats=args.repeats)
        rows.append(r)
        if r["status"].startswith(("OOM", "timeout")):
            ran_out[(model, mode)] = r
        if r["status"] == "ok":
            desc = f"{r['delta_mib']:,.0f} MiB, CPU {r['cpu_s']:.2f} s, wall {r['wall_s']:.2f} s"
            desc += f" ({r['note']})" if r.get("note") else ""
        else:
            desc = r["status"] + (f": {r['error']}" if r.get("error") else "")
        print(f"[{time.monotonic() - t0:6.0f} s] {model:16} {mode:5} L={length:<6} b={batch:<3} {desc}", flush=True)
        write_csv(rows, out / "scaling.csv")  # keep what we have if the run is interrupted
    _write_outputs(rows, out, args)
    print(f"# {len(points)} points in {time.monotonic() - t0:.0f} s")
    return rows


def _write_outputs(rows: list[dict], out: Path, args) -> None:
    cuda = any(str(r.get("device") or "").startswith("cuda") for r in rows)
    memory_key, time_key = ("cuda_delta_mib", "wall_s") if cuda else ("delta_mib", "cpu_s")
    report = markdown_report(rows, memory_key=memory_key, time_key=time_key)
    (out / "scaling.md").write_text(report)
    try:
        plot(rows, out / "scaling.png", None if cuda else args.memory_limit_gb, memory_key, time_key)
    except ImportError:
        print("# matplotlib not installed: no PNG", file=sys.stderr)
    print()
    print(report)
    print(f"# wrote {out / 'scaling.csv'}, {out / 'scaling.md'}, {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
