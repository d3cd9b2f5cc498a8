#!/usr/bin/env python3
"""Roofline and latency charts from `moerunner bench --json` files.

    scripts/roofline.py OUT_PREFIX RUN.json [RUN.json ...]

writes OUT_PREFIX-roofline.png — every row as a point at its arithmetic intensity (FLOPs / bytes)
and achieved rate (FLOPs / time), under the run's ceilings (read bandwidth × intensity, capped by
the matrix rate: bf16, and fp8 where the device has one) — and OUT_PREFIX-latency.png, median time
against T per preset (one line per weight format, min–max as a band where the run kept samples).
Several files are one run split by preset; their ceilings should agree (the first file's are drawn).
Needs matplotlib.
"""
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"bf16": "o", "fp8": "s", "fp8_block": "D", "mxfp8": "^", "mxfp4": "v", "nvfp4": "P"}


def load(paths):
    runs = [json.load(open(p)) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    return runs[0], rows


def roofline(run, rows, out):
    c = run["ceilings"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["flops"] / r["bytes"] for r in rows if r["bytes"] and r["flops"]]
    lo, hi = min(xs + [0.1]) / 2, max(xs + [10.0]) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    bw = c["read_gbps"] * 1e9
    rates = [("bf16", c["bf16_tflops"])] if c.get("f32_tflops") is None else [
        ("matrix (f32 GEMM)", c["bf16_tflops"])]
    if c.get("fp8_tflops"):
        rates.append(("fp8", c["fp8_tflops"]))
    for name, tflops in rates:
        ax.plot(grid, [min(bw * x, tflops * 1e12) / 1e12 for x in grid], "--", lw=1,
                label=f"ceiling: {c['read_gbps']:.0f} GB/s, {name} {tflops:.3g} TFLOP/s")
    by = defaultdict(list)
    for r in rows:
        by[(r["preset"], r["weight_format"])].append(r)
    for (preset, wf), rs in sorted(by.items()):
        ax.scatter([r["flops"] / r["bytes"] for r in rs],
                   [r["flops"] / (r["time_us"] * 1e-6) / 1e12 for r in rs],
                   marker=MARKERS.get(wf, "o"), s=22, label=f"{preset} {wf}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"{run['device']} ({run['backend']}), {run['date']}", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def latency(run, rows, out):
    presets = sorted({r["preset"] for r in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 3.6), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        by = defaultdict(list)
        for r in rows:
            if r["preset"] == preset:
                by[r["weight_format"]].append(r)
        for wf, rs in sorted(by.items()):
            rs.sort(key=lambda r: r["tokens"])
            t = [r["tokens"] for r in rs]
            ax.plot(t, [r["time_us"] for r in rs], marker=MARKERS.get(wf, "o"), ms=4, label=wf)
            if all("min_us" in r for r in rs):
                ax.fill_between(t, [r["min_us"] for r in rs], [r["max_us"] for r in rs], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("median µs")
        ax.set_title(preset, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    prefix, paths = sys.argv[1], sys.argv[2:]
    run, rows = load(paths)
    roofline(run, rows, f"{prefix}-roofline.png")
    latency(run, rows, f"{prefix}-latency.png")
    print(f"wrote {prefix}-roofline.png, {prefix}-latency.png")


if __name__ == "__main__":
    main()
