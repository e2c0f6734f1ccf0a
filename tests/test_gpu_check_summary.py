"""bench/gpu_check_summary.py, the last step of `make gpu-check`, on a canned report and benchmark."""

import json

from bench import gpu_check_summary as gcs

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="20" time="1.0">
</testsuite></testsuites>"""


def _row(name, ms, bpp, kind="default", status="ok", state=None):
    row = dict(kind=kind, row=name, workload="llm", dtype="float32", status=status,
               median_ms=ms, bytes_per_param=bpp)
    if state is not None:
        row["state_bytes_per_param"] = state
    return row


BENCH = {"meta": {"device": "cuda", "device_name": "NVIDIA H100"},
         "results": [_row("fadam-cuda", 2.0, 40.0), _row("fadam-triton", 3.0, 40.0),
                     _row("torch-adam-fused", 1.6, 28.0), _row("fadam-cuda", 9.0, 40.0, kind="size"),
                     _row("fadafactor-cuda", 2.4, 32.0, state=4.01),
                     _row("fadam-cpu", 50.0, 40.0, status="skipped"),
                     dict(_row("pytorch_optimizer-fadam", None, 40.0, status="unavailable"),
                          reason="pytorch_optimizer is not installed (No module named 'x')"),
                     dict(_row("fadafactor-triton", None, 32.0, status="error"),
                          reason="OutOfMemoryError: CUDA out of memory")]}


def test_summary_of_canned_reports(tmp_path, capsys):
    junit, bench = tmp_path / "t.xml", tmp_path / "b.json"
    junit.write_text(JUNIT)
    bench.write_text(json.dumps(BENCH))
    assert gcs.main([str(junit), str(bench)]) == 1  # 3 failed: the make target fails
    out = capsys.readouterr().out
    assert "tests: 14 passed, 3 failed, 3 skipped" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "2.000 ms" in lines["fadam-cuda"] and "1.25x torch-adam-fused" in lines["fadam-cuda"]
    assert "40.0 B/param" in lines["fadam-cuda"]
    assert "1.88x torch-adam-fused" in lines["fadam-triton"]
    assert "1.00x" in lines["torch-adam-fused"] and "28.0 B/param" in lines["torch-adam-fused"]
    assert "ratio fadam-triton / fadam-cuda: 1.50x" in out
    assert "1.50x torch-adam-fused" in lines["fadafactor-cuda"]
    assert "32.0 B/param, state 4.01 B/param" in lines["fadafactor-cuda"]
    assert lines["fadafactor-triton"].split(None, 1)[1] == \
        "not run: OutOfMemoryError: CUDA out of memory"
    # A row outside the summary's list that did not run: one line that says why.
    skipped = [line for line in out.splitlines() if "pytorch_optimizer-fadam" in line]
    assert skipped == ["  skipped pytorch_optimizer-fadam: pytorch_optimizer is not installed "
                       "(No module named 'x')"], out


def test_summary_passes_only_with_no_failure_and_a_benchmark(tmp_path):
    junit, bench = tmp_path / "t.xml", tmp_path / "b.json"
    junit.write_text(JUNIT.replace('errors="1" failures="2"', 'errors="0" failures="0"'))
    assert gcs.main([str(junit), str(tmp_path / "missing.json")]) == 1
    bench.write_text(json.dumps(BENCH))
    assert gcs.main([str(junit), str(bench)]) == 0
    assert gcs.main([str(tmp_path / "missing.xml"), str(bench)]) == 1
