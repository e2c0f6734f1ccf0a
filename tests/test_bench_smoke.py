"""Smoke test of the benchmark machinery and the training example (fast; no timing assertions).

Runs bench/step_bench.py on its tiny workload with a couple of rows, and checks the CSV / JSON
fields and the bytes-per-param traffic model (docs/design.md section 4). The figures themselves
come from `make bench`, not from here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import report, rows, step_bench, traffic, workloads  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def test_traffic_model_per_element():
    # Adam 28 B/param in float32; exact FAdam 40 B for multi-chunk tensors; one-chunk tensors 28 B
    # plus our phase-A re-read of g for the non-finite check = 32 B (docs/design.md section 4).
    assert traffic.adam_bytes_per_element(F32) == 28
    assert traffic.fadam_bytes_per_element(65537, F32) == 40
    assert traffic.fadam_bytes_per_element(65536, F32) == 32
    assert traffic.fadam_bytes_per_element(1, F32) == 32
    # bf16 / fp16 params and grads are 2 bytes; torch's Adam keeps its state in the param dtype,
    # FAdam keeps float32 state (docs/design.md section 5).
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


def test_traffic_model_with_clipping_off():
    # clip=None or 0: no RMS, so phase A reads only g (the non-finite check) and every tensor,
    # multi-chunk or not, costs 32 B in float32 (reads g, g, f, m, theta = 20 B).
    off = dict(clipping=False)
    for numel in (1, 65536, 65537, 1 << 24):
        assert traffic.fadam_bytes_per_element(numel, F32, **off) == 32
        assert traffic.fadam_bytes_per_element(numel, F32, reads_only=True, **off) == 20
    assert traffic.fadam_bytes_per_element(10**6, BF16, **off) == 2 * 2 + 4 * 4 + 2 * 2  # 24
    numels = [70000, 4096, 0]
    assert traffic.model_bytes("fadam", numels, F32, **off) == (70000 + 4096) * 32
    assert traffic.bytes_per_param("fadam", numels, F32, **off) == pytest.approx(32.0)
    # The default CPU list: 34 B with clipping (the 16M embedding is two-pass), 32 B without.
    w = workloads.llm_workload(workloads.CPU_DEFAULT_PARAMS, workloads.CPU_DEFAULT_D_MODEL)
    assert traffic.bytes_per_param("fadam", w.numels, F32, chunk_size=1 << 20, **off) == 32.0
    # A row carries its clip into the model: the -noclip twin of fadam-cpu, and --clip none.
    by = {r.name: r for r in rows.all_rows()}
    assert by["fadam-cpu"].clipping and not by["fadam-cpu-noclip"].clipping
    assert by["fadam-cpu-noclip"].twin == "fadam-cpu" and by["fadam-cpu-noclip"].clip is None
    big = [1 << 21]  # two CPU chunks
    assert by["fadam-cpu"].bytes_per_param(big, F32) == 40.0
    assert by["fadam-cpu-noclip"].bytes_per_param(big, F32) == 32.0
    assert by["torch-adam-fused"].bytes_per_param(big, F32) == 28.0
    off_rows = {r.name: r for r in rows.all_rows(clip=None)}
    assert off_rows["fadam-cpu"].bytes_per_param(big, F32) == 32.0
    assert off_rows["pytorch_optimizer-fadam"].clip == 1.0  # it cannot turn clipping off


def test_traffic_model_of_fadafactor():
    # A factored tensor (2+ dims) never reads or writes f: phase S reads g (4), phase A g and theta
    # (8), phase B reads g, m, theta and writes m, theta (20) = 32 B multi-chunk with clipping
    # (docs/design.md section 8); one-chunk (phase A fused into B) or clipping off, 24 B.
    per = traffic.fadafactor_bytes_per_element
    assert per(65537, F32) == 32 and per(65536, F32) == 24 and per(1, F32) == 24
    assert per(65537, F32, clipping=False) == 24
    assert per(65537, F32, reads_only=True) == 24  # g; g, theta; g, m, theta
    assert per(65536, F32, reads_only=True) == 16 and per(1 << 24, F32, reads_only=True,
                                                            clipping=False) == 16
    # bf16 params and grads, float32 momentum: 3 x 2 + 2 x 4 + 3 x 2 = 20, or 2 x (2 + 4 + 2) = 16.
    assert per(10**6, BF16) == 20 and per(100, F16) == 16
    assert per(5000, F32, chunk_size=4096) == 32
    # By shape: 2+ dims are factored, fewer dims (an int is a 1-D numel) cost FAdam's figure, and
    # the same shapes cost FAdam and Adam what they cost as numels.
    shapes = [(280, 250), (70000,), 70000, (300,), (7, 11, 13), (0, 5)]
    assert traffic.model_bytes("fadafactor", shapes, F32) == \
        70000 * 32 + 2 * 70000 * 40 + 300 * 32 + 1001 * 24
    assert traffic.model_bytes("fadam", shapes, F32) == 3 * 70000 * 40 + (300 + 1001) * 32
    assert traffic.model_bytes("adam", shapes, F32) == (3 * 70000 + 300 + 1001) * 28
    assert traffic.bytes_per_param("fadafactor", shapes, F32, clipping=False) == pytest.approx(
        (70000 * 24 + (2 * 70000 + 300) * 32 + 1001 * 24) / (3 * 70000 + 1301))
    with pytest.raises(ValueError, match="unknown traffic family"):
        traffic.model_bytes("adafactor", shapes, F32)
    # The LLM-shaped CPU default: 99.98% of it in matrices. GPU chunks (65536) make every matrix
    # multi-chunk: 32 B against FAdam's 40; the CPU's 2^20 only the 16.4M embedding (a quarter of
    # the list): 24 + 8 x 0.256 = 26.0 B against FAdam's 34; clipping off 24 B against 32.
    w = workloads.llm_workload(workloads.CPU_DEFAULT_PARAMS, workloads.CPU_DEFAULT_D_MODEL)
    assert traffic.bytes_per_param("fadafactor", w.shapes, F32) == pytest.approx(32.0, abs=1e-3)
    cpu = dict(chunk_size=1 << 20)
    assert traffic.bytes_per_param("fadafactor", w.shapes, F32, **cpu) == \
        pytest.approx(26.05, abs=0.01)
    assert traffic.bytes_per_param("fadafactor", w.shapes, F32, clipping=False, **cpu) == \
        pytest.approx(24.0, abs=0.01)
    assert traffic.bytes_per_param("fadafactor", w.shapes, F32, reads_only=True, **cpu) == \
        pytest.approx(18.05, abs=0.01)
    # A row carries family, chunk size and clip: fadafactor-cpu on one 2-CPU-chunk matrix.
    by = {r.name: r for r in rows.all_rows()}
    assert by["fadafactor-cpu"].family == "fadafactor" and by["fadafactor-cpu"].clipping
    assert by["fadafactor-cpu"].bytes_per_param([(2048, 1024)], F32) == 32.0
    assert by["fadafactor-cpu"].bytes_per_param([(1 << 21,)], F32) == 40.0  # 1-D: FAdam's
    assert {r.name: r for r in rows.all_rows(clip=None)}["fadafactor-cpu"].bytes_per_param(
        [(2048, 1024)], F32) == 24.0


def test_traffic_model_of_adafisher():
    # The update reads g, m, theta and writes m, theta (20 B in float32; F comes from two small
    # factor vectors); the non-finite check reads g once more unless a GradScaler checked: 24 B.
    per = traffic.adafisher_bytes_per_element
    assert per(F32) == 24 and per(F32, checked=True) == 20
    assert per(F32, reads_only=True) == 16 and per(F32, reads_only=True, checked=True) == 12
    assert per(BF16) == 2 * 2 + 2 * 4 + 2 * 2 == 16  # float32 momentum, bf16 params and grads
    assert per(BF16, checked=True) == 14
    # Every tensor alike, whatever its rank or size (no chunk-size or clip dependence).
    shapes = [(280, 250), (70000,), (300,), (7, 11, 13), (0, 5)]
    n = 70000 * 2 + 300 + 1001
    for kw in ({}, dict(chunk_size=4096), dict(clipping=False)):
        assert traffic.model_bytes("adafisher", shapes, F32, **kw) == 24 * n
        assert traffic.model_bytes("adafisher", shapes, F32, reads_only=True, **kw) == 16 * n
    w = workloads.llm_workload(workloads.CPU_DEFAULT_PARAMS, workloads.CPU_DEFAULT_D_MODEL)
    by = {r.name: r for r in rows.all_rows()}
    for backend in rows.BACKENDS:
        row = by[f"adafisher-{backend}"]
        assert row.family == "adafisher" and row.backend == backend and row.clip is None
        assert row.bytes_per_param(list(w.shapes), F32) == 24.0
        assert row.bytes_per_param(list(w.shapes), F32, reads_only=True) == 16.0
        assert step_bench.state_bytes(row, F32) == 4


def test_adafisher_rows_time_the_update_alone():
    """The row's optimizer: Linear layers for matrices, LayerNorm for vectors, other ranks bare;
    factors measured by one forward/backward at build time (no p.grad written), folded by the
    first step and never again; each step is the update with F = S H^T + damping from them
    (F = 1 for a bare parameter)."""
    from fadam_fused import AdaFisher
    w = workloads.tiny_workload()
    cpu = torch.device("cpu")
    params = [torch.nn.Parameter(p) for p in step_bench.make_params(w, cpu, F32, 0)]
    grads = step_bench.make_grads(w, cpu, F32, 0)
    for p, g in zip(params, grads):
        p.grad = g
    grads_before = [g.clone() for g in grads]
    before = [p.detach().clone() for p in params]
    row = {r.name: r for r in rows.all_rows()}["adafisher-reference"]
    opt = row.make(params)
    assert type(opt) is AdaFisher and opt.update_interval == rows.ADAFISHER_UPDATE_INTERVAL
    assert opt.defaults["lr"] == rows.LR and opt.defaults["beta"] == rows.BETAS[0]
    assert opt.defaults["weight_decay"] == rows.FADAM_WEIGHT_DECAY
    assert opt.defaults["backend"] == "reference"
    assert all(p.grad is g and torch.equal(g, b) for p, g, b in zip(params, grads, grads_before))
    opt.step()
    state = opt.state_dict()["state"]
    # (280, 250) and (64, 64) Linear, (300,) and (1,) LayerNorm; (7, 11, 13) in no layer.
    assert [state[i].get("fisher_layer") for i in range(5)] == ["0", "1", "2", None, "3"]
    factors = {i: (state[i]["fisher_in"].clone(), state[i]["fisher_out"].clone())
               for i in (0, 1, 2, 4)}
    assert [tuple(h.shape) + tuple(s.shape) for h, s in factors.values()] == \
        [(250, 280), (64, 64), (2, 300), (2, 1)]
    # One fold of a real measurement: 0.08 * 1 + 0.008 * minmax(new), so the smallest entry
    # of a factor of 2+ entries is 0.08 and the largest 0.008 range / (range + 1e-6) below
    # 0.088 (the smallest range here, a factor's of ~7e-3, puts it 1.1e-6 below).
    for h, s in factors.values():
        for f in (h, s) if s.numel() > 1 else (h,):
            assert f.min().item() == pytest.approx(0.08, abs=1e-7)
            assert f.max().item() == pytest.approx(0.088, abs=1e-5)
    # Step 1 (t = 1): m = (1 - beta) (g + wd theta), theta -= lr / (1 - beta) m / F.
    beta, wd, damping = rows.BETAS[0], rows.FADAM_WEIGHT_DECAY, opt.defaults["damping"]
    fims = {0: torch.outer(factors[0][1], factors[0][0]) + damping,
            1: torch.outer(factors[1][1], factors[1][0]) + damping,
            2: factors[2][1] * factors[2][0][0] + damping,
            3: torch.ones(()),
            4: factors[4][1] * factors[4][0][0] + damping}
    for i, (p, theta, g) in enumerate(zip(params, before, grads)):
        m = (1 - beta) * (g.double() + wd * theta.double())
        want = theta.double() - rows.LR / (1 - beta) * m / fims[i].double()
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
    for _ in range(3):
        opt.step()
    later = opt.state_dict()["state"]
    for i, (h, s) in factors.items():  # no factor update in the timed steps
        assert torch.equal(later[i]["fisher_in"], h) and torch.equal(later[i]["fisher_out"], s)
    # The factors count in the state column: 4 B/param of momentum, 4 B per step counter and
    # per factor entry.
    entries = sum(h.numel() + s.numel() for h, s in factors.values())
    assert step_bench.measured_state_bytes(opt) == 4 * (w.n_params + w.n_tensors + entries)


def test_adafisher_rows_without_kernels_are_not_run_and_say_why():
    from fadam_fused import backends
    by = {r.name: r for r in rows.all_rows()}
    cpu = torch.device("cpu")
    reason = by["adafisher-cpu"].unavailable(cpu)
    if backends.adafisher_available("cpu"):
        assert reason is None
    else:
        assert reason == ("this build has no AdaFisher kernels for 'cpu' "
                          "(fadam_fused.backends.adafisher_available)")
    assert by["adafisher-reference"].unavailable(cpu) is None
    for name in ("adafisher-triton", "adafisher-cuda"):
        assert by[name].unavailable(cpu).startswith("GPU-only row; this run is on cpu")


def test_clip_flag_parses_none_and_zero_as_off():
    assert step_bench.parse_args([]).clip == 1.0
    for off in ("none", "None", "off", "0", "0.0"):
        assert step_bench.parse_args(["--clip", off]).clip is None
    assert step_bench.parse_args(["--clip", "0.5"]).clip == 0.5
    for bad in ("-1", "inf", "nan", "x"):
        with pytest.raises(SystemExit):
            step_bench.parse_args(["--clip", bad])


def test_threads_and_budget_scale_are_refused_unless_positive(capsys):
    assert step_bench.parse_args(["--threads", "3", "--budget-scale", "0.5"]).threads == 3
    for bad in (["--threads", "0"], ["--threads", "-2"], ["--threads", "1.5"],
                ["--budget-scale", "0"], ["--budget-scale", "-1"], ["--budget-scale", "inf"],
                ["--budget-scale", "nan"]):
        with pytest.raises(SystemExit):
            step_bench.parse_args(bad)
        err = capsys.readouterr().err
        assert f"argument {bad[0]}:" in err and (">= 1" in err or "> 0" in err or
                                                 "not a whole number" in err), (bad, err)


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


def test_rows_have_their_names_and_gpu_rows_say_why_not():
    assert rows.ROW_NAMES == ("fadam-cpu", "fadam-reference", "fadam-triton", "fadam-cuda",
                              "fadafactor-cpu", "fadafactor-triton", "fadafactor-cuda",
                              "adafisher-cpu", "adafisher-triton", "adafisher-cuda",
                              "torch-adam-fused", "torch-adam-foreach",
                              "torch-adam-forloop", "pytorch_optimizer-fadam")
    assert rows.ALL_ROW_NAMES == ("fadam-cpu", "fadam-cpu-noclip", "fadam-reference",
                                  "fadam-triton", "fadam-triton-noclip", "fadam-cuda",
                                  "fadam-cuda-noclip", "fadafactor-cpu", "fadafactor-reference",
                                  "fadafactor-triton", "fadafactor-cuda", "adafisher-cpu",
                                  "adafisher-reference", "adafisher-triton", "adafisher-cuda",
                                  "torch-adam-fused", "torch-adam-foreach", "torch-adam-forloop",
                                  "pytorch_optimizer-fadam")
    # -noclip rows, fadafactor-reference and adafisher-reference (unfused, slow) opt in
    assert [r.name for r in rows.select(None)] == list(rows.ROW_NAMES)
    assert [r.name for r in rows.select(["fadafactor-cuda", "fadafactor-triton"])] == \
        ["fadafactor-triton", "fadafactor-cuda"]
    by = {r.name: r for r in rows.all_rows()}
    cpu = torch.device("cpu")
    for name in ("fadam-triton", "fadam-cuda", "fadam-cuda-noclip", "fadafactor-triton",
                 "fadafactor-cuda", "adafisher-triton", "adafisher-cuda"):
        reason = by[name].unavailable(cpu)
        assert reason and reason.startswith("GPU-only row; this run is on cpu"), (name, reason)
    for name in ("fadam-cpu", "fadafactor-cpu", "fadafactor-reference", "adafisher-reference"):
        assert by[name].unavailable(cpu) is None, name


def test_fadafactor_rows_build_fadafactor_with_the_fadam_rows_hyperparameters():
    from fadam_fused import FAdafactor, FAdam
    by = {r.name: r for r in rows.all_rows(clip=0.5)}
    params = [torch.nn.Parameter(torch.zeros(3, 4))]
    for backend in rows.BACKENDS:
        fadafactor = by[f"fadafactor-{backend}"].make(params)
        fadam = by[f"fadam-{backend}"].make(params)
        assert type(fadafactor) is FAdafactor and type(fadam) is FAdam
        assert fadafactor.defaults == fadam.defaults
        assert fadafactor.defaults["backend"] == backend and fadafactor.defaults["clip"] == 0.5
        assert fadafactor.defaults["weight_decay"] == rows.FADAM_WEIGHT_DECAY
        assert by[f"fadafactor-{backend}"].clip == 0.5


def test_small_workload_is_4096_tensors_of_256():
    w = workloads.small_workload()
    assert w.kind == "small" and w.n_tensors == 4096 and set(w.numels) == {256}
    args = step_bench.parse_args(["--workloads", "small", "--device", "cpu"])
    assert [x.name for x in step_bench.build_workloads(args, torch.device("cpu"), [])] == [w.name]
    assert [x.n_tensors for x in workloads.count_sweep([1, 4096])] == [1, 4096]
    assert workloads.count_sweep([4096])[0].numels[0] == 1024


def _timed(name, medians, **more):
    """A timed row's result: its round medians and their median, and `more` fields."""
    return dict(row=name, median_ms=float(np.median(medians)), round_medians_ms=medians, **more)


