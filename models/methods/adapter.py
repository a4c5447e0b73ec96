"""Bottleneck adapters: ``DoubleSeqBnConfig`` (Houlsby: after self-attention and after the FFN of every block)
or ``SeqBnConfig`` (Pfeiffer: after the FFN only), with ``init_weights="mam_adapter"`` so that the
up-projection starts at zero and the module starts as the identity.

The library sizes the bottleneck as ``int(d_model // reduction_factor)``. ``d_model / size`` in floating
point does not always round back to ``size`` (5 // (5 / 3) == 2.0), so the factor passed is
``d_model / (size + 0.5)``, whose floor is ``size`` with half a unit of margin, and the built widths are checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: the registry loads without it
    import torch
    from torch import nn


from models.methods.base import DELTA_NAME, DeltaMethod, Shapes, SizeField, one_size

ADAPTER_TYPES = ("houlsby", "pfeiffer")


def reduction_factor(d_model: int, size: int) -> float:
    """Reduction factor for which the library's ``int(d_model // rf)`` is exactly ``size``."""
    rf = d_model / (size + 0.5)
    if int(d_model // rf) != size:  # cannot happen for realistic sizes; guards the reasoning above
        raise ValueError(f"no reduction factor gives bottleneck {size} for d_model={d_model}")
    return rf


class Adapter(DeltaMethod):
    name = "adapter"
    summary = "bottleneck adapter (Houlsby or Pfeiffer)"
    size_fields = (
        SizeField("adapter_type", "houlsby: after attention and FFN; pfeiffer: after the FFN", ADAPTER_TYPES),
        SizeField("adapter_size", "bottleneck width of the adapter"),
    )
    storage = "adapters"
    hub_architectures = (None, "bottleneck")

    def library_config(self, sizes: Mapping[str, Any], d_model: int) -> Any:
        from adapters import DoubleSeqBnConfig, SeqBnConfig

        cls = DoubleSeqBnConfig if sizes["adapter_type"] == "houlsby" else SeqBnConfig
        return cls(reduction_factor=reduction_factor(d_model, sizes["adapter_size"]), init_weights="mam_adapter")

    def check_built(self, model: nn.Module, sizes: Mapping[str, Any]) -> None:
        suffix = f".{DELTA_NAME}.adapter_down.0"
        widths = {m.out_features for n, m in model.named_modules() if n.endswith(suffix)}
        if widths != {sizes["adapter_size"]}:
            raise RuntimeError(f"adapter widths {sorted(widths)} != --adapter_size {sizes['adapter_size']}")

    def sizes_from_shapes(self, shapes: Shapes, source: str) -> dict[str, Any]:
        houlsby = any(re.search(rf"\.layer\.0\.adapters\.{DELTA_NAME}\.", k) for k in shapes)
        return {"adapter_type": "houlsby" if houlsby else "pfeiffer",
                "adapter_size": one_size(shapes, ".adapter_down.0.weight", 0, "adapter size", source)}

    def neutral_state(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The residual adds adapter_up(...): with its weight and bias at zero the block's output is untouched.
        import torch

        return {k: torch.zeros_like(v) if ".adapter_up." in k else v.clone() for k, v in tensors.items()}
