"""CellFM forward memory against input length: the ``tiny`` model from 2,048 to 16,384 genes.

Each measurement runs in a fresh subprocess and reads the process's peak resident memory (``ru_maxrss``) before
and after one forward pass of a single cell, so the figure is what the forward itself added (activations and
temporaries; weights are loaded before the baseline). Two modes: inference (``torch.no_grad``) and training
(the autograd graph kept, i.e. what a backward pass will need). The linear form ``Q (Kᵀ V)`` should grow in
proportion to the length; for contrast the quadratic reference ``(Q Kᵀ) V`` is measured at the two shortest
lengths (its L x L score matrix makes longer ones needlessly heavy on a shared machine).

Run: ``.venv/bin/python benchmarks/cellfm_memory.py`` (each point is a fresh subprocess: 1 to 5 minutes on 2 cores, depending on load). Prints a table; it never
fails on the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

LENGTHS = [2048, 4096, 8192, 16384]
QUADRATIC_LENGTHS = [2048, 4096]

_CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from hf_scfm.modeling.cellfm import CellFMConfig, CellFMModel

length, form, grad = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
torch.manual_seed(0)
model = CellFMModel(CellFMConfig.from_preset("tiny", retention_form=form)).eval()
ids = torch.randint(6, model.config.vocab_size, (1, length))
ids[0, 0] = 2
values = torch.rand(1, length) * 4
values[0, 0] = 0.0

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

with torch.no_grad():  # warm-up on a short input: allocator and kernels, not counted
    model(input_ids=ids[:, :64], values=values[:, :64])
before = rss_kib()
with torch.set_grad_enabled(grad):
    out = model(input_ids=ids, values=values)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mib": (peak - before) / 1024}))
"""


def measure(length: int, form: str, grad: bool) -> float:
    # glibc: serve every allocation above 64 KiB by mmap and give it back on free, so the resident-set peak
    # tracks the tensors alive at once rather than heap fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(length), form, "1" if grad else "0"],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["mib"]


def main() -> None:
    print("CellFM tiny (d=64, 2 layers, 4 heads), one cell; peak memory added by one forward pass, MiB")
    print(f"{'genes':>7} | {'linear, no_grad':>15} | {'linear, graph':>13} | {'quadratic, no_grad':>18}")
    rows = []
    for length in LENGTHS:
        lin = measure(length, "linear", False)
        lin_graph = measure(length, "linear", True)
        quad = measure(length, "quadratic", False) if length in QUADRATIC_LENGTHS else float("nan")
        rows.append((length, lin, lin_graph, quad))
        print(f"{length:>7} | {lin:>15.1f} | {lin_graph:>13.1f} | {quad:>18.1f}")
    base = rows[0]
    print(
        f"ratio {LENGTHS[-1]} : {LENGTHS[0]} genes ({LENGTHS[-1] // LENGTHS[0]}x): "
        f"no_grad {rows[-1][1] / base[1]:.2f}x, graph {rows[-1][2] / base[2]:.2f}x (linear growth = "
        f"{LENGTHS[-1] // LENGTHS[0]}x); quadratic {QUADRATIC_LENGTHS[-1] // QUADRATIC_LENGTHS[0]}x length -> "
        f"{rows[1][3] / base[3]:.2f}x"
    )


if __name__ == "__main__":
    main()
