#!/usr/bin/env python3
"""Markdown table of `moerunner bench --json` files for the README: time, floor, roofline fraction,
issue 3's target for the row, and SGLang's Triton fused MoE time from spec/performance.md (measured on
an H100 80GB; our runs may be on another GPU — the roofline fraction is the comparable number).

usage: bench-table.py bench/results/FILE.json [more.json ...]
       bench-table.py --mx FILE.json ...   the microscaling formats: weight × activation columns and
                                           issue 12's targets (T = 1: 60 %; T <= 128: 80 %; T >= 1024:
                                           50 % for W4A16, 40 % for mxfp8, W4A8 and nvfp4)
       FILE.json@PATH or FILE.json@WEIGHT=PATH: the file's rows (or those of weight format WEIGHT)
                       ran on the GPU kernel path PATH (e4m3_block or mxfp8_decoded for mxfp8), for
                       files written before bench recorded `kernel_path`; a row's path shows beside
                       its formats, and rows of different paths are kept apart
       --peer PEER.json (repeatable, before or after the files): the JSON of
       scripts/gpu/peer_sglang.py; every row whose (preset, weight format, activation format, T) the
       peer has gains four columns: the peer's time (its whole layer, routing and our torch alignment
       included) and peer time / our time (above 1: we are faster), then its kernels alone
       (experts_us − align_us) and that over our time: SGLang's real time lies between the two.
       Without --peer the output is unchanged.
       --into DOC.md: instead of printing the table, replace the rows of DOC.md's table that has the
       same header line, each where the first three cells (preset, formats, T) match, and append the
       others at that table's end; prints what it replaced and appended."""
import contextlib, io, json, os, sys

# spec/performance.md, "The peer to beat": (µs, floor µs) on H100 for bf16 and fp8_block.
SGLANG = {
    ("qwen3-30b-a3b", 1): ((49, 25), (60, 13)), ("qwen3-30b-a3b", 16): ((310, 286), (205, 143)),
    ("qwen3-30b-a3b", 1024): ((579, 405), (471, 203)), ("qwen3-30b-a3b", 8192): ((2138, 796), (2599, 439)),
    ("deepseek-v3", 1): ((258, 235), (174, 117)), ("deepseek-v3", 128): ((7304, 7456), (3857, 3728)),
    ("deepseek-v3", 8192): ((18267, 7592), (13907, 4098)), ("mixtral-8x7b", 1): ((266, 235), (189, 117)),
    ("mixtral-8x7b", 1024): ((2012, 945), (1914, 512)), ("mixtral-8x7b", 8192): ((14663, 7426), (12921, 4098)),
}


def target(tokens, roofline):
    if tokens == 1:
        need = 1 / 1.5
    elif tokens <= 128:
        need = 0.8
    elif tokens >= 1024:
        need = 0.5
    else:
        return "—"
    verdict = "met" if roofline >= need else f"**missed** ({roofline / need:.0%} of it)"
    return f"≥ {need:.0%}: {verdict}"


def target_mx(tokens, roofline, weight, acts):
    if tokens == 1:
        need = 0.6
    elif tokens <= 128:
        need = 0.8
    elif tokens >= 1024:
        need = 0.5 if acts == "bf16" else 0.4
    else:
        return "—"
    verdict = "met" if roofline >= need else f"**missed** ({roofline / need:.0%} of it)"
    return f"≥ {need:.0%}: {verdict}"


args = sys.argv[1:]
INTO = None
if "--into" in args:
    i = args.index("--into")
    if i + 1 >= len(args):
        sys.exit("--into needs a file")
    INTO = args[i + 1]
    del args[i:i + 2]


def merge_into(doc_path, table):
    """Replaces (or appends) the rows of `table` in the table of `doc_path` with the same header line."""
    lines = table.splitlines()
    head, body = lines[0], [l for l in lines[2:] if l.startswith("| ")]
    key = lambda l: tuple(c.strip() for c in l.strip().strip("|").split("|")[:3])
    new = {key(l): l for l in body}
    doc = open(doc_path).read().split("\n")
    try:
        at = doc.index(head)
    except ValueError:
        sys.exit(f"{doc_path}: no table with the header {head!r}")
    end = at + 2
    while end < len(doc) and doc[end].startswith("|"):
        end += 1
    replaced = 0
    for i in range(at + 2, end):
        k = key(doc[i])
        if k in new:
            doc[i] = new.pop(k)
            replaced += 1
    appended = [new[k] for k in new]
    doc[end:end] = appended
    # (written beside it and renamed over it: an interrupted run leaves the document whole)
    tmp = doc_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(doc))
    os.replace(tmp, doc_path)
    print(f"{doc_path}: {replaced} rows replaced, {len(appended)} appended"
          + "".join(f"\n  + {l}" for l in appended))


