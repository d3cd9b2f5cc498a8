#!/usr/bin/env python3
"""Relative error between two output files of `moerunner run` (spec/layer-file.md): ‖a − b‖ / ‖b‖ over
`output`, and whether they agree on `topk_ids` when both carry it. For checking one backend's file
against another's (e.g. cuda against cpu) on a machine with torch and safetensors.

usage: compare_outputs.py A.safetensors B.safetensors"""
import sys
import torch
from safetensors.torch import load_file

a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
x, y = a["output"].double(), b["output"].double()
assert x.shape == y.shape, (x.shape, y.shape)
den = y.norm().item()
err = (x - y).norm().item() / den if den > 0 else (x - y).norm().item()
same_ids = "n/a"
if "topk_ids" in a and "topk_ids" in b:
    same_ids = bool(torch.equal(a["topk_ids"], b["topk_ids"]))
print(f"{sys.argv[1]} vs {sys.argv[2]}: shape {tuple(x.shape)} rel_err {err:.3e} nan {bool(torch.isnan(x).any())} same topk_ids {same_ids}")
sys.exit(0 if err <= 2e-2 and not torch.isnan(x).any() else 1)
