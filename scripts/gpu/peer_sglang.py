#!/usr/bin/env python3
"""The peer column of our benchmark: SGLang's Triton fused-MoE layer, timed on the cases
`moerunner bench` times (same presets, formats and token counts), on the GPU machine.

usage: python3 scripts/gpu/peer_sglang.py --preset qwen3-30b-a3b --format bf16,fp8_block \
           --tokens 1,16,128,1024,8192 --json out.json [--sglang-wheel PATH] [--seed 0] [--iters 20]
       TRITON_INTERPRET=1 python3 scripts/gpu/peer_sglang.py --preset tiny --tokens 1,5 --dry-run
           (no GPU: Triton's interpreter runs the kernels on the CPU; checks the import, the
           alignment and the layer against float32, times nothing)

Needs torch and triton (no internet, no Rust). SGLang comes from its wheel (default: the newest
`sglang-*.whl` under gpu-bin/peer-wheels, downloaded with `pip download sglang --no-deps`): the
harness extracts the few files it uses into a scratch folder (--unpack-dir) and loads them by path.
Nothing of SGLang is copied into this repository; no pure-Python dependency beyond torch and
triton is needed.

What runs (one MoE layer as SGLang's Triton runner `_fused_moe_kernel_sequence` runs it):
  1. routing from f32 router logits, in torch (ours): the preset's method — `renormalize` (top-k
     of the logits, softmax over the k) or `deepseek_v3`/`minimax2` (sigmoid + bias, group
     selection, weights σ normalised over the k; the routed scaling factor is applied in the
     combine, as SGLang does). SGLang itself would use its fused CUDA top-k ops (sgl_kernel),
     which are not available here: `routing_us` in each row is this step alone.
  2. alignment (ours, torch): `moe_align_block_size` in current SGLang is a CUDA op from
     sgl_kernel / its JIT kernels. `align_block_size` below writes the same three tensors with
     the same semantics the Triton kernel reads: sorted_token_ids (pair ids = token*k + slot,
     grouped by expert, each expert's run padded to a multiple of BLOCK_SIZE_M with the pad value
     T*k), expert_ids (one per BLOCK_SIZE_M block; -1 past the end) and num_tokens_post_padded
     (one int32). It is a dozen small torch kernels where SGLang's CUDA op is one or two, so it
     costs the peer more than SGLang pays: `align_us` in each row is this step alone.
  3. GEMM1 `invoke_fused_moe_kernel` -> SGLang's `fused_moe_kernel` (w13, bf16 out).
  4. activation: SGLang's Triton `act_and_mul_triton` (silu) for swiglu (SGLang on CUDA calls
     sgl_kernel's `silu_and_mul`, not available here; the Triton one is its own alternative);
     for GPT-OSS's clamped swiglu (interleaved rows) and relu², torch eager, the formulas
     SGLang's runner uses (it torch.compiles the GPT-OSS one).
  5. GEMM2 `invoke_fused_moe_kernel` (w2, top-k weight multiplied in, top_k = 1).
  6. combine: SGLang's rule for CUDA — k = 2 without scaling: torch.add of the two slots; else
     SGLang's Triton `moe_sum_reduce_triton` (with the routed scaling factor). (SGLang uses its
     CUDA `moe_sum_reduce` for large T; the Triton one is what it uses for small T with PDL.)
  fp8 per-tensor ("fp8"): weights e4m3 with one scale per expert, activations quantized with
  static scales (2/448 for GEMM1's input, 8/448 for GEMM2's, as our synthetic layers), through
  SGLang's Triton `static_quant_fp8`. fp8_block: weights 128x128 blocks, activations per token per
  128 columns through SGLang's Triton per-token-group quant (`_per_token_group_quant_8bit_raw`;
  on CUDA SGLang calls a JIT CUDA kernel of the same math, not available here).
  TMA: where SGLang's shipped config for the case says "USE_TMA" (its up and/or `_down` file;
  in this wheel only E=128, N=768 on H100, i.e. qwen3-30b-a3b bf16 at large T), the harness does
  what SGLang's runner then does: GEMM1 reads w13 through a TMA descriptor (up flag); with the down
  flag GEMM1 writes its rows in sorted (padded) order, the activation runs over those rows
  filtered by expert_ids, and GEMM2 reads both operands through TMA descriptors (`--tma off`
  turns this off, `--tma on` forces it onto every config). Not exercised: the fused-swiglu GEMM1
  epilogue (opt-in in SGLang).

Stubs (modules put into sys.modules before SGLang's files are loaded by path; SGLang's package
`__init__`s, which import the server, distributed and sgl_kernel, never run):
  - package shells sglang, sglang.kernels, sglang.kernels.ops(.moe, .quantization), sglang.srt,
    sglang.srt.layers(.moe, .moe.moe_runner, .moe.moe_runner.triton_utils), sglang.srt.utils:
    empty modules so that loading one file does not import its package;
  - sglang.kernels.jit.utils: is_arch_support_pdl (SGLang's rule: CUDA arch major >= 9; False
    in the interpreter), get_jit_cuda_arch, is_hip_runtime/is_musa_runtime (False);
  - sglang.srt.utils: is_cuda (torch's CUDA, False while fp8_kernel.py loads, so that its
    CUDA-only JIT imports are skipped), is_hip/is_musa/is_xpu/is_cpu/cpu_has_amx_support
    (False), is_sm90_supported (SGLang's rule: CC 9.x and CUDA >= 12.3), ceil_align,
    get_device_name (torch's); sglang.srt.utils.patch_torch.register_fake_if_exists (no-op);
  - sglang.srt.environ.envs (every flag off: no AITER), sglang.srt.batch_invariant_ops
    (batch-invariant mode off), sglang.srt.runtime_context.get_exec (deterministic inference
    off), sglang.srt.layers.moe.utils.get_moe_padding_size (SGLang's rule: 0 unless
    SGLANG_MOE_PADDING=1, which we refuse), sglang.srt.layers.moe.moe_runner.triton_utils.get_config
    (no override), sglang.kernels.ops.quantization.int8_kernel (int8 paths, never called);
  - in the loaded fp8_kernel module, `sglang_per_token_group_quant_fp8` and
    `per_token_group_quant_fp8` are pointed at SGLang's Triton `_per_token_group_quant_8bit_raw`
    and `scaled_fp8_quant` at SGLang's Triton `static_quant_fp8` (static scales only).
Real SGLang code used: sglang/kernels/ops/moe/fused_moe_triton_kernels.py (fused_moe_kernel,
invoke_fused_moe_kernel, act_and_mul_triton, moe_sum_reduce_triton, should_enable_swap_ab),
sglang/kernels/ops/quantization/fp8_kernel.py and fp8_utils.py (the quant kernels above), and
sglang/srt/layers/moe/moe_runner/triton_utils/fused_moe_triton_config.py with its configs/
(try_get_optimal_moe_config: the tuned config SGLang ships for this E, I, GPU and dtype, else
its get_default_config).

Timing (skipped by --dry-run and in the interpreter): per case, every config of a small sweep —
SGLang's own choice for the case plus a few alternatives (BLOCK_SIZE_M/N/K, GROUP_SIZE_M,
num_warps, num_stages), each checked against the float32 reference first — is captured in a CUDA
graph and replayed with the L2 flushed (a 512 MiB memset, as our bench's timing.rs does) before
each replay; the fastest median wins and is reported with its config. Then the whole layer
(routing + alignment + experts) is timed the same way with the winner (`time_us`), and the parts:
experts given the routes (`experts_us`: align + GEMM1 + activation + GEMM2 + combine), routing
alone (`routing_us`), alignment alone (`align_us`). Medians are the upper median of the replays.

Correctness: the peer's routes on up to 4 evenly spaced tokens against spec/routing.md in
float64 (same experts, weights within 1e-5), the alignment's contract on the host, and the
peer's output on those tokens against float32 torch computations of the same layer (the
dequantized weights, activations quantized as the format does, the peer's routes):
  rel_err         against the plain one (no rounding but the format's): comparable to our bench's
                  rel_err; SGLang's bf16 intermediates put ~5e-3 (bf16) and 1-3e-2 (fp8) here;
  rel_err_stages  against the same computation rounded to bf16 where the peer stores bf16 (GEMM1
                  out, activation, weighted GEMM2 out, sum): only summation order separates them
                  (0 to 6e-4 under the interpreter); a config over 1e-2 (bf16) / 2e-2
                  (fp8) is reported and not timed.

Inputs: weights U(−a, a), a = √(3/cols), hidden U(−2, 2), logits N(0, 1), router bias U(−0.1,
0.1), GPT-OSS biases U(−0.5, 0.5) — the distributions of our synthetic layers, not the same
numbers (torch's generator from the printed --seed).
"""
import argparse
import datetime
import glob
import importlib.util
import json
import math
import os
import sys
import tempfile
import types
import zipfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# spec/models.md: (E, k, H, I, activation, routing, (n_group, topk_group), routed scaling, biases)
PRESETS = {
    "qwen3-30b-a3b": (128, 8, 2048, 768, "swiglu", "renormalize", (1, 1), 1.0, False),
    "deepseek-v3": (256, 8, 7168, 2048, "swiglu", "deepseek_v3", (8, 4), 2.5, False),
    "gpt-oss-120b": (128, 4, 2880, 2880, "swiglu_oai", "renormalize", (1, 1), 1.0, True),
    "mixtral-8x7b": (8, 2, 4096, 14336, "swiglu", "renormalize", (1, 1), 1.0, False),
    "nemotron-3-nano": (128, 6, 2688, 1856, "relu2", "deepseek_v3", (1, 1), 2.5, False),
    "minimax-m2.5": (256, 8, 3072, 1536, "swiglu", "minimax2", (1, 1), 1.0, False),
    "qwen3-235b-a22b": (128, 8, 4096, 1536, "swiglu", "renormalize", (1, 1), 1.0, False),
    # for the interpreter: small enough for Triton's CPU interpreter
    "tiny": (8, 2, 256, 128, "swiglu", "renormalize", (1, 1), 1.0, False),
    "tiny-ds": (8, 3, 256, 128, "swiglu", "deepseek_v3", (4, 2), 2.5, False),
    "tiny-oss": (8, 2, 256, 128, "swiglu_oai", "renormalize", (1, 1), 1.0, True),
    "tiny-nemo": (8, 2, 256, 128, "relu2", "deepseek_v3", (1, 1), 2.5, False),
    "tiny-mm": (8, 4, 256, 128, "swiglu", "minimax2", (1, 1), 1.0, False),
}
FORMATS = ("bf16", "fp8", "fp8_block")
X_AMP = 2.0  # synth.rs: hidden ~ U(-X_AMP, X_AMP); static fp8 scales X_AMP/448 and 8/448
OAI = (1.702, 1.0, 7.0)  # GPT-OSS swiglu: alpha, beta, limit
L2_FLUSH_BYTES = 512 << 20  # timing.rs
SAMPLED_TOKENS = 4  # bench.rs
# the peer against the staged reference (bf16 roundings where the peer stores bf16): a config
# over this is reported and not timed
TOLERANCE = {"bf16": 1e-2, "fp8": 2e-2, "fp8_block": 2e-2}
FP8_MAX = 448.0

