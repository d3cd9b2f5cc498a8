"""moerunner: a fused Mixture-of-Experts layer on numpy arrays and torch tensors.

Tensors cross into the Rust runtime through DLPack without a copy of their memory: torch CUDA
tensors run on the CUDA backend on torch's current stream (launches only, no host
synchronisation, capturable in a ``torch.cuda.CUDAGraph``); CPU tensors (numpy or torch) run on
the CPU backend (or the float64 reference).

>>> import moerunner, numpy as np
>>> layer = moerunner.MoeLayer.from_file("layer.safetensors", device="cpu")
>>> x = np.random.randn(4, layer.hidden_size).astype(np.float32)
>>> logits = np.random.randn(4, layer.num_experts).astype(np.float32)
>>> y = layer(x, logits)          # [4, H] float32, the dtype of x

Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument; errors of the layer, the
files or the device raise :class:`MoeError` (a ``ValueError``).
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any, Optional

from . import _native
from ._native import MoeError

__all__ = ["MoeLayer", "MoeError", "info", "quantize_weights", "reference", "__version__"]
__version__: str = _native.__version__


def info() -> dict:
    """What this build and machine can do.

    Returns a dict: ``version``, ``cuda_feature`` (whether the package was built with the CUDA
    backend) and ``backends``, a list of dicts with ``name``, ``available`` and either
    ``devices`` and ``supports`` (formats, in words) or the ``reason`` it is unavailable.
    """
    return _native.info()


# Live layers by handle, for the torch custom op (held weakly: the caller owns its layers).
_layers: "weakref.WeakValueDictionary[int, MoeLayer]" = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


def _is_torch(t: Any) -> bool:
    return type(t).__module__.startswith("torch")


def _empty_like(t: Any) -> Any:
    """A new contiguous tensor of t's shape, dtype and device, from t's own library (numpy or
    torch); other DLPack producers must pass ``out``."""
    if not hasattr(t, "__dlpack__"):
        raise TypeError(
            "hidden_states: expected a tensor or array with `__dlpack__` (numpy, torch), "
            f"got {type(t).__name__}"
        )
    if _is_torch(t):
        return t.new_empty(t.shape)
    if type(t).__module__ == "numpy":
        import numpy as np

        return np.empty(t.shape, dtype=t.dtype)
    raise TypeError(
        f"out: required for hidden_states of type {type(t).__name__} (only numpy and torch "
        "outputs are allocated by the layer)"
    )


def _stream_of(t: Any) -> Optional[int]:
    """torch's current CUDA stream on t's device (a raw handle), or None off CUDA."""
    if _is_torch(t) and t.is_cuda:
        import torch

        # What inductor calls: cheaper than torch.cuda.current_stream(), the fallback.
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            return raw(t.get_device())
        return torch.cuda.current_stream(t.device).cuda_stream
    return None


class MoeLayer:
    """One MoE layer loaded on a device, called on tensors.

    Build one with :meth:`from_file` or :meth:`from_checkpoint`; call it like a module::

        y = layer(hidden_states, router_logits)
        y = layer(hidden_states, topk_ids=ids, topk_weights=weights)
        y = layer(hidden_states, topk_packed=packed)

    ``device`` is ``"auto"`` (the GPU when present and able to run the layer's format, else the
    CPU), ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` or ``"reference"`` (the float64 reference
    implementation, slow, for checking).
    """

    __slots__ = ("_native", "_handle", "__weakref__")

    def __init__(self, native: "_native.NativeLayer"):
        self._native = native
        # The integer that names this layer in torch.ops.moerunner.moe_layer (torch_op.py).
        self._handle = next(_next_handle)
        _layers[self._handle] = self

    @classmethod
    def from_file(
        cls,
        path: "str | os.PathLike[str]",
        *,
        device: str = "auto",
        tp_size: int = 1,
        tp_rank: int = 0,
        ep_size: int = 1,
        ep_rank: int = 0,
    ) -> "MoeLayer":
        """Loads a moerunner layer file (``moerunner make-layer`` / ``convert`` writes them).

        With ``tp_size`` or ``ep_size`` above 1 the layer is sliced for the rank
        (tensor-parallel: columns of the intermediate; expert-parallel: whole experts). The
        output of a sliced layer is the rank's partial sum.
        """
        return cls(
            _native.NativeLayer.from_file(
                os.fspath(path),
                device=device,
                tp_size=tp_size,
                tp_rank=tp_rank,
                ep_size=ep_size,
                ep_rank=ep_rank,
            )
        )

    @classmethod
    def from_checkpoint(
        cls,
        dir: "str | os.PathLike[str]",
        layer: int,
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        ep_size: int = 1,
        ep_rank: int = 0,
        device: str = "auto",
        quantize: Optional[str] = None,
    ) -> "MoeLayer":
        """Loads MoE layer ``layer`` of a Hugging Face model folder (Qwen3-MoE, Mixtral,
        DeepSeek-V3, GPT-OSS, Nemotron-H NVFP4, MiniMax-M2); a TP/EP rank reads only its slice.

        ``quantize`` (e.g. ``"fp8_block"``, ``"mxfp8"``, ``"nvfp4"``) quantizes the experts at load.
        Such a layer keeps the checkpoint's router: on CPU tensors it may be called with hidden
        states alone.
        """
        return cls(
            _native.NativeLayer.from_checkpoint(
                os.fspath(dir),
                layer,
                device=device,
                tp_size=tp_size,
                tp_rank=tp_rank,
                ep_size=ep_size,
                ep_rank=ep_rank,
                quantize=quantize,
            )
        )

    @classmethod
    def from_tensors(
        cls,
        *,
        w13: Any,
        w2: Any,
        top_k: int,
        weight_format: str = "bf16",
        activation: str = "swiglu",
        routing: str = "renormalize",
        w13_scale: Any = None,
        w2_scale: Any = None,
        w13_global_scale: Any = None,
        w2_global_scale: Any = None,
        w13_input_scale: Any = None,
        w2_input_scale: Any = None,
        w13_bias: Any = None,
        w2_bias: Any = None,
        router_bias: Any = None,
        device: str = "auto",
        tp_size: int = 1,
        tp_rank: int = 0,
        ep_size: int = 1,
        ep_rank: int = 0,
        **config: Any,
    ) -> "MoeLayer":
        """A layer from stacked expert tensors, as SGLang and vLLM hold them: ``w13`` =
        ``w13_weight`` ``[E, 2I, H]`` (gate rows, then up rows) and ``w2`` = ``w2_weight``
        ``[E, H, I]``, in the dtype of ``weight_format`` (bf16; float8_e4m3fn for fp8,
        fp8_block, mxfp8; uint8 pairs of e2m1 for mxfp4, nvfp4), with their scales as stored:
        ``w13_scale`` = ``w13_weight_scale_inv`` ``[E, 2I/128, H/128]`` float32 for fp8_block,
        ``[E]`` float32 for fp8 (with ``w13_input_scale``/``w2_input_scale`` scalars), uint8
        UE8M0 ``[E, rows, cols/32]`` for mx formats, float8 ``[E, rows, cols/16]`` plus
        ``*_global_scale`` ``[E]`` for nvfp4. Biases ``[E, 2I]``, ``[E, H]``; ``router_bias``
        ``[E]`` (DeepSeek's ``e_score_correction_bias``).

        ``config`` takes the other layer-file keys: ``activation_format`` (default: the
        format's natural pairing), ``w13_order`` (``gate_up``, ``up_gate``, ``interleaved``),
        ``n_group``, ``topk_group``, ``routed_scaling_factor``, ``norm_topk_prob``,
        ``swiglu_alpha``, ``swiglu_beta``, ``swiglu_limit``. Tensors may be numpy arrays or
        torch tensors on any device; they are copied to the host once and validated like a
        layer file (errors name the tensor or key). Raw bits may be given with their dtype:
        ``w13=("BF16", uint16_array)`` (numpy has no bfloat16).
        """
        import tempfile

        from ._tensors import NATURAL_ACTIVATION, write_layer_file

        metadata = {
            "version": "1",
            "weight_format": weight_format,
            "activation_format": NATURAL_ACTIVATION.get(weight_format, weight_format),
            "activation": activation,
            "w13_order": "gate_up",
            "routing": routing,
            "top_k": str(top_k),
        }
        metadata.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in config.items()})
        tensors = {
            "w13": w13,
            "w2": w2,
            "w13_scale": w13_scale,
            "w2_scale": w2_scale,
            "w13_global_scale": w13_global_scale,
            "w2_global_scale": w2_global_scale,
            "w13_input_scale": w13_input_scale,
            "w2_input_scale": w2_input_scale,
            "w13_bias": w13_bias,
            "w2_bias": w2_bias,
            "router_bias": router_bias,
        }
        with tempfile.TemporaryDirectory(prefix="moerunner-") as tmp:
            path = os.path.join(tmp, "layer.safetensors")
            write_layer_file(path, tensors, {f"moerunner.{k}": v for k, v in metadata.items()})
            return cls.from_file(
                path, device=device, tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank
            )

    @property
    def backend(self) -> str:
        """The backend that runs the layer: ``cpu``, ``cuda`` or ``reference``."""
        return self._native.backend

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N``."""
        return self._native.device

    @property
    def config(self) -> dict:
        """The layer's description: the layer file's metadata (strings: ``weight_format``,
        ``routing_method``, ``activation``, …)."""
        return dict(self._native.config[0])

    @property
    def hidden_size(self) -> int:
        """H: the width of hidden states and output."""
        return self._native.config[1]

    @property
    def intermediate_size(self) -> int:
        """I of this rank (after tensor-parallel slicing)."""
        return self._native.config[2]

    @property
    def num_experts(self) -> int:
        """E: experts routed over (all of them, also on an expert-parallel rank)."""
        return self._native.config[3]

    @property
    def top_k(self) -> int:
        """Experts per token."""
        return self._native.config[4]

    def reserve(self, tokens: int) -> None:
        """Sizes the CUDA workspace for calls of up to ``tokens`` tokens. Call it before capturing
        a CUDA graph (a capture that would need a larger workspace is refused). Nothing on CPU."""
        self._native.reserve(tokens)

    def workspace_bytes(self, tokens: int) -> int:
        """Bytes of GPU memory the workspace of calls of up to ``tokens`` tokens takes besides the
        weights (what :meth:`reserve` allocates), computed without allocating — so an engine can
        size its KV cache after it. Bounded for any ``tokens``: larger calls run in slices. 0 on
        CPU."""
        return self._native.workspace_bytes(tokens)

    def __call__(
        self,
        hidden_states: Any,
        router_logits: Any = None,
        *,
        topk_ids: Any = None,
        topk_weights: Any = None,
        topk_packed: Any = None,
        out: Any = None,
    ) -> Any:
        """Runs the layer on ``hidden_states`` ``[T, H]`` (bfloat16, float16 or float32).

        Routing, exactly one of:

        - ``router_logits`` ``[T, E]`` float32 or bfloat16: the layer's routing method picks
          the experts;
        - ``topk_ids`` ``[T, top_k]`` int32 and ``topk_weights`` ``[T, top_k]`` float32 (bfloat16
          also on CPU): routes chosen elsewhere (ids of other expert-parallel ranks, and -1, are
          skipped);
        - ``topk_packed`` ``[T, top_k]`` int32: FlashInfer's packed form (id << 16 | bf16 weight);
        - none: a layer from a checkpoint (or a layer file `convert` wrote, which carries the router)
          routes with its own router (CPU tensors only).

        Returns the output ``[T, H]`` in the dtype of ``hidden_states``, on its device; when
        ``out`` is given (same dtype and shape, contiguous, not an input) it is written and
        returned. All tensors must be contiguous and on one device. CUDA tensors run on torch's
        current stream without host synchronisation.
        """
        if out is None:
            out = _empty_like(hidden_states)
        self._native.forward(
            hidden_states,
            out,
            router_logits,
            topk_ids,
            topk_weights,
            topk_packed,
            _stream_of(hidden_states),
        )
        return out

    def __repr__(self) -> str:
        c = self.config
        return (
            f"MoeLayer({c.get('weight_format')}, E={self.num_experts}, H={self.hidden_size}, "
            f"I={self.intermediate_size}, top_k={self.top_k}, backend={self.backend}, "
            f"device={self.device})"
        )


def reference(
    path: "str | os.PathLike[str]",
    hidden_states: Any,
    router_logits: Any = None,
    *,
    topk_ids: Any = None,
    topk_weights: Any = None,
    topk_packed: Any = None,
) -> Any:
    """The float64 reference forward pass of the layer file at ``path`` on CPU tensors (the
    oracle the backends are tested against; slow). Arguments as :meth:`MoeLayer.__call__`."""
    layer = MoeLayer.from_file(path, device="reference")
    return layer(
        hidden_states,
        router_logits,
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        topk_packed=topk_packed,
    )


def quantize_weights(
    weights: Any, weight_format: str, *, name: str = "w13", global_scales: Any = None
) -> dict:
    """Quantizes stacked expert weights ``[E, rows, cols]`` (float32, bfloat16 or float16 on
    the CPU: numpy or torch) into ``weight_format`` with moerunner's bit-exact quantizer.

    Returns the projection's tensors keyed as :meth:`MoeLayer.from_tensors` takes them —
    ``name``, ``{name}_scale`` and for nvfp4 ``{name}_global_scale`` (``global_scales`` ``[E]``
    overrides the computed ones) — as numpy arrays, or ``(dtype, bits)`` pairs where numpy has
    no such dtype (``("F8_E4M3", uint8 array)``)::

        w = {**moerunner.quantize_weights(w13, "fp8_block"),
             **moerunner.quantize_weights(w2, "fp8_block", name="w2")}
        layer = moerunner.MoeLayer.from_tensors(**w, weight_format="fp8_block", top_k=8)
    """
    import numpy as np

    plain = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I32": np.int32}
    bits = {"BF16": np.uint16, "F8_E4M3": np.uint8}
    out: dict = {}
    for key, dtype, shape, data in _native.quantize_weights(
        weights, weight_format, name=name, global_scales=global_scales
    ):
        if dtype in plain:
            out[key] = np.frombuffer(data, plain[dtype]).reshape(shape).copy()
        else:
            out[key] = (dtype, np.frombuffer(data, bits[dtype]).reshape(shape).copy())
    return out