_captured = io.StringIO()
_redirect = contextlib.redirect_stdout(_captured) if INTO else contextlib.nullcontext()
_redirect.__enter__()


def finish():
    if INTO:
        _redirect.__exit__(None, None, None)
        merge_into(INTO, _captured.getvalue())
    sys.exit(0)

# --peer FILE: measured peer rows, keyed by (preset, weight format, activation format, T)
PEER = None
while "--peer" in args:
    i = args.index("--peer")
    if i + 1 >= len(args):
        sys.exit("--peer needs a file")
    PEER = PEER or {}
    for r in json.load(open(args[i + 1]))["rows"]:
        if r.get("time_us") is not None:
            PEER[(r["preset"], r["weight_format"], r["activation_format"], r["tokens"])] = r
    del args[i:i + 2]


def peer_head():
    return "" if PEER is None else " peer µs | peer / ours | peer kernels µs | kernels / ours |"


def peer_rule():
    return "" if PEER is None else " --- | --- | --- | --- |"


def peer_cells(r):
    """The peer's whole layer (its routing and our torch alignment included: more than SGLang's own
    CUDA ops would take), and its kernels alone (experts_us − align_us: GEMMs, activation, combine,
    as if routing and alignment were free) — the two bound SGLang's real time."""
    if PEER is None:
        return ""
    p = PEER.get((r["preset"], r["weight_format"], r["activation_format"], r["tokens"]))
    if p is None:
        return " — | — | — | — |"
    kern = p.get("experts_us", p["time_us"]) - p.get("align_us", 0.0)
    return (f" {p['time_us']:.1f} | {p['time_us'] / r['time_us']:.2f}× | {kern:.1f} | "
            f"{kern / r['time_us']:.2f}× |")


if args and args[0] == "--mx":
    # a later file's row replaces an earlier one of the same preset, formats and T; `build` is the
    # commit the row was measured with
    merged = {}
    for path in args[1:]:
        path, _, kernel = path.partition("@")
        only, _, kernel = kernel.rpartition("=")
        rep = json.load(open(path))
        for r in rep["rows"]:
            if r.get("kernel_path") is None:
                r["kernel_path"] = kernel if kernel and only in ("", r["weight_format"]) else None
            key = (r["preset"], r["weight_format"], r["activation_format"], r["tokens"], r["kernel_path"])
            merged.setdefault(key, None)
            merged[key] = (r, (rep.get("commit") or "?")[:7])
    print("| preset | weights × acts | T | experts | time µs | floor µs | roofline | target (issue 12) | rel_err | build |"
          + peer_head())
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + peer_rule())
    for (preset, w, a, t, kernel), (r, build) in merged.items():
        fmt = f"{w} × {a}" + (f" [{kernel}]" if kernel else "")
        print(f"| {preset} | {fmt} | {t} | {r['active_experts']} | {r['time_us']:.1f} | "
              f"{r['floor_us']:.1f} | {r['roofline']:.1%} | {target_mx(t, r['roofline'], w, a)} | "
              f"{r['rel_err']:.1e} | {build} |" + peer_cells(r))
    finish()

rows = []
for path in args:
    rep = json.load(open(path))
    for r in rep["rows"]:
        rows.append((rep, r))
print("| preset | format | T | experts | time µs | floor µs | roofline | target (issue 3) | SGLang (H100): µs, roofline | rel_err |"
      + peer_head())
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + peer_rule())
for rep, r in rows:
    sg = SGLANG.get((r["preset"], r["tokens"]))
    if sg is None:
        sg = "—"
    else:
        t, f = sg[0] if r["weight_format"] == "bf16" else sg[1]
        sg = f"{t}, {f / t:.0%}"
    print(f"| {r['preset']} | {r['weight_format']} | {r['tokens']} | {r['active_experts']} | "
          f"{r['time_us']:.1f} | {r['floor_us']:.1f} | {r['roofline']:.1%} | {target(r['tokens'], r['roofline'])} | "
          f"{sg} | {r['rel_err']:.1e} |" + peer_cells(r))
finish()
