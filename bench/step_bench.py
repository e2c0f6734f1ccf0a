"""Time one optimizer step per implementation, side by side in one process.

    .venv/bin/python bench/step_bench.py                     # default CPU/GPU run, ~5 min on CPU
    .venv/bin/python bench/step_bench.py --quick             # < 2 min on CPU
    .venv/bin/python bench/step_bench.py --csv out.csv --json out.json --plot out.png

    # clip=None against clip=1.0 in the same rounds (count-1 is one multi-chunk 4.2M tensor):
    .venv/bin/python bench/step_bench.py --workloads default,count \
        --rows fadam-cpu,fadam-cpu-noclip,torch-adam-fused
    # 4096 tensors of 256 elements (the per-tensor cost), FAdam against torch's fused Adam:
    .venv/bin/python bench/step_bench.py --workloads small --rows fadam-cpu,torch-adam-fused

How a workload is measured:

1. One parameter list is generated (fixed seed) and one gradient list (fixed seed). Each row gets
   its own *copy of the parameters* (steps mutate them) but they all *share the gradient tensors*:
   no row writes p.grad (torch's Adam does not without maximize, FAdam never does: docs/design.md
   section 2, pytorch_optimizer does not without maximize) and we check that with a float64
   checksum after each row's warmup. Sharing saves 4 B/param per row: 6 CPU rows of the 64M
   default then need 6 x 12 B + 4 B = 76 B/param = 4.9 GB instead of 6.1 GB.
2. Each row runs 4 warmup steps (2 for rows slower than 50 ms per step) so lazy state
   initialisation and the t=1 special case (b2hat = 0) are never timed; the last warmup step is
   timed and gives the estimate the scheduler uses.
3. Rounds: every round runs every row once, in an order rotated by one each round, so drift
   (other jobs on the machine, thermal, page cache) falls on every row alike. Within a round a row
   takes `Timer.blocked_autorange` samples for its share of the time budget; rows 5-30x slower than
   fused (forloop, reference, pytorch_optimizer) take part in fewer rounds (at least 3), so the
   default run stays under ~10 minutes.
4. Statistics over all samples of a row: median, p20, p80 (each sample is the mean step time of a
   block of back-to-back steps; blocked_autorange sizes blocks so timer overhead is < 0.01%).
5. The state column (`state B/param`, `state_bytes_per_param`): the bytes of the tensors in the
   row's optimizer state after its warmup, over the workload's parameter count. Measured, not
   modelled: torch's Adam and FAdam 8 (+ the 4 B step tensor per parameter tensor), FAdafactor
   4 + 4 (n + m) / (n m) on an n x m matrix and FAdam's 8 on 1-D tensors.

Parameters persist across steps and rounds (like training), so a workload that fits in cache is
timed with warm caches. In a real training step, forward and backward evict the optimizer's data
between steps, so for small models the large-workload figures are the realistic ones.

With `--clip none` every fadam_fused row steps with clip=None; a `-noclip` row does so whatever
`--clip` says, and next to its twin (`fadam-cpu-noclip` and `fadam-cpu`) the run reports the
clip-off / clip-on ratio per round, like the ratio to torch's fused Adam.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
from torch.utils.benchmark import Timer

if __package__ in (None, ""):  # run as `python bench/step_bench.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import report, rows as rows_mod, workloads  # noqa: E402

WARMUP_NOTE = "4 warmup steps per row before timing (2 for rows slower than 50 ms/step)"
MIN_ROUNDS = 3  # fewest rounds a slow row takes part in: p20/p80 need at least 3 samples

# Per workload kind: (seconds of timing, shared by its runnable rows; rounds). The default CPU run,
# 90 s for the main workload + 9 sweep points x 15 s of timing plus ~1 min of setup and warmup, is
# meant to take ~5 min on 2 idle cores; --quick (25 s + 4 x 6 s) ~1.5 min.
BUDGETS = {
    False: {"default": (90.0, 24), "size": (15.0, 8), "count": (15.0, 8), "small": (30.0, 24)},
    True: {"default": (25.0, 10), "size": (6.0, 4), "count": (6.0, 4), "small": (10.0, 10)},
}
# Many short rounds rather than a few long ones: with other jobs on the machine the step time of
# the fast rows can swing 3x within seconds, so each row's slot in a round is kept to ~0.5 s (90 s /
# 6 rows / 24 rounds) and rows compared in one round see the same conditions. Each round costs a
# fast row one extra untimed step.
SIZE_SWEEP_D = {False: [64, 128, 256, 512, 1024], True: [64, 256]}
COUNT_SWEEP_N = {False: [1, 64, 1024, 16384], True: [1, 4096]}


# --------------------------------------------------------------------------------------------
# Timers: one interface, torch.utils.benchmark.Timer on CPU, CUDA events on GPU.


class CpuTimer:
    # Steps slower than this are timed one at a time: 50 ms is 5e4x the ~1 us timer overhead.
    SLOW_STEP_S = 0.05

    def __init__(self, opt: torch.optim.Optimizer, threads: int):
        # num_threads must be passed: Timer defaults to 1 thread, which would time a different
        # machine than the one the user trains on.
        self.timer = Timer(stmt="opt.step()", globals={"opt": opt}, num_threads=threads)

    def _once(self) -> float:
        """One timed step. Timer._timeit is the inner call of Timer.timeit / blocked_autorange
        without their extra warmup steps; fall back to the public API if it ever goes away."""
        if hasattr(self.timer, "_timeit"):
            return self.timer._timeit(1)
        return self.timer.blocked_autorange(min_run_time=0).times[-1]

    def warmup(self) -> float:
        """4 warmup steps for fast rows, 2 for slow ones; returns the time of the last one.

        The first step allocates the state (and is FAdam's t=1 special case, b2hat = 0), so it is
        never a sample. Slow rows (seconds per step at 64M params) get one more warmup step only, to
        keep the run inside its budget."""
        first = self._once()
        if first >= self.SLOW_STEP_S:
            return self._once()
        return self.timer.timeit(number=1).median  # 2 warmup steps + 1 timed

    def sample(self, min_run_time: float, step_s: float) -> list[float]:
        """Per-step times of blocks of steps, until min_run_time is spent (at least one block)."""
        if step_s >= self.SLOW_STEP_S:
            # blocked_autorange would choose 1 step per block here anyway (timer overhead ~1 us is
            # < 1e-4 of a 50 ms step), after one untimed estimate step per call: timing single
            # steps directly halves the cost of the slow rows.
            times = [self._once()]
            while sum(times) < min_run_time:
                times.append(self._once())
            return times
        return list(self.timer.blocked_autorange(min_run_time=min_run_time).times)


class CudaEventTimer:
    """The GPU time of blocks of back-to-back steps, between two CUDA events.

    Steps are enqueued without syncs, so a step whose host-side launch work is slower than its
    kernels is measured at its launch rate, which is what a training loop sees."""

    BLOCK_S = 2e-3  # >= 2 ms per block: event resolution (~0.5 us) is then < 0.05% of a sample

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def _block(self, number: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            self.opt.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    def warmup(self) -> float:
        self._block(2)
        return self._block(1)

    def sample(self, min_run_time: float, step_s: float) -> list[float]:
        number = max(1, math.ceil(self.BLOCK_S / step_s))
        times, total = [], 0.0
        while not times or total < min_run_time:
            t = self._block(number)
            times.append(t)
            total += t * number
        return times


# --------------------------------------------------------------------------------------------
# Tensors, memory, environment


def make_params(workload: workloads.Workload, device, dtype, seed: int) -> list[torch.Tensor]:
    """LLM-like init: N(0, 0.02^2), the GPT-2 / LLaMA default for weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(s, generator=gen, device=device) * 0.02).to(dtype) for s in workload.shapes]


