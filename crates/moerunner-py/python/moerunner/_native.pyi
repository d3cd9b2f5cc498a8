"""Type stubs of the native extension (Rust, PyO3). Users call `moerunner.MoeLayer`."""

from typing import Any, Optional

__version__: str

class MoeError(ValueError):
    """An error of the moerunner library; the message names the tensor, key, file or token."""

class NativeLayer:
    @staticmethod
    def from_file(
        path: str,
        *,
        device: str = "auto",
        tp_size: int = 1,
        tp_rank: int = 0,
        ep_size: int = 1,
        ep_rank: int = 0,
    ) -> NativeLayer: ...
    @staticmethod
    def from_checkpoint(
        dir: str,
        layer: int,
        *,
        device: str = "auto",
        tp_size: int = 1,
        tp_rank: int = 0,
        ep_size: int = 1,
        ep_rank: int = 0,
        quantize: Optional[str] = None,
    ) -> NativeLayer: ...
    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def config(self) -> tuple[dict[str, str], int, int, int, int]:
        """(metadata, hidden, intermediate, num_experts, top_k)."""
    @property
    def has_router(self) -> bool: ...
    def reserve(self, tokens: int) -> None: ...
    def workspace_bytes(self, tokens: int) -> int: ...
    def forward(
        self,
        hidden_states: Any,
        out: Any,
        router_logits: Any = None,
        topk_ids: Any = None,
        topk_weights: Any = None,
        topk_packed: Any = None,
        stream: Optional[int] = None,
    ) -> None: ...

def info() -> dict[str, Any]: ...
def quantize_weights(
    weights: Any,
    weight_format: str,
    *,
    name: str = "w13",
    global_scales: Any = None,
) -> list[tuple[str, str, list[int], bytes]]:
    """(name, layer-file dtype, shape, bytes) of each tensor of the quantized projection."""
