"""benchmarks/scaling.py: one point really runs in a subprocess, the limits kill, and the writers compute the ratios.

The script is not part of the package; it is loaded from its path. The subprocess tests use a 16-wide, 1-layer CellFM
at 64 tokens (a few seconds, nearly all of it importing torch and transformers in the child).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    yield from import_script(SCRIPT, "scaling_benchmark")


TINY = dict(d_model=16, layers=1, vocab_size=64, repeats=1)


def test_one_point_runs_in_a_fresh_process(scaling):
    row = scaling.measure_point("cellfm", "train", 64, 2, memory_limit_gb=8.0, time_limit_s=300, **TINY)
    assert row["status"] == "ok", row
    assert (row["model"], row["mode"], row["length"], row["batch"]) == ("cellfm", "train", 64, 2)
    assert (row["d_model"], row["layers"], row["vocab_size"]) == (16, 1, 64)
    # a torch process is hundreds of MiB; the peak is at least the baseline and the delta is their difference
    assert row["baseline_rss_mib"] > 50
    assert row["peak_rss_mib"] >= row["baseline_rss_mib"] - 1  # RSS counters lag by up to 64 pages per thread
    assert row["delta_mib"] == pytest.approx(max(row["peak_rss_mib"] - row["baseline_rss_mib"], 0), abs=0.11)
    assert row["polled_rss_mib"] > 50  # the parent saw the child's resident set
    assert 0 < row["wall_s"] < 60 and 0 < row["cpu_s"] < 60
    assert row["cells_per_s"] == pytest.approx(2 / row["cpu_s"], rel=1e-2)  # per CPU-second on CPU


def test_memory_limit_kills_the_child(scaling):
    # 30 MiB: importing torch alone passes it, so the poller must kill the child and say so
    row = scaling.measure_point("cellfm", "infer", 64, 1, memory_limit_gb=0.03, time_limit_s=300, **TINY)
    assert row["status"] == "OOM (> 0.03 GiB)"
    assert "wall_s" not in row


def test_time_limit_kills_the_child(scaling):
    row = scaling.measure_point("cellfm", "infer", 64, 1, memory_limit_gb=8.0, time_limit_s=0.3, **TINY)
    assert row["status"] == "timeout (> 0.3 s)"


def _row(model, mode, length, mem, cpu, status="ok", batch=1, cells=None):
    row = {"model": model, "mode": mode, "length": length, "batch": batch, "status": status, "device": "cpu"}
    if status == "ok":
        row.update(delta_mib=mem, peak_rss_mib=mem + 400.0, baseline_rss_mib=400.0, wall_s=cpu * 1.5, cpu_s=cpu,
                   cells_per_s=cells if cells is not None else batch / (cpu * 1.5))
    return row


def _synthetic_rows():
    rows = []
    for length, k in ((2048, 1), (16384, 8)):
        rows += [
            _row("mouse-genemamba", "train", length, 100.0 * k, 1.0 * k),
            _row("scmamba2", "train", length, 50.0 * k, 0.5 * k),
            _row("bert-sdpa", "train", length, 80.0 * k, 2.0 * k),
        ]
    rows += [
        _row("bert-eager", "train", 2048, 400.0, 4.0),
        _row("bert-eager", "train", 16384, None, None, status="OOM (> 11.8 GiB)"),
        _row("mouse-genemamba", "embed", 2048, 10.0, 0.1, batch=8, cells=40.0),
        _row("mouse-genemamba", "embed", 2048, 10.0, 0.1, batch=1, cells=10.0),
        _row("bert-sdpa", "embed", 2048, 10.0, 0.1, batch=32, cells=80.0),
    ]
    return rows


def test_markdown_ratios_linearity_and_throughput(scaling):
    rows = _synthetic_rows()
    md = scaling.markdown_report(rows)
    lines = md.splitlines()
    mgm_2k = next(line for line in lines if line.startswith("| 2,048 | Mouse-GeneMamba"))
    # memory 100 vs eager 400 and sdpa 80; CPU 1.0 vs eager 4.0 and sdpa 2.0
    assert mgm_2k.split("|")[6:10] == [" 0.25x ", " 1.25x ", " 0.25x ", " 0.50x "]
    scm_16k = next(line for line in lines if line.startswith("| 16,384 | SC-MAMBA2"))
    assert scm_16k.split("|")[6:10] == [" base OOM ", " 0.62x ", " base OOM ", " 0.25x "]
    eager_16k = next(line for line in lines if line.startswith("| 16,384 | BERT eager"))
    assert "OOM (> 11.8 GiB)" in eager_16k
    lin = scaling.linearity(rows)
    assert lin["mouse-genemamba"] == pytest.approx(8.0) and lin["bert-eager"] is None
    assert "Mouse-GeneMamba 8.00" in md and "CellFM" not in md
    best = scaling.best_throughput(rows)
    assert best["mouse-genemamba"]["batch"] == 8
    mgm_tp = next(line for line in lines if line.startswith("| Mouse-GeneMamba | 8 |"))
    assert mgm_tp.split("|")[3:6] == [" 40.0 ", "  ", " 0.50x "]  # no eager throughput row: no ratio


def test_csv_round_trip_and_plot(scaling, tmp_path):
    rows = _synthetic_rows()
    scaling.write_csv(rows, tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        header = next(csv.reader(f))
    assert header == list(scaling.CSV_FIELDS)
    back = scaling.read_csv(tmp_path / "s.csv")
    assert len(back) == len(rows)
    assert back[0]["length"] == 2048 and back[0]["delta_mib"] == 100.0 and back[0]["cpu_s"] == 1.0
    assert back[7]["status"].startswith("OOM") and back[7]["delta_mib"] is None
    assert scaling.markdown_report(back) == scaling.markdown_report(rows)
    pytest.importorskip("matplotlib")
    scaling.plot(back, tmp_path / "s.png", memory_limit_gb=11.8)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_runs_the_whole_transcriptome_for_inference_only(scaling):
    args = scaling.build_parser().parse_args(["--models", "scmamba2", "bert-sdpa"])
    points = scaling.plan(args)
    assert ("scmamba2", "infer", 60530, 1) in points and ("scmamba2", "train", 60530, 1) not in points
    assert ("bert-sdpa", "embed", 2048, "1,8,32") in points
    assert sum(1 for p in points if p[1] == "train") == 2 * 4
    quick = scaling.plan(scaling.build_parser().parse_args(["--quick", "--models", "cellfm"]))
    assert {p[2] for p in quick if p[1] != "embed"} == {2048, 4096}


def test_side_by_side_throughput_and_per_token_reports(scaling):
    # in this process, tiny shapes: every (model, length, batch) timed once per round, rounds interleaved
    rows = scaling.side_by_side(["mouse-genemamba", "bert-sdpa"], [(32, 1), (32, 2), (64, 1)], "infer", rounds=2,
                                d_model=16, layers=1, vocab_size=64, progress=False)
    assert {(r["model"], r["length"], r["batch"]) for r in rows} == {
        (m, n, b) for m in ("mouse-genemamba", "bert-sdpa") for n, b in ((32, 1), (32, 2), (64, 1))}
    for r in rows:
        assert r["rounds"] == 2 and 0 < r["cpu_min"] <= r["cpu_median"]
        assert r["cells_per_cpu_s"] == pytest.approx(r["batch"] / r["cpu_min"])
    fake = [dict(model=m, mode="infer", length=n, batch=b, cells_per_cpu_s=c, cells_per_cpu_s_median=c / 2,
                 cells_per_wall_s=c / 3)
            for m, n, b, c in (("mouse-genemamba", 2048, 1, 30.0), ("mouse-genemamba", 2048, 8, 40.0),
                               ("bert-sdpa", 2048, 1, 20.0), ("mouse-genemamba", 16384, 1, 5.0),
                               ("bert-sdpa", 16384, 1, 0.5))]
    table = scaling.throughput_report(fake)
    assert "| 2,048 | Mouse-GeneMamba | 8 | 40.00 / 20.00 | 13.33 | 2.00x / 2.00x |" in table  # best batch kept
    assert "| 16,384 | Mouse-GeneMamba | 1 | 5.00 / 2.50 | 1.67 | 10.00x / 10.00x |" in table
    train = [dict(model="cellfm", mode="train", length=n, batch=1, cpu_min=n * t * 1e-6, cpu_median=n * t * 2e-6,
                  user_min=n * 1e-5, user_median=n * 2e-5)
             for n, t in ((2048, 10.0), (8192, 11.0), (32768, 13.0))]
    report = scaling.per_token_report(train)
    assert "| CellFM | CPU | 10.0 / 20.0 | 11.0 / 22.0 | 13.0 / 26.0 | 1.30x / 1.30x |" in report
    assert "| CellFM | user | 10.0 / 20.0 | 10.0 / 20.0 | 10.0 / 20.0 | 1.00x / 1.00x |" in report
    assert all(r["user_min"] <= r["cpu_min"] + 1e-3 for r in rows)