def make_grads(workload: workloads.Workload, device, dtype, seed: int) -> list[torch.Tensor]:
    """N(0, 0.01^2): g*g ~ 1e-4 stays far from float32 denormals (< 1.2e-38) in every EMA, so no
    row hits the slow denormal path; every grad is finite (no row skips its step)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return [(torch.randn(s, generator=gen, device=device) * 0.01).to(dtype) for s in workload.shapes]


def checksum(tensors: list[torch.Tensor]) -> float:
    return float(sum(torch.sum(t, dtype=torch.float64) for t in tensors if t.numel()))


def state_bytes(row: rows_mod.Row, dtype: torch.dtype) -> int:
    """Bytes of optimizer state per parameter, for the memory check before a run: 2 tensors, param
    dtype for Adam, float32 for FAdam; AdaFisher's one float32 momentum. FAdafactor is given FAdam's
    8, its figure for 1-D tensors and an upper bound for matrices (4 + 4 (n + m) / (n m)). The
    results' state_bytes_per_param is measured instead (measured_state_bytes)."""
    size = torch.empty((), dtype=dtype).element_size()
    if row.family == "adafisher":
        return 4
    return 2 * (size if row.family == "adam" else 4)


def measured_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state, each storage counted once:
    momentum / fim / exp_avg..., the factored fim_row and fim_col, and the 0-dim float32 `step`
    tensors (4 B each: 8e-6 B/param over the 128 tensors of the 64M default); for AdaFisher
    also its layers' factors H and S, which its state_dict() puts in each layer weight's state
    (they live with the layers, not in `opt.state`; O(rows + cols) floats per layer). Entries
    that are not tensors (pytorch_optimizer keeps its step count in the param group) hold no
    device memory worth counting."""
    seen: dict[tuple[str, int], int] = {}
    states = list(opt.state.values())
    if hasattr(opt, "remove_hooks"):  # an AdaFisher: its factors are in state_dict() only
        states += list(opt.state_dict()["state"].values())
    for state in states:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def peak_bytes_estimate(n_params: int, rows: list[rows_mod.Row], dtype: torch.dtype) -> int:
    """Shared grads + the master copy + per row (params + state), + 16 B/param of transients
    (pytorch_optimizer's foreach path allocates a few full-size temporaries per step)."""
    size = torch.empty((), dtype=dtype).element_size()
    per_param = 2 * size + sum(size + state_bytes(r, dtype) for r in rows) + 16
    return n_params * per_param


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not block the run


def gpu_default_workload(device: torch.device, rows: list[rows_mod.Row], dtype) -> workloads.Workload:
    """~1B params, or as many as fit in 60% of free GPU memory next to every row's copy."""
    per_param = peak_bytes_estimate(1, rows, dtype)
    fit = 0.6 * available_memory(device) / per_param
    return workloads.llm_workload(min(workloads.GPU_DEFAULT_PARAMS, fit), workloads.GPU_DEFAULT_D_MODEL)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache() -> str | None:
    base = "/sys/devices/system/cpu/cpu0/cache"

    def read(path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    try:
        levels = [d for d in os.listdir(base) if d.startswith("index")]
        best = max(levels, key=lambda d: int(read(f"{base}/{d}/level")))
        return read(f"{base}/{best}/size")
    except (OSError, ValueError):
        return None


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "device": device.type,
        "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_model": cpu_model(),
        "llc": last_level_cache(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    try:
        import fadam_fused
        meta["fadam_fused"] = fadam_fused.__version__
    except Exception:
        meta["fadam_fused"] = None
    try:
        from importlib.metadata import version
        meta["pytorch_optimizer"] = version("pytorch_optimizer")
    except Exception:
        meta["pytorch_optimizer"] = None
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


def busy_threads(samples: int = 10, interval: float = 0.05) -> float | None:
    """Threads of other processes running or ready to run now: the median over `samples` reads of
    /proc/loadavg's count of runnable threads, less this one, `interval` s apart (0.5 s).

    Not the load average: the 1-minute average still counts a build that ended a minute ago
    (`make bench` builds right before it runs) and reads 0.5-0.7 on an idle 2-core VM."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return float(np.median(counts))


def print_unavailable(rows: list[rows_mod.Row], device: torch.device) -> None:
    """One line per reason for the rows that cannot run here (GPU-only rows on a CPU run, a
    package that is not installed): the same on every workload, so the tables leave them out."""
    by_reason: dict[str, list[str]] = {}
    for row in rows:
        reason = row.unavailable(device)
        if reason is not None:
            by_reason.setdefault(reason, []).append(row.name)
    for reason, names in by_reason.items():
        print(f"not run here: {', '.join(names)}: {reason}", flush=True)


# --------------------------------------------------------------------------------------------
# Scheduling and the measurement loop


def plan_rounds(estimates: dict[str, float], budget: float, rounds: int) -> dict[str, tuple[set[int], float]]:
    """Per row: the rounds it takes part in and its min_run_time per round.

    Each row gets an equal share of `budget`. A round costs a fast row one untimed step (the
    block-size estimate of blocked_autorange, which also re-warms after the other rows) plus its
    samples, and a slow row (CpuTimer.SLOW_STEP_S) one timed step. A row whose share cannot pay for
    every round takes part in fewer, evenly spread rounds (at least MIN_ROUNDS); the others fill
    their share with more samples per round."""
    share = budget / max(1, len(estimates))
    order = spread_order(rounds)
    plan = {}
    for name, t in estimates.items():
        cost = t if t >= CpuTimer.SLOW_STEP_S else 2 * t
        k = rounds if cost * rounds <= share else max(MIN_ROUNDS, min(rounds, int(share // cost)))
        min_run_time = max(0.0, share / k - t)
        plan[name] = (set(order[:k]), min_run_time)
    return plan


def spread_order(rounds: int) -> list[int]:
    """0..rounds-1 ordered so that every prefix is spread evenly over the run: each next round is
    the one farthest from those already taken (the earliest on a tie). A row taking part in k
    rounds takes the first k, so two rows of different speeds share min(k1, k2) >= MIN_ROUNDS
    rounds, and the paired ratios always have their samples. (Spreading each row's rounds on its
    own, 3 rounds of 10 as {0, 3, 7} against 4 as {0, 2, 5, 8}, shared one round.)"""
    order = [0] if rounds else []
    while len(order) < rounds:
        taken = set(order)
        order.append(max((r for r in range(rounds) if r not in taken),
                         key=lambda r: (min(abs(r - t) for t in order), -r)))
    return order


def run_workload(workload: workloads.Workload, rows: list[rows_mod.Row], device: torch.device,
                 dtype: torch.dtype, threads: int, budget: float, rounds: int, seed: int,
                 progress=None) -> list[dict[str, Any]]:
    """Time every row on `workload`; one result dict per row (unavailable rows included)."""
    results: dict[str, dict[str, Any]] = {}
    numels = workload.numels
    base = dict(workload=workload.name, kind=workload.kind, n_params=workload.n_params,
                n_tensors=workload.n_tensors, dtype=str(dtype).replace("torch.", ""))
    shapes = list(workload.shapes)
    for row in rows:
        bpp = row.bytes_per_param(shapes, dtype)
        results[row.name] = dict(base, row=row.name, clip=row.clip if row.family != "adam" else None,
                                 status="ok", reason="", bytes_per_param=bpp,
                                 model_bytes=bpp * workload.n_params,
                                 read_bytes_per_param=row.bytes_per_param(shapes, dtype, reads_only=True))

    runnable = []
    for row in rows:
        reason = row.unavailable(device)
        if reason is not None:
            results[row.name].update(status="unavailable", reason=reason)
        else:
            runnable.append(row)

    need = peak_bytes_estimate(workload.n_params, runnable, dtype)
    have = available_memory(device)
    if need > 0.9 * have:
        raise SystemExit(f"{workload.name}: needs ~{need / 2**30:.1f} GiB for {len(runnable)} rows, "
                         f"{have / 2**30:.1f} GiB available; pick fewer rows with --rows")

    master = make_params(workload, device, dtype, seed)
    grads = make_grads(workload, device, dtype, seed)
    grad_sum = checksum(grads)
    biggest = max(range(len(numels)), key=numels.__getitem__) if numels else None
    live: dict[str, tuple[Any, Any]] = {}  # name -> (optimizer, timer)
    estimates: dict[str, float] = {}
    for row in runnable:
        t0 = time.perf_counter()  # bookkeeping only (setup_s in the JSON), not a measurement
        try:
            params = [torch.nn.Parameter(m.clone()) for m in master]
            for p, g in zip(params, grads):
                p.grad = g
            opt = row.make(params)
            timer = CpuTimer(opt, threads) if device.type == "cpu" else CudaEventTimer(opt)
            estimates[row.name] = timer.warmup()
            if checksum(grads) != grad_sum:
                raise RuntimeError("the step wrote into p.grad (shared between rows); not timed")
            if biggest is not None and torch.equal(params[biggest], master[biggest]):
                raise RuntimeError("the warmup steps left the largest parameter unchanged: the step did nothing")
            # After the warmup every parameter has its state: what this row keeps besides the
            # params and grads, measured rather than modelled.
            results[row.name]["state_bytes_per_param"] = (
                measured_state_bytes(opt) / workload.n_params if workload.n_params else math.nan)
            live[row.name] = (opt, timer)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            results[row.name].update(status="error", reason=f"{type(exc).__name__}: {msg}"[:300])
            estimates.pop(row.name, None)
            if checksum(grads) != grad_sum:  # restore the shared grads for the next rows
                for g, fresh in zip(grads, make_grads(workload, device, dtype, seed)):
                    g.copy_(fresh)
        finally:
            params = opt = timer = None  # noqa: F841  (drop references before the next row)
        results[row.name]["setup_s"] = round(time.perf_counter() - t0, 2)
        if progress is not None:
            progress.update(1)
    del master
    gc.collect()

    samples: dict[str, list[float]] = {name: [] for name in live}
    spent = {name: 0.0 for name in live}
    round_medians: dict[str, list[float | None]] = {name: [None] * rounds for name in live}
    plan = plan_rounds(estimates, budget, rounds)
    share = budget / max(1, len(live))
    order = list(live)
    for r in range(rounds):
        shift = r % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            joins, _ = plan[name]
            if r not in joins:
                continue
            # Re-plan from what this row really cost so far: when other jobs slow the machine
            # down 2-5x mid-run, the remaining rounds shrink instead of the run overrunning.
            left = sum(1 for j in joins if j >= r)
            t = float(np.median(samples[name])) if samples[name] else estimates[name]
            min_run_time = max(0.0, (share - spent[name]) / left - t)
            t0 = time.perf_counter()
            got = live[name][1].sample(min_run_time, t)
            spent[name] += time.perf_counter() - t0
            samples[name].extend(got)
            round_medians[name][r] = float(np.median(got)) * 1e3
        if progress is not None:
            progress.update(1)

    for name, times in samples.items():
        p20, med, p80 = np.percentile(np.asarray(times) * 1e3, [20, 50, 80])
        res = results[name]
        res.update(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), n_samples=len(times),
                   gbps=res["model_bytes"] / (med / 1e3) / 1e9, rounds=len(plan[name][0]),
                   timed_s=round(spent[name], 2), round_medians_ms=round_medians[name])
    add_ratios(results, rows)

    live.clear()
    del grads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [results[r.name] for r in rows]


def add_ratios(results: dict[str, dict[str, Any]], rows: list[rows_mod.Row]) -> None:
    """Every timed row against torch-adam-fused (`time_vs_adam_fused`, `paired_vs_adam_fused`),
    a clip-off row against its clip-on twin (`time_vs_clip_on`, `paired_vs_clip_on`), and a
    fadafactor row against the FAdam row of its backend (`time_vs_fadam`, `paired_vs_fadam`)."""
    pairs = [(r.name, rows_mod.BASELINE, "adam_fused") for r in rows]
    pairs += [(r.name, r.twin, "clip_on") for r in rows if r.twin and not r.clipping]
    pairs += [(r.name, r.fadam, "fadam") for r in rows if r.fadam]
    for name, ref, suffix in pairs:
        res, base = results[name], results.get(ref, {})
        if "median_ms" in res and base.get("median_ms") and (suffix != "clip_on" or base["clip"]):
            res[f"time_vs_{suffix}"] = res["median_ms"] / base["median_ms"]
            res[f"paired_vs_{suffix}"] = paired_ratio(res, base)


def paired_ratio(res: dict[str, Any], base: dict[str, Any]) -> list[float] | None:
    """[p20, median, p80] of the per-round ratio of this row's median step time to the baseline's
    in the same round. Rows of one round run seconds apart, so when other jobs slow the machine
    down for a while both sides of a ratio see it: this is the drift-robust figure (None when the
    two rows shared fewer than 3 rounds)."""
    pairs = [a / b for a, b in zip(res.get("round_medians_ms", []), base.get("round_medians_ms", []))
             if a is not None and b]
    if len(pairs) < MIN_ROUNDS:
        return None
    return [float(x) for x in np.percentile(pairs, [20, 50, 80])]


SUMMARY_ROWS = ("fadam-cpu", "fadam-cuda", "fadam-triton",
                "adafisher-cpu", "adafisher-cuda", "adafisher-triton")


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fused FAdam and AdaFisher row, on the default workload: its time against
    torch-adam-fused's (and what the traffic model expects of it); for FAdam also its speed-up
    over pytorch_optimizer-fadam."""
    by = {(r["kind"], r["row"]): r for r in results}
    out: dict[str, Any] = {}
    for fused in SUMMARY_ROWS:
        mine, adam, po = by.get(("default", fused)), by.get(("default", "torch-adam-fused")), \
            by.get(("default", "pytorch_optimizer-fadam"))
        if not mine or "median_ms" not in mine:
            continue
        entry: dict[str, Any] = {"workload": mine["workload"]}
        if adam and "median_ms" in adam:
            entry["time_vs_adam_fused"] = mine["median_ms"] / adam["median_ms"]
            entry["paired_vs_adam_fused"] = mine.get("paired_vs_adam_fused")
            entry["memory_bound_expectation"] = mine["bytes_per_param"] / adam["bytes_per_param"]
            entry["read_bytes_ratio"] = mine["read_bytes_per_param"] / adam["read_bytes_per_param"]
        if po and "median_ms" in po and fused.startswith("fadam-"):
            entry["speedup_vs_pytorch_optimizer"] = po["median_ms"] / mine["median_ms"]
            inverse = paired_ratio(po, mine)  # pytorch_optimizer's time / ours, per round
            entry["paired_speedup_vs_pytorch_optimizer"] = inverse
        out[fused] = entry
    return out


# --------------------------------------------------------------------------------------------


class _NoProgress:
    """The part of tqdm's interface main() uses, doing nothing but printing."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def write(self, s):
        print(s, flush=True)

    def close(self):
        pass


def parse_clip(text: str) -> float | None:
    """--clip: a number >= 0, or none / off; 0 and none both mean clipping off (None)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, none or off") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"clip must be finite and >= 0 (0: off), got {text}")
    return value or None


def parse_threads(text: str) -> int:
    """--threads: a whole number >= 1 (0 would leave torch's default in place without saying so)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"threads must be >= 1, got {text}")
    return value


def parse_budget_scale(text: str) -> float:
    """--budget-scale: a finite number > 0 (0 or less would time nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"budget scale must be finite and > 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda if available, else cpu")
    ap.add_argument("--quick", action="store_true", help="smaller budgets and sweeps (< 2 min on CPU)")
    ap.add_argument("--workloads", default="default,size,count",
                    help="comma list of: default (LLM-shaped), size (size sweep), count "
                         "(tensor-count sweep), small (4096 tensors of 256 elements); "
                         "default: default,size,count")
    opt_in = [n for n in rows_mod.ALL_ROW_NAMES if n not in rows_mod.ROW_NAMES]
    ap.add_argument("--rows", default="", help=f"comma list of rows (default: "
                                              f"{', '.join(rows_mod.ROW_NAMES)}); also {', '.join(opt_in)}")
    ap.add_argument("--clip", type=parse_clip, default=rows_mod.FADAM_CLIP,
                    help="clip of the fadam_fused rows (default 1.0; none or 0: clipping off). "
                         "pytorch_optimizer-fadam keeps 1.0 (it cannot turn clipping off)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="param and grad dtype (FAdam state stays float32)")
    ap.add_argument("--threads", type=parse_threads, default=None,
                    help="torch threads, >= 1 (default: torch's)")
    ap.add_argument("--budget-scale", type=parse_budget_scale, default=1.0,
                    help="multiply every time budget, > 0 (e.g. 3 for final figures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH", help="PNG: step time vs size / tensor count")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def build_workloads(args, device, rows) -> list[workloads.Workload]:
    kinds = [k.strip() for k in args.workloads.split(",") if k.strip()]
    unknown = set(kinds) - set(workloads.KINDS) - {"tiny"}
    if unknown:
        raise SystemExit(f"unknown workload kind(s) {sorted(unknown)}; use {', '.join(workloads.KINDS)}")
    dtype = getattr(torch, args.dtype)
    out = []
    if "tiny" in kinds:  # 75K params: for tests/test_bench_smoke.py, not for figures
        out.append(workloads.tiny_workload())
    if "default" in kinds:
        if device.type == "cuda":
            runnable = [r for r in rows if r.unavailable(device) is None]
            out.append(gpu_default_workload(device, runnable, dtype))
        else:
            out.append(workloads.llm_workload(workloads.CPU_DEFAULT_PARAMS, workloads.CPU_DEFAULT_D_MODEL))
    if "size" in kinds:
        ds = SIZE_SWEEP_D[args.quick]
        if device.type == "cuda":
            ds = ds + [2048]  # GPUs have the memory for 270M params and need it to saturate
        out += workloads.size_sweep(ds)
    if "count" in kinds:
        out += workloads.count_sweep(COUNT_SWEEP_N[args.quick])
    if "small" in kinds:
        out.append(workloads.small_workload())
    return out


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Every workload and row `args` names, printed as it goes; returns (meta, results, summary)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    rows = rows_mod.select([r.strip() for r in args.rows.split(",") if r.strip()], clip=args.clip)
    works = build_workloads(args, device, rows)
    budgets = BUDGETS[args.quick]
    meta = environment(device, threads)
    meta.update(quick=args.quick, budget_scale=args.budget_scale, argv=sys.argv[1:], seed=args.seed,
                clip=args.clip, timing=("torch.utils.benchmark.Timer.blocked_autorange"
                                        if device.type == "cpu" else "CUDA events"),
                warmup=WARMUP_NOTE)
    if device.type == "cpu":
        meta["busy_threads_start"] = busy_threads()
    print(report.header(meta), flush=True)
    busy, cores = meta.get("busy_threads_start"), os.cpu_count() or 1
    if busy is not None and busy >= max(1.0, cores / 2):
        # With more runnable threads than cores, an OpenMP barrier waits for a descheduled thread
        # for a whole time slice (ms): that made a 1.5 s reference step take 7-20 s and fused
        # Adam's p80 10x its p20. Small workloads and many-op rows suffer most.
        print(f"WARNING: {busy:g} other threads were running on this machine's {cores} cores "
              f"when the benchmark started, next to its {threads}: the figures may be noisy; rerun "
              "on an idle machine for figures to keep", flush=True)
    print_unavailable(rows, device)

    try:
        from tqdm import tqdm
    except ImportError:  # requirements-bench.txt not installed: run without a progress bar
        tqdm = _NoProgress
    units = sum(len(rows) + budgets[w.kind][1] for w in works)
    progress = tqdm(total=units, desc="step_bench", unit="step", file=sys.stderr, dynamic_ncols=True,
                    disable=True if args.no_progress else None)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for w in works:
        progress.set_postfix_str(w.name)
        budget, rounds = budgets[w.kind]
        res = run_workload(w, rows, device, dtype, threads, budget * args.budget_scale, rounds,
                           args.seed, progress)
        results += res
        progress.write(report.table(w, res))
    progress.close()
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return meta, results, summary(results)


def write_outputs(args: argparse.Namespace, meta: dict[str, Any], results: list[dict[str, Any]],
                  summ: dict[str, Any]) -> None:
    """The closing summary on stdout, then the CSV, JSON and plot `args` asks for."""
    print(report.summary_text(summ, results, meta), flush=True)
    if args.csv:
        report.write_csv(args.csv, meta, results)
    if args.json:
        report.write_json(args.json, meta, results, summ)
    if args.plot:
        report.plot(args.plot, meta, results)
    for path in (args.csv, args.json, args.plot):
        if path:
            print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    write_outputs(args, *run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
