#!/usr/bin/env python3
"""Reads a module's machine code without a GPU: compiles it with NVRTC for sm_90a (the backend's options,
scripts/gpu/nvrtc.py), disassembles the CUBIN with nvdisasm, and prints its registers and the main loop's
instruction mix — the loop being the backward branch whose body has the most (H)GMMA / HMMA per instruction. For kernels
that are issue-bound (the decoded formats at mid batch: docs/performance.md), instructions per K step is the
number a change must lower; a GPU run still decides whether it is faster.

usage: sass_loop.py LABEL_SUBSTRING [--keep DIR]
  LABEL_SUBSTRING  picks modules of ModuleKey::all() (`moerunner info --kernels-json`; MOERUNNER_BIN)
  --keep DIR       write each module's SASS there

nvdisasm: $NVDISASM, else on PATH, else the PyPI wheel's (`pip install nvidia-cuda-nvdisasm`; 13.2 reads
sm_90a CUBINs made by NVRTC 13.0)."""
import argparse
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contracts  # noqa: E402
import nvrtc  # noqa: E402

ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def nvdisasm():
    found = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not found:
        roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
        hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "cu*", "bin", "nvdisasm"))]
        found = hits[0] if hits else None
    if not found:
        sys.exit("no nvdisasm: set NVDISASM, or `pip install nvidia-cuda-nvdisasm`")
    return found


def main_loop(sass):
    """(instructions, MMA instructions, {opcode: count}) of the backward branch's body with the most MMAs per
    instruction (an outer loop around the main loop, a persistent kernel's, holds as many MMAs and more)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := LABEL.match(l.strip()))}
    best = None
    for i, l in enumerate(lines):
        m = BRANCH.search(l)
        if not (m and labels.get(m.group(1), i) < i):
            continue
        ops = [ADDR.search(x).group(2) for x in lines[labels[m.group(1)]:i + 1] if ADDR.search(x)]
        mma = sum("MMA" in o for o in ops)
        if mma and (best is None or mma / len(ops) > best[1] / best[0]):
            best = (len(ops), mma, ops)
    if best is None:
        return 0, 0, {}
    counts = {}
    for o in best[2]:
        counts[o] = counts.get(o, 0) + 1
    return best[0], best[1], counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only")
    ap.add_argument("--keep")
    a = ap.parse_args()
    tool = nvdisasm()
    mods = [m for m in contracts.load()["modules"] if a.only in m["label"]]
    if not mods:
        sys.exit(f"no module label contains {a.only!r}")
    for m in mods:
        defs = [d[2:] if d.startswith("-D") else d for d in m["defines"]]
        tu = nvrtc.translation_unit(m["source"] + ".cu")
        (cubin, _), log = nvrtc.compile(tu, m["source"] + ".cu", nvrtc.options("sm_90a", defs) + ["--ptxas-options=-v"],
                                        output="both")
        log = log if isinstance(log, str) else log.decode(errors="replace")
        regs = re.search(r"Used (\d+) registers", log)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            open(os.path.join(a.keep, m["label"] + ".sass"), "w").write(sass)
        n, mma, counts = main_loop(sass)
        top = " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:12])
        print(f"{m['label']}: {regs.group(1) if regs else '?'} registers; main loop {n} instructions, "
              f"{mma} MMA ({n / max(mma, 1):.1f} per MMA): {top}")


if __name__ == "__main__":
    main()
