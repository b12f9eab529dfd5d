"""The benchmark diagnostics' arithmetic, on synthetic traces and calls (the numbers they report come from GPU runs;
what they compute from those runs is checked here)."""

from __future__ import annotations

import json
import pathlib

from bench.diagnostics.profile_gang import across_ranks, timeline
from bench.gang import warm_up


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur, "args": {}}


def _write_trace(path: pathlib.Path, attention_durations: list[float], gemm_gap: float = 5.0) -> pathlib.Path:
    """Per layer: a GEMM (the projection), a gap, the self-attention kernel, a short cross-attention kernel, a GEMM."""
    events, t = [], 0.0
    for duration in attention_durations:
        events.append(_kernel("nvjet_sm90_gemm", t, 10.0))
        t += 10.0 + gemm_gap
        events.append(_kernel("cudnn_generated_fort_native_sdpa", t, duration))
        t += duration
        events.append(_kernel("cudnn_generated_fort_native_sdpa", t + 1.0, 2.0))     # cross-attention
        t += 3.0
        events.append(_kernel("nvjet_sm90_gemm", t + 4.0, 10.0))
        t += 14.0
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_across_ranks_charges_each_call_to_its_slowest_rank(tmp_path):
    fast = _write_trace(tmp_path / "r0.json", [100_000.0, 100_000.0])       # microseconds, as traces are
    slow = _write_trace(tmp_path / "r1.json", [120_000.0, 100_000.0])
    report = across_ranks([fast, slow])
    assert report["attention_calls"] == 2                  # the short cross-attention calls are not counted
    assert report["attention_ms"]["sum_of_slowest"] == 220.0
    assert report["attention_ms"]["sum_of_mean"] == 210.0
    assert report["attention_ms"]["per_rank"] == [200.0, 220.0]
    assert report["imbalance_ms"] == 10.0
    assert report["calls_slowest_by_rank"] == [1, 1]       # ties go to the first rank
    assert report["spread_pct"]["max"] == round(100 * 20.0 / 110.0, 1)


def test_across_ranks_refuses_ranks_that_disagree(tmp_path):
    report = across_ranks([_write_trace(tmp_path / "a.json", [100.0]),
                           _write_trace(tmp_path / "b.json", [100.0, 100.0])])
    assert "error" in report


def test_timeline_reports_peer_copies_and_their_overlap(tmp_path):
    copy = {"cat": "gpu_memcpy", "ph": "X", "name": "Memcpy PtoP", "args": {"toDevice": 1, "bytes": 1_000_000}}
    events = [_kernel("nvjet_sm90_gemm", 0.0, 50_000.0),
              {**copy, "ts": 0.0, "dur": 10_000.0}, {**copy, "ts": 5_000.0, "dur": 10_000.0},      # overlap 5 ms
              {"cat": "gpu_memcpy", "ph": "X", "name": "Memcpy DtoD", "ts": 20.0, "dur": 3.0, "args": {"bytes": 8}}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    copies = timeline(path)["copies"]
    assert copies["peer_copies"] == 2                      # the local copy is not a peer copy
    assert copies["peer_copy_ms"] == 20.0
    assert copies["peer_copy_busy_ms"] == 15.0             # the overlap counted once
    assert copies["median_gb_per_s"] == 0.1                # 1 MB in 10 ms


def test_warm_up_runs_until_rank_zero_says_stop():
    calls, decisions = [], iter([True, True, False])
    warm_up(lambda: calls.append(1), lambda: None, lambda go: next(decisions), calls=2, seconds=1.0)
    assert len(calls) == 4                                  # two asked for, then two more while rank 0 said go


def test_warm_up_without_seconds_still_asks_every_rank_once():
    asked = []
    warm_up(lambda: None, lambda: None, lambda go: asked.append(go) or go, calls=3, seconds=0.0)
    assert asked == [False]                                 # every rank makes the same collective call to stop
