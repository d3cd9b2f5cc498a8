#!/usr/bin/env python3
"""Tiny checkpoints written by transformers itself, with golden outputs of its own MoE block.

For each family this builds a model from transformers' own config class (H = 128, E = 4, one or
two layers), fills its MoE block with seeded random values, writes it with `save_pretrained`
(bf16, sharded with an index; `save_original_format=False` for the `-fused` variants), and runs
the block's own router and experts on fixed hidden states. The folders are then stripped to the
MoE layer's tensors (attention and embeddings are not ours to read and would make the fixtures
large); names, dtypes, shapes, shards and index are as transformers wrote them.

Writes, under OUT (default crates/moerunner/tests/fixtures/transformers/):
  <name>/config.json, model-*.safetensors, model.safetensors.index.json   the checkpoint
  <name>/golden.safetensors   hidden_states [T, H] bf16 (an input file), output [T, H] f32
                              (transformers' experts(hidden, its top-k) — shared experts, which
                              are outside our layer, left out), topk_ids [T, k] i32
  <name>/layer.txt            the MoE layer's index

Needs torch and transformers >= 5. CI does not rerun it: torch
from PyPI brings ~3 GB of CUDA libraries, more than the check is worth on every run; the Rust test
crates/moerunner/tests/transformers_oracle.rs reads the committed results without torch.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict

import torch
import transformers as T
from safetensors.torch import load_file, save_file

H, E, K, TOKENS = 128, 4, 2, 8
COMMON = dict(hidden_size=H, vocab_size=16, num_attention_heads=2, num_key_value_heads=1,
              head_dim=64, intermediate_size=64)


def families():
    # name: (config, model class, layer index, block attribute path, save_original_format)
    return {
        "qwen3_moe": (T.Qwen3MoeConfig(**COMMON, num_hidden_layers=1, num_local_experts=E,
                                       num_experts_per_tok=K, moe_intermediate_size=8,
                                       norm_topk_prob=True),
                      T.Qwen3MoeForCausalLM, 0, "mlp", True),
        "qwen3_moe-fused": (T.Qwen3MoeConfig(**COMMON, num_hidden_layers=1, num_local_experts=E,
                                             num_experts_per_tok=K, moe_intermediate_size=8,
                                             norm_topk_prob=True),
                            T.Qwen3MoeForCausalLM, 0, "mlp", False),
        "qwen2_moe": (T.Qwen2MoeConfig(**COMMON, num_hidden_layers=1, num_experts=E,
                                       num_experts_per_tok=K, moe_intermediate_size=8,
                                       shared_expert_intermediate_size=8, norm_topk_prob=True),
                      T.Qwen2MoeForCausalLM, 0, "mlp", True),
        "mixtral": (T.MixtralConfig(**{**COMMON, "intermediate_size": 8}, num_hidden_layers=1, num_local_experts=E,
                                    num_experts_per_tok=K),
                    T.MixtralForCausalLM, 0, "mlp", True),
        "deepseek_v3": (T.DeepseekV3Config(**{**COMMON, "intermediate_size": 64},
                                           num_hidden_layers=2, first_k_dense_replace=1,
                                           n_routed_experts=E, num_experts_per_tok=K,
                                           moe_intermediate_size=8, n_group=2, topk_group=1,
                                           routed_scaling_factor=2.5, n_shared_experts=1,
                                           q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
                                           qk_nope_head_dim=16, v_head_dim=16),
                        T.DeepseekV3ForCausalLM, 1, "mlp", True),
        "minimax_m2": (T.MiniMaxM2Config(**{**COMMON, "intermediate_size": 8},
                                         num_hidden_layers=1, num_local_experts=E,
                                         num_experts_per_tok=K),
                       T.MiniMaxM2ForCausalLM, 0, "mlp", True),
        "gpt_oss": (T.GptOssConfig(**{**COMMON, "intermediate_size": 16}, num_hidden_layers=1,
                                   num_local_experts=E, num_experts_per_tok=K),
                    T.GptOssForCausalLM, 0, "mlp", True),
        "nemotron_h": (T.NemotronHConfig(hidden_size=H, vocab_size=16, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=64,
                                         layers_block_type=["moe"], n_routed_experts=E,
                                         num_experts_per_tok=K, moe_intermediate_size=8,
                                         moe_shared_expert_intermediate_size=8, n_group=1,
                                         topk_group=1, routed_scaling_factor=2.5,
                                         mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=16,
                                         n_groups=1),
                       T.NemotronHForCausalLM, 0, "mixer", True),
    }


def router_and_experts(block):
    """transformers' own top-k and experts for hidden states [T, H] (no shared experts)."""
    def run(x):
        if hasattr(block, "router"):
            _, w, idx = block.router(x)
        elif hasattr(block, "e_score_correction_bias"):
            _, w, idx = block.gate(x, block.e_score_correction_bias)
        else:
            _, w, idx = block.gate(x)
        return block.experts(x, idx, w), idx
    return run