# ------------------------------------------------------------------------------------------------
# Loading SGLang's kernel files from the wheel


def newest_wheel():
    wheels = sorted(glob.glob(os.path.join(REPO, "gpu-bin", "peer-wheels", "sglang-*.whl")),
                    key=os.path.getmtime)
    if not wheels:
        sys.exit("no sglang wheel under gpu-bin/peer-wheels (pip download sglang --no-deps -d "
                 "gpu-bin/peer-wheels), or pass --sglang-wheel")
    return wheels[-1]


WANTED = (
    "sglang/kernels/ops/moe/fused_moe_triton_kernels.py",
    "sglang/kernels/ops/quantization/fp8_kernel.py",
    "sglang/kernels/ops/quantization/fp8_utils.py",
    "sglang/srt/layers/moe/moe_runner/triton_utils/fused_moe_triton_config.py",
)
CONFIG_DIR = "sglang/srt/layers/moe/moe_runner/triton_utils/configs/"


def extract(wheel, unpack_dir):
    """The files we load (and the tuned MoE configs) from the wheel; returns (root, version)."""
    stem = os.path.basename(wheel)[: -len(".whl")]
    root = os.path.join(unpack_dir, stem)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        for n in WANTED:
            if n not in names:
                sys.exit(f"{wheel} has no {n}: this SGLang's layout is not the one the harness knows")
        if not os.path.exists(os.path.join(root, WANTED[0])):
            z.extractall(root, [n for n in names if n in WANTED or
                                (n.startswith(CONFIG_DIR) and n.endswith(".json"))])
        meta = [n for n in names if n.endswith(".dist-info/METADATA")]
        version = "?"
        if meta:
            for line in z.read(meta[0]).decode().splitlines():
                if line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
                    break
    return root, version


