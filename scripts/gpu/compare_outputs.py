#!/usr/bin/env python3
"""Compares two output files of `moerunner run` (spec/layer-file.md). On a machine with torch and
safetensors.

    compare_outputs.py A.safetensors B.safetensors            relative error ‖a − b‖ / ‖b‖ of `output`
                                                            (≤ 2e-2, no NaN) and whether `topk_ids` agree
    compare_outputs.py --exact A.safetensors B.safetensors    every tensor both files hold identical bit
                                                            for bit (a build against another: `at 0`)

Exit status 0 when the files agree."""
import sys
import torch
from safetensors.torch import load_file

args = sys.argv[1:]
exact = "--exact" in args
args = [a for a in args if a != "--exact"]
if len(args) != 2:
    sys.exit(__doc__)
a, b = load_file(args[0]), load_file(args[1])
x, y = a["output"].double(), b["output"].double()
assert x.shape == y.shape, (x.shape, y.shape)
den = y.norm().item()
err = (x - y).norm().item() / den if den > 0 else (x - y).norm().item()
if exact:
    names = sorted(set(a) & set(b))
    differ = [n for n in names if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
              or not torch.equal(a[n].contiguous().view(torch.uint8), b[n].contiguous().view(torch.uint8))]
    print(f"{args[0]} vs {args[1]}: tensors {names} {'IDENTICAL' if not differ else 'DIFFER: ' + str(differ)}"
          f" (rel_err {err:.3e}, nan {bool(torch.isnan(x).any())})")
    sys.exit(0 if not differ and "output" in names else 1)
same_ids = "n/a"
if "topk_ids" in a and "topk_ids" in b:
    same_ids = bool(torch.equal(a["topk_ids"], b["topk_ids"]))
print(f"{args[0]} vs {args[1]}: shape {tuple(x.shape)} rel_err {err:.3e} nan {bool(torch.isnan(x).any())} same topk_ids {same_ids}")
sys.exit(0 if err <= 2e-2 and not torch.isnan(x).any() else 1)
