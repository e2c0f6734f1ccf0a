"""Smoke test of the benchmark machinery and the training example (fast; no timing assertions).

Runs bench/step_bench.py on its tiny workload with a couple of rows, and checks the CSV / JSON
fields and the bytes-per-param traffic model (SPEC section 3). The figures themselves come from
`make bench`, not from here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import access_pattern, placement, report, rows, step_bench, traffic, workloads  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def test_traffic_model_per_element():
    # SPEC section 3: Adam 28 B/param in float32; exact FAdam 40 B for multi-chunk tensors; one-chunk
    # tensors 28 B in the SPEC plus our phase-A re-read of g for the non-finite check = 32 B.
    assert traffic.adam_bytes_per_element(F32) == 28
    assert traffic.fadam_bytes_per_element(65537, F32) == 40
    assert traffic.fadam_bytes_per_element(65536, F32) == 32
    assert traffic.fadam_bytes_per_element(1, F32) == 32
    # bf16 / fp16 params and grads are 2 bytes; torch's Adam keeps its state in the param dtype,
    # FAdam keeps float32 state (SPEC section 4).
    assert traffic.adam_bytes_per_element(BF16) == 2 + 2 * 2 + 4 * 2
    assert traffic.fadam_bytes_per_element(10**6, BF16) == 2 * 2 + 5 * 4 + 3 * 2  # 30
    assert traffic.fadam_bytes_per_element(100, F16) == 2 * 2 + 4 * 4 + 2 * 2     # 24
    # The chunk size of the backend sets the one-chunk threshold.
    assert traffic.fadam_bytes_per_element(5000, F32, chunk_size=4096) == 40
    # Reads alone: Adam g, m, v, theta; FAdam g, f, theta then g, f, m, theta (multi-chunk), or
    # the check's g, then g, f, theta, m (one-chunk).
    assert traffic.adam_bytes_per_element(F32, reads_only=True) == 16
    assert traffic.fadam_bytes_per_element(65537, F32, reads_only=True) == 28
    assert traffic.fadam_bytes_per_element(65536, F32, reads_only=True) == 20
    assert traffic.fadam_bytes_per_element(10**6, BF16, reads_only=True) == 2 * 2 + 3 * 4 + 2 * 2
    assert traffic.adam_bytes_per_element(BF16, reads_only=True) == 2 + 2 + 2 * 2


def test_traffic_model_weighted_over_a_workload():
    numels = [70000, 4096, 300, 0]  # one multi-chunk, two one-chunk, one empty (moves nothing)
    total = 70000 * 40 + (4096 + 300) * 32
    assert traffic.model_bytes("fadam", numels, F32) == total
    assert traffic.bytes_per_param("fadam", numels, F32) == pytest.approx(total / sum(numels))
    assert traffic.bytes_per_param("adam", numels, F32) == pytest.approx(28.0)
    assert math.isnan(traffic.bytes_per_param("adam", [], F32))
    # The CPU default workload is LLM-shaped, bigger than a 480 MiB LLC, and nearly all multi-chunk.
    w = workloads.llm_workload(workloads.CPU_DEFAULT_PARAMS, workloads.CPU_DEFAULT_D_MODEL)
    assert 60e6 < w.n_params < 70e6
    assert w.n_params * 16 > 480 * 2**20
    assert 39.9 < traffic.bytes_per_param("fadam", w.numels, F32) <= 40.0
    # With the CPU's 2^20-element chunks three quarters of it is one-chunk: 34 B, 22 B of reads.
    cpu = dict(chunk_size=1 << 20)
    assert traffic.bytes_per_param("fadam", w.numels, F32, **cpu) == pytest.approx(34.0, abs=0.05)
    assert traffic.bytes_per_param("fadam", w.numels, F32, reads_only=True, **cpu) == \
        pytest.approx(22.0, abs=0.05)


def _default_row(name, median_ms, bpp, reads, **extra):
    """A timed row of the default workload, with the fields step_bench.summary() reads."""
    return dict(kind="default", row=name, workload="llm", status="ok", reason="",
                median_ms=median_ms, bytes_per_param=bpp, read_bytes_per_param=reads,
                paired_vs_adam_fused=None, **extra)


def test_summary_gives_both_traffic_bounds():
    results = [_default_row("fadam-cpu", 15.0, 34.0, 22.0),
               _default_row("torch-adam-fused", 10.0, 28.0, 16.0)]
    entry = step_bench.summary(results)["fadam-cpu"]
    assert entry["time_vs_adam_fused"] == pytest.approx(1.5)
    assert entry["memory_bound_expectation"] == pytest.approx(34 / 28)
    assert entry["read_bytes_ratio"] == pytest.approx(22 / 16)
    text = report.summary_text(step_bench.summary(results), results, {"elapsed_s": 1})
    assert "memory-bound expectation 1.21x, read-bytes ratio 1.38x" in text
    # A JSON file of an earlier release names the entry read_bound_floor.
    old = step_bench.summary(results)
    old["fadam-cpu"]["read_bound_floor"] = old["fadam-cpu"].pop("read_bytes_ratio")
    assert "read-bytes ratio 1.38x" in report.summary_text(old, results, {"elapsed_s": 1})


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

    def row(name, medians, places):
        return _default_row(name, float(np.median(medians)), 34.0, 22.0,
                            round_medians_ms=medians, round_placement=places)
    results = [row("fadam-cpu", [14.0, 15.0, 16.0, 30.0], [S, S, S, C]),
               row("torch-adam-fused", [10.0, 10.0, 10.0, 15.0], [S, S, S, C])]
    summ = step_bench.summary(results)
    assert summ["fadam-cpu"]["paired_by_placement"][S]["paired"][1] == pytest.approx(1.5)
    text = report.summary_text(summ, results, {"elapsed_s": 1})
    assert "by CPU placement: same-l3 1.50x (3 rounds), cross-l3 - (1 rounds);" in text
    meta = dict(device="cpu", device_name="x", threads=2, torch="t", python="p", date="d")
    for r in results:
        r.update(dtype="float32", n_params=1, n_tensors=1, p20_ms=1.0, p80_ms=2.0, gbps=1.0)
    assert ("`fadam-cpu` paired by CPU placement (`bench/placement.py`): same-l3 1.50x (3 rounds), "
            "cross-l3 - (1 rounds).") in report.markdown(meta, results, summ)


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


def test_rows_have_the_issue_names_and_gpu_rows_say_why_not():
    assert rows.ROW_NAMES == ("fadam-cpu", "fadam-reference", "fadam-triton", "fadam-cuda",
                              "torch-adam-fused", "torch-adam-foreach", "torch-adam-forloop",
                              "pytorch_optimizer-fadam")
    by = {r.name: r for r in rows.all_rows()}
    for name in ("fadam-triton", "fadam-cuda"):
        reason = by[name].unavailable(torch.device("cpu"))
        assert reason and "GPU" in reason


def test_plan_rounds_gives_slow_rows_fewer_rounds():
    plan = step_bench.plan_rounds({"fast": 0.01, "slow": 5.0}, budget=20.0, rounds=9)
    assert len(plan["fast"][0]) == 9 and plan["fast"][1] > 0
    assert len(plan["slow"][0]) == step_bench.MIN_ROUNDS and plan["slow"][1] == 0.0
    assert plan["slow"][0] <= set(range(9))


def test_cli_on_tiny_workload_writes_csv_json_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # requirements-bench.txt
    wanted = ["torch-adam-fused", "torch-adam-foreach", "fadam-cpu", "fadam-cuda"]
    csv_path, json_path, png = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.png"
    step_bench.main(["--device", "cpu", "--quick", "--workloads", "tiny", "--rows", ",".join(wanted),
                     "--budget-scale", "0.02", "--no-progress", "--csv", str(csv_path),
                     "--json", str(json_path), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "torch-adam-fused" in out and "x adam-fused" in out

    data = json.loads(json_path.read_text())
    meta = data["meta"]
    for key in ("device", "device_name", "threads", "torch", "triton", "python", "date", "cpu_model"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["threads"] == torch.get_num_threads()
    res = {r["row"]: r for r in data["results"]}
    assert list(res) == [n for n in rows.ROW_NAMES if n in wanted]  # issue order, none dropped

    w = workloads.tiny_workload()
    assert res["fadam-cuda"]["status"] == "unavailable" and "GPU" in res["fadam-cuda"]["reason"]
    timed = [r for r in res.values() if r["status"] == "ok"]
    assert {"torch-adam-fused", "torch-adam-foreach"} <= {r["row"] for r in timed}
    for r in timed:
        assert r["n_params"] == w.n_params and r["n_tensors"] == w.n_tensors
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["n_samples"] >= step_bench.MIN_ROUNDS
        family = "adam" if r["row"].startswith("torch-adam") else "fadam"
        chunk = next(row for row in rows.all_rows() if row.name == r["row"]).chunk_size()
        assert r["bytes_per_param"] == pytest.approx(
            traffic.bytes_per_param(family, w.numels, F32, chunk_size=chunk))
        assert r["gbps"] == pytest.approx(r["model_bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["read_bytes_per_param"] == pytest.approx(
            traffic.bytes_per_param(family, w.numels, F32, chunk_size=chunk, reads_only=True))
    assert res["torch-adam-fused"]["time_vs_adam_fused"] == pytest.approx(1.0)
    assert res["torch-adam-fused"]["paired_vs_adam_fused"] == pytest.approx([1.0, 1.0, 1.0])
    assert len(res["torch-adam-fused"]["round_medians_ms"]) == step_bench.BUDGETS[True]["rounds_default"]
    # The placement probe ran around every sample (bench/placement.py).
    assert "core-to-core latency" in meta["placement_probe"], meta["placement_probe"]
    for r in timed:
        assert len(r["round_placement"]) == len(r["round_medians_ms"])
        for where, ns, ms in zip(r["round_placement"], r["round_core_to_core_ns"], r["round_medians_ms"]):
            assert (ns is None) == (ms is None)  # probed exactly around the rounds it ran in
            assert where in (placement.SAME, placement.CROSS, None)
            if ns is not None and all(x is not None for x in ns):
                assert where == placement.label(*ns)
    # tiny = one 70000-element tensor (40 B) + one-chunk tensors (32 B)
    one = sum(n for n in w.numels if n <= 65536)
    assert res["torch-adam-fused"]["bytes_per_param"] == pytest.approx(28.0)
    expected = (70000 * 40 + one * 32) / w.n_params
    assert traffic.bytes_per_param("fadam", w.numels, F32) == pytest.approx(expected)

    with open(csv_path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(wanted)
    assert set(report.META_COLUMNS + report.RESULT_COLUMNS) <= set(lines[0])
    assert {line["row"] for line in lines} == set(wanted)
    assert png.stat().st_size > 1000


def test_training_example_runs_a_few_steps(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_char_lm

    png = tmp_path / "loss.png"
    train_char_lm.main(["--steps", "3", "--eval-every", "3", "--batch", "4", "--context", "32",
                        "--eval-batches", "1", "--sample-chars", "8", "--plot", str(png)])
    out = capsys.readouterr().out
    assert "adamw" in out and "fadam" in out and "final validation loss" in out
    assert png.stat().st_size > 1000
