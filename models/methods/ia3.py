"""(IA)³: learned vectors that rescale the keys and values of every attention (self- and, in the decoder,
cross-attention) and the FFN's intermediate activations, via AdapterHub's ``IA3Config``. The library keeps
each vector as a ``lora_B`` of shape (features, 1) under ``loras`` (it is LoRA's code in "scale" mode), and
starts it at ones, so the module starts as the identity. It has no sizes to choose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: the registry loads without it
    import torch


from models.methods.base import DeltaMethod, Shapes
from utils.errors import UserInputError


class IA3(DeltaMethod):
    name = "ia3"
    summary = "(IA)³: rescaling vectors of keys, values and FFN activations"
    task_vector_origin = 1.0  # the identity scaling
    storage = "loras"
    hub_architectures = ("lora",)  # AdapterHub's IA3Config is a LoRAConfig with composition_mode "scale"

    def library_config(self, sizes: Mapping[str, Any], d_model: int) -> Any:
        from adapters import IA3Config

        return IA3Config(selfattn_lora=True, intermediate_lora=True, output_lora=False, attn_matrices=["k", "v"])

    def owns(self, name: str) -> bool:
        return super().owns(name) and name.endswith(".lora_B")

    def sizes_from_shapes(self, shapes: Shapes, source: str) -> dict[str, Any]:
        bad = [k for k, s in shapes.items() if not k.endswith(".lora_B") or len(s) != 2 or s[1] != 1]
        if bad:
            raise UserInputError(f"{source}: {bad[0]} is not an (IA)³ scaling vector (a lora_B of shape (n, 1))")
        return {}

    def neutral_state(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        return {k: torch.ones_like(v) for k, v in tensors.items()}
