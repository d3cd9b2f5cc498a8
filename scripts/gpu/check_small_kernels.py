#!/usr/bin/env python3
"""Device check of the small CUDA kernels of moerunner's CUDA backend (routing.cu, sort.cu, quant.cu,
combine.cu in crates/moerunner/src/backend/cuda/kernels/) against numpy re-implementations of the CPU
semantics (crates/moerunner/src/routing/*.rs, formats/act_quant.rs, backend/cpu/forward.rs phase D).

usage: python3 scripts/gpu/check_small_kernels.py [--seed N] [--quick] [--no-timing]
Needs a GPU, cupy (cuda 13), numpy, torch. Each .cu is compiled with NVRTC exactly as the backend does
(scripts/gpu/nvrtc.py: common.cuh pasted first, the backend's options for sm_90a, no fast math, no
-ftz) to a cubin loaded by cupy. Seeded random cases (the seed is printed; every case prints its own
seed on failure); outputs are poisoned before each launch (NaN / -7 / 0xAB). The sort is checked on
both of its paths: the one-block kernel and the multi-block one (sort_count, sort_scan, sort_scatter;
what the backend launches for P > 4096 pairs). Then times routing, sort and combine at T = 1, 16, 128,
4096 (routing and sort also at 8192 and 16384) with the backend's launch shapes (median of 100 launches,
cupy events), the kernels of git HEAD ("before", when git is there) beside the working tree ("after").
Ends with a PASS/FAIL table and exits 1 on any failure.

The exp that routing mirrors is glibc's expf (what Rust's f32::exp calls on Linux); the reference
calls this machine's libm expf through ctypes (on unique values), so a CPU where glibc picks its
non-FMA expf variant could differ in rare last bits.
"""
import argparse
import ctypes
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import cupy as cp
import torch

import contracts  # scripts/gpu/contracts.py: kernel signatures from the Rust launchers
import nvrtc  # scripts/gpu/nvrtc.py: the backend's compile path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KDIR = os.path.join(ROOT, "crates", "moerunner", "src", "backend", "cuda", "kernels")
OPTIONS = nvrtc.options("sm_90a")
F32 = np.float32
ARG_DTYPE_BF16, ARG_DTYPE_F16, ARG_DTYPE_F32 = 0, 1, 2

RESULTS = []  # (name, cases, ok, detail)


def record(name, cases, fails, detail=""):
    RESULTS.append((name, cases, not fails, detail if fails else detail))
    print(f"  -> {name}: {'PASS' if not fails else 'FAIL'} ({cases} cases{', ' + detail if detail else ''})",
          flush=True)


# ---------------------------------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------------------------------
COMPILE_NOTE = []


def load_module(name, extra="", body=None, common=None):
    common = common if common is not None else open(os.path.join(KDIR, "common.cuh")).read()
    body = body if body is not None else open(os.path.join(KDIR, name + ".cu")).read()
    src = nvrtc.translation_unit(f"{name}.cu", f"{body}\n{extra}",
                                 read=lambda rel: common if rel == "common.cuh" else nvrtc._read_kernel_file(rel))
    cubin, _log = nvrtc.compile(src, name + ".cu", OPTIONS)
    fd, path = tempfile.mkstemp(suffix=".cubin")
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    if not COMPILE_NOTE:
        COMPILE_NOTE.append("NVRTC: " + " ".join(OPTIONS))
    return cp.RawModule(path=path)


def i32(v):
    return np.int32(v)


# ---------------------------------------------------------------------------------------------------
# float helpers (f32 exact, as the CPU)
# ---------------------------------------------------------------------------------------------------
_libm = ctypes.CDLL("libm.so.6")
_libm.expf.restype = ctypes.c_float
_libm.expf.argtypes = [ctypes.c_float]


def expf(a):
    a = np.ascontiguousarray(a, dtype=F32)
    u, inv = np.unique(a, return_inverse=True)
    out = np.empty(u.shape, F32)
    fn = _libm.expf
    for i, v in enumerate(u.tolist()):
        out[i] = fn(v)
    return out[inv.reshape(-1)].reshape(a.shape)


def sigmoid(x):
    return F32(1.0) / (F32(1.0) + expf(-x))


def seq_sum(a):
    """Sequential f32 sum along axis 1 (Rust's iter().sum() order)."""
    s = a[:, 0].copy()
    for i in range(1, a.shape[1]):
        s = s + a[:, i]
    return s


def to_bf16_bits(x):
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=F32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(F32)


def e4m3_encode(x):
    """Mirror of formats/e4m3.rs::encode (RNE, saturating, NaN -> 0x7F|sign)."""
    x = np.asarray(x, F32)
    bits = x.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    a = np.abs(x)
    out = np.zeros(x.shape, np.uint8)
    nan = np.isnan(x)
    big = ~nan & (a >= F32(448.0))
    small = ~nan & ~big & (a < F32(2.0 ** -6))
    norm = ~nan & ~big & ~small
    out[nan] = 0x7F
    out[big] = 0x7E
    out[small] = np.rint(a[small] * F32(512.0)).astype(np.uint8)
    an = a[norm]
    unb = (an.view(np.uint32) >> 23).astype(np.int64) - 127
    scale = ((127 + 3 - unb).astype(np.uint32) << 23).view(F32)
    q = np.rint(an * scale).astype(np.int64)
    code = ((unb + 7) << 3) + (q - 8)
    out[norm] = np.minimum(code, 0x7E).astype(np.uint8)
    return out | sign


