"""Several ``hf-scfm`` commands in one set of processes: ``accelerate launch --multi_gpu --num_processes 2
tests/distributed_runs.py JOBS.json``, where JOBS.json is ``[{"argv": ["pretrain", ...], "env": {...}}, ...]``.

Each job runs as the ``hf-scfm`` command line runs it (:func:`hf_scfm.cli.main`), with its ``env`` set for its
duration (e.g. ``ACCELERATE_USE_FSDP``, as ``accelerate launch --use_fsdp`` sets it); Accelerate's process-wide
state is reset between jobs, but the processes keep one gloo process group for all jobs: ``end_training`` would
destroy it after each, and a second ``init_process_group`` on the same port can pair one process with the old
rendezvous store and the other with the new one (a hang). The launch and the imports are paid once for all jobs, which keeps the multi-process
tests of ``tests/test_distributed.py`` within the suite's time budget. Exits with the first failing job's status.
"""

from __future__ import annotations

import json
import os
import sys


def main(jobs_file: str) -> int:
    import datasets.config
    import torch.distributed
    from accelerate.state import AcceleratorState, PartialState

    from hf_scfm.cli import main as hf_scfm

    # datasets sleeps 5 s after every pass over a shuffled parquet stream (apache/arrow#45214, a crash at
    # interpreter exit); the tiny test corpora go round their parts' epochs every few steps.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None  # one process group for all jobs
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
    PartialState.destroy_process_group = destroy
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
