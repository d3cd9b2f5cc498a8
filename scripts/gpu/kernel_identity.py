#!/usr/bin/env python3
"""Proves that a change to the CUDA kernel sources changed no code: compiles every module the backend
may load (kernels::ModuleKey::all(), mirrored below) from a git revision and from the working tree,
with NVRTC for sm_90a and the backend's options (scripts/gpu/nvrtc.py), and compares

  PTX   with the debug-only lines removed (.loc, .file, the .debug_* sections, comments), and
  SASS  the CUBIN's `.text.*` sections (the machine code) and `.nv.info.*` sections (registers,
        barriers, parameter layout), extracted from the ELF.

Prints one line per module and exits 1 if any module differs. Needs only libnvrtc (no GPU).

usage: kernel_identity.py [--old REV] [--only SUBSTRING] [--jobs N] [--keep DIR]
  --old REV   the revision to compare the working tree against (default HEAD)
  --keep DIR  write both PTX of each differing module there (for `diff`)

A revision's GEMM defines are spelled the way that revision spells them: before the split of
moe_gemm.cu (68628ee and earlier) W_FP8 / EPI / ACT / OUT_TYPE / WGMMA / WG_WS with numbers, after it
WEIGHT_FORMAT / EPILOGUE / ACT / STORE / MAINLOOP with named constants (kernels.rs,
GemmVariant::defines)."""
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

# ---------------------------------------------------------------------- ModuleKey::all(), mirrored
# (kernels.rs: GemmVariant::all / choose, GEMM_BN, WGMMA_BN, WS_BN, gemm_bm). The count is printed;
# `cargo test ... every_kernel_compiles_for_sm90a` prints the backend's.
PLAIN = ["routing", "sort", "quant", "combine"]
GEMM_BN = [16, 32, 64, 128]
WGMMA_BN = [16, 32, 64, 128]
WS_BN = [128]
STAGES = [("gated", 0), ("gated", 1), ("gated", 2), ("relu2", 0), ("down", 0), ("down_bf16", 0)]


def gemm_variants():
    out = []
    for w in range(3):  # 0 bf16, 1 fp8 per-tensor, 2 fp8 block-scale
        for stage in STAGES:
            for bn in GEMM_BN:
                for wg_on, ws_on in [(False, False), (True, False), (True, True)]:
                    wg = wg_on and w != 1 and bn in WGMMA_BN
                    v = (w, stage, bn, wg, wg and ws_on and bn in WS_BN)
                    if v not in out:
                        out.append(v)
    return out


def gemm1_out(w):
    return {0: 0, 1: 2}.get(w, 1)  # bf16, e4m3, f32


def defines(v, named):
    w, (stage, act), bn, wg, ws = v
    epi, out = {"gated": (1, gemm1_out(w)), "relu2": (2, gemm1_out(w)), "down": (0, 1), "down_bf16": (0, 0)}[stage]
    bm = 64 if bn <= 32 else 128
    if not named:
        return [f"W_FP8={w}", f"EPI={epi}", f"ACT={act}", f"OUT_TYPE={out}", f"BN={bn}", f"BM={bm}",
                f"WGMMA={int(wg)}", f"WG_WS={int(ws)}"]
    d = [f"WEIGHT_FORMAT={['WFMT_BF16', 'WFMT_E4M3_TENSOR', 'WFMT_E4M3_BLOCK'][w]}",
         f"EPILOGUE={['EPI_DOWN', 'EPI_GATED', 'EPI_RELU2'][epi]}"]
    if epi == 1:
        d.append(f"ACT={['ACT_SWIGLU', 'ACT_GEGLU', 'ACT_SWIGLU_OAI'][act]}")
    d += [f"STORE={['STORE_BF16', 'STORE_F32', 'STORE_E4M3'][out]}", f"BN={bn}", f"BM={bm}",
          f"MAINLOOP={'MAINLOOP_WGMMA_WS' if ws else 'MAINLOOP_WGMMA' if wg else 'MAINLOOP_MMA_SYNC'}"]
    return d


def label(v):
    w, (stage, act), bn, wg, ws = v
    return (f"moe_gemm w{w} {stage}{act if stage == 'gated' else ''} bn{bn} "
            f"{'wgmma_ws' if ws else 'wgmma' if wg else 'mma_sync'}")


# ---------------------------------------------------------------------- sources

def reader(rev):
    """read(rel) -> text of kernels/rel at `rev` (None: the working tree), or None if absent."""
    if rev is None:
        return nvrtc._read_kernel_file

    def read(rel):
        r = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{KREL}/{rel}"], capture_output=True)
        return r.stdout.decode() if r.returncode == 0 else None
    return read


def rust_form(v):
    """A mirrored variant as the backend names it in `moerunner info --kernels-json`."""
    w, (stage, act), bn, wg, ws = v
    name = {"gated": f"Gated {{ act: {act} }}", "relu2": "Relu2", "down": "Down", "down_bf16": "DownBf16"}[stage]
    return (["bf16", "e4m3_tensor", "e4m3_block"][w], name, 64 if bn <= 32 else 128, bn,
            "wgmma_ws" if ws else "wgmma" if wg else "mma_sync")


def modules(read, working_tree=False):
    """Translation units and (label, source, defines) of every module. For the working tree the GEMM
    defines are the backend's own (contracts.py), and the mirrored list must be exactly its list."""
    named = "WEIGHT_FORMAT" in (read("moe_gemm.cu") or "") + (read("gemm/config.cuh") or "")
    tus = {}
    for name in PLAIN + ["moe_gemm"]:
        tus[name] = nvrtc.translation_unit(name + ".cu", read=read)
    mods = [(name, name, []) for name in PLAIN]
    if working_tree:
        rust = {(v["format"], v["stage"], v["bm"], v["bn"], v["main_loop"]) for v in contracts.gemm_variants()}
        mirrored = {rust_form(v) for v in gemm_variants()}
        if rust != mirrored:
            sys.exit(f"the mirrored module list differs from the backend's: only in Rust {sorted(rust - mirrored)}, "
                     f"only here {sorted(mirrored - rust)}")
        mods += [(label(v), "moe_gemm", contracts.host_gemm_defines(*rust_form(v))) for v in gemm_variants()]
    else:
        mods += [(label(v), "moe_gemm", defines(v, named)) for v in gemm_variants()]
    return tus, mods


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
    old_tus, old_mods = modules(reader(a.old))
    new_tus, new_mods = modules(reader(None), working_tree=True)
    pairs = [(o, n) for o, n in zip(old_mods, new_mods) if a.only in n[0]]

    def one(pair):
        (lab, src, od), (_, _, nd) = pair
        try:
            old = build(old_tus[src], src, od)
            new = build(new_tus[src], src, nd)
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
          f".nv.info identical {n_info}; {bad} different or failed")
    sys.exit(1 if bad else 0)


main()
