"""Prefix tuning: ``PrefixTuningConfig(prefix_length, bottleneck_size=prefix_mlp, flat=False)`` with prefixes for
encoder self-attention, decoder self-attention and decoder cross-attention (a decoder-only backbone has only
the decoder's self-attention). Each prefix is an embedding of
``prefix_length`` rows fed through a two-layer MLP (width ``prefix_mlp``) that emits the keys and values of
all layers of one stack at once; the MLP weights are ordinary trainable parameters (they are what is saved).
A prefix always adds attention positions, so the method has no neutral state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from models.methods.base import DELTA_NAME, GRANULARITIES, DeltaMethod, Shapes, SizeField, one_size

_PREFIX_RE = re.compile(rf"\.prefix_tunings\.{DELTA_NAME}\.(\w+?)\.")
# Which stack each prefix of the shared pool feeds, and its layer-granularity group (see `param_group`).
PREFIX_GROUPS = {
    "encoder_prefix": ("encoder", "encoder.prefix"),
    "self_prefix": ("decoder", "decoder.self_prefix"),
    "cross_prefix": ("decoder", "decoder.cross_prefix"),
}


class Prefix(DeltaMethod):
    name = "prefix"
    summary = "prefix tuning of every attention, reparametrised by an MLP"
    task_vector_origin = None  # no prefix does nothing: its parameters are not a task vector
    size_fields = (
        SizeField("prefix_length", "number of prefix positions"),
        SizeField("prefix_mlp", "hidden size of the prefix's reparametrisation MLP"),
    )
    storage = "prefix_tunings"
    hub_architectures = ("prefix_tuning",)
    pool_home = "encoder.block.0.layer.0.SelfAttention.prefix_tuning.pool.prefix_tunings"

    def library_config(self, sizes: Mapping[str, Any], d_model: int) -> Any:
        from adapters import PrefixTuningConfig

        return PrefixTuningConfig(prefix_length=sizes["prefix_length"], bottleneck_size=sizes["prefix_mlp"],
                                  flat=False, encoder_prefix=True, cross_prefix=True)

    def sizes_from_shapes(self, shapes: Shapes, source: str) -> dict[str, Any]:
        return {"prefix_length": one_size(shapes, ".wte.weight", 0, "prefix length", source),
                "prefix_mlp": one_size(shapes, ".control_trans.0.weight", 0, "prefix MLP size", source)}

    def layer_counts(self, shapes: Shapes, d_model: int) -> dict[str, int]:
        # Each stack's MLP emits keys and values (2 * d_model) for each of its layers at once.
        # The pool sits under the backbone's first attention layer, whose path differs between families.
        counts = {}
        for kind, key in (("encoder_prefix", "num_layers"), ("self_prefix", "num_decoder_layers")):
            suffix = f".prefix_tunings.{DELTA_NAME}.{kind}.control_trans.2.weight"
            shape = next((s for name, s in shapes.items() if name.endswith(suffix)), None)
            if shape is not None:
                counts[key] = int(shape[0]) // (2 * d_model)
        return counts

    def param_group(self, name: str, granularity: str) -> str:
        """The prefix pool is shared by all layers (its name is the first path that reaches it, which says
        nothing about the layer), and each prefix's MLP emits all layers of one stack at once, so it cannot be
        split per layer: its block is the stack it feeds and its layer group is the prefix itself."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, found {granularity!r}")
        if granularity == "model":
            return "model"
        kind = _PREFIX_RE.search(name)
        if kind is None or kind.group(1) not in PREFIX_GROUPS:
            raise ValueError(f"unknown prefix kind in parameter {name!r}")
        block, layer = PREFIX_GROUPS[kind.group(1)]
        return block if granularity == "block" else layer
