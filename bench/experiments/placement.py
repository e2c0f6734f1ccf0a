"""The step benchmark with the CPU placement probed around every sample (CPU runs only).

    .venv/bin/python -m bench.experiments.placement --workloads default --rows fadam-cpu,torch-adam-fused

On a cloud VM the host may move the vCPUs between cores that share an L3 and cores that do not,
and a CPU step's time depends on which (bench/NOTES.md, "Where the host puts the two CPUs").
core_to_core.c measures the one-way latency of a cache line between the first two CPUs; this
runs bench/step_bench.py (same flags) with that probe before each round and after each sample,
labels each sample `same-l3` or `cross-l3`, and adds to the summary each fused row's paired
ratio to torch-adam-fused per placement, counting a round only where both rows ran in one
placement throughout. The JSON gets `round_placement` per row and `paired_by_placement` per
summary entry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python bench/experiments/placement.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import rows as rows_mod, step_bench  # noqa: E402
from bench.experiments import cbuild  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_to_core.c")
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")

# One-way latencies up to this are cores that share an L3: 20-40 ns within a Zen CCX, 40-70 ns on
# an Intel mesh; between Zen CCDs or sockets it is 80-300 ns.
SAME_L3_MAX_NS = 80.0
SAME, CROSS = "same-l3", "cross-l3"


def build(out_dir: str) -> tuple[str | None, str]:
    return cbuild.build(SOURCE, out_dir, ("-O2", "-pthread"))


def prober(exe: str, round_trips: int = 20000) -> step_bench.Probe:
    """A function that measures the latency now (5 ms of pause, then 1-7 ms), or returns None if
    the probe fails (fewer than two CPUs, no permission to pin threads)."""
    def probe() -> float | None:
        # The benchmarked step's OpenMP threads spin for a while after each parallel region and
        # share the probe's CPUs: a timing started at once read ~130 ns in 1 of 8 tries against
        # 25-30 ns after a 2 ms pause. The probe also reports the fastest of 4 timings.
        time.sleep(0.005)
        try:
            done = subprocess.run([exe, str(round_trips)], capture_output=True, text=True, timeout=5)
            return float(done.stdout) if done.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None
    return probe


def label(before: float | None, after: float | None) -> str | None:
    """The placement a sample ran in, or None when unknown or it changed during the sample."""
    if before is None or after is None:
        return None
    near = (before <= SAME_L3_MAX_NS, after <= SAME_L3_MAX_NS)
    if near[0] != near[1]:
        return None
    return SAME if near[0] else CROSS


def paired_by_placement(res: dict[str, Any], base: dict[str, Any], min_rounds: int) -> dict[str, Any]:
    """{placement: {"rounds": n, "paired": [p20, median, p80] or None}}: the per-round ratio
    res / base over the rounds in which both rows' samples ran in that placement."""
    out: dict[str, Any] = {}
    rounds = list(zip(res.get("round_medians_ms", []), base.get("round_medians_ms", []),
                      res.get("round_placement", []), base.get("round_placement", [])))
    for where in (SAME, CROSS):
        pairs = [a / b for a, b, pa, pb in rounds if a is not None and b and pa == pb == where]
        out[where] = {"rounds": len(pairs),
                      "paired": [float(x) for x in np.percentile(pairs, [20, 50, 80])]
                      if len(pairs) >= min_rounds else None}
    return out


def placement_text(by_place: dict[str, Any]) -> str:
    """"same-l3 1.58x (15 rounds), cross-l3 - (2 rounds)": the paired median per placement."""
    parts = []
    for where, v in by_place.items():
        ratio = f"{v['paired'][1]:.2f}x" if v["paired"] else "-"
        parts.append(f"{where} {ratio} ({v['rounds']} rounds)")
    return ", ".join(parts)


def add_placement(results: list[dict[str, Any]], summ: dict[str, Any]) -> list[str]:
    """Labels every row's rounds (`round_placement`), adds `paired_by_placement` to each summary
    entry, and returns one line of text per entry."""
    for r in results:
        if "round_probe" in r:
            r["round_placement"] = [label(*ns) if ns else None for ns in r["round_probe"]]
    by = {(r["workload"], r["row"]): r for r in results}
    lines = []
    for name, entry in summ.items():
        mine, base = by.get((entry["workload"], name)), by.get((entry["workload"], rows_mod.BASELINE))
        if mine and base and "round_placement" in mine and "round_placement" in base:
            entry["paired_by_placement"] = paired_by_placement(mine, base, step_bench.MIN_ROUNDS)
            lines.append(f"{name} on {entry['workload']}, paired by CPU placement: "
                         f"{placement_text(entry['paired_by_placement'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = step_bench.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("the placement probe is for CPU runs (--device cpu)")
    out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else RESULTS
    exe, why = build(out_dir)
    if exe is None:
        raise SystemExit(f"cannot build {SOURCE}: {why}")
    meta, results, summ = step_bench.run(args, probe=prober(exe))
    meta["placement_probe"] = (f"{exe}: one-way core-to-core latency around each sample, "
                               f"same L3 if <= {SAME_L3_MAX_NS:.0f} ns")
    lines = add_placement(results, summ)
    step_bench.write_outputs(args, meta, results, summ)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
