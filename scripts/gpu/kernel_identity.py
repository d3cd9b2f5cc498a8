#!/usr/bin/env python3
"""Proves that a change to the CUDA kernel sources changed no code: compiles every module the backend
may load (kernels::ModuleKey::all(), read from `moerunner info --kernels-json` through contracts.py: the
working tree's list, its sources and defines) from a git revision's sources and from the working tree's,
with NVRTC for sm_90a and the backend's options (scripts/gpu/nvrtc.py), and compares

  PTX   with the debug-only lines removed (.loc, .file, the .debug_* sections, comments), and
  SASS  the CUBIN's `.text.*` sections (the machine code) and `.nv.info.*` sections (registers,
        barriers, parameter layout), extracted from the ELF.

Prints one line per module and exits 1 if any module differs. A module whose source file the revision
lacks is listed as new, not compared. Needs only libnvrtc (no GPU) and a moerunner binary of the
working tree (MOERUNNER_BIN, gpu-bin/moerunner or target/release/moerunner: contracts.py).

usage: kernel_identity.py [--old REV] [--only SUBSTRING] [--jobs N] [--keep DIR]
  --old REV   the revision to compare the working tree against (default HEAD)
  --keep DIR  write both PTX of each differing module there (for `diff`)

The defines are the working tree's; a revision that spelled them otherwise (before the split of
moe_gemm.cu, 68628ee and earlier) is not comparable this way."""
import argparse
import os
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contracts  # noqa: E402
import nvrtc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KREL = "crates/moerunner/src/backend/cuda/kernels"


# ---------------------------------------------------------------------- sources

def reader(rev):
    """read(rel) -> text of kernels/rel at `rev` (None: the working tree), or None if absent."""
    if rev is None:
        return nvrtc._read_kernel_file

    def read(rel):
        r = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{KREL}/{rel}"], capture_output=True)
        return r.stdout.decode() if r.returncode == 0 else None
    return read


def modules():
    """(label, source, defines) of every module the backend may load (ModuleKey::all())."""
    return [(m["label"], m["source"], [d[2:] if d.startswith("-D") else d for d in m["defines"]])
            for m in contracts.load()["modules"]]


def translation_units(read, sources):
    """{source: its translation unit as `read` gives the files, or None where the file is absent}."""
    return {s: (nvrtc.translation_unit(s + ".cu", read=read) if read(s + ".cu") is not None else None)
            for s in sources}


# ---------------------------------------------------------------------- comparison

def strip_ptx(ptx):
    out, in_debug = [], False
    for line in ptx.decode().splitlines():
        t = line.strip()
        if t.startswith(".section") and ".debug" in t:
            in_debug = True
        if in_debug:
            if t == "}":
                in_debug = False
            continue
        if not t or t.startswith("//") or t.startswith(".loc") or t.startswith(".file"):
            continue
        if re.match(r"^\$L__(tmp|func_begin|func_end)\d+:$", t):  # labels only line info refers to
            continue
        out.append(line)
    return "\n".join(out)


def elf_sections(blob):
    """{name: bytes} of an ELF64 little-endian file (a CUBIN)."""
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    stro = heads[shstrndx][4]

    def name(off):
        end = blob.index(b"\0", stro + off)
        return blob[stro + off:end].decode()
    out = {}
    for h in heads:
        nm, typ, off, size = name(h[0]), h[1], h[4], h[5]
        out[nm] = b"" if typ == 8 else blob[off:off + size]  # SHT_NOBITS has no bytes
    return out


def sass(cubin):
    secs = elf_sections(cubin)
    text = {k: v for k, v in secs.items() if k.startswith(".text.")}
    info = {k: v for k, v in secs.items() if k.startswith(".nv.info")}
    return text, info


def build(tu, name, defs):
    opts = nvrtc.options("sm_90a", defs)
    (cubin, ptx), _ = nvrtc.compile(tu, name + ".cu", opts, output="both")
    return strip_ptx(ptx), sass(cubin)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="HEAD")
    ap.add_argument("--only", default="")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep")
    a = ap.parse_args()
    mods = [m for m in modules() if a.only in m[0]]
    sources = sorted({m[1] for m in mods})
    old_tus = translation_units(reader(a.old), sources)
    new_tus = translation_units(reader(None), sources)
    new_only = [m for m in mods if old_tus[m[1]] is None]
    for lab, src, _ in new_only:
        print(f"{'new':10} {lab}  ({src}.cu is not in {a.old})", flush=True)
    pairs = [m for m in mods if old_tus[m[1]] is not None]

    def one(mod):
        lab, src, defs = mod
        try:
            old = build(old_tus[src], src, defs)
            new = build(new_tus[src], src, defs)
        except nvrtc.NvrtcError as e:
            return lab, None, None, str(e)
        if a.keep and old[0] != new[0]:
            os.makedirs(a.keep, exist_ok=True)
            stem = os.path.join(a.keep, lab.replace(" ", "_"))
            open(stem + ".old.ptx", "w").write(old[0])
            open(stem + ".new.ptx", "w").write(new[0])
        return lab, old[0] == new[0], (old[1][0] == new[1][0], old[1][1] == new[1][1]), ""

    n_ptx = n_text = n_info = 0
    bad = 0
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        for lab, ptx_same, sass_same, err in ex.map(one, pairs):
            if ptx_same is None:
                print(f"ERROR      {lab}: {err.splitlines()[0] if err else ''}\n{err}", flush=True)
                bad += 1
                continue
            text_same, info_same = sass_same
            n_ptx += ptx_same
            n_text += text_same
            n_info += info_same
            ok = ptx_same and text_same and info_same
            bad += not ok
            what = "identical" if ok else "DIFFERENT"
            print(f"{what:10} {lab}  (ptx {'=' if ptx_same else '!='}, sass .text {'=' if text_same else '!='}, "
                  f".nv.info {'=' if info_same else '!='})", flush=True)
    print(f"{len(pairs)} modules ({a.old} vs working tree): PTX identical {n_ptx}, SASS .text identical {n_text}, "
          f".nv.info identical {n_info}; {bad} different or failed; {len(new_only)} new")
    sys.exit(1 if bad else 0)


main()
