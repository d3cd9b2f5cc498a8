"""Replace a Hugging Face Qwen3-MoE sparse block with moerunner, check the outputs agree, time both.

    python crates/moerunner-py/examples/qwen3_moe_block.py [--device cuda|cpu] [--tokens 16]

Builds a tiny random Qwen3-MoE model from a config (no download), takes layer 0's
`Qwen3MoeSparseMoeBlock`, stacks its experts the way SGLang and vLLM hold them (`w13` [E, 2I, H]
gate rows then up rows, `w2` [E, H, I]) into `moerunner.MoeLayer.from_tensors`, and puts a
drop-in module in the block's place: the router (`gate`, a Linear) stays in torch, the experts
run in moerunner on the router's logits. Then compares the block's and the model's outputs and
times a call of each. Needs torch and transformers (4.x per-expert modules or 5.x fused ones).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moerunner


def stacked_experts(block) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) of a Qwen3MoeSparseMoeBlock, gate rows before up rows."""
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):  # transformers 5: fused 3-D parameters, already stacked
        return ex.gate_up_proj.data, ex.down_proj.data
    w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ex])
    w2 = torch.stack([e.down_proj.weight for e in ex])
    return w13.data, w2.data


class MoeRunnerBlock(torch.nn.Module):
    """A drop-in for Qwen3MoeSparseMoeBlock: torch's router, moerunner's experts."""

    def __init__(self, block, config, device: str):
        super().__init__()
        self.gate = block.gate
        w13, w2 = stacked_experts(block)
        self.layer = moerunner.MoeLayer.from_tensors(
            w13=w13.to(torch.bfloat16),
            w2=w2.to(torch.bfloat16),
            top_k=config.num_experts_per_tok,
            routing="renormalize" if config.norm_topk_prob else "default",
            device=device,
        )
        self.returns_logits = True

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).contiguous()
        # The router's own weight (an nn.Linear in transformers 4, a router module returning a
        # tuple in transformers 5): the raw logits either way.
        logits = torch.nn.functional.linear(x, self.gate.weight).float()
        y = self.layer(x, logits).view(shape)
        return (y, logits) if self.returns_logits else y


def first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def time_us(fn, iters: int, cuda: bool) -> float:
    for _ in range(10):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--iters", type=int, default=100)
    a = p.parse_args()
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    )
    model = Qwen3MoeForCausalLM(config).to(a.device, torch.bfloat16).eval()
    block = model.model.layers[0].mlp
    mine = MoeRunnerBlock(block, config, "cuda:0" if a.device.startswith("cuda") else "cpu")
    mine.returns_logits = isinstance(block(torch.zeros(1, 1, config.hidden_size, dtype=torch.bfloat16,
                                                        device=a.device)), tuple)
    print(f"moerunner {moerunner.__version__}: {mine.layer!r}")

    cuda = a.device.startswith("cuda")
    x = torch.randn(1, a.tokens, config.hidden_size, dtype=torch.bfloat16, device=a.device)
    with torch.no_grad():
        want, got = first_tensor(block(x)), first_tensor(mine(x))
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        print(f"block output, T = {a.tokens}: max |moerunner - transformers| / max |transformers| = {err:.2e}")
        t_hf = time_us(lambda: block(x), a.iters, cuda)
        t_mr = time_us(lambda: mine(x), a.iters, cuda)
        print(f"time per block call: transformers {t_hf:.0f} µs, moerunner (router in torch) {t_mr:.0f} µs")

        ids = torch.randint(0, config.vocab_size, (1, a.tokens), device=a.device)
        ref = model(ids).logits
        for layer in model.model.layers:
            layer.mlp = MoeRunnerBlock(layer.mlp, config, mine.layer.device)
            layer.mlp.returns_logits = mine.returns_logits
        swapped = model(ids).logits
        agree = (swapped.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"whole model with every MoE block replaced: next-token argmax agrees on {agree:.0%} of positions")
    assert err < 2e-2, "the replaced block disagrees with transformers"


if __name__ == "__main__":
    main()
