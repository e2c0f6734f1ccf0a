"""Output of bench/step_bench.py: the stdout table, CSV, JSON and the PNG plot."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from . import rows as rows_mod
from .workloads import Workload

# CSV columns, in order. Environment columns are repeated on every line so one CSV line stands on
# its own when files from several machines are concatenated.
META_COLUMNS = ("date", "device", "device_name", "threads", "torch", "triton", "python", "fadam_fused")
RESULT_COLUMNS = ("workload", "kind", "n_params", "n_tensors", "dtype", "row", "clip", "status",
                  "median_ms", "p20_ms", "p80_ms", "n_samples", "rounds", "bytes_per_param",
                  "state_bytes_per_param", "gbps",
                  "time_vs_adam_fused", "paired_vs_adam_fused_median", "paired_vs_clip_on_median",
                  "paired_vs_fadam_median", "reason")


# Rows of fadam_fused's optimizers, drawn with solid lines in the plot (the others dashed).
FUSED_FAMILIES = ("fadam-", "fadafactor-", "adafisher-")


def header(meta: dict[str, Any]) -> str:
    load = meta.get("loadavg_start")
    load_s = f", load avg {load[0]:.2f}" if load else ""
    if meta.get("busy_threads_start") is not None:
        load_s += f", {meta['busy_threads_start']:g} other threads running"
    llc = f", LLC {meta['llc']}" if meta.get("llc") else ""
    clip = f", fadam clip {meta['clip']}" if "clip" in meta else ""
    return (f"fadam_fused step benchmark: {meta['device']} ({meta['device_name']}{llc}), "
            f"{meta['threads']} threads, torch {meta['torch']}, triton {meta.get('triton')}, "
            f"python {meta['python']}, {meta['date']}{load_s}{clip}\n"
            f"timing: {meta['timing']}, {meta['warmup']}; times in ms per step; "
            f"x adam-fused = median time / torch-adam-fused's median time (lower is faster); "
            f"paired = median over rounds of the same ratio within one round (robust to drift)")


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _fmt_state(r: dict[str, Any]) -> str:
    """The measured state bytes per parameter; '-' in a JSON file of an earlier release (no such
    field) or where there was nothing to measure. Two decimals: FAdafactor's 4 + 4 (n + m) / (n m)
    differs from 4 in the second decimal for d = 512 matrices (4.016)."""
    x = r.get("state_bytes_per_param")
    return f"{x:.2f}" if x is not None and not math.isnan(x) else "-"


def _cells(r: dict[str, Any]) -> list[str]:
    """A timed row's cells, for the stdout table and the markdown one: median, p20, p80, n,
    B/param, GB/s, x adam-fused, paired, state B/param."""
    ratio, pr = r.get("time_vs_adam_fused"), r.get("paired_vs_adam_fused")
    return [_fmt_ms(r["median_ms"]), _fmt_ms(r["p20_ms"]), _fmt_ms(r["p80_ms"]), str(r["n_samples"]),
            f"{r['bytes_per_param']:.1f}", f"{r['gbps']:.1f}", _fmt_ratio(ratio) if ratio else "-",
            _fmt_ratio(pr[1]) if pr else "-", _fmt_state(r)]


TABLE_WIDTHS = (9, 9, 9, 4, 7, 7, 12, 7, 13)


def table(w: Workload, results: list[dict[str, Any]]) -> str:
    """The stdout table of one workload; B/param is each row's own traffic model (its chunk size
    and clip), state B/param the bytes of its optimizer state, measured."""
    n, dtype = w.n_params, results[0]["dtype"] if results else "float32"
    import torch
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    working = n * (2 * size + 8)  # p + g + m + v (FAdam state float32)
    lines = [f"\n== {w.name} ({w.kind}): {n / 1e6:.2f}M params in {w.n_tensors} tensors, {dtype}, "
             f"p+g+m+v {working / 1e9:.2f} GB; {w.note}"]
    names = ("median", "p20", "p80", "n", "B/param", "GB/s", "x adam-fused", "paired",
             "state B/param")
    head = f"{'row':<24} " + " ".join(c.rjust(w) for c, w in zip(names, TABLE_WIDTHS))
    lines += [head, "-" * len(head)]
    for r in results:
        if r["status"] == "unavailable":  # said once, before the first table
            continue
        if r["status"] != "ok":
            lines.append(f"{r['row']:<24} not run ({r['status']}): {r['reason']}")
            continue
        lines.append(f"{r['row']:<24} " + " ".join(c.rjust(w) for c, w in zip(_cells(r), TABLE_WIDTHS)))
    return "\n".join(lines)


def clip_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per clip-off row timed next to its clip-on twin: its time over the twin's."""
    lines = []
    for r in results:
        if "time_vs_clip_on" not in r:
            continue
        twin = r["row"].removesuffix(rows_mod.NOCLIP)
        on = next(x for x in results if x["workload"] == r["workload"] and x["row"] == twin)
        pr = r.get("paired_vs_clip_on")
        paired = f", per-round paired {_fmt_ratio(pr[1])} [p20 {pr[0]:.2f}, p80 {pr[2]:.2f}]" if pr else ""
        lines.append(f"clip off on {r['workload']}: {r['row']} takes {_fmt_ratio(r['time_vs_clip_on'])} "
                     f"{twin}'s time{paired} (bytes/param {r['bytes_per_param']:.1f} against "
                     f"{on['bytes_per_param']:.1f}: {r['bytes_per_param'] / on['bytes_per_param']:.2f}x)")
    return lines


