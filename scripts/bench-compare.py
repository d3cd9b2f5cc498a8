#!/usr/bin/env python3
"""Two builds' bench runs side by side: for each row (preset, format, T) the median time of each
build over its runs, the ratio new / old, and each build's own spread (max / min over its runs).

usage: bench-compare.py --old A.json [A2.json ...] --new B.json [B2.json ...] [--markdown]"""
import argparse
import json
import statistics


def rows(paths):
    out = {}
    for p in paths:
        for r in json.load(open(p))["rows"]:
            out.setdefault((r["preset"], r["weight_format"], r["tokens"]), []).append(r["time_us"])
    return out


ap = argparse.ArgumentParser()
ap.add_argument("--old", nargs="+", required=True)
ap.add_argument("--new", nargs="+", required=True)
ap.add_argument("--markdown", action="store_true")
a = ap.parse_args()
old, new = rows(a.old), rows(a.new)
print("| preset | format | T | old µs (runs) | new µs (runs) | new / old | old spread | new spread |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
ratios = []
for key in sorted(old.keys() & new.keys(), key=lambda k: (k[0], k[1], k[2])):
    o, n = old[key], new[key]
    mo, mn = statistics.median(o), statistics.median(n)
    ratios.append(mn / mo)
    fmt = lambda v: " / ".join(f"{x:.1f}" for x in v)
    print(f"| {key[0]} | {key[1]} | {key[2]} | {fmt(o)} | {fmt(n)} | {mn / mo:.3f} | "
          f"{max(o) / min(o):.3f} | {max(n) / min(n):.3f} |")
if ratios:
    print(f"\n{len(ratios)} rows: new / old median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}–{max(ratios):.3f}")