def build(name, cfg, cls, layer, attr, original, out):
    torch.manual_seed(sum(map(ord, name.split("-")[0])))
    model = cls(cfg).to(torch.bfloat16).eval()
    block = getattr(model.model.layers[layer], attr)
    with torch.no_grad():
        for pname, p in block.named_parameters():
            if "shared" in pname:
                continue
            std = 0.02 if "bias" in pname else 1.0 / (p.shape[-1] ** 0.5)
            p.copy_(torch.randn_like(p, dtype=torch.float32).mul(std).to(p.dtype))
        for bname, b in block.named_buffers():
            if "e_score_correction_bias" in bname:
                b.copy_(torch.randn_like(b, dtype=torch.float32).mul(0.1).to(b.dtype))
    dest = os.path.join(out, name)
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size="16KB", save_original_format=original)
        strip(tmp, dest, layer)
    x = torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch.no_grad():
        y, idx = router_and_experts(block)(x)
    save_file({"hidden_states": x.contiguous(), "output": y.float().contiguous(),
               "topk_ids": idx.to(torch.int32).contiguous()},
              os.path.join(dest, "golden.safetensors"))
    with open(os.path.join(dest, "layer.txt"), "w") as f:
        f.write(f"{layer}\n")


def strip(src, dest, layer):
    """Copies the folder keeping only layer `layer`'s MoE tensors (shards that end empty go)."""
    os.makedirs(dest)
    shutil.copy(os.path.join(src, "config.json"), dest)
    index_path = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
    else:
        index, shards = None, ["model.safetensors"]
    marker = f"layers.{layer}."
    keep_map = {}
    for shard in shards:
        tensors = load_file(os.path.join(src, shard))
        kept = {k: v for k, v in tensors.items()
                if marker in k and any(m in k for m in (".mlp.", ".block_sparse_moe.", ".mixer."))
                and "shared" not in k}
        if kept:
            save_file(kept, os.path.join(dest, shard), metadata={"format": "pt"})
            keep_map.update({k: shard for k in kept})
    if len(set(keep_map.values())) < 2:
        sys.exit(f"{dest}: the layer's tensors landed in one shard; lower max_shard_size")
    with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"transformers": T.__version__},
                   "weight_map": dict(sorted(keep_map.items()))}, f, indent=1)


