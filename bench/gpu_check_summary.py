"""The last step of `make gpu-check`: a short summary of the GPU test run and the quick benchmark.

    python bench/gpu_check_summary.py TESTS.xml BENCH.json

TESTS.xml is pytest's --junitxml report, BENCH.json the --json output of bench/step_bench.py
(--quick --device cuda). Prints tests passed / failed / skipped, then the default workload's step
time of the cuda and triton rows of FAdam, FAdafactor and AdaFisher and of torch-adam-fused, their
ratios, bytes per parameter of traffic and of optimizer state, and one line per reason for the
other rows that did not run (pytorch_optimizer-fadam where that package is not installed).
Exits 1 when a test failed or errored (or the report is missing), so `make gpu-check` fails too.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

ROWS = ("fadam-cuda", "fadam-triton", "fadafactor-cuda", "fadafactor-triton", "adafisher-cuda",
        "adafisher-triton", "torch-adam-fused")


def test_counts(junit_path: str) -> dict[str, int]:
    """{"passed", "failed", "skipped", "total"} summed over the report's test suites."""
    root = ET.parse(junit_path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    total = failed = skipped = 0
    for s in suites:
        total += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped, "total": total}


def bench_rows(bench: dict) -> dict[str, dict]:
    """The timed rows of the default workload, by row name."""
    return {r["row"]: r for r in bench.get("results", [])
            if r.get("kind") == "default" and r.get("status") == "ok"}


def not_run(bench: dict) -> dict[str, str]:
    """The default workload's rows that did not run, by row name: why not (a package that is not
    installed, such as pytorch_optimizer on the GPU runners; a row for another device)."""
    return {r["row"]: r.get("reason") or r.get("status", "?") for r in bench.get("results", [])
            if r.get("kind") == "default" and r.get("status") != "ok"}


def summary(counts: dict[str, int] | None, bench: dict | None) -> str:
    lines = ["== gpu-check summary =="]
    if counts is None:
        lines.append("tests: no report (pytest did not run)")
    else:
        lines.append(f"tests: {counts['passed']} passed, {counts['failed']} failed, "
                     f"{counts['skipped']} skipped")
    rows = bench_rows(bench) if bench else {}
    if not rows:
        lines.append("benchmark: no timed rows (step_bench.py did not run or failed)")
        return "\n".join(lines)
    meta = bench.get("meta", {})
    workload = next(iter(rows.values())).get("workload", "default")
    lines.append(f"benchmark: {meta.get('device_name', meta.get('device', '?'))}, workload "
                 f"{workload}, {next(iter(rows.values())).get('dtype', '?')}, median step time")
    adam = rows.get("torch-adam-fused")
    cuda = rows.get("fadam-cuda")
    skipped = not_run(bench)
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            why = skipped.get(name)
            lines.append(f"  {name:<17} not run" + (f": {why}" if why else ""))
            continue
        vs_adam = f"{r['median_ms'] / adam['median_ms']:.2f}x torch-adam-fused" if adam else "-"
        state = r.get("state_bytes_per_param")
        state = f", state {state:4.2f} B/param" if state is not None else ""
        lines.append(f"  {name:<17} {r['median_ms']:9.3f} ms  {vs_adam:<24} "
                     f"{r['bytes_per_param']:5.1f} B/param{state}")
    if cuda and rows.get("fadam-triton"):
        lines.append(f"  ratio fadam-triton / fadam-cuda: "
                     f"{rows['fadam-triton']['median_ms'] / cuda['median_ms']:.2f}x")
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        if name not in ROWS:
            by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        lines.append(f"  skipped {', '.join(names)}: {why}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    junit_path, bench_path = argv
    try:
        counts = test_counts(junit_path)
    except (OSError, ET.ParseError):
        counts = None
    try:
        with open(bench_path) as f:
            bench = json.load(f)
    except (OSError, json.JSONDecodeError):
        bench = None
    print(summary(counts, bench))
    ok = counts is not None and counts["failed"] == 0 and bench is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
