"""How much of fadam-cpu's time over fused Adam's is its memory access pattern (CPU only).

    .venv/bin/python -m bench.experiments.access_pattern              # the default LLM list, ~10 s
    .venv/bin/python -m bench.experiments.access_pattern --repeats 3  # three independent runs

access_pattern.c runs the passes of the steps over the same tensor list with trivial arithmetic
(a multiply-add or two per operand), scheduled as the kernel schedules its items: Adam's one pass
per chunk against FAdam's phase A (the reduction of multi-chunk tensors, the non-finite check of
one-chunk ones) and phase B (the update, or the fused reduce-then-update of a one-chunk tensor).
Two more steps run in the same rounds: FAdam's without phase A's gradient check of the one-chunk
tensors (the price of the non-finite skip, docs/design.md section 6), and the plain two-pass step
with every tensor multi-chunk (40 B per parameter, docs/design.md section 4: the step behind the
"about 1.43x" memory-bound expectation). Their ratios are what the order and number of memory
accesses cost on the machine it runs on, whatever the arithmetic: if fadam-cpu's measured ratio
is close to the pattern's, the kernel's arithmetic is hidden behind memory and only a step that
moves fewer bytes can be faster.

It is a model of the access pattern, not a bound: its Adam pass is not torch's kernel, and
its passes vectorise as the compiler decides (-O3 -march=native).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import torch

if __package__ in (None, ""):  # run as `python bench/experiments/access_pattern.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import rows, workloads  # noqa: E402
from bench.experiments import cbuild  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "access_pattern.c")
# -ffast-math lets the compiler vectorise the float sums of the model's reductions (their
# values are never used); -fopenmp for the thread pool.
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
FIELDS = ("adam_ms", "fadam_ms", "phase_a_ms", "ratio", "ratio_p20", "ratio_p80",
          "ratio_no_check", "ratio_two_pass", "adam_bytes_per_param", "fadam_bytes_per_param")


def run(numels: list[int], threads: int, rounds: int, chunk_size: int, out_dir: str) -> dict:
    """Builds the model into out_dir and runs it once; returns its figures by FIELDS name."""
    exe, why = cbuild.build(SOURCE, out_dir, FLAGS)
    if exe is None:
        raise RuntimeError(f"cannot build {SOURCE}: {why}")
    cmd = [exe, str(threads), str(rounds), str(chunk_size), *map(str, numels)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    values = [float(v) for v in done.stdout.split()]
    if len(values) != len(FIELDS):
        raise RuntimeError(f"unexpected output of {exe}: {done.stdout!r}")
    return dict(zip(FIELDS, values))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="threads (default: torch.get_num_threads(), as the step uses)")
    ap.add_argument("--rounds", type=int, default=31, help="rounds per run (default 31)")
    ap.add_argument("--repeats", type=int, default=1, help="independent runs (default 1)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.dirname(SOURCE)), "results"),
                    help="where the binary is built (default bench/results)")
    args = ap.parse_args(argv)
    # The model's one-chunk threshold is the kernel's, as the bench's fadam-cpu row reports it.
    row = rows.select(["fadam-cpu"])[0]
    why = row.unavailable(torch.device("cpu"))
    if why:
        raise SystemExit(f"fadam-cpu cannot run here, so its chunk size is unknown: {why}")
    threads = args.threads or torch.get_num_threads()
    w = workloads.llm_workload(workloads.CPU_DEFAULT_PARAMS, workloads.CPU_DEFAULT_D_MODEL)
    numels = [math.prod(s) for s in w.shapes]
    chunk = row.chunk_size()
    print(f"{w.name}: {sum(numels) / 1e6:.2f}M float32 params in {len(numels)} tensors, "
          f"{threads} threads, chunk {chunk}, {args.rounds} rounds per run")
    for _ in range(args.repeats):
        r = run(numels, threads, args.rounds, chunk, args.out_dir)
        print(f"access pattern: adam {r['adam_ms']:.1f} ms, fadam {r['fadam_ms']:.1f} ms "
              f"(phase A {r['phase_a_ms']:.1f}), paired ratio {r['ratio']:.2f}x "
              f"[p20 {r['ratio_p20']:.2f}, p80 {r['ratio_p80']:.2f}], without the gradient "
              f"check {r['ratio_no_check']:.2f}x, two-pass {r['ratio_two_pass']:.2f}x; DRAM "
              f"bytes/param {r['adam_bytes_per_param']:.1f} vs {r['fadam_bytes_per_param']:.1f}")


if __name__ == "__main__":
    main()
