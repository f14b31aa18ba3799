"""Import cost of hf_scfm against ``import torch``, in fresh interpreters (issue 16: ``import hf_scfm`` must cost
under 1.5x ``import torch``; ``hf-scfm --help`` must not import torch).

    python benchmarks/import_time.py            # 5 rounds
    python benchmarks/import_time.py --runs 9

Every round runs each command once in a new process, in turn (A B C ... A B C ...), so a change of machine load
hits all of them alike; the table gives the min and the median wall time over the rounds, the ratio of each
median (and min) to ``import torch``'s, and the load average before and after (2 cores shared: read ratios, not
seconds). ``python -c pass`` is the interpreter's own start-up, included in every figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import hf_scfm": [sys.executable, "-c", "import hf_scfm"],
    "import hf_scfm + AutoModel resolves": [
        sys.executable, "-c",
        "import hf_scfm; from transformers import AutoModel; "
        "AutoModel.from_config(hf_scfm.CellFMConfig.from_preset('tiny', vocab_size=40))"],
    "hf-scfm --help": ([shutil.which("hf-scfm"), "--help"] if shutil.which("hf-scfm")
                       else [sys.executable, "-m", "hf_scfm.cli", "--help"]),
}


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _torch_imported(cmd: list[str]) -> bool:
    """Whether the command imports torch (the console script is run as ``hf_scfm.cli.main(["--help"])``)."""
    if "-c" in cmd:
        code = cmd[cmd.index("-c") + 1]
    else:
        code = "from hf_scfm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    code += "\nimport sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().endswith("True")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():
            times[name].append(_time(cmd))
    load_after = os.getloadavg()
    torch_min, torch_median = min(times["import torch"]), statistics.median(times["import torch"])
    print(f"{args.runs} rounds, fresh processes; load average before {load_before[0]:.2f} / after "
          f"{load_after[0]:.2f} (1 min), {os.cpu_count()} CPUs\n")
    print("| command | min (s) | median (s) | median / import torch | min / import torch | imports torch |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        torch_in = _torch_imported(COMMANDS[name])
        print(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} | "
              f"{statistics.median(values) / torch_median:.2f}x | {min(values) / torch_min:.2f}x | "
              f"{'yes' if torch_in else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
