#!/usr/bin/env python3
"""How exact is folding MXFP8's per-32 scales into the FP8 operands (issue 12, item 1)?

An fp8 tensor-core path for mxfp8 x mxfp8 cannot apply a scale per 32 of K inside one MMA. One way
(FlashInfer's Hopper W4A8 style) keeps one scale per G blocks (G x 32 of K): within the group, each
block's E4M3 elements are multiplied by 2^(s_block - s_max) and re-rounded to E4M3, so one f32 fold per
group remains. This script measures, on seeded data, how many elements that re-rounding changes and the
relative error it adds to y = W.x against the exact MXFP8 product (what moerunner's GPU path computes:
the bf16 MMA multiplies the format's own values exactly). G = 1 is the per-k32 fold (exact).

usage: mx_operand_offset_study.py [--seed S] [--rows R] [--k K]      (numpy only)"""
import argparse

import numpy as np


def e4m3_grid():
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(sorted(set(vals)))


GRID = e4m3_grid()  # non-negative finite E4M3 values, 0 .. 448


def e4m3_round(x):
    """Round to nearest E4M3 (ties to even code), saturating to 448."""
    a = np.minimum(np.abs(x), 448.0)
    i = np.clip(np.searchsorted(GRID, a), 1, len(GRID) - 1)
    lo, hi = GRID[i - 1], GRID[i]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (i % 2 == 0))  # even index = even code
    return np.sign(x) * np.where(pick_hi, hi, lo)


def mx_quantize(x):
    """MXFP8 per 1x32 along the last axis (ceil-pow2 of amax/448): elements and scale exponents."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    s = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-300) / 448.0)), -127).clip(-127, 127)
    return e4m3_round(b / 2.0**s), s


def fold(q, s, g):
    """Re-express G consecutive blocks against their largest scale: the elements re-rounded to E4M3."""
    *lead, nb, _ = q.shape
    qg = q.reshape(*lead, nb // g, g, 32)
    sg = s.reshape(*lead, nb // g, g, 1)
    smax = sg.max(-2, keepdims=True)
    q2 = e4m3_round(qg * 2.0 ** (sg - smax))
    return q2.reshape(q.shape), np.broadcast_to(smax, sg.shape).reshape(s.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--k", type=int, default=2048)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    # weights: rows of differing scale; activations: a few outlier channels (as LLM hidden states have)
    w = rng.standard_normal((a.rows, a.k)) * np.exp(rng.normal(0, 0.5, (a.rows, 1))) * 0.02
    x = rng.standard_normal((16, a.k))
    x[:, rng.choice(a.k, 8, replace=False)] *= 60.0
    qw, sw = mx_quantize(w)
    qx, sx = mx_quantize(x)
    wv = (qw * 2.0**sw).reshape(a.rows, a.k)
    xv = (qx * 2.0**sx).reshape(16, a.k)
    y = xv @ wv.T
    print(f"seed {a.seed}: W [{a.rows}, {a.k}], x [16, {a.k}] with 8 outlier channels (x60)")
    print("G (blocks per fold)  K per fold  W elements changed  x elements changed  rel. error of y")
    for g in (1, 2, 4):
        qw2, sw2 = fold(qw, sw, g)
        qx2, sx2 = fold(qx, sx, g)
        y2 = (qx2 * 2.0**sx2).reshape(16, a.k) @ (qw2 * 2.0**sw2).reshape(a.rows, a.k).T
        cw = np.mean(qw2 != qw)
        cx = np.mean(qx2 != qx)
        err = np.linalg.norm(y2 - y) / np.linalg.norm(y)
        print(f"{g:>19}  {32 * g:>10}  {cw:>18.2%}  {cx:>18.2%}  {err:>15.2e}")


if __name__ == "__main__":
    main()