def e4m3_torch(x):
    t = torch.from_numpy(np.clip(np.asarray(x, F32), -448.0, 448.0)).to(torch.float8_e4m3fn)
    return t.view(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------------
METHODS = ["default", "renormalize", "renormalize_naive", "deepseek_v3", "llama4", "topk",
           "sigmoid_renorm", "minimax2", "sigmoid", "topk_sigmoid"]


def ref_route(r, bias, K, method, n_group, topk_group, rsf, norm):
    T, E = r.shape
    b = bias if method in (3, 7) else None
    if method in (0, 2):
        mx = r.max(axis=1, keepdims=True)
        e = expf(r - mx)
        keys = e / seq_sum(e)[:, None]
    elif method in (3, 6, 7, 8):
        keys = sigmoid(r)
        if b is not None:
            keys = keys + b[None, :]
    else:
        keys = r.copy()
    if method == 3 and n_group > 1:
        size = E // n_group
        g = keys.reshape(T, n_group, size)
        if size >= 2:
            srt = -np.sort(-g, axis=2)
            score = srt[:, :, 0] + srt[:, :, 1]
        else:
            score = g[:, :, 0].copy()
        order = np.argsort(-score, axis=1, kind="stable")[:, :topk_group]
        keep = np.zeros((T, n_group), bool)
        keep[np.arange(T)[:, None], order] = True
        keys = np.where(np.repeat(keep, size, axis=1), keys, F32(-np.inf)).astype(F32)
    ids = np.argsort(-keys, axis=1, kind="stable")[:, :K]
    rid = np.take_along_axis(r, ids, 1)
    kid = np.take_along_axis(keys, ids, 1)
    if method == 0:
        w = kid
    elif method == 1:
        w = expf(rid - rid[:, :1])
        w = w / seq_sum(w)[:, None]
    elif method == 2:
        w = kid / seq_sum(kid)[:, None]
    elif method in (3, 7):
        w = sigmoid(rid)
        d = seq_sum(w) + F32(1e-20)
        w = (w * F32(rsf)) / d[:, None]
    elif method == 5:
        w = rid.copy()
    elif method == 6:
        w = sigmoid(rid)
        if norm:
            w = w / np.maximum(seq_sum(w), F32(1e-20))[:, None]
    else:  # 4, 8, 9
        w = sigmoid(rid)
    return ids.astype(np.int32), w.astype(F32)


def route_launch(E, K, T):
    warp_bytes = (12 * E + 8 * K + 15) & ~15
    W = max(1, min(8, 49152 // warp_bytes))
    grid = max(1, min((T + W - 1) // W, 264))
    return grid, 32 * W, W * warp_bytes


def gen_logits(rng, kind, T, E):
    if kind == "randn":
        return (rng.standard_normal((T, E)) * rng.uniform(0.5, 4.0)).astype(F32)
    if kind == "ties":
        return (rng.integers(-4, 5, (T, E)) * 0.5).astype(F32)
    if kind == "sat":  # sigmoid saturates to exactly 1.0: ties among keys
        return rng.uniform(10.0, 40.0, (T, E)).astype(F32)
    if kind == "wide":
        return (rng.standard_normal((T, E)) * 30.0).astype(F32)
    raise ValueError(kind)


def check_routing(mod, seed, quick):
    k = contracts.Kernel(mod, "route_logits")
    cases = []
    c = 0
    Es = [8, 64, 128, 256, 384]
    for E in Es:
        for method in range(10):
            for dt in ("f32", "bf16"):
                c += 1
                rng = np.random.default_rng(seed * 1000 + c)
                if method == 4:
                    K = 1
                elif E == 384 and rng.random() < 0.5:
                    K = 22
                else:
                    K = int(min(E, rng.choice([1, 2, 4, 6, 8])))
                ng, tg = 1, 1
                if method == 3:
                    ng, tg = {8: (4, 2), 64: (8, 4), 128: (8, 4), 256: (8, 4), 384: (8, 4)}[E]
                    if rng.random() < 0.25:
                        ng, tg = 1, 1
                    K = min(K, tg * (E // ng))
                kind = ["randn", "ties", "sat", "wide"][int(rng.integers(0, 4))] if method not in (0, 2) \
                    else ["randn", "ties", "wide"][int(rng.integers(0, 3))]
                cases.append(dict(seed=seed * 1000 + c, E=E, K=K, method=method, dt=dt, ng=ng, tg=tg, kind=kind,
                                  T=int(rng.integers(1, 200 if not quick else 40))))
    # extra: deepseek with singleton groups, E=384 K=22 with groups, ties with zero bias, big T (grid-stride)
    extra = [dict(E=8, K=4, method=3, dt="f32", ng=8, tg=4, kind="ties", T=300),
             dict(E=384, K=22, method=3, dt="bf16", ng=8, tg=4, kind="ties", T=200),
             dict(E=256, K=8, method=3, dt="f32", ng=8, tg=4, kind="randn", T=500, zero_bias=True),
             dict(E=256, K=8, method=3, dt="bf16", ng=1, tg=1, kind="ties", T=300, zero_bias=True),
             dict(E=256, K=8, method=7, dt="f32", ng=1, tg=1, kind="sat", T=200),
             dict(E=128, K=8, method=1, dt="bf16", ng=1, tg=1, kind="ties", T=20000),
             dict(E=512, K=8, method=0, dt="f32", ng=1, tg=1, kind="randn", T=64),
             dict(E=2048, K=16, method=6, dt="bf16", ng=1, tg=1, kind="ties", T=64, norm=0),
             dict(E=64, K=64, method=5, dt="f32", ng=1, tg=1, kind="ties", T=50),
             # register-path edges: K = 32, E not a multiple of 32, grouped DeepSeek at odd sizes
             dict(E=512, K=32, method=1, dt="bf16", ng=1, tg=1, kind="ties", T=70),
             dict(E=512, K=32, method=2, dt="f32", ng=1, tg=1, kind="randn", T=70),
             dict(E=40, K=3, method=0, dt="bf16", ng=1, tg=1, kind="ties", T=90),
             dict(E=96, K=8, method=3, dt="f32", ng=4, tg=2, kind="ties", T=130),
             dict(E=320, K=12, method=3, dt="bf16", ng=10, tg=3, kind="sat", T=60),
             dict(E=160, K=33, method=5, dt="f32", ng=1, tg=1, kind="ties", T=40),
             dict(E=513, K=8, method=1, dt="bf16", ng=1, tg=1, kind="ties", T=40)]
    for x in extra:
        c += 1
        x["seed"] = seed * 1000 + c
        cases.append(x)
    fails = 0
    nonexact = 0
    for cs in cases:
        rng = np.random.default_rng(cs["seed"])
        T, E, K, method = cs["T"], cs["E"], cs["K"], cs["method"]
        r = gen_logits(rng, cs["kind"], T, E)
        if cs["dt"] == "bf16":
            bits = to_bf16_bits(r)
            r = bf16_bits_to_f32(bits)
            d_logits = cp.asarray(bits)
            dt_code = ARG_DTYPE_BF16
        else:
            d_logits = cp.asarray(r)
            dt_code = ARG_DTYPE_F32
        if cs.get("zero_bias"):
            bias = np.zeros(E, F32)
        elif cs["kind"] == "ties":
            bias = (rng.integers(-2, 3, E) * 0.25).astype(F32)
        else:
            bias = (rng.standard_normal(E) * 0.1).astype(F32)
        use_bias = method in (3, 7) or rng.random() < 0.3  # other methods must ignore it
        rsf = float(rng.choice([1.0, 2.5, 1.8269]))
        norm = cs.get("norm", int(rng.integers(0, 2)))
        ids_ref, w_ref = ref_route(r, bias if use_bias else None, K, method, cs["ng"], cs["tg"], rsf, norm)
        d_ids = cp.full((T, K), -7, cp.int32)
        d_w = cp.full((T, K), cp.nan, cp.float32)
        d_bias = cp.asarray(bias)
        grid, block, smem = route_launch(E, K, T)
        k((grid,), (block,), shared_mem=smem, logits=d_logits, logits_dtype=dt_code,
          bias=d_bias if use_bias else None, T=T, E=E, K=K, method=method, n_group=cs["ng"],
          topk_group=cs["tg"], routed_scaling_factor=rsf, norm_topk_prob=norm, topk_ids=d_ids, topk_w=d_w)
        ids = cp.asnumpy(d_ids)
        w = cp.asnumpy(d_w)
        bad_ids = int((ids != ids_ref).any(axis=1).sum())
        rel = np.abs(w.astype(np.float64) - w_ref) / np.maximum(np.abs(w_ref.astype(np.float64)), 1e-30)
        rel[(w == w_ref)] = 0.0
        bad_w = int(((rel > 1e-6) | np.isnan(w)).sum()) if bad_ids == 0 else 0
        nonexact += int((w.view(np.uint32) != w_ref.view(np.uint32)).sum()) if bad_ids == 0 else 0
        if bad_ids or bad_w:
            fails += 1
            t = int(np.nonzero((ids != ids_ref).any(axis=1) | (rel > 1e-6).any(axis=1))[0][0])
            print(f"  FAIL routing {METHODS[method]} {cs} bad_tokens={bad_ids} bad_w={bad_w}\n"
                  f"     token {t}: gpu ids {ids[t].tolist()} w {w[t].tolist()}\n"
                  f"              ref ids {ids_ref[t].tolist()} w {w_ref[t].tolist()}", flush=True)
    record("route_logits", len(cases), fails, f"{nonexact} weights not bit-identical")


def check_expf(seed):
    extra = r"""
extern "C" __global__ void test_expf(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = rt_expf(x[i]);
}
"""
    mod = load_module("routing", extra)
    k = mod.get_function("test_expf")
    rng = np.random.default_rng(seed)
    x = np.concatenate([
        rng.uniform(-110, 95, 150000).astype(F32),
        rng.uniform(-1, 1, 50000).astype(F32),
        rng.integers(0, 2 ** 32, 100000, dtype=np.uint64).astype(np.uint32).view(F32),
        np.array([0.0, -0.0, np.inf, -np.inf, 88.0, -88.0, 88.72283, 88.72284, -103.97208, -103.97209,
                  -103.2789, 1e-45, -1e-45, 1e-38], F32)])
    x = x[~np.isnan(x)]
    n = x.size
    dx = cp.asarray(x)
    dy = cp.full(n, cp.nan, cp.float32)
    k(((n + 255) // 256,), (256,), (dx, dy, i32(n)))
    y = cp.asnumpy(dy)
    ref = expf(x)
    bad = int((y.view(np.uint32) != ref.view(np.uint32)).sum())
    if bad:
        i = int(np.nonzero(y.view(np.uint32) != ref.view(np.uint32))[0][0])
        print(f"  FAIL expf port: x={x[i]!r} gpu={y[i]!r} libm={ref[i]!r}")
    record("rt_expf == libm expf", n, bad, f"{bad} mismatches" if bad else "bit-identical")


def check_unpack(mod, seed):
    k = contracts.Kernel(mod, "unpack_routes")
    fails = 0
    ncases = 0
    for n in (0, 1, 37, 100000):
        ncases += 1
        rng = np.random.default_rng(seed + n)
        ids = rng.integers(-3, 600, n).astype(np.int32)
        wb = rng.integers(0, 65536, n).astype(np.uint32)
        packed = ((ids.astype(np.int64) << 16) | wb).astype(np.int64)
        packed = ((packed + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)
        m = max(n, 1)
        d_ids = cp.full(m, -7, cp.int32)
        d_w = cp.full(m, cp.nan, cp.float32)
        grid = max(1, min((n + 255) // 256, 1024))
        k((grid,), (256,), packed=cp.asarray(packed) if n else cp.zeros(1, cp.int32), n=n, ids=d_ids, w=d_w)
        gi = cp.asnumpy(d_ids)[:n]
        gw = cp.asnumpy(d_w)[:n].view(np.uint32)
        ri = packed >> 16
        rw = (packed.view(np.uint32) & 0xFFFF) << 16
        if (gi != ri).any() or (gw != rw).any():
            fails += 1
            print(f"  FAIL unpack n={n}")
    record("unpack_routes", ncases, fails)


# ---------------------------------------------------------------------------------------------------
# sort
# ---------------------------------------------------------------------------------------------------
def ref_sort(ids, es, El, BN):
    e = ids.astype(np.int64) - es
    local = (e >= 0) & (e < El)
    counts = np.bincount(e[local], minlength=El)
    offs = np.zeros(El + 1, np.int64)
    offs[1:] = np.cumsum(counts)
    li = np.nonzero(local)[0]
    order = li[np.argsort(e[local], kind="stable")]
    pos = np.full(ids.size, -1, np.int64)
    pos[order] = np.arange(order.size)
    nt = (counts + BN - 1) // BN
    toffs = np.zeros(El + 1, np.int64)
    toffs[1:] = np.cumsum(nt)
    te = np.repeat(np.arange(El), nt)
    m = np.arange(te.size) - np.repeat(toffs[:-1], nt)
    start = offs[te] + m * BN
    end = np.minimum(start + BN, offs[te + 1])
    return offs, order, pos, te, start, end


# Rust shapes::SORT_SMEM_CAP: dynamic shared memory of the one-block sort (48 KiB minus its static 256 B,
# rounded down to 47 KiB).
SORT_SMEM_CAP = 47 * 1024
# Rust shapes::sort_multi_block / sort_chunks / sort_count / sort_scan / sort_scatter.
SORT_MULTI_MIN_PAIRS, SORT_MULTI_MAX_EXPERTS, SORT_CHUNK, SORT_MAX_CHUNKS = 4096, 1024, 1024, 256


def sort_multi_block(P, El):
    return P > SORT_MULTI_MIN_PAIRS and El <= SORT_MULTI_MAX_EXPERTS


def sort_chunks(P):
    p = max(P, 1)
    chunk = SORT_CHUNK * (-(-p // (SORT_CHUNK * SORT_MAX_CHUNKS)))
    return chunk, -(-p // chunk)


def sort_multi_launcher(mod, ids, P, es, El, BN, max_tiles, outs, chunk=None, block=256, scatter_words=None):
    """The three multi-block kernels as layer.rs enqueues them (chunk, block, scatter smem overridable
    to test the kernels' generality). outs = (offs, sorted, pos, te, ts, tend, nt). Returns (launch,
    scratch)."""
    kc, ks, kx = (contracts.Kernel(mod, n) for n in ("sort_count", "sort_scan", "sort_scatter"))
    if chunk is None:
        chunk, nc = sort_chunks(P)
    else:
        nc = -(-P // chunk)
    scratch = cp.full(nc * El, -7, cp.int32)
    offs, srt, pos, te, ts, tend, ntl = outs
    scan_smem = 4 * (2 * (El + 1) + max(El, min(1024, 32 * El)))
    xs_smem = 4 * (scatter_words if scatter_words is not None else 8 * El)
    chunked = dict(topk_ids=ids, P=P, chunk=chunk, expert_start=es, E_local=El)
    ca = kc.args(**chunked, chunk_counts=scratch)
    sa = ks.args(chunk_counts=scratch, num_chunks=nc, E_local=El, BN=BN, max_tiles=max_tiles, expert_offsets=offs,
                 tile_expert=te, tile_row_start=ts, tile_row_end=tend, num_tiles=ntl)
    xa = kx.args(**chunked, chunk_starts=scratch, sorted_pair=srt, pair_pos=pos)

    def launch():
        kc.fn((nc,), (block,), ca, shared_mem=4 * El)
        ks.fn((1,), (1024,), sa, shared_mem=scan_smem)
        kx.fn((nc,), (block,), xa, shared_mem=xs_smem)
    return launch, scratch


def check_sort(mod, seed, quick):
    k = contracts.Kernel(mod, "sort_pairs_by_expert")
    fails = 0
    cases = []
    c = 0
    Ps = [0, 1, 7, 100, 1000, 8192, 65536] + ([] if quick else [2_000_000])
    for P in Ps:
        for El in (1, 8, 64, 256):
            for BN in (8, 64, 128):
                if P >= 65536 and (El, BN) not in ((256, 128), (1, 64), (64, 8)):
                    continue
                c += 1
                cases.append(dict(P=P, El=El, BN=BN, seed=seed * 1000 + c))
    # big E_local, fewer segments (smaller smem), skew
    for (P, El, BN, smem_mode, dist) in [(8192, 1024, 128, "min", "uniform"), (8192, 1024, 64, "cap", "uniform"),
                                          (65536, 1024, 128, "full", "uniform"), (8192, 32, 128, "min", "uniform"),
                                          (100000, 16, 128, "full", "one"), (4096, 256, 128, "full", "oor"),
                                          (8192, 2000, 128, "cap", "uniform"),
                                          # one-pair-per-thread path edges (P <= 32 * S)
                                          (1024, 128, 16, "full", "uniform"), (1025, 128, 16, "full", "uniform"),
                                          (20, 1024, 128, "min", "uniform"), (33, 1024, 128, "min", "uniform"),
                                          (100, 2000, 64, "cap", "uniform"), (200, 2000, 64, "cap", "uniform"),
                                          (8, 128, 16, "full", "one"), (512, 128, 16, "full", "oor")]:
        c += 1
        cases.append(dict(P=P, El=El, BN=BN, smem=smem_mode, dist=dist, seed=seed * 1000 + c))
    # multi-block path (sort_count / sort_scan / sort_scatter), as the backend launches it for P > 4096
    for P in [4097, 65536, 131072] + ([] if quick else [2_000_000]):
        for El in (1, 128, 256):
            for dist in ("uniform", "oor", "one"):
                if P == 2_000_000 and dist == "one" and El != 128:
                    continue
                c += 1
                BN = pick_bn(P // 8, 8, El)
                cases.append(dict(P=P, El=El, BN=BN, dist=dist, multi=True, seed=seed * 1000 + c))
    # multi-block generality: odd chunks, other block sizes, fewer warp segments, big E_local, small BN
    for (P, El, BN, chunk, block, sw, dist) in [(65536, 128, 16, 1000, 128, None, "uniform"),
                                                (100000, 256, 64, 5000, 512, 2 * 256, "oor"),
                                                (50000, 1024, 128, None, 256, None, "uniform"),
                                                (9000, 1024, 32, 333, 96, 1024, "uniform"),
                                                (4100, 3, 8, 1, 32, None, "uniform"),
                                                (70000, 64, 1, None, 256, None, "uniform"),
                                                (8192, 128, 128, 8192, 1024, None, "one")]:
        c += 1
        cases.append(dict(P=P, El=El, BN=BN, chunk=chunk, block=block, scatter_words=sw, dist=dist, multi=True,
                          seed=seed * 1000 + c))
    # num_tiles clamped to max_tiles (half the tiles needed), both paths
    for (P, El, BN, multi) in [(3000, 64, 16, False), (65536, 128, 32, True), (5000, 1, 8, True)]:
        c += 1
        cases.append(dict(P=P, El=El, BN=BN, multi=multi, clamp=True, seed=seed * 1000 + c))
    for cs in cases:
        rng = np.random.default_rng(cs["seed"])
        P, El, BN = cs["P"], cs["El"], cs["BN"]
        E_total = El * int(rng.integers(1, 4))
        es = int(rng.integers(0, E_total - El + 1))
        dist = cs.get("dist", "uniform")
        if dist == "one":
            ids = np.full(P, es + El // 2, np.int32)
            ids[rng.random(P) < 0.1] = -1
        elif dist == "oor":
            ids = rng.integers(-5, E_total + 50, P).astype(np.int32)
        else:
            ids = rng.integers(-1, E_total, P).astype(np.int32)
        # "full" is capped at 47 KiB, as the backend launches it: the 48 KiB that need no opt-in
        # attribute count the kernel's 256 B of static shared memory too, so 48 KiB of dynamic memory
        # (what this check used to pass) fails the launch with CUDA_ERROR_INVALID_VALUE.
        S_words = {"full": min(2 * (El + 1) + 32 * El, SORT_SMEM_CAP // 4), "min": 3 * El + 2,
                   "cap": SORT_SMEM_CAP // 4}.get(cs.get("smem", "full"))
        smem = 4 * S_words
        offs, order, pos, te, start, end = ref_sort(ids, es, El, BN)
        max_tiles = (P + BN - 1) // BN + El
        tile_cap = max_tiles
        if cs.get("clamp"):
            tile_cap = max(1, te.size // 2)
            te, start, end = te[:tile_cap], start[:tile_cap], end[:tile_cap]
        d_ids = cp.asarray(ids) if P else cp.zeros(1, cp.int32)
        d_offs = cp.full(El + 1, -7, cp.int32)
        d_sorted = cp.full(max(P, 1), -7, cp.int32)
        d_pos = cp.full(max(P, 1), -7, cp.int32)
        d_te = cp.full(max_tiles, -7, cp.int32)
        d_ts = cp.full(max_tiles, -7, cp.int32)
        d_tend = cp.full(max_tiles, -7, cp.int32)
        d_nt = cp.full(1, -7, cp.int32)
        if cs.get("multi"):
            launch, _ = sort_multi_launcher(mod, d_ids, P, es, El, BN, tile_cap,
                                            (d_offs, d_sorted, d_pos, d_te, d_ts, d_tend, d_nt),
                                            chunk=cs.get("chunk"), block=cs.get("block", 256),
                                            scatter_words=cs.get("scatter_words"))
            launch()
        else:
            k((1,), (1024,), shared_mem=smem, topk_ids=d_ids, P=P, expert_start=es, E_local=El, BN=BN,
              max_tiles=tile_cap, expert_offsets=d_offs, sorted_pair=d_sorted, pair_pos=d_pos, tile_expert=d_te,
              tile_row_start=d_ts, tile_row_end=d_tend, num_tiles=d_nt)
        n_loc = order.size
        g_sorted = cp.asnumpy(d_sorted)
        g_pos = cp.asnumpy(d_pos)[:P]
        nt = int(cp.asnumpy(d_nt)[0])
        errs = []
        if (cp.asnumpy(d_offs) != offs).any():
            errs.append("expert_offsets")
        if not np.array_equal(np.sort(g_sorted[:n_loc]), np.sort(order)):
            errs.append("not a permutation of the local pairs")
        if (g_sorted[:n_loc] != order).any():
            errs.append("sorted_pair order (ascending pair index within expert)")
        if P > n_loc and (g_sorted[n_loc:P] != -7).any():
            errs.append("sorted_pair written past the local count")
        if (g_pos != pos).any():
            errs.append("pair_pos")
        loc = g_pos >= 0
        if loc.any() and (g_sorted[g_pos[loc]] != np.nonzero(loc)[0]).any():
            errs.append("pair_pos inconsistent with sorted_pair")
        if nt != te.size:
            errs.append(f"num_tiles {nt} != {te.size}")
        else:
            if ((cp.asnumpy(d_te)[:nt] != te).any() or (cp.asnumpy(d_ts)[:nt] != start).any()
                    or (cp.asnumpy(d_tend)[:nt] != end).any()):
                errs.append("tile list")
        if errs:
            fails += 1
            print(f"  FAIL sort {cs} E_total={E_total} expert_start={es}: {'; '.join(errs)}", flush=True)
    # timing (information only)
    P, El, BN = 8192, 128, 128
    rng = np.random.default_rng(seed)
    d_ids = cp.asarray(rng.integers(0, El, P).astype(np.int32))
    mt = P // BN + El
    bufs = [cp.zeros(El + 1, cp.int32), cp.zeros(P, cp.int32), cp.zeros(P, cp.int32), cp.zeros(mt, cp.int32),
            cp.zeros(mt, cp.int32), cp.zeros(mt, cp.int32), cp.zeros(1, cp.int32)]
    smem = 4 * (2 * (El + 1) + 32 * El)
    args = k.args(topk_ids=d_ids, P=P, expert_start=0, E_local=El, BN=BN, max_tiles=mt,
                  **dict(zip(("expert_offsets", "sorted_pair", "pair_pos", "tile_expert", "tile_row_start",
                              "tile_row_end", "num_tiles"), bufs)))
    for _ in range(3):
        k.fn((1,), (1024,), args, shared_mem=smem)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record()
    for _ in range(50):
        k.fn((1,), (1024,), args, shared_mem=smem)
    e1.record()
    e1.synchronize()
    us = cp.cuda.get_elapsed_time(e0, e1) * 1000 / 50
    launch, _ = sort_multi_launcher(mod, d_ids, P, 0, El, BN, mt, bufs)
    us_multi = median_us(launch, n=50)
    record("sort_pairs_by_expert", len(cases), fails,
           f"P=8192 E_local=128: {us:.1f} us/launch one-block, {us_multi:.1f} us multi-block (3 launches)")


# ---------------------------------------------------------------------------------------------------
# quant
# ---------------------------------------------------------------------------------------------------
def ref_quant(x32, cols, out_stride, mode, s):
    rows = x32.shape[0]
    xp = np.zeros((rows, out_stride), F32)
    xp[:, :cols] = x32[:, :cols]
    if mode == 0:
        return to_bf16_bits(xp), None
    if mode == 1:
        return e4m3_encode(xp / F32(s)), None
    nb = out_stride // 128
    blocks = xp.reshape(rows, nb, 128)
    amax = np.abs(blocks).max(axis=2)
    sc = (np.maximum(amax, F32(1e-10)) / F32(448.0)).astype(F32)
    q = e4m3_encode(blocks / sc[:, :, None]).reshape(rows, out_stride)
    return q, sc


def check_quant(mod, seed, quick):
    k = contracts.Kernel(mod, "quantize_rows")
    fails = 0
    c = 0
    torch_disagree = 0
    shapes = [(1, 128), (3, 1), (5, 129), (17, 200), (64, 7168), (33, 2048), (1000, 384), (7, 4096)]
    for rows, cols in shapes:
        for dt in (ARG_DTYPE_F32, ARG_DTYPE_BF16, ARG_DTYPE_F16):
            for mode in (0, 1, 2):
                c += 1
                rng = np.random.default_rng(seed * 1000 + c)
                pad = int(rng.choice([0, 0, 1, 3, 8]))
                in_stride = cols + pad
                out_stride = (cols + 127) // 128 * 128 + int(rng.choice([0, 0, 128]))
                scale = rng.choice([1.0, 0.01, 30.0]) * (1.0 if rng.random() < 0.8 else 1e-3)
                x = (rng.standard_normal((rows, in_stride)) * scale).astype(F32)
                if rows > 2:
                    x[1, :] = 0.0                         # all-zero row -> floor scale
                    x[2, : min(cols, 64)] *= F32(1e-30)   # tiny values (e4m3 subnormals / zeros)
                    x[0, 0] = F32(1e4)                    # saturating values
                if dt == ARG_DTYPE_F32:
                    xs = x
                    dx = cp.asarray(x)
                elif dt == ARG_DTYPE_BF16:
                    b = to_bf16_bits(x)
                    xs = bf16_bits_to_f32(b)
                    dx = cp.asarray(b)
                else:
                    h = x.astype(np.float16)
                    xs = h.astype(F32)
                    dx = cp.asarray(h.view(np.uint16))
                s_static = F32(rng.choice([0.0123, 0.5, 2.0, 1e-3]))
                d_s = cp.asarray(np.array([s_static], F32))
                esz = 2 if mode == 0 else 1
                d_out = cp.full(rows * out_stride * esz, 0xAB, cp.uint8)
                nb = out_stride // 128
                d_sc = cp.full(rows * nb, cp.nan, cp.float32)
                total = rows * out_stride // 16
                grid = max(1, min((total + 255) // 256, 200))
                k((grid,), (256,), x=dx, x_dtype=dt, rows=rows, cols=cols, in_stride=in_stride, out=d_out,
                  out_stride=out_stride, mode=mode, static_scale=d_s, out_scales=d_sc)
                q_ref, sc_ref = ref_quant(xs, cols, out_stride, mode, s_static)
                out = cp.asnumpy(d_out)
                errs = []
                if mode == 0:
                    g = out.view(np.uint16).reshape(rows, out_stride)
                    if (g != q_ref).any():
                        errs.append(f"bf16 bits ({int((g != q_ref).sum())} differ)")
                else:
                    g = out.reshape(rows, out_stride)
                    if (g != q_ref).any():
                        errs.append(f"e4m3 codes ({int((g != q_ref).sum())} differ)")
                    # cross-check the numpy encoder against torch (clamped to ±448 first)
                    xin = np.zeros((rows, out_stride), F32)
                    xin[:, :cols] = xs[:, :cols]
                    if mode == 1:
                        xin = xin / s_static
                    else:
                        xin = (xin.reshape(rows, nb, 128) / sc_ref[:, :, None]).reshape(rows, out_stride)
                    torch_disagree += int((e4m3_torch(xin) != q_ref).sum())
                    if mode == 2:
                        gs = cp.asnumpy(d_sc).reshape(rows, nb)
                        if (gs.view(np.uint32) != sc_ref.view(np.uint32)).any():
                            errs.append("scales")
                if errs:
                    fails += 1
                    print(f"  FAIL quant rows={rows} cols={cols} dtype={dt} mode={mode} in_stride={in_stride} "
                          f"out_stride={out_stride} seed={seed * 1000 + c}: {'; '.join(errs)}", flush=True)
    if torch_disagree:
        print(f"  note: numpy e4m3 encoder and torch float8_e4m3fn disagree on {torch_disagree} values")
    record("quantize_rows", c, fails, f"numpy vs torch e4m3 disagreements: {torch_disagree}")


# ---------------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------------
def check_combine(mod, seed, quick):
    k = contracts.Kernel(mod, "combine_rows")
    fails = 0
    c = 0
    for T, K, H, zpad in [(1, 1, 128, 0), (7, 2, 130, 2), (64, 8, 7168, 0), (33, 4, 2048, 4), (5, 8, 4, 0),
                          (300, 8, 512, 1), (1, 22, 384, 0), (2000, 2, 1024, 0), (3, 3, 1, 0)]:
        for dt, zdt in [(d, zd) for d in (ARG_DTYPE_F32, ARG_DTYPE_BF16, ARG_DTYPE_F16) for zd in (ARG_DTYPE_F32, ARG_DTYPE_BF16)]:
            for weighted in (True, False):
                c += 1
                rng = np.random.default_rng(seed * 1000 + c)
                z_stride = H + zpad
                P = T * K
                Ps = max(1, int(P * 0.8))
                pos = rng.integers(0, Ps, P).astype(np.int32)
                pos[rng.random(P) < 0.25] = -1
                if T > 1:
                    pos[:K] = -1  # token 0 has no local slot
                z = rng.standard_normal((Ps, z_stride)).astype(F32)
                if zdt == ARG_DTYPE_BF16:  # GEMM2 rows rounded to bf16: the kernel reads the bf16 bits
                    z_dev = cp.asarray(to_bf16_bits(z))
                    z = (to_bf16_bits(z).astype(np.uint32) << 16).view(F32)
                else:
                    z_dev = cp.asarray(z)
                w = rng.standard_normal(P).astype(F32)
                acc = np.zeros((T, H), F32)
                posr = pos.reshape(T, K)
                wr = w.reshape(T, K) if weighted else np.ones((T, K), F32)
                for j in range(K):
                    m = posr[:, j] >= 0
                    prod = wr[:, j:j + 1] * z[np.maximum(posr[:, j], 0), :H]
                    acc = np.where(m[:, None], acc + prod, acc)
                d_out = cp.full(T * H * (4 if dt == ARG_DTYPE_F32 else 2), 0xAB, cp.uint8)
                if c % 2:
                    grid, block = combine_launch(T, H)  # as the backend (Rust shapes::combine)
                else:
                    per = (H + 3) // 4 if H % 4 == 0 else H
                    grid, block = max(1, min((T * per + 255) // 256, 200)), 256
                k((grid,), (block,), z=z_dev, z_dtype=zdt, z_stride=z_stride, pair_pos=cp.asarray(pos),
                  topk_w=cp.asarray(w) if weighted else None, T=T, K=K, H=H, out=d_out, out_dtype=dt)
                out = cp.asnumpy(d_out)
                if dt == ARG_DTYPE_F32:
                    g, r = out.view(np.uint32).reshape(T, H), acc.view(np.uint32)
                elif dt == ARG_DTYPE_BF16:
                    g, r = out.view(np.uint16).reshape(T, H), to_bf16_bits(acc)
                else:
                    g, r = out.view(np.uint16).reshape(T, H), acc.astype(np.float16).view(np.uint16)
                if (g != r).any():
                    fails += 1
                    print(f"  FAIL combine T={T} K={K} H={H} z_stride={z_stride} dtype={dt} z_dtype={zdt} weighted={weighted} "
                          f"seed={seed * 1000 + c}: {int((g != r).sum())} elements differ", flush=True)
    record("combine_rows", c, fails)


# ---------------------------------------------------------------------------------------------------
# launch shapes as the backend computes them (crates/moerunner/src/backend/cuda/layer.rs `mod shapes`)
# ---------------------------------------------------------------------------------------------------
def num_sms():
    return cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]


def route_launch_rust(E, K, T):
    warp_bytes = (12 * E + 8 * K + 15) & ~15
    W = max(1, min(8, 49152 // warp_bytes))
    return max(1, min((T + W - 1) // W, 32 * num_sms())), 32 * W, W * warp_bytes


def sort_launch_rust(El):
    return 1, 1024, min(4 * (34 * El + 2), max(SORT_SMEM_CAP, 4 * (3 * El + 2)))


def combine_launch(T, H):
    items = T * ((H + 3) // 4)
    block = 128 if items <= 128 * num_sms() else 256
    return max(1, min((items + block - 1) // block, 32 * num_sms())), block


def pick_bn(T, K, E):
    mean = (T * K + E - 1) // E
    return next((bn for bn in (16, 32, 64, 128) if bn >= mean), 128)


# ---------------------------------------------------------------------------------------------------
# timing: qwen3-30b-a3b shapes (E=128, k=8, H=2048, renormalize, bf16), Rust launch shapes, median of
# N launches each between its own pair of events (no PDL here: pdl_wait is a no-op). "before" = the
# kernels of git HEAD (when git is there), "after" = the working tree.
# ---------------------------------------------------------------------------------------------------
TIMES = []  # (kernel, T, label, median us)


def median_us(launch, n=100, prep=None):
    """prep (optional) runs before each launch, outside its events (e.g. restoring an input)."""
    for _ in range(5):
        if prep is not None:
            prep()
        launch()
    ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(n)]
    for a, b in ev:
        if prep is not None:
            prep()
        a.record()
        launch()
        b.record()
    ev[-1][1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(a, b) * 1000.0 for a, b in ev]))


def git_head_source(name):
    import subprocess
    rel = os.path.relpath(os.path.join(KDIR, name), ROOT)
    try:
        return subprocess.run(["git", "-C", ROOT, "show", f"HEAD:{rel}"], capture_output=True, check=True,
                              text=True).stdout
    except Exception:
        return None


def time_small_kernels(seed, Ts=(1, 16, 128, 4096), sort_Ts=(8192, 16384)):
    """Routing, sort and combine at Ts; routing and sort also at sort_Ts (combine's z would be 1 GiB).
    The sort row is the backend's path: the one-block kernel up to P = 4096 pairs, the three multi-block
    kernels above (when the module has them; git HEAD's may not). For the multi-block path the working
    tree's one-block kernel and each of the three kernels alone are timed too ("after" column only)."""
    E, K, H = 128, 8, 2048
    variants = [("after", None, None)]
    head_common = git_head_source("common.cuh")
    if head_common is not None:
        variants.insert(0, ("before", head_common, {n: git_head_source(n + ".cu") for n in ("routing", "sort",
                                                                                          "combine")}))
    else:
        print("  (no git here: timing the working tree only)")
    rng = np.random.default_rng(seed)
    all_Ts = tuple(Ts) + tuple(t for t in sort_Ts if t not in Ts)
    for label, common, bodies in variants:
        mods = {n: load_module(n, body=None if bodies is None else bodies[n], common=common)
                for n in ("routing", "sort", "combine")}
        kr = contracts.Kernel(mods["routing"], "route_logits")
        ks = contracts.Kernel(mods["sort"], "sort_pairs_by_expert")
        kc = contracts.Kernel(mods["combine"], "combine_rows")
        try:
            multi_kernels = [contracts.Kernel(mods["sort"], n) for n in ("sort_count", "sort_scan", "sort_scatter")]
        except Exception:
            multi_kernels = None
        for T in all_Ts:
            P = T * K
            # routing
            logits = cp.asarray(to_bf16_bits((rng.standard_normal((T, E)) * 2).astype(F32)))
            ids = cp.zeros((T, K), cp.int32)
            w = cp.zeros((T, K), cp.float32)
            g, b, sm = route_launch_rust(E, K, T)
            ra = kr.args(logits=logits, logits_dtype=ARG_DTYPE_BF16, bias=None, T=T, E=E, K=K, method=1, n_group=1,
                         topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=0, topk_ids=ids, topk_w=w)
            TIMES.append(("route_logits", T, label, median_us(lambda: kr.fn((g,), (b,), ra, shared_mem=sm))))
            # sort (of the ids just routed)
            BN = pick_bn(T, K, E)
            mt = (P + BN - 1) // BN + E
            bufs = [cp.zeros(E + 1, cp.int32), cp.zeros(P, cp.int32), cp.zeros(P, cp.int32),
                    cp.zeros(mt, cp.int32), cp.zeros(mt, cp.int32), cp.zeros(mt, cp.int32), cp.zeros(1, cp.int32)]
            g, b, sm = sort_launch_rust(E)
            sort_outs = dict(zip(("expert_offsets", "sorted_pair", "pair_pos", "tile_expert", "tile_row_start",
                                  "tile_row_end", "num_tiles"), bufs))
            sa = ks.args(topk_ids=ids, P=P, expert_start=0, E_local=E, BN=BN, max_tiles=mt, **sort_outs)
            one_block = median_us(lambda: ks.fn((g,), (b,), sa, shared_mem=sm))
            if multi_kernels is not None and sort_multi_block(P, E):
                launch, scratch = sort_multi_launcher(mods["sort"], ids, P, 0, E, BN, mt, bufs)
                TIMES.append(("sort_pairs_by_expert", T, label, median_us(launch)))
                if label == "after":
                    TIMES.append(("  one-block kernel", T, label, one_block))
                    chunk, nc = sort_chunks(P)
                    kcnt, kscan, kscat = multi_kernels
                    chunked = dict(topk_ids=ids, P=P, chunk=chunk, expert_start=0, E_local=E)
                    ca = kcnt.args(**chunked, chunk_counts=scratch)
                    TIMES.append(("  sort_count", T, label,
                                  median_us(lambda: kcnt.fn((nc,), (256,), ca, shared_mem=4 * E))))
                    # the scan rewrites the counts in place: restored before each launch, outside its events
                    counts = scratch.copy()
                    scan_smem = 4 * (2 * (E + 1) + max(E, min(1024, 32 * E)))
                    sca = kscan.args(chunk_counts=scratch, num_chunks=nc, E_local=E, BN=BN, max_tiles=mt,
                                     **{n: v for n, v in sort_outs.items() if n not in ("sorted_pair", "pair_pos")})
                    TIMES.append(("  sort_scan", T, label,
                                  median_us(lambda: kscan.fn((1,), (1024,), sca, shared_mem=scan_smem),
                                            prep=lambda: scratch.__setitem__(slice(None), counts))))
                    launch()  # consistent starts again for the scatter
                    xa = kscat.args(**chunked, chunk_starts=scratch, sorted_pair=bufs[1], pair_pos=bufs[2])
                    TIMES.append(("  sort_scatter", T, label,
                                  median_us(lambda: kscat.fn((nc,), (256,), xa, shared_mem=4 * 8 * E))))
                    launch()  # leave a valid pair_pos for the combine below
            else:
                TIMES.append(("sort_pairs_by_expert", T, label, one_block))
            if T not in Ts:
                continue
            # combine (positions from the sort)
            z = cp.asarray(rng.standard_normal((P, H)).astype(F32))
            out = cp.zeros(T * H, cp.uint16)
            g, b = combine_launch(T, H)
            ca = kc.args(z=z, z_dtype=ARG_DTYPE_F32, z_stride=H, pair_pos=bufs[2], topk_w=w, T=T, K=K, H=H, out=out,
                         out_dtype=ARG_DTYPE_BF16)
            TIMES.append(("combine_rows", T, label, median_us(lambda: kc.fn((g,), (b,), ca))))
    print(f"\n{'kernel (E=128 k=8 H=2048)':<26} {'T':>6} " + " ".join(f"{v[0] + ' us':>11}" for v in variants))
    names = []
    for (kk, _, _, _) in TIMES:
        if kk not in names:
            names.append(kk)
    # the multi-block breakdown rows right after the sort rows
    order = ["route_logits", "sort_pairs_by_expert", "  one-block kernel", "  sort_count", "  sort_scan",
             "  sort_scatter", "combine_rows"]
    for kname in [n for n in order if n in names] + [n for n in names if n not in order]:
        for T in all_Ts:
            row = [next((us for (kk, tt, ll, us) in TIMES if kk == kname and tt == T and ll == v[0]), None)
                   for v in variants]
            if all(x is None for x in row):
                continue
            print(f"{kname:<26} {T:>6} " + " ".join(f"{x:>11.2f}" if x is not None else f"{'-':>11}" for x in row))
    print("(multi-block sort: three launches between one pair of events, without PDL; the backend launches "
          "them with PDL)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-timing", action="store_true", help="skip the before/after timing table")
    a = ap.parse_args()
    t0 = time.time()
    print(f"seed {a.seed} (rerun with --seed {a.seed}); device {cp.cuda.runtime.getDeviceProperties(0)['name']}",
          flush=True)
    mods = {}
    for name in ("routing", "sort", "quant", "combine"):
        try:
            mods[name] = load_module(name)
        except Exception as e:
            print(f"  FAIL compile {name}: {e}")
            RESULTS.append((f"compile {name}.cu", 1, False, str(e).splitlines()[0]))
    print("compiled:", COMPILE_NOTE[0] if COMPILE_NOTE else "-", flush=True)
    steps = [("rt_expf", lambda: check_expf(a.seed)),
             ("routing", lambda: check_routing(mods["routing"], a.seed, a.quick)),
             ("unpack", lambda: check_unpack(mods["routing"], a.seed)),
             ("sort", lambda: check_sort(mods["sort"], a.seed, a.quick)),
             ("quant", lambda: check_quant(mods["quant"], a.seed, a.quick)),
             ("combine", lambda: check_combine(mods["combine"], a.seed, a.quick))]
    for name, fn in steps:
        print(f"[{name}] ({time.time() - t0:.1f}s)", flush=True)
        try:
            fn()
            cp.cuda.Device().synchronize()
        except Exception as e:
            traceback.print_exc()
            RESULTS.append((name, 0, False, f"exception: {type(e).__name__}: {e}"))
    if not a.no_timing:
        print(f"[timing] ({time.time() - t0:.1f}s)", flush=True)
        try:
            time_small_kernels(a.seed)
        except Exception:
            traceback.print_exc()
            print("  timing failed (information only)")
    print(f"\n{'check':<24} {'cases':>6}  result  detail")
    for name, n, ok, detail in RESULTS:
        print(f"{name:<24} {n:>6}  {'PASS' if ok else 'FAIL'}    {detail}")
    bad = sum(1 for r in RESULTS if not r[2])
    print(f"\n{'ALL PASS' if not bad else f'{bad} FAILED'} (seed {a.seed}, {time.time() - t0:.1f}s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
