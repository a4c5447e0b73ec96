"""LoRA: ``LoRAConfig(r, alpha)`` on the projections ``lora_targets`` names (default ``q,v``): any of the attention's
``q``, ``k``, ``v`` and the feed-forward's two AdapterHub locations, ``intermediate`` and ``output``. Which module each
location reaches is the backbone family's (``lora_modules`` in models/backbones/, measured there; AdapterHub reaches
no attention output projection). For T5 the library's ``selfattn_lora`` location covers both self-attention and the
decoder's cross-attention (``EncDecAttention``); that library behaviour is kept rather than patching modules out.
``lora_B`` starts at zero, so the module starts neutral.

Only the update ΔW = B·A·(alpha/r) is determined by training (B·M and M⁻¹·A give the same module for any
invertible M), so ΔW per pair is LoRA's task vector, and ``factor`` turns a ΔW back into rank-r factors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: the registry loads without it
    import torch


from models.backbones import lora_location
from models.methods.base import DeltaMethod, Shapes, SizeField, one_size
from utils.errors import UserInputError

LORA_LOCATIONS = ("q", "k", "v", "intermediate", "output")  # AdapterHub's: attn_matrices, then its two FFN flags


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """LoRA module prefix -> (lora_A key, lora_B key). ``adapters`` stores A as (r, in) and B as (out, r)."""
    keys = set(keys)
    pairs = {}
    for k in sorted(keys):
        if k.endswith(".lora_A"):
            prefix = k[: -len("lora_A")]
            if prefix + "lora_B" not in keys:
                raise UserInputError(f"LoRA tensor {k} has no matching lora_B")
            pairs[prefix] = (k, prefix + "lora_B")
        elif k.endswith(".lora_B") and k[: -len("lora_B")] + "lora_A" not in keys:
            raise UserInputError(f"LoRA tensor {k} has no matching lora_A")
    return pairs


def lora_factor(delta_w: torch.Tensor, r: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') of shapes (out, r), (r, in) with B'·A'·scaling the best rank-r approximation of ``delta_w``
    (Eckart-Young): sqrt of the singular values into each factor, and /scaling undoes the module's alpha/r."""
    import torch

    u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
    k = min(r, s.numel())
    root = (s[:k] / scaling).sqrt()
    b = delta_w.new_zeros(delta_w.shape[0], r)
    a = delta_w.new_zeros(r, delta_w.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def projection_of(name: str) -> str:
    """The projection a LoRA parameter sits on, as PEFT's ``target_modules`` names it (``q``, ``v_proj``)."""
    return name.split(".loras.")[0].rsplit(".", 1)[-1]


def targets_of(names: Iterable[str], source: str) -> str:
    """The ``lora_targets`` value that LoRA tensors of these names have (by their projections, in any family)."""
    found = {lora_location(projection_of(k), source) for k in names if k.endswith(".lora_A")}
    return ",".join(t for t in LORA_LOCATIONS if t in found)


class LoRA(DeltaMethod):
    name = "lora"
    summary = "low-rank update B·A·alpha/r of chosen projections (default q and v)"
    size_fields = (
        SizeField("lora_r", "rank r of the update"),
        SizeField("lora_alpha", "the update is scaled by alpha/r", in_shapes=False, hub_key="alpha"),
        SizeField("lora_targets", "where the updates go: a comma-separated set of q, k, v (attention) and "
                  "intermediate, output (the feed-forward's AdapterHub locations)", subset_of=LORA_LOCATIONS,
                  earlier="q,v"),
    )
    storage = "loras"
    hub_architectures = ("lora",)

    def library_config(self, sizes: Mapping[str, Any], d_model: int) -> Any:
        from adapters import LoRAConfig

        targets = self.size(sizes, "lora_targets").split(",")
        attention = [m for m in ("q", "k", "v") if m in targets]
        return LoRAConfig(r=sizes["lora_r"], alpha=sizes["lora_alpha"], selfattn_lora=bool(attention),
                          intermediate_lora="intermediate" in targets, output_lora="output" in targets,
                          attn_matrices=attention)

    def owns(self, name: str) -> bool:
        return super().owns(name) and name.endswith((".lora_A", ".lora_B"))

    def holds(self, names: Any) -> bool:
        names = list(names)  # (IA)³ keeps lone lora_B vectors under the same storage: LoRA needs its A factors
        return super().holds(names) and any(n.endswith(".lora_A") for n in names)

    def sizes_from_shapes(self, shapes: Shapes, source: str) -> dict[str, Any]:
        return {"lora_r": one_size(shapes, ".lora_A", 0, "LoRA rank", source),
                "lora_targets": targets_of(shapes, source)}

    def neutral_state(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        return {k: torch.zeros_like(v) if k.endswith(".lora_B") else v.clone() for k, v in tensors.items()}

    def factor_pairs(self, names: Any) -> dict[str, tuple[str, str]]:
        return lora_pairs(names)

    def scaling(self, sizes: Mapping[str, Any]) -> float:
        return sizes["lora_alpha"] / sizes["lora_r"]
