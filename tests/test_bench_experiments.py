"""The experiments of bench/experiments/: the CPU placement probe around the step benchmark's
samples, and the access-pattern model whose bytes must be bench/traffic.py's."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import step_bench, traffic  # noqa: E402
from bench.experiments import access_pattern, placement  # noqa: E402

F32 = torch.float32


def _default_row(name, median_ms, **extra):
    return dict(kind="default", row=name, workload="llm", status="ok", reason="",
                median_ms=median_ms, bytes_per_param=34.0, read_bytes_per_param=22.0,
                paired_vs_adam_fused=None, **extra)


def test_placement_labels_and_per_placement_ratios():
    S, C = placement.SAME, placement.CROSS
    assert placement.label(28.0, 31.0) == S
    assert placement.label(165.0, 158.0) == C
    assert placement.label(28.0, 165.0) is None  # moved during the sample
    assert placement.label(None, 28.0) is None
    # Five rounds: a round counts for a placement only when both rows' samples ran in it.
    mine = dict(round_medians_ms=[15.0, 16.0, 30.0, 17.0, None], round_placement=[S, S, C, S, S])
    base = dict(round_medians_ms=[10.0, 10.0, 15.0, 10.0, 10.0], round_placement=[S, S, C, None, S])
    by = placement.paired_by_placement(mine, base, min_rounds=2)
    assert by[S]["rounds"] == 2 and by[S]["paired"][1] == pytest.approx(1.55)
    assert by[C] == {"rounds": 1, "paired": None}

    # add_placement labels each round from the probe readings around the sample, then pairs.
    def row(name, medians, probes):
        return _default_row(name, float(np.median(medians)), round_medians_ms=medians,
                            round_probe=probes)
    near, far = [28.0, 30.0], [165.0, 170.0]
    results = [row("fadam-cpu", [14.0, 15.0, 16.0, 30.0, 99.0], [near, near, near, far, [28.0, 165.0]]),
               row("torch-adam-fused", [10.0, 10.0, 10.0, 15.0, 10.0], [near, near, near, far, near])]
    summ = step_bench.summary(results)
    lines = placement.add_placement(results, summ)
    assert results[0]["round_placement"] == [S, S, S, C, None]  # moved during the last sample
    assert summ["fadam-cpu"]["paired_by_placement"][S]["paired"][1] == pytest.approx(1.5)
    assert lines == ["fadam-cpu on llm, paired by CPU placement: same-l3 1.50x (3 rounds), "
                     "cross-l3 - (1 rounds)"]


def test_placement_runs_the_step_bench_with_the_probe_around_every_sample(tmp_path, capsys):
    json_path = tmp_path / "r.json"
    placement.main(["--device", "cpu", "--quick", "--workloads", "tiny", "--rows",
                    "torch-adam-fused,torch-adam-foreach", "--budget-scale", "0.02",
                    "--no-progress", "--json", str(json_path)])
    data = json.loads(json_path.read_text())
    assert "core-to-core latency" in data["meta"]["placement_probe"]
    timed = [r for r in data["results"] if r["status"] == "ok"]
    assert len(timed) == 2
    for r in timed:
        assert len(r["round_placement"]) == len(r["round_medians_ms"]) == len(r["round_probe"])
        for where, ns, ms in zip(r["round_placement"], r["round_probe"], r["round_medians_ms"]):
            assert (ns is None) == (ms is None)  # probed exactly around the rounds it ran in
            assert where in (placement.SAME, placement.CROSS, None)
            if ns is not None:
                assert where == placement.label(*ns)


def test_core_to_core_probe_builds_and_measures(tmp_path):
    exe, why = placement.build(str(tmp_path))
    assert exe is not None, why
    built = os.path.getmtime(exe)
    assert placement.build(str(tmp_path)) == (exe, "")  # up to date: not rebuilt
    assert os.path.getmtime(exe) == built
    ns = placement.prober(exe, round_trips=2000)()
    if len(os.sched_getaffinity(0)) >= 2:
        assert ns is not None and 1.0 < ns < 100_000.0  # a cache line between two cores
    else:
        assert ns is None  # the probe says it needs two CPUs rather than measuring one


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_access_pattern_model_builds_runs_and_counts_the_traffic_model(tmp_path, chunk):
    # A small list with tensors on both sides of the chunk: the model's items must move the bytes
    # bench/traffic.py counts for the kernel (one-chunk 32 B, multi-chunk 40 B, Adam 28 B).
    numels = [3, 4096, 5000, 70000]
    r = access_pattern.run(numels, threads=2, rounds=3, chunk_size=chunk, out_dir=str(tmp_path))
    assert r["adam_bytes_per_param"] == pytest.approx(
        traffic.bytes_per_param("adam", numels, F32), abs=1e-3)
    assert r["fadam_bytes_per_param"] == pytest.approx(
        traffic.bytes_per_param("fadam", numels, F32, chunk_size=chunk), abs=1e-3)
    assert 0 < r["phase_a_ms"] < r["fadam_ms"]
    assert r["adam_ms"] > 0 and r["ratio_p20"] <= r["ratio"] <= r["ratio_p80"]
    assert r["ratio_no_check"] > 0 and r["ratio_two_pass"] > 0