def _with_ratios(*results):
    """The rows `results` by name, with step_bench's ratios added: (by name, the chosen rows)."""
    by_name = {r["row"]: r for r in results}
    chosen = rows.select(by_name)
    step_bench.add_ratios(by_name, chosen)
    return by_name, chosen


def test_clip_off_rows_are_paired_with_their_clip_on_twin():
    results, chosen = _with_ratios(_timed("fadam-cpu", [10.0, 12.0, 20.0], clip=1.0),
                                   _timed("fadam-cpu-noclip", [8.0, 9.0, 16.0], clip=None),
                                   _timed("torch-adam-fused", [5.0, 6.0, 10.0], clip=None))
    off = results["fadam-cpu-noclip"]
    assert off["time_vs_clip_on"] == pytest.approx(9.0 / 12.0)
    assert off["paired_vs_clip_on"][1] == pytest.approx(0.8)  # rounds: 0.8, 0.75, 0.8
    assert off["paired_vs_adam_fused"][1] == pytest.approx(1.6)
    assert "time_vs_clip_on" not in results["fadam-cpu"]
    # With --clip none the twin is clip-off too: no clip-off / clip-on ratio to give.
    results["fadam-cpu"]["clip"] = None
    del off["time_vs_clip_on"], off["paired_vs_clip_on"]
    step_bench.add_ratios(results, chosen)
    assert "time_vs_clip_on" not in off