def fadam_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per fadafactor row timed next to the FAdam row of its backend: its time over
    FAdam's, and the ratio of the bytes each reads (what the time follows on a CPU whose reads
    saturate, bench/NOTES.md)."""
    lines = []
    for r in results:
        if "time_vs_fadam" not in r:
            continue
        name = r["row"].replace("fadafactor-", "fadam-", 1)
        fadam = next(x for x in results if x["workload"] == r["workload"] and x["row"] == name)
        pr = r.get("paired_vs_fadam")
        paired = f", per-round paired {_fmt_ratio(pr[1])} [p20 {pr[0]:.2f}, p80 {pr[2]:.2f}]" if pr else ""
        reads = ""
        if r.get("read_bytes_per_param") and fadam.get("read_bytes_per_param"):
            mine, theirs = r["read_bytes_per_param"], fadam["read_bytes_per_param"]
            reads = f" (read bytes/param {mine:.1f} against {theirs:.1f}: {mine / theirs:.2f}x)"
        lines.append(f"fadafactor on {r['workload']}: {r['row']} takes {_fmt_ratio(r['time_vs_fadam'])} "
                     f"{name}'s time{paired}{reads}")
    return lines


def summary_text(summ: dict[str, Any], results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"\nfinished in {meta.get('elapsed_s')} s"
             + (f"; load avg {meta['loadavg_end'][0]:.2f} at the end" if meta.get("loadavg_end") else "")]
    for name, e in summ.items():
        parts = [f"{name} on {e['workload']}:"]
        if "time_vs_adam_fused" in e:
            pr = e.get("paired_vs_adam_fused")
            paired = f", per-round paired {_fmt_ratio(pr[1])} [p20 {pr[0]:.2f}, p80 {pr[2]:.2f}]" if pr else ""
            # Older JSON files name it read_bound_floor, or lack it.
            reads = e.get("read_bytes_ratio", e.get("read_bound_floor"))
            parts.append(f"{_fmt_ratio(e['time_vs_adam_fused'])} torch-adam-fused's time{paired} "
                         f"(memory-bound expectation {e['memory_bound_expectation']:.2f}x"
                         + (f", read-bytes ratio {reads:.2f}x" if reads else "") + ");")
        if "speedup_vs_pytorch_optimizer" in e:
            ps = e.get("paired_speedup_vs_pytorch_optimizer")
            paired = f", per-round paired {ps[1]:.1f}x [p20 {ps[0]:.1f}, p80 {ps[2]:.1f}]" if ps else ""
            parts.append(f"{e['speedup_vs_pytorch_optimizer']:.1f}x faster than pytorch_optimizer-fadam"
                         f"{paired}")
        lines.append(" ".join(parts))
    lines += clip_lines(results)
    lines += fadam_lines(results)
    # Rows that could not run here at all were listed before the first table.
    skipped = sorted({(r["row"], r["status"], r["reason"]) for r in results
                      if r["status"] not in ("ok", "unavailable")})
    seen = set()
    for row, status, reason in skipped:
        if row not in seen:
            seen.add(row)
            lines.append(f"not run: {row} ({status}): {reason}")
    return "\n".join(lines)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def write_csv(path: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(META_COLUMNS + RESULT_COLUMNS)
        for r in results:
            flat = dict(r, paired_vs_adam_fused_median=(r.get("paired_vs_adam_fused") or [None] * 3)[1],
                        paired_vs_clip_on_median=(r.get("paired_vs_clip_on") or [None] * 3)[1],
                        paired_vs_fadam_median=(r.get("paired_vs_fadam") or [None] * 3)[1])
            w.writerow([meta.get(c) for c in META_COLUMNS] + [_clean(flat.get(c, "")) for c in RESULT_COLUMNS])


def write_json(path: str, meta: dict[str, Any], results: list[dict[str, Any]], summ: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [{k: _clean(v) for k, v in r.items()} for r in results],
                   "summary": summ}, f, indent=1)
        f.write("\n")


def plot(path: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """One panel per workload kind: the default workload (and many small tensors) as bars, one
    per row; the size and tensor-count sweeps as step time against the sweep, log-log. p20-p80
    bars; each row keeps its colour in every panel, and the legend sits below the panels, off
    the data."""
    import matplotlib
    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    kinds = [k for k in ("default", "size", "count", "small") if any(r["kind"] == k for r in ok)]
    names = [n for n in rows_mod.ALL_ROW_NAMES if any(r["row"] == n for r in ok)]
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5.2 * max(1, len(kinds)), 4.4),
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        data = [r for r in ok if r["kind"] == kind]
        if kind in ("default", "small"):
            first = data[0]["workload"]  # e.g. --workloads tiny,default: the first one
            data = [r for r in data if r["workload"] == first][::-1]  # table order, top down
            ax.barh([r["row"] for r in data], [r["median_ms"] for r in data],
                    xerr=[[r["median_ms"] - r["p20_ms"] for r in data],
                          [r["p80_ms"] - r["median_ms"] for r in data]],
                    color=[colors[r["row"]] for r in data])
            ax.set_xscale("log")
            ax.tick_params(axis="y", labelsize=8)
            ax.set_xlabel("ms per step (median, p20-p80)")
            ax.set_title(f"{first}: {data[0]['n_params'] / 1e6:.1f}M parameters in "
                         f"{data[0]['n_tensors']} tensors", fontsize=10)
            ax.grid(True, axis="x", which="both", alpha=0.3)
            continue
        for name in names:
            pts = sorted((r for r in data if r["row"] == name),
                         key=lambda r: r["n_params"] if kind == "size" else r["n_tensors"])
            if not pts:
                continue
            xs = [p["n_params"] if kind == "size" else p["n_tensors"] for p in pts]
            ys = [p["median_ms"] for p in pts]
            err = [[p["median_ms"] - p["p20_ms"] for p in pts], [p["p80_ms"] - p["median_ms"] for p in pts]]
            style = "-" if name.startswith(FUSED_FAMILIES) else "--"
            ax.errorbar(xs, ys, yerr=err, fmt=style + "o", ms=3, capsize=2, label=name,
                        color=colors[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("ms per step (median, p20-p80)")
        if kind == "size":
            ax.set_xlabel("parameters (LLM-shaped list)")
            ax.set_title("step time vs size", fontsize=10)
        else:
            total = data[0]["n_params"] if data else 0
            ax.set_xlabel(f"tensors ({total / 1e6:.1f}M parameters in total)")
            ax.set_title("step time vs tensor count", fontsize=10)
    legend_rows = 0
    if any(k in ("size", "count") for k in kinds):
        handles = [plt.Line2D([], [], color=colors[n], marker="o", ms=4,
                              ls="-" if n.startswith(FUSED_FAMILIES) else "--")
                   for n in names]
        ncol = min(len(names), 3 * len(kinds))
        legend_rows = -(-len(names) // ncol)
        fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"{meta['device']} {meta['device_name']}, {meta['threads']} threads, "
                 f"torch {meta['torch']}, {meta['date'][:10]}", fontsize=9)
    # Room at the bottom for the legend: ~0.3 inch per legend row.
    fig.tight_layout(rect=(0, min(0.4, 0.3 * legend_rows / fig.get_figheight()), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """README tables from a results JSON: the default workload in full, then one table per sweep
    (median ms per row and point). `python -m bench.report bench/results/step_bench.json`."""
    out = [f"{meta['device']} ({meta['device_name']}, LLC {meta.get('llc')}), {meta['threads']} threads, "
           f"torch {meta['torch']}, python {meta['python']}, {meta['date']}, load average "
           f"{(meta.get('loadavg_start') or [float('nan')])[0]:.1f} at the start"]
    default = [r for r in results if r["kind"] == "default"]
    if default:
        r0 = default[0]
        out += ["", f"Default workload `{r0['workload']}`: {r0['n_params'] / 1e6:.1f}M {r0['dtype']} params "
                    f"in {r0['n_tensors']} tensors.", "",
                "| row | median ms | p20 | p80 | B/param | GB/s | x adam-fused | paired | state B/param |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in default:
            if r["status"] == "unavailable":  # listed once, under the table
                continue
            if r["status"] != "ok":
                out.append(f"| {r['row']} | not run: {r['reason']} | | | | | | | |")
                continue
            cells = _cells(r)
            del cells[3]  # n: the markdown table leaves it out
            out.append(f"| {r['row']} | " + " | ".join(cells) + " |")
        absent = {r["row"]: r["reason"] for r in results if r["status"] == "unavailable"}
        if absent:
            out += ["", "Not run here: " + "; ".join(f"{row} ({why})" for row, why in absent.items())]
    clip = clip_lines(results) + fadam_lines(results)
    if clip:
        out += [""] + [f"- {line}" for line in clip]
    for kind, title in (("size", "Size sweep"), ("count", "Tensor-count sweep"),
                        ("small", "Many small tensors")):
        data = [r for r in results if r["kind"] == kind and r["status"] == "ok"]
        if not data:
            continue
        points = list(dict.fromkeys(r["workload"] for r in data))
        names = [n for n in rows_mod.ALL_ROW_NAMES if any(r["row"] == n for r in data)]
        by = {(r["workload"], r["row"]): r for r in data}
        out += ["", f"{title}: median ms per step (x adam-fused)", "",
                "| row | " + " | ".join(points) + " |", "| --- |" + " ---: |" * len(points)]
        for n in names:
            cells = []
            for p in points:
                r = by.get((p, n))
                ratio = r.get("time_vs_adam_fused") if r else None
                cells.append(f"{_fmt_ms(r['median_ms'])} ({_fmt_ratio(ratio)})" if r and ratio else
                             (_fmt_ms(r["median_ms"]) if r else "-"))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    with open(sys.argv[1]) as f:
        doc = json.load(f)
    print(markdown(doc["meta"], doc["results"]))
