"""Time and peak memory of one no-grad forward of SC-MAMBA2 on one whole-transcriptome cell.

The cell is ``<cls>`` + 60,530 gene tokens (the paper's full CELLxGENE vocabulary length; here the
first 60,530 gene ids of our human vocabulary), every gene present, zeros included, with about 10 %
non-zero bins, i.e. the "all genes" input of the paper's fine-tuning. Prints figures; never fails on time.

    .venv/bin/python benchmarks/scmamba2_whole_transcriptome.py [--preset tiny] [--threads 1] [--device cpu]

Peak memory: on CPU the growth of the process's peak resident set (``ru_maxrss``) during the forward
(model weights are loaded before the measurement starts, so this is activations + workspace); on CUDA
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from hf_scfm.modeling.scmamba2 import ScMamba2Config, ScMamba2ForMaskedExpression
from hf_scfm.tokenization.special_tokens import CLS_TOKEN_ID

N_GENES = 60_530


def _rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--genes", type=int, default=N_GENES)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = ScMamba2Config.from_preset(args.preset)
    if config.vocab_size < args.genes + 6:
        config = ScMamba2Config.from_preset(args.preset, vocab_size=args.genes + 6)
    model = ScMamba2ForMaskedExpression(config).eval().to(args.device)
    ids = torch.cat([torch.tensor([CLS_TOKEN_ID]), torch.arange(6, 6 + args.genes)]).unsqueeze(0)
    expressed = torch.rand(1, args.genes + 1) < 0.1
    values = torch.where(expressed, torch.randint(1, config.n_bins, (1, args.genes + 1)), 0).float()
    values[0, 0] = 0.0
    batch = dict(input_ids=ids, values=values, attention_mask=torch.ones_like(ids))
    batch = {k: v.to(args.device) for k, v in batch.items()}
    cuda = args.device.startswith("cuda")

    times, cpu_times = [], []
    rss_before = _rss_mib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model(**batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    assert torch.isfinite(out.predictions).all()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib() - rss_before

    print(f"SC-MAMBA2 preset={args.preset} ({model.num_parameters() / 1e6:.2f} M parameters), device={args.device}, "
          f"threads={args.threads}, torch {torch.__version__}")
    print(f"one cell, {ids.shape[1]:,} tokens (<cls> + {args.genes:,} genes), no-grad forward")
    print(f"wall time: {min(times):.2f} s, process CPU time: {min(cpu_times):.2f} s (best of {len(times)}; on a "
          f"shared machine the CPU time is the steadier figure); peak memory over the weights: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
