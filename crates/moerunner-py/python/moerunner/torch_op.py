"""The layer as one opaque PyTorch operator, ``torch.ops.moerunner.moe_layer``, so that
``torch.compile`` sees a single op (its fake implementation gives the output's shape and dtype)
instead of tracing into the Rust call.

>>> from moerunner.torch_op import moe_layer
>>> y = moe_layer(layer, hidden_states, router_logits)          # inside a compiled function too

Importing this module registers the op (it needs torch). A layer is named in the graph by an
integer handle (``MoeLayer._handle``); the registry holds layers weakly.
"""

# No `from __future__ import annotations`: custom_op reads the schema from real annotations.
from typing import Optional

import torch

from . import MoeLayer, _layers


@torch.library.custom_op("moerunner::moe_layer", mutates_args=())
def _moe_layer(
    layer: int,
    hidden_states: torch.Tensor,
    router_logits: Optional[torch.Tensor],
    topk_ids: Optional[torch.Tensor],
    topk_weights: Optional[torch.Tensor],
    topk_packed: Optional[torch.Tensor],
) -> torch.Tensor:
    found = _layers.get(layer)
    if found is None:
        raise ValueError(f"layer: handle {layer} names no live moerunner.MoeLayer")
    return found(
        hidden_states,
        router_logits,
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        topk_packed=topk_packed,
    )


@_moe_layer.register_fake
def _(layer, hidden_states, router_logits, topk_ids, topk_weights, topk_packed):
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


def moe_layer(
    layer: MoeLayer,
    hidden_states: torch.Tensor,
    router_logits: Optional[torch.Tensor] = None,
    *,
    topk_ids: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    topk_packed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``layer(hidden_states, …)`` through ``torch.ops.moerunner.moe_layer`` (one opaque op
    under ``torch.compile``). Arguments as :meth:`moerunner.MoeLayer.__call__`, without ``out``."""
    return torch.ops.moerunner.moe_layer(
        layer._handle, hidden_states, router_logits, topk_ids, topk_weights, topk_packed
    )