def test_fadafactor_rows_are_paired_with_the_fadam_row_of_their_backend():
    def timed(name, medians, reads):
        return _timed(name, medians, workload="llm", clip=1.0, read_bytes_per_param=reads)
    results, _ = _with_ratios(timed("fadam-cpu", [10.0, 12.0, 20.0], 22.0),
                              timed("fadafactor-cpu", [8.0, 12.0, 14.0], 18.0),
                              timed("torch-adam-fused", [5.0, 6.0, 10.0], 16.0))
    mine = results["fadafactor-cpu"]
    assert mine["time_vs_fadam"] == pytest.approx(12.0 / 12.0)
    assert mine["paired_vs_fadam"][1] == pytest.approx(0.8)  # rounds: 0.8, 1.0, 0.7
    assert mine["paired_vs_adam_fused"][1] == pytest.approx(1.6)
    assert "time_vs_fadam" not in results["fadam-cpu"]
    line = report.fadam_lines(list(results.values()))
    assert line == ["fadafactor on llm: fadafactor-cpu takes 1.00x fadam-cpu's time, per-round "
                    "paired 0.80x [p20 0.74, p80 0.92] (read bytes/param 18.0 against 22.0: 0.82x)"]
    # Without its FAdam row in the run there is nothing to pair it with.
    alone = {k: v for k, v in results.items() if k != "fadam-cpu"}
    del mine["time_vs_fadam"], mine["paired_vs_fadam"]
    step_bench.add_ratios(alone, rows.select(alone))
    assert "time_vs_fadam" not in mine


