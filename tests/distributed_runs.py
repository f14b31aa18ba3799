"""Several ``hf-scfm`` commands in one set of processes: ``accelerate launch --multi_gpu --num_processes 2
tests/distributed_runs.py JOBS.json``, where JOBS.json is ``[{"argv": ["pretrain", ...], "env": {...}}, ...]``.

Each job runs as the ``hf-scfm`` command line runs it (:func:`hf_scfm.cli.main`), with its ``env`` set for its
duration (e.g. ``ACCELERATE_USE_FSDP``, as ``accelerate launch --use_fsdp`` sets it); Accelerate's process-wide
state is reset between jobs. The launch and the imports are paid once for all jobs, which keeps the multi-process
tests of ``tests/test_distributed.py`` within the suite's time budget. Exits with the first failing job's status.
"""

from __future__ import annotations

import json
import os
import sys


def main(jobs_file: str) -> int:
    import datasets.config
    from accelerate.state import AcceleratorState

    from hf_scfm.cli import main as hf_scfm

    # datasets sleeps 5 s after every pass over a shuffled parquet stream (apache/arrow#45214, a crash at
    # interpreter exit); the tiny test corpora go round their parts' epochs every few steps.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

    with open(jobs_file, encoding="utf-8") as fh:
        jobs = json.load(fh)
    for job in jobs:
        env = job.get("env", {})
        before = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            status = hf_scfm(["--debug", *job["argv"]])
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            AcceleratorState._reset_state(reset_partial_state=True)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
