#!/usr/bin/env python3
"""Markdown table of an A/B measurement: `moerunner bench --json` files of build or setting A and of B
(the same cases, ideally run interleaved in one call: A, B, A, B), one row per (preset, weight format,
activation format, T) that both sides have, with each side's time (the median of its files' row
medians), their spread over the files, and B / A (below 1: B is faster). Rows whose outputs' errors
against the reference differ by more than a tenth are marked: an A/B of a change that must not move
the arithmetic should show none.

usage: bench-ab.py --a A1.json [A2.json ...] --b B1.json [B2.json ...] [--labels A-NAME B-NAME]
  e.g. scripts/bench-ab.py --a bench-front0-1.json bench-front0-2.json \\
                           --b bench-front64-1.json bench-front64-2.json --labels "three launches" "fused front"
"""
import json
import statistics
import sys


def rows_of(paths):
    """(preset, weight, activation, T) -> list of (time_us, rel_err), one per file that has the row."""
    out = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for r in report.get("rows", []):
            key = (r["preset"], r["weight_format"], r["activation_format"], r["tokens"])
            out.setdefault(key, []).append((r["time_us"], r.get("rel_err", float("nan"))))
    return out


def side(samples):
    times = [t for t, _ in samples]
    med = statistics.median(times)
    spread = (max(times) - min(times)) / med if med > 0 else 0.0
    return med, spread, statistics.median(e for _, e in samples)


def main(argv):
    if "--a" not in argv or "--b" not in argv:
        sys.exit(__doc__)
    labels = ["A", "B"]
    if "--labels" in argv:
        i = argv.index("--labels")
        labels = argv[i + 1:i + 3]
        if len(labels) != 2:
            sys.exit("--labels needs two names")
        del argv[i:i + 3]
    ia, ib = argv.index("--a"), argv.index("--b")
    a_files = argv[ia + 1:ib] if ia < ib else argv[ia + 1:]
    b_files = argv[ib + 1:] if ia < ib else argv[ib + 1:ia]
    if not a_files or not b_files:
        sys.exit("--a and --b each need at least one file")
    a, b = rows_of(a_files), rows_of(b_files)
    keys = [k for k in a if k in b]
    if not keys:
        sys.exit("the two sides have no (preset, formats, T) in common")
    print(f"| preset | formats | T | {labels[0]} µs | {labels[1]} µs | {labels[1]} / {labels[0]} | spread | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in sorted(keys, key=lambda k: (k[0], k[1], k[2], k[3])):
        (ta, sa, ea), (tb, sb, eb) = side(a[key]), side(b[key])
        note = ""
        if ea == ea and eb == eb and abs(eb - ea) > 0.1 * max(ea, eb, 1e-12):
            note = f"rel_err {ea:.2e} → {eb:.2e}"
        preset, wf, af, t = key
        print(f"| {preset} | {wf} × {af} | {t} | {ta:.1f} | {tb:.1f} | {tb / ta:.3f} | "
              f"{100 * max(sa, sb):.0f} % | {note} |")
    missing = len(set(a) ^ set(b))
    if missing:
        print(f"\n({missing} rows are on one side only and are not shown)")


if __name__ == "__main__":
    main(sys.argv[1:])