def fp8_block_release(out):
    """Qwen3-MoE's FP8 release as DeepSeek/Qwen ship it, derived from a bf16 model: each expert
    weight E4M3 with `weight_scale_inv` F32 per 128×128 block (s = amax / 448, q = e4m3(w / s)),
    `quantization_config` {quant_method: fp8, weight_block_size: [128, 128]}. Goldens: transformers'
    block on the dequantized weights (`output`, activations unquantized), and the same layer with
    our activation quantization emulated in f32 (`output_emulated`: x and the intermediate
    quantized 1×128, s = max(amax, 1e-10) / 448, routing in f32)."""
    name = "qwen3_moe-fp8_block"
    cfg = T.Qwen3MoeConfig(**COMMON, num_hidden_layers=1, num_local_experts=E,
                           num_experts_per_tok=K, moe_intermediate_size=128, norm_topk_prob=True)
    build(name, cfg, T.Qwen3MoeForCausalLM, 0, "mlp", True, out)
    dest = os.path.join(out, name)
    torch.manual_seed(0)
    model = None
    with open(os.path.join(dest, "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update({k: (shard, v) for k, v in load_file(os.path.join(dest, shard)).items()})
    deq = {}
    new = defaultdict(dict)
    for k, (shard, v) in tensors.items():
        if ".experts." in k and k.endswith(".weight"):
            q, s = quantize_fp8_block(v.float())
            new[shard][k] = q
            new[shard][k + "_scale_inv"] = s
            index["weight_map"][k + "_scale_inv"] = shard
            deq[k] = dequantize_fp8_block(q, s)
        else:
            new[shard][k] = v
    for shard, ts in new.items():
        save_file(ts, os.path.join(dest, shard), metadata={"format": "pt"})
    with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(dest, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # transformers' own block on the dequantized weights (bf16, as it would run them unquantized).
    model = T.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    block = model.model.layers[0].mlp
    golden = load_file(os.path.join(dest, "golden.safetensors"))
    x = golden["hidden_states"]
    p = "model.layers.0.mlp."
    w = {k[len(p):]: v for k, v in deq.items() if k.startswith(p)}
    gate = torch.stack([w[f"experts.{e}.gate_proj.weight"] for e in range(E)])
    up = torch.stack([w[f"experts.{e}.up_proj.weight"] for e in range(E)])
    down = torch.stack([w[f"experts.{e}.down_proj.weight"] for e in range(E)])
    router = tensors[p + "gate.weight"][1]
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1).to(torch.bfloat16))
        block.experts.down_proj.copy_(down.to(torch.bfloat16))
        y, idx = router_and_experts(block)(x)
    emulated = emulate_fp8_block(x.float(), router.float(), gate, up, down)
    save_file({"hidden_states": x, "output": y.float().contiguous(), "topk_ids": idx.to(torch.int32),
               "output_emulated": emulated.contiguous()},
              os.path.join(dest, "golden.safetensors"))
    print(f"{name}: derived FP8 128x128 release")


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_encode(w):
    """[rows, K] f32 → GPT-OSS `_blocks` U8 [rows, K/32, 16] (two E2M1 codes a byte, low nibble
    first) and `_scales` U8 [rows, K/32] (UE8M0, s = 2^ceil(log2(amax / 6)); amax = 0 → 2^-127),
    and the dequantized values."""
    rows, k = w.shape
    b = w.reshape(rows, k // 32, 32)
    amax = b.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    s = torch.pow(2.0, exp)
    v = b / s[..., None]
    mag = (v.abs()[..., None] - E2M1).abs().argmin(dim=-1)  # nearest E2M1 magnitude
    code = mag | ((v < 0) & (mag > 0)).to(torch.int64) << 3
    deq = E2M1[mag] * torch.where(code >= 8, -1.0, 1.0) * s[..., None]
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8), deq.reshape(rows, k)


def mxfp4_release(out):
    """GPT-OSS's MXFP4 release derived from a transformers-built bf16 GPT-OSS: the BF16
    `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]` become `gate_up_proj_blocks [E, 2I, H/32, 16]`
    / `_scales [E, 2I, H/32]` and `down_proj_blocks [E, H, I/32, 16]` / `_scales`, biases and router
    as they are, `quantization_config` {quant_method: mxfp4}. Goldens: transformers' block on the
    dequantized weights (`output`), and the layer in f32 on them with our W4A16 handling emulated
    (`output_emulated`: bf16 hidden states, the intermediate rounded to bf16; routing in f32)."""
    name = "gpt_oss-mxfp4"
    cfg = T.GptOssConfig(**{**COMMON, "intermediate_size": 32}, num_hidden_layers=1,
                         num_local_experts=E, num_experts_per_tok=K)
    build(name, cfg, T.GptOssForCausalLM, 0, "mlp", True, out)
    dest = os.path.join(out, name)
    with open(os.path.join(dest, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = {}
    for shard in sorted(set(index["weight_map"].values())):
        shards[shard] = load_file(os.path.join(dest, shard))
    p = "model.layers.0.mlp."
    where = {k: sh for sh, ts in shards.items() for k in ts}
    gu = shards[where[p + "experts.gate_up_proj"]].pop(p + "experts.gate_up_proj").float()
    dn = shards[where[p + "experts.down_proj"]].pop(p + "experts.down_proj").float()
    gu_rows = gu.transpose(1, 2).contiguous()   # [E, 2I, H], rows interleaved gate/up
    dn_rows = dn.transpose(1, 2).contiguous()   # [E, H, I]
    enc = [mxfp4_encode(gu_rows[e]) for e in range(E)]
    dec = [mxfp4_encode(dn_rows[e]) for e in range(E)]
    for proj, parts, rows in (("gate_up_proj", enc, gu_rows), ("down_proj", dec, dn_rows)):
        sh = where[p + f"experts.{proj}"]  # where transformers put the BF16 tensor
        shards[sh][p + f"experts.{proj}_blocks"] = torch.stack([q for q, _, _ in parts]).contiguous()
        shards[sh][p + f"experts.{proj}_scales"] = torch.stack([s for _, s, _ in parts]).contiguous()
        index["weight_map"].pop(p + f"experts.{proj}", None)
        index["weight_map"][p + f"experts.{proj}_blocks"] = sh
        index["weight_map"][p + f"experts.{proj}_scales"] = sh
    for sh, ts in shards.items():
        save_file(ts, os.path.join(dest, sh), metadata={"format": "pt"})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(dest, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    w13 = torch.stack([d for _, _, d in enc])          # [E, 2I, H] dequantized
    w2 = torch.stack([d for _, _, d in dec])           # [E, H, I]
    tensors = {k: v for ts in shards.values() for k, v in ts.items()}
    b13 = tensors[p + "experts.gate_up_proj_bias"].float()
    b2 = tensors[p + "experts.down_proj_bias"].float()
    rw, rb = tensors[p + "router.weight"].float(), tensors[p + "router.bias"].float()
    golden = load_file(os.path.join(dest, "golden.safetensors"))
    x = golden["hidden_states"]
    model = T.GptOssForCausalLM(cfg).to(torch.bfloat16).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.router.weight.copy_(rw.to(torch.bfloat16))
        block.router.bias.copy_(rb.to(torch.bfloat16))
        block.experts.gate_up_proj.copy_(w13.transpose(1, 2).to(torch.bfloat16))
        block.experts.down_proj.copy_(w2.transpose(1, 2).to(torch.bfloat16))
        block.experts.gate_up_proj_bias.copy_(b13.to(torch.bfloat16))
        block.experts.down_proj_bias.copy_(b2.to(torch.bfloat16))
        y, idx = router_and_experts(block)(x)
    xf = x.float()
    logits = xf @ rw.T + rb
    top, ids = logits.topk(K, dim=-1)
    wts = torch.softmax(top, dim=-1)
    emulated = torch.zeros_like(xf)
    alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit
    for t in range(xf.shape[0]):
        for slot in range(K):
            e = ids[t, slot]
            gu_t = xf[t] @ w13[e].T + b13[e]
            g, u = gu_t[0::2].clamp(max=limit), gu_t[1::2].clamp(-limit, limit)
            h = (g * torch.sigmoid(alpha * g) * (u + 1.0)).to(torch.bfloat16).float()
            emulated[t] += wts[t, slot] * (h @ w2[e].T + b2[e])
    save_file({"hidden_states": x, "output": y.float().contiguous(),
               "topk_ids": idx.to(torch.int32).contiguous(), "output_emulated": emulated.contiguous()},
              os.path.join(dest, "golden.safetensors"))
    print(f"{name}: derived MXFP4 release")


def e2m1_rne(v):
    """Nearest E2M1 magnitude code of |v| (ties to the even code, saturating at 6) and the sign."""
    a = v.abs()
    d = (a[..., None] - E2M1).abs()
    low = d.argmin(dim=-1)                       # the first (lower) of two equal distances
    up = (low + 1).clamp(max=7)
    tie = (d.gather(-1, up[..., None])[..., 0] == d.gather(-1, low[..., None])[..., 0]) & (low % 2 == 1)
    mag = torch.where(tie, up, low)
    return mag, (v < 0) & (mag > 0)


def nvfp4_quantize(x, g):
    """spec/formats.md's NVFP4 rows with global g: per 1×16 block byte = E4M3(amax / 6 / g),
    s = dec(byte)·g, q = E2M1(x / s) (IEEE divisions; s = 0 → zeros). Returns the E2M1 codes,
    the scale bytes (as float8) and the dequantized values."""
    rows, k = x.shape
    b = x.reshape(rows, k // 16, 16)
    amax = b.abs().amax(dim=-1)
    byte = ((amax / 6.0) / g).clamp(max=448.0).to(torch.float8_e4m3fn)
    s = byte.float() * g
    v = torch.where(s[..., None] > 0, b / s[..., None], torch.zeros_like(b))
    mag, neg = e2m1_rne(v)
    deq = E2M1[mag] * torch.where(neg, -1.0, 1.0) * s[..., None]
    code = mag | neg.to(torch.int64) << 3
    return code.reshape(rows, k), byte, deq.reshape(rows, k)


def nvfp4_release(out):
    """Nemotron-H's ModelOpt NVFP4 release derived from a transformers-built bf16 Nemotron-H
    (I = 16): per expert `up_proj` / `down_proj` `.weight` U8 [out, in/2] (E2M1, low nibble
    first), `.weight_scale` F8_E4M3 [out, in/16], `.weight_scale_2` (amax / 2688) and a calibrated
    `.input_scale` (the hidden states' amax / 2688, a little larger per expert), named as ModelOpt
    ships them (`backbone.`). Goldens: transformers' block on the dequantized weights (`output`),
    and the layer in f32 with our static NVFP4 activation quantization emulated
    (`output_emulated`: the max input scale over experts, routing in f32)."""
    name = "nemotron_h-nvfp4"
    cfg = T.NemotronHConfig(hidden_size=H, vocab_size=16, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, layers_block_type=["moe"],
                            n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
                            moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1,
                            routed_scaling_factor=2.5, mamba_num_heads=2, mamba_head_dim=16,
                            ssm_state_size=16, n_groups=1)
    build(name, cfg, T.NemotronHForCausalLM, 0, "mixer", True, out)
    dest = os.path.join(out, name)
    with open(os.path.join(dest, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = {sh: load_file(os.path.join(dest, sh)) for sh in sorted(set(index["weight_map"].values()))}
    golden = load_file(os.path.join(dest, "golden.safetensors"))
    x = golden["hidden_states"].float()
    x_amax = x.abs().max()
    p = "backbone.layers.0.mixer."
    deq = {}
    in_scales = {}
    for sh, ts in shards.items():
        for k in list(ts):
            if ".experts." not in k or not k.endswith(".weight"):
                continue
            w = ts.pop(k).float()
            g = w.abs().max() / (448.0 * 6.0)
            code, byte, d = nvfp4_quantize(w, g)
            ts[k] = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).contiguous()
            ts[k + "_scale"] = byte.contiguous()
            ts[k[:-len("weight")] + "weight_scale_2"] = g.reshape(()).float()
            for extra in ("weight_scale", "weight_scale_2", "input_scale"):
                index["weight_map"][k[:-len("weight")] + extra] = sh
            deq[k] = d
    # Calibration as ModelOpt does it: each GEMM input's amax over the data / (448·6); the
    # intermediate's from the unquantized forward. A little larger per expert, so the max matters.
    for k in deq:
        e = int(k.split(".experts.")[1].split(".")[0])
        if "up_proj" in k:
            amax = x_amax
        else:
            amax = (torch.relu(x @ deq[k.replace("down_proj", "up_proj")].T) ** 2).abs().max()
        calib = float(amax) / (448.0 * 6.0) * (1.0 + 0.05 * e)
        shards[index["weight_map"][k]][k[:-len("weight")] + "input_scale"] = torch.tensor(calib)
    for sh, ts in shards.items():
        save_file(ts, os.path.join(dest, sh), metadata={"format": "pt"})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(dest, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v for ts in shards.values() for k, v in ts.items()}
    up = torch.stack([deq[f"{p}experts.{e}.up_proj.weight"] for e in range(E)])      # [E, I, H]
    down = torch.stack([deq[f"{p}experts.{e}.down_proj.weight"] for e in range(E)])  # [E, H, I]
    router = tensors[p + "gate.weight"].float()
    bias = tensors[p + "gate.e_score_correction_bias"].float()
    g13 = max(float(tensors[f"{p}experts.{e}.up_proj.input_scale"]) for e in range(E))
    g2 = max(float(tensors[f"{p}experts.{e}.down_proj.input_scale"]) for e in range(E))
    model = T.NemotronHForCausalLM(cfg).to(torch.bfloat16).eval()
    block = model.model.layers[0].mixer
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.gate.e_score_correction_bias.copy_(bias)
        block.experts.up_proj.copy_(up.to(torch.bfloat16))
        block.experts.down_proj.copy_(down.to(torch.bfloat16))
        y, idx = router_and_experts(block)(golden["hidden_states"])
    scores = torch.sigmoid(x @ router.T)
    ids = (scores + bias).topk(K, dim=-1).indices
    wts = scores.gather(-1, ids)
    wts = wts / wts.sum(dim=-1, keepdim=True) * cfg.routed_scaling_factor
    xq = nvfp4_quantize(x, g13)[2]
    emulated = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(K):
            e = ids[t, slot]
            h = torch.relu(xq[t:t + 1] @ up[e].T) ** 2
            emulated[t] += wts[t, slot] * (nvfp4_quantize(h, g2)[2] @ down[e].T)[0]
    save_file({"hidden_states": golden["hidden_states"], "output": y.float().contiguous(),
               "topk_ids": idx.to(torch.int32).contiguous(), "output_emulated": emulated.contiguous()},
              os.path.join(dest, "golden.safetensors"))
    print(f"{name}: derived ModelOpt NVFP4 release")


def quantize_fp8_block(w):
    """[out, in] f32 → E4M3 [out, in] and f32 scales [ceil(out/128), ceil(in/128)]."""
    rows, cols = w.shape
    s = torch.empty((rows + 127) // 128, (cols + 127) // 128)
    q = torch.empty_like(w)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s[i, j] = blk.abs().max().clamp(min=1e-10) / 448.0
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk / s[i, j]
    return q.to(torch.float8_e4m3fn), s


def dequantize_fp8_block(q, s):
    rows, cols = q.shape
    full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return q.float() * full


def quantize_rows_1x128(x):
    """spec/formats.md's fp8_block activations: per row and 128 columns, s = max(amax, 1e-10) / 448,
    q = e4m3(x / s) (an IEEE f32 division), returned dequantized."""
    out = torch.empty_like(x)
    for j in range(0, x.shape[1], 128):
        blk = x[:, j:j + 128]
        s = blk.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 448.0
        out[:, j:j + 128] = (blk / s).to(torch.float8_e4m3fn).float() * s
    return out


def emulate_fp8_block(x, router, gate, up, down):
    """Renormalized softmax top-k in f32, then per expert: xq·gateᵀ, xq·upᵀ, silu(g)·u quantized
    1×128, ·downᵀ, all in f32 on the dequantized weights."""
    logits = x @ router.T
    probs = torch.softmax(logits, dim=-1)
    w, idx = probs.topk(K, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    xq = quantize_rows_1x128(x)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(K):
            e = idx[t, slot]
            h = torch.nn.functional.silu(xq[t:t + 1] @ gate[e].T) * (xq[t:t + 1] @ up[e].T)
            y[t] += w[t, slot] * (quantize_rows_1x128(h) @ down[e].T)[0]
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="crates/moerunner/tests/fixtures/transformers")
    ap.add_argument("--only", help="comma-separated family names")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    for name, spec in families().items():
        if only and name not in only:
            continue
        build(name, *spec, args.out)
        print(f"{name}: written with transformers {T.__version__}, torch {torch.__version__}")
    if not only or "qwen3_moe-fp8_block" in only:
        fp8_block_release(args.out)
    if not only or "gpt_oss-mxfp4" in only:
        mxfp4_release(args.out)
    if not only or "nemotron_h-nvfp4" in only:
        nvfp4_release(args.out)


if __name__ == "__main__":
    main()