def test_plan_rounds_gives_slow_rows_fewer_rounds():
    plan = step_bench.plan_rounds({"fast": 0.01, "slow": 5.0}, budget=20.0, rounds=9)
    assert len(plan["fast"][0]) == 9 and plan["fast"][1] > 0
    assert len(plan["slow"][0]) == step_bench.MIN_ROUNDS and plan["slow"][1] == 0.0
    assert plan["slow"][0] <= set(range(9))


@pytest.mark.parametrize("rounds", [3, 4, 10, 24])
def test_plan_rounds_lets_rows_of_any_speeds_share_their_rounds(rounds):
    # A clip-off row slightly faster than its clip-on twin may take one round more; the paired
    # ratio needs MIN_ROUNDS rounds the two have in common, whatever their counts.
    step = 1.0
    plans = [step_bench.plan_rounds({"a": step / ka, "b": step / kb}, budget=2 * step, rounds=rounds)
             for ka in range(1, rounds + 1) for kb in range(1, rounds + 1)]
    for plan in plans:
        a, b = plan["a"][0], plan["b"][0]
        assert len(a & b) == min(len(a), len(b)) >= min(rounds, step_bench.MIN_ROUNDS)
    # and the rounds stay spread over the run: the first three are its start, end and middle
    assert sorted(step_bench.spread_order(rounds)[:3]) == [0, (rounds - 1) // 2, rounds - 1]


def _tiny_cli(tmp_path, capsys, wanted, more=()):
    """step_bench's command line on the tiny workload at 2 % of the time budget, rows `wanted`,
    writing r.csv and r.json in tmp_path: (stdout, the CSV's path, the JSON report)."""
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    step_bench.main(["--device", "cpu", "--quick", "--workloads", "tiny", "--rows", ",".join(wanted),
                     "--budget-scale", "0.02", "--no-progress", "--csv", str(csv_path),
                     "--json", str(json_path), *more])
    return capsys.readouterr().out, csv_path, json.loads(json_path.read_text())


def test_cli_on_tiny_workload_writes_csv_json_plot(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401  (requirements-bench.txt; without it, no plot to check)
        plot = True
    except ImportError:
        plot = False
    wanted = ["torch-adam-fused", "torch-adam-foreach", "fadam-cpu", "fadam-cpu-noclip", "fadam-cuda"]
    png = tmp_path / "r.png"
    out, csv_path, data = _tiny_cli(tmp_path, capsys, wanted,
                                    ["--plot", str(png)] if plot else [])
    assert "torch-adam-fused" in out and "x adam-fused" in out
    assert "clip off on tiny: fadam-cpu-noclip takes" in out

    meta = data["meta"]
    for key in ("device", "device_name", "threads", "torch", "triton", "python", "date", "cpu_model"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["threads"] == torch.get_num_threads()
    res = {r["row"]: r for r in data["results"]}
    assert list(res) == [n for n in rows.ALL_ROW_NAMES if n in wanted]  # table order, none dropped

    w = workloads.tiny_workload()
    assert res["fadam-cuda"]["status"] == "unavailable" and "GPU" in res["fadam-cuda"]["reason"]
    timed = [r for r in res.values() if r["status"] == "ok"]
    assert {"torch-adam-fused", "torch-adam-foreach", "fadam-cpu", "fadam-cpu-noclip"} <= \
        {r["row"] for r in timed}, {r["row"]: r["reason"] for r in res.values()}
    for r in timed:
        assert r["n_params"] == w.n_params and r["n_tensors"] == w.n_tensors
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["n_samples"] >= step_bench.MIN_ROUNDS
        family = "adam" if r["row"].startswith("torch-adam") else "fadam"
        chunk = next(row for row in rows.all_rows() if row.name == r["row"]).chunk_size()
        clipping = r["row"] != "fadam-cpu-noclip"
        assert r["clip"] == (None if family == "adam" or not clipping else 1.0)
        # Adam and FAdam see numels only: the 280 x 250 matrix is 70000 elements to them.
        assert r["bytes_per_param"] == pytest.approx(
            traffic.bytes_per_param(family, w.numels, F32, chunk_size=chunk, clipping=clipping))
        assert r["gbps"] == pytest.approx(r["model_bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["read_bytes_per_param"] == pytest.approx(traffic.bytes_per_param(
            family, w.numels, F32, chunk_size=chunk, reads_only=True, clipping=clipping))
    assert res["torch-adam-fused"]["time_vs_adam_fused"] == pytest.approx(1.0)
    assert res["torch-adam-fused"]["paired_vs_adam_fused"] == pytest.approx([1.0, 1.0, 1.0])
    assert len(res["torch-adam-fused"]["round_medians_ms"]) == step_bench.BUDGETS[True]["default"][1]
    noclip, clip = res["fadam-cpu-noclip"], res["fadam-cpu"]
    assert noclip["time_vs_clip_on"] == pytest.approx(noclip["median_ms"] / clip["median_ms"])
    assert len(noclip["paired_vs_clip_on"]) == 3
    assert noclip["bytes_per_param"] == 32.0  # every tensor, clip off
    # tiny = one 70000-element tensor (40 B with GPU chunks) + one-chunk tensors (32 B)
    one = sum(n for n in w.numels if n <= 65536)
    assert res["torch-adam-fused"]["bytes_per_param"] == pytest.approx(28.0)
    expected = (70000 * 40 + one * 32) / w.n_params
    assert traffic.bytes_per_param("fadam", w.numels, F32) == pytest.approx(expected)

    with open(csv_path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(wanted)
    assert set(report.META_COLUMNS + report.RESULT_COLUMNS) <= set(lines[0])
    assert {line["row"] for line in lines} == set(wanted)
    assert {line["clip"] for line in lines if line["row"].startswith("fadam-cpu")} == {"1.0", ""}
    md = report.markdown(data["meta"], data["results"])
    assert "| fadam-cpu-noclip |" in md and "- clip off on tiny: fadam-cpu-noclip takes" in md
    if plot:
        assert png.stat().st_size > 1000


def _state_bytes(shapes, factored):
    """Optimizer state per parameter from the shapes: 8 B (two float32 tensors) per element, or
    for a factored (2+ dims) tensor 4 B per element plus float32 R and C per matrix; the 0-dim
    step tensors left out (the callers allow for them)."""
    total = 0
    for s in shapes:
        n = math.prod(s)
        if factored and len(s) >= 2:
            total += 4 * n + 4 * (n // (s[-2] * s[-1])) * (s[-2] + s[-1])
        else:
            total += 8 * n
    return total / sum(math.prod(s) for s in shapes)


def test_cli_writes_the_measured_state_bytes_per_param(tmp_path, capsys):
    wanted = ["fadam-cpu", "fadafactor-cpu", "torch-adam-fused", "fadafactor-cuda"]
    out, csv_path, data = _tiny_cli(tmp_path, capsys, wanted)
    w = workloads.tiny_workload()
    res = {r["row"]: r for r in data["results"]}
    assert [r for r in res if res[r]["status"] == "ok"] == wanted[:3], res
    assert "GPU-only" in res["fadafactor-cuda"]["reason"]
    assert "state_bytes_per_param" not in res["fadafactor-cuda"]  # nothing ran, nothing measured
    # A 0-dim float32 step per tensor: 4 B x 5 tensors over 75398 params = 0.00027 B/param.
    steps = 4 * w.n_tensors / w.n_params
    fadam, fadafactor, adam = (res[n]["state_bytes_per_param"] for n in wanted[:3])
    assert fadam == pytest.approx(8.0 + steps, abs=steps)
    assert adam == pytest.approx(8.0 + steps, abs=steps)
    # 75097 of the 75398 params are in matrices: 4 B each, plus R and C (530, 128 and 7 x 24
    # floats), and 8 B for the 301 in 1-D tensors: 306100 B / 75398 = 4.06.
    assert _state_bytes(w.shapes, factored=True) == pytest.approx(306100 / 75398)
    assert fadafactor == pytest.approx(_state_bytes(w.shapes, True) + steps, abs=steps)
    assert fadafactor <= 4.2 and fadafactor < fadam / 1.9
    # The FAdafactor row's traffic is its own model (the CPU's 2^20 chunks: all one-chunk).
    assert res["fadafactor-cpu"]["bytes_per_param"] == pytest.approx(
        traffic.bytes_per_param("fadafactor", w.shapes, F32, chunk_size=1 << 20))
    assert res["fadafactor-cpu"]["bytes_per_param"] == pytest.approx((75097 * 24 + 301 * 32) / 75398)
    assert res["fadafactor-cpu"]["clip"] == 1.0

    # The column in the table, the CSV and the README markdown.
    head = next(line for line in out.splitlines() if line.startswith("row "))
    assert head.rstrip().endswith("state B/param")
    line = next(line for line in out.splitlines() if line.startswith("fadafactor-cpu "))
    assert line.split()[-1] == f"{fadafactor:.2f}" == "4.06"
    with open(csv_path, newline="") as f:
        by_row = {line["row"]: line for line in csv.DictReader(f)}
    assert float(by_row["fadam-cpu"]["state_bytes_per_param"]) == pytest.approx(fadam)
    assert by_row["fadafactor-cuda"]["state_bytes_per_param"] == ""
    md = report.markdown(data["meta"], list(res.values()))
    assert "| paired | state B/param |" in md
    assert re.search(r"^\| fadafactor-cpu \|.* \| 4\.06 \|$", md, re.M), md
    assert re.search(r"^\| fadam-cpu \|.* \| 8\.00 \|$", md, re.M), md


def test_measured_state_bytes_counts_each_storage_once():
    p = torch.nn.Parameter(torch.zeros(10, 20))
    opt = torch.optim.SGD([p], lr=0.1)
    shared = torch.zeros(50)
    opt.state[p] = {"a": torch.zeros(10, 20), "b": shared, "c": shared[10:], "n": 3}
    assert step_bench.measured_state_bytes(opt) == 800 + 200


def test_training_example_runs_fadafactor_for_a_few_steps(capsys):
    # No plot, so no matplotlib needed. --optimizer is the alias of --optimizers.
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_char_lm

    train_char_lm.main(["--optimizer", "fadafactor", "--steps", "4", "--eval-every", "1",
                        "--batch", "4", "--context", "32", "--eval-batches", "1",
                        "--sample-chars", "8", "--plot", ""])
    out = capsys.readouterr().out
    got = re.findall(r"^  (\S+) +step +(\d+) +train ([\d.naif]+) +val ([\d.naif]+)$", out, re.M)
    assert [(name, int(step)) for name, step, _, _ in got] == [("fadafactor", s) for s in (1, 2, 3, 4)]
    val = [float(v) for _, _, _, v in got]
    assert all(math.isfinite(float(t)) and math.isfinite(float(v)) for _, _, t, v in got)
    # From ~5.25 nats (ln 161 = 5.08 for the 161-character vocabulary, plus the random init's
    # excess) down by 0.2 in 4 steps at lr 1e-3: assert at least 0.05, and every step down.
    assert val[-1] < val[0] - 0.05 and val == sorted(val, reverse=True), val
    assert "adamw" not in out


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


def test_cli_times_the_adafisher_rows(tmp_path, capsys):
    from fadam_fused import backends
    wanted = ["adafisher-cpu", "adafisher-reference", "adafisher-cuda", "torch-adam-fused"]
    out, _, data = _tiny_cli(tmp_path, capsys, wanted)
    w = workloads.tiny_workload()
    res = {r["row"]: r for r in data["results"]}
    cpu_kernels = backends.adafisher_available("cpu")
    ran = [n for n in ("adafisher-cpu", "adafisher-reference") if n != "adafisher-cpu" or cpu_kernels]
    assert [r for r in res if res[r]["status"] == "ok"] == ran + ["torch-adam-fused"], res
    assert res["adafisher-cuda"]["reason"].startswith("GPU-only row; this run is on cpu")
    if not cpu_kernels:  # said once, in one line, before the tables
        assert res["adafisher-cpu"]["status"] == "unavailable"
        assert "this build has no AdaFisher kernels for 'cpu'" in res["adafisher-cpu"]["reason"]
        assert out.count("this build has no AdaFisher kernels for 'cpu'") == 1, out
    # Momentum (4 B/param), a 4 B step counter per tensor, and the factors: H and S of the two
    # Linear layers (250 + 280, 64 + 64) and the two LayerNorms (2 + 300, 2 + 1).
    extra = 4 * (w.n_tensors + 250 + 280 + 64 + 64 + 2 + 300 + 2 + 1) / w.n_params
    for name in ran:
        r = res[name]
        assert r["bytes_per_param"] == 24.0 and r["read_bytes_per_param"] == 16.0
        assert r["state_bytes_per_param"] == pytest.approx(4.0 + extra, abs=1e-9)
        # (No paired ratio asserted: at --budget-scale 0.02 a loaded machine leaves the slow
        # reference row fewer than the 3 shared rounds a pairing needs.)
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    md = report.markdown(data["meta"], data["results"])
    assert re.search(r"^\| adafisher-reference \|.* \| 4\.05 \|$", md, re.M), md


def _losses(out):
    got = re.findall(r"^  (\S+) +step +(\d+) +train ([\d.naif]+) +val ([\d.naif]+)$", out, re.M)
    return got


def test_training_example_runs_adafisher_and_adafisherw(capsys):
    # AdaFisher takes the model: the example hands it the model, not its parameters.
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_char_lm

    train_char_lm.main(["--optimizer", "adafisher,adafisherw", "--steps", "4", "--eval-every", "1",
                        "--batch", "4", "--context", "32", "--eval-batches", "1",
                        "--sample-chars", "8", "--plot", ""])
    got = _losses(capsys.readouterr().out)
    assert [(n, int(s)) for n, s, _, _ in got] == \
        [(n, s) for n in ("adafisher", "adafisherw") for s in (1, 2, 3, 4)]
    for name in ("adafisher", "adafisherw"):
        train = [float(t) for n, _, t, _ in got if n == name]
        val = [float(v) for n, _, _, v in got if n == name]
        assert all(math.isfinite(x) for x in train + val), (name, train, val)
        # From ~5.3 nats to ~4.0 in 4 steps at lr 1e-3 (the first factor update makes F ~ 1e-2,
        # large steps): at least 0.3 down, and every validation loss below the one before.
        assert val[-1] < val[0] - 0.3 and val == sorted(val, reverse=True), (name, val)


def test_published_adafisher_computes_what_the_oracle_computes(monkeypatch):
    """bench/adafisher_vs_published.py's published algorithm against reference.AdaFisherReference
    (and fadam_fused.AdaFisher) in float64, and against fadam_fused.AdaFisher in float32; the
    check fails when one formula differs (min-max with a relative instead of an absolute 1e-6)."""
    pytest.importorskip("sklearn")
    from bench import adafisher_vs_published as vs
    diffs = vs.check_same_math(batch=16, steps=3)
    assert diffs["published_float64"] <= 1e-12 and diffs["ours_float64"] <= 1e-6
    assert diffs["ours_vs_published_float32"] <= 1e-5
    def relative(x, epsilon=1e-6):
        return (x - x.min()) / ((x.max() - x.min()) * (1 + epsilon))
    monkeypatch.setattr(vs, "_minmax", relative)
    with pytest.raises(AssertionError, match="published .* differs"):
        vs.check_same_math(batch=16, steps=3)


def test_published_comparison_cli_times_both(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from bench import adafisher_vs_published as vs
    path = tmp_path / "vs.json"
    assert vs.main(["--batch", "16", "--rounds", "3", "--steps", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    for name in ("published", "ours"):
        r = doc[name]
        assert r["n"] == 3 and 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert doc["ratio_of_medians"] == pytest.approx(doc["ours"]["median_ms"]
                                                    / doc["published"]["median_ms"])
    assert doc["paired_ratio"][0] <= doc["paired_ratio"][1] <= doc["paired_ratio"][2]
    assert "load average" in doc["load_start"] and "load average" in doc["load_end"]
    assert doc["backend"] in ("cpu", "reference") and doc["check"]["published_float64"] <= 1e-12
    assert "ours / published:" in out and "same math, 4 steps: float64" in out


def test_digits_example_trains_adafisher_and_adamw_and_writes_the_figure(tmp_path, capsys):
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_digits_cnn

    png = tmp_path / "digits.png"
    assert train_digits_cnn.main(["--steps", "12", "--seeds", "0", "--batch", "32",
                                  "--update-interval", "5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(png.with_suffix(".json").read_text())
    assert list(doc["optimizers"]) == ["adafisher", "adamw"] and doc["steps"] == 12
    for name, lr in (("adafisher", train_digits_cnn.LRS["adafisher"]),
                     ("adamw", train_digits_cnn.LRS["adamw"])):
        r = doc["optimizers"][name]
        acc = r["test_accuracy"][0]
        assert r["lr"] == lr and f"{name:<10} lr {lr:<8g} test accuracy {acc:6.2f}%" in out
        # 12 steps of 32 images from 10% (chance) on 360 test images: both well above chance.
        assert 30.0 < acc <= 100.0 and math.isfinite(r["final_loss"][0]), (name, r)
    assert "adafisher - adamw:" in out
    try:
        import matplotlib  # noqa: F401  (requirements-bench.txt; without it, the JSON alone)
    except ImportError:
        assert not png.exists() and "no figure: matplotlib is not installed" in out
    else:
        assert png.stat().st_size > 1000 and f"wrote {png}" in out


def test_digits_example_skips_adafisher_on_a_backend_without_its_kernels(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from fadam_fused import backends
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_digits_cnn

    assert train_digits_cnn.main(["--steps", "2", "--seeds", "0", "--backend", "cpu",
                                  "--plot", ""]) == 0
    out = capsys.readouterr().out
    skipped = "skipped adafisher: this build has no AdaFisher kernels for backend 'cpu'"
    assert (skipped in out) == (not backends.adafisher_available("cpu")), out
    assert "adamw      lr" in out