class _Flag:
    def __init__(self, value=False):
        self.value = value

    def get(self):
        return self.value

    def __bool__(self):
        return bool(self.value)


class _Envs:
    def __getattr__(self, name):
        return _Flag(False)


def patch_interpreter_bf16():
    """Triton's CPU interpreter (3.9) keeps bf16 values as their uint16 bit patterns and computes
    on those bits: create_dot multiplies them as integers (it widens fp8, not bf16), and binary
    and unary arithmetic on bf16 operands does integer arithmetic; its f32 -> bf16 and f32 -> e4m3
    casts truncate. Interpreter only: bf16 operands of dot, binary and unary ops are widened to
    f32 and float results rounded back to bf16, and those two casts round to nearest even (torch's
    conversion), as the GPU computes them. Never used on the GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as it

    builder = getattr(it, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_peer_bf16", False):
        return
    np.seterr(all="ignore")  # padding rows hold whatever torch.empty left there, as on the GPU

    def bf16(h):
        return h.dtype.scalar == tl.bfloat16 and h.data.dtype == np.uint16

    def widen(h):
        if not bf16(h):
            return h.data
        return (h.data.astype(np.uint32) << 16).view(np.float32)

    def narrow(f):
        bits = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return np.where(np.isnan(f), 0x7FC0, rounded).astype(np.uint16)

    dot, binary, unary = builder.create_dot, builder.binary_op, builder.unary_op
    cast, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    narrow_to = {tl.bfloat16: (torch.bfloat16, np.uint16),
                 tl.float8e4nv: (torch.float8_e4m3fn, np.uint8)}

    def downcast(src, dst):
        """f32 -> bf16 / e4m3 rounded to nearest even (the interpreter truncates)."""
        tdt, ndt = narrow_to[dst]
        f = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        return it.TensorHandle(f.to(tdt).view(torch.uint8 if ndt == np.uint8 else torch.int16)
                               .numpy().view(ndt), dst)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar in narrow_to:
            return downcast(src, dst_type.scalar)
        return cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar in narrow_to:
            return downcast(src, dst_type.scalar)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if bf16(a) or bf16(b):
            out = np.matmul(widen(a).astype(np.float32), widen(b).astype(np.float32),
                            dtype=np.float32).astype(d.data.dtype) + d.data
            return it.TensorHandle(out, d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if bf16(lhs) and bf16(rhs):
            out = op(widen(lhs), widen(rhs))
            if out.dtype == np.bool_:
                return it.TensorHandle(out, lhs.dtype.scalar)
            return it.TensorHandle(narrow(out), tl.bfloat16)
        return binary(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if bf16(arg):
            return it.TensorHandle(narrow(op(widen(arg))), tl.bfloat16)
        return unary(self, arg, op)

    builder.create_dot, builder.binary_op, builder.unary_op = create_dot, binary_op, unary_op
    builder.cast_impl, builder.create_fp_to_fp = cast_impl, create_fp_to_fp
    for name in ("create_fp_trunc", "create_fp_ext", "create_si_to_fp", "create_ui_to_fp",
                 "create_fp_to_si", "create_fp_to_ui"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    builder._peer_bf16 = True


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__path__ = []  # a package shell: submodules can be registered below it
    sys.modules[name] = m
    return m


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_sglang(root, pdl=True):
    """SGLang's Triton MoE kernels and their config rule, loaded by path with the stubs the module
    docstring lists. Returns (kernels module, fp8 quant module, config module)."""
    import logging

    if INTERPRET:
        patch_interpreter_bf16()
    cuda = torch.cuda.is_available() and torch.version.cuda is not None and not INTERPRET
    is_cuda_now = {"value": False}  # False while fp8_kernel.py loads (skips its JIT-only imports)

    def cap():
        return torch.cuda.get_device_capability() if cuda else (0, 0)

    class _Arch:
        def __init__(self, major, minor):
            self.major, self.minor = major, minor

    for pkg in ("sglang", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.moe",
                "sglang.kernels.ops.quantization", "sglang.kernels.jit", "sglang.srt",
                "sglang.srt.layers", "sglang.srt.layers.moe", "sglang.srt.layers.moe.moe_runner"):
        _module(pkg)
    _module("sglang.kernels.jit.utils",
            is_arch_support_pdl=lambda: pdl and cuda and cap()[0] >= 9,
            get_jit_cuda_arch=lambda: _Arch(*cap()),
            is_hip_runtime=lambda: False, is_musa_runtime=lambda: False)

    def sm90():
        if not cuda or cap()[0] != 9:
            return False
        return tuple(int(x) for x in torch.version.cuda.split(".")[:2]) >= (12, 3)

    _module("sglang.srt.utils",
            is_cuda=lambda: cuda and is_cuda_now["value"], is_hip=lambda: False,
            is_musa=lambda: False, is_xpu=lambda: False, is_cpu=lambda: False,
            cpu_has_amx_support=lambda: False, is_sm90_supported=sm90,
            ceil_align=lambda x, y: (x + y - 1) // y * y,
            get_device_name=lambda device_id=0: (torch.cuda.get_device_name(device_id)
                                                 if cuda else "cpu"))
    _module("sglang.srt.utils.patch_torch", register_fake_if_exists=lambda name: (lambda f: f))
    _module("sglang.srt.environ", envs=_Envs())
    _module("sglang.srt.batch_invariant_ops", is_batch_invariant_mode_enabled=lambda: False)
    exec_ctx = types.SimpleNamespace(
        deterministic=types.SimpleNamespace(enable_deterministic_inference=False),
        moe=types.SimpleNamespace(enable_fused_moe_sum_all_reduce=False))
    _module("sglang.srt.runtime_context", get_exec=lambda: exec_ctx)

    def padding_size(is_aiter_moe):
        if is_aiter_moe or os.environ.get("SGLANG_MOE_PADDING", "0") != "0":
            sys.exit("SGLANG_MOE_PADDING / AITER padding is not supported by this harness")
        return 0

    _module("sglang.srt.layers.moe.utils", get_moe_padding_size=padding_size)
    _module("sglang.srt.layers.moe.moe_runner.triton_utils", get_config=lambda: None)

    def never(*a, **k):
        raise NotImplementedError("int8 paths are stubbed out in the peer harness")

    _module("sglang.kernels.ops.quantization.int8_kernel", per_token_group_quant_int8=never,
            per_token_quant_int8=never, sglang_per_token_group_quant_int8=never)

    q = os.path.join(root, "sglang/kernels/ops/quantization")
    _load("sglang.kernels.ops.quantization.fp8_utils", os.path.join(q, "fp8_utils.py"))
    fp8 = _load("sglang.kernels.ops.quantization.fp8_kernel", os.path.join(q, "fp8_kernel.py"))
    is_cuda_now["value"] = True

    def scaled_fp8_quant(input, scale=None, num_token_padding=None,
                         use_per_token_if_dynamic=False):
        if scale is None or num_token_padding:
            raise NotImplementedError("the peer harness runs per-tensor fp8 with static scales only")
        return fp8.static_quant_fp8(input.contiguous(), scale)

    fp8.per_token_group_quant_fp8 = fp8._per_token_group_quant_8bit_raw
    fp8.sglang_per_token_group_quant_fp8 = fp8._per_token_group_quant_8bit_raw
    fp8.scaled_fp8_quant = scaled_fp8_quant
    kern = _load("sglang.kernels.ops.moe.fused_moe_triton_kernels",
                 os.path.join(root, "sglang/kernels/ops/moe/fused_moe_triton_kernels.py"))
    cfg = _load("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config",
                os.path.join(root, WANTED[3]))
    # its "config file not found, using the default" warnings: the row's config_source says so
    logging.getLogger(cfg.__name__).setLevel(logging.ERROR)
    return kern, fp8, cfg


# ------------------------------------------------------------------------------------------------
# The layer's pieces that are ours (routing, alignment, reference)


def route(logits, k, method, groups, bias):
    """topk ids int32 [T, k] and f32 weights [T, k] (the routed scaling factor not applied)."""
    logits = logits.float()
    if method == "renormalize":
        vals, ids = torch.topk(logits, k, dim=-1)
        return ids.to(torch.int32), torch.softmax(vals, dim=-1)
    scores = torch.sigmoid(logits)
    keys = scores + bias if bias is not None else scores
    n_group, topk_group = groups
    if method == "deepseek_v3" and n_group > 1:
        t, e = keys.shape
        g = keys.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g).scatter_(1, g.topk(topk_group, dim=-1).indices, 1.0)
        keep = keep.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        keys = keys.masked_fill(keep == 0, float("-inf"))
    ids = torch.topk(keys, k, dim=-1).indices
    w = scores.gather(1, ids)
    return ids.to(torch.int32), w / (w.sum(-1, keepdim=True) + 1e-20)


def route_reference(logits_row, k, method, groups, bias):
    """spec/routing.md for one token, in float64 Python: {expert: weight} (scaling not applied)."""
    r = [float(v) for v in logits_row]
    e = len(r)
    if method == "renormalize":
        ids = sorted(range(e), key=lambda j: (-r[j], j))[:k]
        m = max(r[j] for j in ids)
        z = sum(math.exp(r[j] - m) for j in ids)
        return {j: math.exp(r[j] - m) / z for j in ids}
    sig = [1 / (1 + math.exp(-v)) for v in r]
    key = [sig[j] + (float(bias[j]) if bias is not None else 0.0) for j in range(e)]
    n_group, topk_group = groups
    if method == "deepseek_v3" and n_group > 1:
        size = e // n_group
        score = [sum(sorted(key[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-score[g], g))[:topk_group]
        key = [key[j] if j // size in kept else -math.inf for j in range(e)]
    ids = sorted(range(e), key=lambda j: (-key[j], j))[:k]
    z = sum(sig[j] for j in ids) + 1e-20
    return {j: sig[j] / z for j in ids}


def check_routing(logits, ids, weights, layer, tokens):
    """The peer's routes on `tokens` against route_reference: same experts, weights within 1e-5."""
    for t in tokens:
        want = route_reference(logits[t].cpu(), layer["k"], layer["method"], layer["groups"],
                               None if layer["router_bias"] is None else layer["router_bias"].cpu())
        got = {int(i): float(w) for i, w in zip(ids[t].cpu(), weights[t].cpu())}
        assert set(got) == set(want), f"token {t}: experts {sorted(got)} != {sorted(want)}"
        for j, w in want.items():
            assert abs(got[j] - w) <= 1e-5, f"token {t}: expert {j} weight {got[j]} != {w}"


