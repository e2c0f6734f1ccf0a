"""Where the host put the benchmark's CPUs, measured around every timed sample (CPU runs only).

On the 2-vCPU cloud VM this project is developed on (AMD EPYC, Zen 4), the host moves the two
vCPUs every few seconds between two placements, and the CPU figures depend on which one a sample
ran in (bench/core_to_core.c measures it: the one-way latency of a cache line between them):

- same L3, ~28 ns: both threads share one L3 and one memory path. Fused Adam on the 64M-parameter
  LLM list took ~37 ms (49 GB/s of its modelled traffic);
- across L3s, 160-300 ns: each thread has its own CCD, L3 and memory path. Fused Adam took ~24 ms
  (73 GB/s). fadam-cpu's ratio to it was 0.06-0.11 higher than in a shared L3 in in-process
  A/B runs (one `make bench` run, with 6 cross-L3 rounds, had it 0.03 lower).

One run mixes both, in proportions that change from run to run, so a ratio over all rounds is a
mixture. The bench labels each row's sample in each round by the latency measured before and
after it; a round counts for a placement when both rows of a ratio ran in it throughout.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Callable

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_to_core.c")

# One-way latencies up to this are cores that share an L3: 20-40 ns within a Zen CCX, 40-70 ns on
# an Intel mesh; between Zen CCDs or sockets it is 80-300 ns (160-300 ns measured here).
SAME_L3_MAX_NS = 80.0
SAME, CROSS = "same-l3", "cross-l3"

Probe = Callable[[], "float | None"]


def build(out_dir: str, source: str = SOURCE,
          flags: tuple[str, ...] = ("-O2", "-pthread")) -> tuple[str | None, str]:
    """Compiles a C program of bench/ (core_to_core.c unless told) into out_dir, once, and again
    when the source is newer. Returns (path to the binary, "") or (None, why it could not be
    built)."""
    exe = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0])
    if os.path.exists(exe) and os.path.getmtime(exe) >= os.path.getmtime(source):
        return exe, ""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [os.environ.get("CC", "cc"), *flags, source, "-o", exe]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{cmd[0]} failed: {exc}"
    if done.returncode != 0:
        return None, f"{' '.join(cmd)}: {done.stderr.strip()[:200]}"
    return exe, ""


def prober(exe: str, round_trips: int = 20000) -> Probe:
    """A function that measures the latency now (5 ms of pause, then 1-7 ms), or returns None if
    the probe fails (fewer than two CPUs, no permission to pin threads)."""
    def probe() -> float | None:
        # The benchmarked step's OpenMP threads spin for a while after each parallel region and
        # share the probe's CPUs: on the 2 vCPUs here a single timing started at once read
        # ~130 ns in 1 of 8 tries against 25-30 ns after a 2 ms pause. The probe also reports the
        # fastest of 4 timings.
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