ALIGN = {"impl": "triton"}  # --align: our Triton kernel (one launch) or the torch version
_TRITON_ALIGN = {}


def _triton_align_kernel():
    """Our one-program Triton version of SGLang's alignment (its CUDA op is in sgl_kernel, which
    the GPU machine does not have): a histogram of the ids, each expert's padded run start
    (cumsum), the expert of every block, the pad fill, then each pair scattered to its expert's
    next slot by an atomic cursor (order within an expert is not the pairs' order — SGLang's CUDA
    op does not promise one either; check_alignment checks the contract on every case)."""
    if "kernel" in _TRITON_ALIGN:
        return _TRITON_ALIGN["kernel"]
    import triton
    import triton.language as tl

    @triton.jit
    def align_kernel(ids_ptr, numel, sorted_ptr, expert_ptr, ntpp_ptr, cursor_ptr, max_padded,
                     n_blocks, E: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCKS_CHUNK: tl.constexpr):
        e = tl.arange(0, E_P2)
        counts = tl.zeros([E_P2], dtype=tl.int32)
        for c0 in range(0, numel, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < numel, other=E_P2 - 1)
            counts += tl.histogram(ids, E_P2).to(tl.int32)
        counts = tl.where(e < E, counts, 0)  # (masked lanes went to the spare last bin)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, 0)
        total = tl.sum(padded, 0)
        tl.store(ntpp_ptr, total)
        tl.store(cursor_ptr + e, ends - padded, mask=e < E)
        # (a [BLOCKS_CHUNK, E_P2] comparison per step: kept small, a [1024, 256] one spilled
        # registers and cost ~270 µs on the H100)
        for b0 in range(0, n_blocks, BLOCKS_CHUNK):
            b = b0 + tl.arange(0, BLOCKS_CHUNK)
            first = b * BLOCK_M
            ex = tl.sum(((ends[None, :] <= first[:, None]) & (e[None, :] < E)).to(tl.int32), axis=1)
            tl.store(expert_ptr + b, tl.where(first < total, ex, -1), mask=b < n_blocks)
        for p0 in range(0, max_padded, CHUNK):
            p = p0 + tl.arange(0, CHUNK)
            tl.store(sorted_ptr + p, numel, mask=p < max_padded)
        tl.debug_barrier()  # the pad fill and the cursors before the scatter
        for c0 in range(0, numel, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            valid = offs < numel
            ids = tl.load(ids_ptr + offs, mask=valid, other=0)
            dest = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
            tl.store(sorted_ptr + dest, offs, mask=valid)

    _TRITON_ALIGN["kernel"] = (align_kernel, triton.next_power_of_2)
    return _TRITON_ALIGN["kernel"]


def align_sizes(numel, block_m, num_experts):
    """SGLang's buffer sizes: numel*block_m when numel < E+1, else numel + (E+1)*(block_m-1),
    rounded up to 4; and the number of blocks."""
    if numel < num_experts + 1:
        max_padded = numel * block_m
    else:
        max_padded = numel + (num_experts + 1) * (block_m - 1)
    max_padded = (max_padded + 3) // 4 * 4
    return max_padded, (max_padded + block_m - 1) // block_m


def align_block_size(topk_ids, block_m, num_experts):
    """SGLang's moe_align_block_size contract (see align_block_size_torch), by --align's choice."""
    if ALIGN["impl"] == "torch":
        return align_block_size_torch(topk_ids, block_m, num_experts)
    kernel, next_pow2 = _triton_align_kernel()
    flat = topk_ids.reshape(-1).to(torch.int32)
    numel = flat.numel()
    max_padded, n_blocks = align_sizes(numel, block_m, num_experts)
    dev = topk_ids.device
    sorted_ids = torch.empty((max_padded,), dtype=torch.int32, device=dev)
    expert_ids = torch.empty((n_blocks,), dtype=torch.int32, device=dev)
    ntpp = torch.empty((1,), dtype=torch.int32, device=dev)
    cursor = torch.empty((num_experts,), dtype=torch.int32, device=dev)
    kernel[(1,)](flat, numel, sorted_ids, expert_ids, ntpp, cursor, max_padded, n_blocks,
                 E=num_experts, E_P2=next_pow2(num_experts + 1), BLOCK_M=block_m, CHUNK=1024,
                 BLOCKS_CHUNK=max(1, 8192 // next_pow2(num_experts + 1)), num_warps=8)
    return sorted_ids, expert_ids, ntpp


def align_block_size_torch(topk_ids, block_m, num_experts):
    """SGLang's moe_align_block_size contract in torch (no host sync: capturable in a CUDA graph).

    Returns sorted_token_ids int32 [max_padded] (pair ids grouped by expert, each expert's run
    padded with numel to a multiple of block_m), expert_ids int32 [max_padded / block_m] (the
    expert of each block; -1 past num_tokens_post_padded) and num_tokens_post_padded int32 [1].
    Buffer sizes as SGLang's: numel*block_m when numel < E+1, else numel + (E+1)*(block_m-1),
    rounded up to 4."""
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    max_padded, n_blocks = align_sizes(numel, block_m, num_experts)
    dev = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    sorted_e, order = torch.sort(flat, stable=True)
    rank = torch.arange(numel, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (ends - padded)[sorted_e] + rank
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(n_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(block_start < ends[-1], expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def check_alignment(topk_ids, block_m, num_experts, aligned):
    """Asserts the alignment's contract on the host (used on every case)."""
    sorted_ids, expert_ids, ntpp = (t.cpu() for t in aligned)
    flat = topk_ids.reshape(-1).cpu().long()
    numel = flat.numel()
    n = int(ntpp[0])
    assert n % block_m == 0 and n <= sorted_ids.numel(), (n, block_m)
    ids = sorted_ids[:n].long()
    real = ids[ids < numel]
    assert sorted(real.tolist()) == list(range(numel)), "every pair exactly once"
    assert bool((ids[ids >= numel] == numel).all()), "pad value is numel"
    for b in range(n // block_m):
        blk = ids[b * block_m:(b + 1) * block_m]
        blk = blk[blk < numel]
        assert len(blk) > 0 and bool((flat[blk] == int(expert_ids[b])).all()), f"block {b}"
    assert bool((expert_ids[n // block_m:] == -1).all())


def make_layer(preset, fmt, seed, dev):
    """Random weights in SGLang's layout: w13 [E, 2I (or I), H], w2 [E, H, I], and their scales."""
    e, k, h, i, act, method, groups, rsf, biases = PRESETS[preset]
    m = i if act == "relu2" else 2 * i
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)

    def uniform(shape, amp):
        return (torch.rand(shape, generator=gen, device=dev, dtype=torch.float32) * 2 - 1) * amp

    def projection(rows, cols):
        amp = math.sqrt(3.0 / cols)
        if fmt == "bf16":
            w = torch.empty((e, rows, cols), dtype=torch.bfloat16, device=dev)
            for x in range(e):
                w[x] = uniform((rows, cols), amp).to(torch.bfloat16)
            return w, None
        w = torch.empty((e, rows, cols), dtype=torch.float8_e4m3fn, device=dev)
        if fmt == "fp8":
            s = torch.empty((e,), dtype=torch.float32, device=dev)
            for x in range(e):
                f = uniform((rows, cols), amp)
                s[x] = f.abs().max().clamp(min=1e-12) / FP8_MAX
                w[x] = (f / s[x]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return w, s
        rb, cb = (rows + 127) // 128, (cols + 127) // 128
        s = torch.empty((e, rb, cb), dtype=torch.float32, device=dev)
        for x in range(e):
            f = torch.nn.functional.pad(uniform((rows, cols), amp), (0, cb * 128 - cols, 0, rb * 128 - rows))
            blocks = f.view(rb, 128, cb, 128)
            sc = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
            q = (blocks / sc[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            w[x] = q.view(rb * 128, cb * 128)[:rows, :cols]
            s[x] = sc
        return w, s

    w13, s13 = projection(m, h)
    w2, s2 = projection(h, i)
    layer = dict(preset=preset, fmt=fmt, E=e, k=k, H=h, I=i, act=act, method=method,
                 groups=groups, rsf=rsf, w13=w13, w2=w2, s13=s13, s2=s2, b13=None, b2=None,
                 router_bias=None, a13=None, a2=None)
    if biases:
        layer["b13"] = uniform((e, m), 0.5).to(torch.bfloat16)
        layer["b2"] = uniform((e, h), 0.5).to(torch.bfloat16)
    if method in ("deepseek_v3", "minimax2"):
        layer["router_bias"] = uniform((e,), 0.1)
    if fmt == "fp8":
        layer["a13"] = torch.tensor([X_AMP / FP8_MAX], dtype=torch.float32, device=dev)
        layer["a2"] = torch.tensor([8.0 / FP8_MAX], dtype=torch.float32, device=dev)
    return layer


def dequant(w, s, x, fmt):
    """Expert x's weight in f32."""
    f = w[x].float()
    if fmt == "fp8":
        return f * s[x]
    if fmt == "fp8_block":
        sc = s[x].repeat_interleave(128, 0).repeat_interleave(128, 1)
        return f * sc[: f.shape[0], : f.shape[1]]
    return f


def quant_act(v, fmt, static_scale):
    """What the format does to an activation vector, in f32 (quantize, dequantize)."""
    if fmt == "fp8":
        s = float(static_scale)
        return (v / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    if fmt == "fp8_block":
        n = v.numel()
        g = torch.nn.functional.pad(v, (0, (-n) % 128)).view(-1, 128)
        s = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
        return ((g / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).view(-1)[:n]
    return v


def activation_f32(h, act, stages=False):
    """The activation on GEMM1's row h. stages: h is bf16 and the activation runs as the peer's
    does — act_and_mul_triton's silu in f32 rounded to bf16, times up rounded to bf16; the torch
    formulas (GPT-OSS, relu²) on bf16 tensors."""
    if stages and act == "swiglu":
        g, u = h.chunk(2)
        return (torch.nn.functional.silu(g.float()).to(torch.bfloat16) * u).float()
    if stages:
        return activation_f32(h, act).float()
    if act == "relu2":
        return torch.relu(h) ** 2
    if act == "swiglu_oai":
        alpha, beta, limit = OAI
        g, u = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
        return g * torch.sigmoid(alpha * g) * (u + beta)
    g, u = h.chunk(2)
    return torch.nn.functional.silu(g) * u


def reference(layer, hidden, ids, weights, tokens, stages=False):
    """f32 torch computation of the layer on `tokens`, with the peer's routes: [len, H].
    stages: rounded to bf16 where the peer's layer stores bf16 (GEMM1's output, the activation,
    each weighted GEMM2 output, the sum), so that only summation order and the roundings those
    change separate it from the peer: the tight check. Without: no rounding but the format's own
    quantization of weights and activations (as our bench's reference)."""
    fmt = layer["fmt"]
    bf = (lambda v: v.to(torch.bfloat16)) if stages else (lambda v: v)
    out = []
    for t in tokens:
        x = hidden[t].float()
        acc = torch.zeros(layer["H"], dtype=torch.float32, device=hidden.device)
        for j in range(layer["k"]):
            e = int(ids[t, j])
            h = dequant(layer["w13"], layer["s13"], e, fmt) @ quant_act(x, fmt, layer["a13"])
            if layer["b13"] is not None:
                h = h + layer["b13"][e].float()
            a = quant_act(activation_f32(bf(h), layer["act"], stages), fmt, layer["a2"])
            y = dequant(layer["w2"], layer["s2"], e, fmt) @ a
            if layer["b2"] is not None:
                y = y + layer["b2"][e].float()
            acc += bf(float(weights[t, j]) * y).float()
        out.append(bf(acc * layer["rsf"]).float())
    return torch.stack(out)


def sampled(t):
    n = min(SAMPLED_TOKENS, t)
    return sorted({i * t // n for i in range(n)})


def rel_err(out, ref):
    d = (out.double() - ref.double()).norm()
    r = ref.double().norm()
    return float(d / r) if r > 0 else float(d)


# ------------------------------------------------------------------------------------------------
# The peer's layer


class PeerLayer:
    def __init__(self, kern, layer):
        import triton.language as tl

        self.kern, self.L = kern, layer
        self.tl_bf16 = tl.bfloat16
        fmt = layer["fmt"]
        self.fp8 = fmt in ("fp8", "fp8_block")
        self.block_shape = [128, 128] if fmt == "fp8_block" else None

    def route(self, logits):
        L = self.L
        return route(logits, L["k"], L["method"], L["groups"], L["router_bias"])

    def experts(self, x, ids, weights, config, down_config=None, tma=(False, False)):
        """align + GEMM1 + activation + GEMM2 + combine, as _fused_moe_kernel_sequence runs them
        (tma: SGLang's up_moe_use_tma, down_moe_use_tma)."""
        L, kern = self.L, self.kern
        T, k = ids.shape
        w13, w2 = L["w13"], L["w2"]
        N = w13.shape[1]
        up_tma, down_tma = tma
        bm = config["BLOCK_SIZE_M"]
        sorted_ids, expert_ids, ntpp = align_block_size(ids, bm, L["E"])
        # with the down TMA path GEMM1 writes sorted rows, padded per expert (SGLang's sizing)
        total = T * k + (min(T * k, L["E"] + 1) * (bm - 1) if down_tma else 0)
        cache1 = torch.empty((total, N), device=x.device, dtype=x.dtype)
        common = dict(compute_type=self.tl_bf16, use_fp8_w8a8=self.fp8, use_int8_w8a8=False,
                      use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
                      block_shape=self.block_shape)
        kern.invoke_fused_moe_kernel(x, w13, L["b13"], cache1, L["a13"], L["s13"], None,
                                     weights, ids, sorted_ids, expert_ids, ntpp, False, k,
                                     dict(config), c_sorted=down_tma, b_use_tma=up_tma, **common)
        if L["act"] == "swiglu":
            cache2 = torch.empty((total, N // 2), device=x.device, dtype=x.dtype)
            if down_tma:  # rows in sorted order: filter by the block's expert
                kern.act_and_mul_triton(cache1, cache2, config, None, expert_ids, True, "silu")
            else:
                kern.act_and_mul_triton(cache1, cache2, config, ids, expert_ids, False, "silu")
        elif L["act"] == "swiglu_oai":
            alpha, beta, limit = OAI
            g, u = cache1[:, 0::2].clamp(max=limit), cache1[:, 1::2].clamp(-limit, limit)
            cache2 = (g * torch.sigmoid(g * alpha) * (u + beta)).contiguous()
        else:
            cache2 = torch.square(torch.relu(cache1))
        cache3 = torch.empty((T, k, w2.shape[1]), device=x.device, dtype=x.dtype)
        dc = dict(down_config or config)
        dc["BLOCK_SIZE_M"] = config["BLOCK_SIZE_M"]  # one alignment serves both GEMMs
        kern.invoke_fused_moe_kernel(cache2, w2, L["b2"], cache3, L["a2"], L["s2"], None,
                                     weights, ids, sorted_ids, expert_ids, ntpp, True, 1, dc,
                                     a_use_tma=down_tma, b_use_tma=down_tma, **common)
        out = torch.empty((T, w2.shape[1]), device=x.device, dtype=x.dtype)
        if k == 2 and L["rsf"] == 1.0:
            torch.add(cache3[:, 0], cache3[:, 1], out=out)
        else:
            kern.moe_sum_reduce_triton(cache3, out, L["rsf"])
        return out

    def forward(self, x, logits, config, down_config=None, tma=(False, False)):
        ids, w = self.route(logits)
        return self.experts(x, ids, w, config, down_config, tma)


# ------------------------------------------------------------------------------------------------
# Configs


def config_dtype(fmt):
    return "fp8_w8a8" if fmt in ("fp8", "fp8_block") else None


def sglang_choice(cfgmod, kern, layer, tokens):
    """SGLang's own config for the case (its tuned JSON for this E, I, GPU and dtype if the wheel
    ships one, else its get_default_config), the down config if shipped, the TMA flags its runner
    derives from them (_prepare_fused_moe_run), and where the config came from."""
    fmt = layer["fmt"]
    block = [128, 128] if fmt == "fp8_block" else None
    name = cfgmod.get_config_file_name(layer["E"], layer["I"], config_dtype(fmt), block)
    tuned = cfgmod.get_moe_configs(layer["E"], layer["I"], config_dtype(fmt),
                                   *(block or [0, 0])) is not None
    config, (down, _) = cfgmod.try_get_optimal_moe_config(
        layer["w13"].shape, layer["w2"].shape, layer["k"], config_dtype(fmt), tokens,
        block_shape=block, return_down_config=True)
    config = dict(config)
    up_tma = bool(config.pop("USE_TMA", False)) and kern.support_tensor_descriptor()
    down_tma = False
    if down is not None:
        down = dict(down)
        down_tma = bool(down.pop("USE_TMA", False)) and kern.support_tensor_descriptor()
    return (config, down, (up_tma, down_tma),
            ("sglang-tuned " + name) if tuned else "sglang-default")


def alternatives(fmt):
    def c(m, n, k, g, w, s):
        return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": g,
                "num_warps": w, "num_stages": s}

    if fmt == "fp8_block":  # BLOCK_SIZE_K must be 128 (one scale per K step)
        return [c(16, 64, 128, 1, 4, 3), c(16, 128, 128, 1, 4, 3), c(32, 128, 128, 1, 4, 3),
                c(64, 128, 128, 1, 4, 3), c(64, 128, 128, 32, 4, 3), c(128, 128, 128, 16, 8, 3)]
    if fmt == "fp8":
        return [c(16, 64, 128, 1, 4, 4), c(16, 128, 128, 1, 4, 4), c(32, 128, 128, 1, 4, 4),
                c(64, 128, 128, 1, 4, 4), c(128, 256, 128, 32, 8, 4), c(64, 256, 128, 16, 8, 3)]
    return [c(16, 32, 64, 1, 4, 4), c(16, 64, 64, 1, 4, 4), c(16, 128, 64, 1, 4, 3),
            c(32, 64, 64, 8, 4, 4), c(64, 64, 32, 8, 4, 3), c(64, 128, 64, 8, 4, 3),
            c(128, 128, 64, 8, 8, 3), c(128, 256, 64, 16, 8, 3)]


def candidates(cfgmod, kern, layer, tokens, sweep, tma_mode="auto"):
    """(source, config, down config, (up TMA, down TMA)) to try: SGLang's choice, then the
    alternatives (TMA off unless --tma on)."""
    config, down, tma, source = sglang_choice(cfgmod, kern, layer, tokens)
    force = {"auto": None, "off": (False, False), "on": (True, True)}[tma_mode]
    out = [(source, config, down, force or tma)]
    if sweep == "sglang":
        return out
    seen = {json.dumps(config, sort_keys=True)}
    alts = alternatives(layer["fmt"])
    if INTERPRET:  # the interpreter is slow: one alternative, with another BLOCK_SIZE_M
        alts = [a for a in alts if a["BLOCK_SIZE_M"] != config["BLOCK_SIZE_M"]][:1]
    for a in alts:
        key = json.dumps(a, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(("alt", a, None, force or (False, False)))
    return out


# ------------------------------------------------------------------------------------------------
# Timing (GPU only)


def graph_median_us(fn, iters, flush):
    """Median GPU time (µs) of fn captured in a CUDA graph and replayed, the L2 flushed before
    each replay (timing.rs: three warm-up replays, then `iters`; the upper median)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for i in range(3 + iters):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) * 1e3)
    del g
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------------------


def run_case(kern, cfgmod, layer, tokens, args, dev, flush):
    L = layer
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed ^ tokens)
    x = ((torch.rand((tokens, L["H"]), generator=gen, device=dev) * 2 - 1) * X_AMP).to(torch.bfloat16)
    logits = torch.randn((tokens, L["E"]), generator=gen, device=dev, dtype=torch.float32)
    peer = PeerLayer(kern, L)
    ids, w = peer.route(logits)
    toks = sampled(tokens)
    check_routing(logits, ids, w, L, toks)
    ref = reference(L, x, ids, w, toks)
    ref_stages = reference(L, x, ids, w, toks, stages=True)
    tol = TOLERANCE[L["fmt"]]
    results = []
    for source, config, down, tma in candidates(cfgmod, kern, L, tokens, args.sweep, args.tma):
        check_alignment(ids, config["BLOCK_SIZE_M"], L["E"],
                        align_block_size(ids, config["BLOCK_SIZE_M"], L["E"]))
        try:
            out = peer.forward(x, logits, config, down, tma)
            if dev == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # a config the GPU cannot run (shared memory), or a bug
            print(f"    {source} {config} tma {tma}: failed: {type(exc).__name__}: "
                  f"{str(exc)[:200]}")
            continue
        err = rel_err(out[toks].float(), ref)
        err_stages = rel_err(out[toks].float(), ref_stages)
        ok = math.isfinite(err_stages) and err_stages <= tol
        entry = dict(source=source, config=config, down_config=down, tma=list(tma), rel_err=err,
                     rel_err_stages=err_stages, ok=ok)
        if not ok:
            print(f"    {source} {config}: rel_err against the staged reference {err_stages:.2e} "
                  f"over {tol:.0e}: not timed")
        elif not args.dry_run:
            entry["experts_us"] = graph_median_us(
                lambda: peer.experts(x, ids, w, config, down, tma), args.sweep_iters, flush)
        results.append(entry)
        if args.verbose:
            print(f"    {source} {config} rel_err {err:.2e} (staged {err_stages:.2e}) "
                  f"{entry.get('experts_us', float('nan')):.1f} us")
    good = [r for r in results if r["ok"]]
    if not good:
        raise SystemExit(f"{L['preset']} {L['fmt']} T={tokens}: no config ran correctly "
                         f"({[(r['source'], r['rel_err']) for r in results]})")
    row = dict(preset=L["preset"], weight_format=L["fmt"], activation_format=L["fmt"],
               tokens=tokens, rel_err=max(r["rel_err"] for r in good),
               rel_err_stages=max(r["rel_err_stages"] for r in good))
    if args.dry_run:
        best = good[0]
        row.update(time_us=None, experts_us=None, routing_us=None, align_us=None)
    else:
        best = min(good, key=lambda r: r["experts_us"])
        cfg, down, tma = best["config"], best["down_config"], tuple(best["tma"])
        it = args.iters
        row["time_us"] = graph_median_us(lambda: peer.forward(x, logits, cfg, down, tma), it, flush)
        row["experts_us"] = graph_median_us(lambda: peer.experts(x, ids, w, cfg, down, tma), it,
                                            flush)
        row["routing_us"] = graph_median_us(lambda: peer.route(logits), it, flush)
        row["align_us"] = graph_median_us(
            lambda: align_block_size(ids, cfg["BLOCK_SIZE_M"], L["E"]), it, flush)
        row["sweep"] = [dict(source=r["source"], config=r["config"], tma=r["tma"],
                             experts_us=r["experts_us"]) for r in good]
    row["config"] = best["config"]
    row["down_config"] = best["down_config"]
    row["config_source"] = best["source"]
    row["tma"] = best["tma"]
    row["rel_err_best"] = best["rel_err"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b", help="comma list: " + ", ".join(PRESETS))
    ap.add_argument("--format", default="bf16,fp8_block", help="comma list of " + ", ".join(FORMATS))
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=20, help="timed replays of the winner")
    ap.add_argument("--sweep-iters", type=int, default=10, help="timed replays per swept config")
    ap.add_argument("--sweep", choices=("full", "sglang"), default="full",
                    help="full: SGLang's choice and the alternatives; sglang: its choice only")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--sglang-wheel", help="default: the newest under gpu-bin/peer-wheels")
    ap.add_argument("--unpack-dir", default=os.path.join(tempfile.gettempdir(), "peer-sglang"))
    ap.add_argument("--dry-run", action="store_true",
                    help="run and check every case once; no CUDA graph, no timing "
                         "(implied by TRITON_INTERPRET=1)")
    ap.add_argument("--no-flush", action="store_true", help="no L2 flush between replays")
    ap.add_argument("--align", choices=("triton", "torch"), default="triton",
                    help="our alignment: one Triton launch (default) or the torch version (a dozen "
                         "launches: it overstates SGLang's time at small T)")
    ap.add_argument("--tma", choices=("auto", "off", "on"), default="auto",
                    help="TMA descriptors: as SGLang's shipped config says (auto), never, or on "
                         "every config (a test of the path)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch without programmatic dependent launch (SGLang uses it from sm_90 "
                         "on; a Triton too old for launch_pdl needs this)")
    ap.add_argument("--verbose", action="store_true", help="print every swept config")
    args = ap.parse_args()
    args.dry_run = args.dry_run or INTERPRET

    presets = [p for p in args.preset.split(",") if p]
    formats = [f for f in args.format.split(",") if f]
    tokens = [int(t) for t in args.tokens.split(",") if t]
    for p in presets:
        if p not in PRESETS:
            sys.exit(f"unknown preset {p}; known: {', '.join(PRESETS)}")
    for f in formats:
        if f not in FORMATS:
            sys.exit(f"unknown format {f}; SGLang's Triton path on Hopper runs {', '.join(FORMATS)}")

    import triton

    if INTERPRET:
        dev = "cpu"
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        sys.exit("no CUDA device: run on the GPU machine, or with TRITON_INTERPRET=1 on the CPU")
    wheel = args.sglang_wheel or newest_wheel()
    root, version = extract(wheel, args.unpack_dir)
    ALIGN["impl"] = args.align
    kern, _, cfgmod = load_sglang(root, pdl=not args.no_pdl)
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu (TRITON_INTERPRET=1)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    print(f"sglang {version} ({os.path.basename(wheel)}), torch {torch.__version__}, "
          f"triton {triton.__version__}, device {device}, seed {args.seed}, "
          f"{'dry run (no timing)' if args.dry_run else f'{args.iters} replays, L2 flush ' + ('off' if args.no_flush else 'on')}")
    flush = None
    if not args.dry_run and not args.no_flush:
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=dev)

    rows = []
    for p in presets:
        for f in formats:
            h, i = PRESETS[p][2], PRESETS[p][3]
            if f == "fp8_block" and (h % 128 or i % 128):
                print(f"  {p} {f}: skipped (H = {h}, I = {i}: SGLang's per-token-group quant "
                      f"needs multiples of 128)")
                continue
            layer = make_layer(p, f, args.seed, dev)
            for t in tokens:
                print(f"  {p} {f} T={t} ...", flush=True)
                row = run_case(kern, cfgmod, layer, t, args, dev, flush)
                row.update(device=device, date=date)
                rows.append(row)
            del layer
            if dev == "cuda":
                torch.cuda.empty_cache()

    def us(v):
        return "—" if v is None else f"{v:.1f}"

    print()
    print("| preset | format | T | time µs | experts µs | routing µs | align µs | config | rel_err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = r["config"]
        cs = (f"M{c['BLOCK_SIZE_M']} N{c['BLOCK_SIZE_N']} K{c['BLOCK_SIZE_K']} "
              f"G{c['GROUP_SIZE_M']} w{c.get('num_warps', '-')} s{c.get('num_stages', '-')} "
              f"({r['config_source'].split(' ')[0]})")
        print(f"| {r['preset']} | {r['weight_format']} | {r['tokens']} | {us(r['time_us'])} | "
              f"{us(r['experts_us'])} | {us(r['routing_us'])} | {us(r['align_us'])} | {cs} | "
              f"{r['rel_err']:.1e} |")
    if args.json:
        report = dict(peer="sglang-triton-fused-moe", sglang_version=version,
                      sglang_wheel=os.path.basename(wheel), torch_version=torch.__version__,
                      triton_version=triton.__version__, device=device, date=date,
                      seed=args.seed, argv=sys.argv, align=args.align, dry_run=args.dry_run,
                      l2_flush=flush is not None, rows=rows)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
