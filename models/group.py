"""Several delta modules on one frozen backbone, run in one forward pass by AdapterHub's composition blocks.

A group of G modules lives in G *slots*: slot 0 is the module ``attach_delta`` adds (``DELTA_NAME``), the
others are copies of its configuration named ``delta1``, ``delta2``, ... A slot's tensors are read and
written under the canonical names (those of ``DELTA_NAME``), so a slot loads any checkpoint and saves one
that loads anywhere.

``activate`` picks the composition: one slot alone (exactly a single run), ``Parallel`` when every slot sees
the same batch (the library replicates it inside the model: the rows of slot g are rows g*B..(g+1)*B-1 of
the output), ``BatchSplit`` when each slot has its own slice of a concatenated batch. Slots share nothing
but the frozen backbone, so the gradient of the summed per-slot losses with respect to one slot's
parameters is exactly that slot's gradient alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from models.backbones import family_of
from models.delta import DeltaConfig, check_delta_shapes, library_config
from models.methods import DELTA_NAME, REGISTRY
from models.settings import AUTO

_STORAGES = "|".join(sorted({re.escape(m.storage) for m in REGISTRY.values()}))
def slot_name(index: int) -> str:
    """Slot 0 is the module every single run uses; the others are numbered after it."""
    return DELTA_NAME if index == 0 else f"{DELTA_NAME}{index}"


def _slot_pattern(slot: str) -> re.Pattern:
    return re.compile(rf"\.({_STORAGES})\.{re.escape(slot)}\.")


def slot_params(model: nn.Module, slot: str) -> dict[str, nn.Parameter]:
    """The parameters of ``slot``, keyed by their canonical (``DELTA_NAME``) names."""
    pattern = _slot_pattern(slot)
    found = {}
    for name, param in model.named_parameters():
        match = pattern.search(name)
        if match:
            found[pattern.sub(rf".\1.{DELTA_NAME}.", name, count=1)] = param
    return found


def ensure_slots(model: nn.Module, cfg: DeltaConfig, count: int) -> list[str]:
    """Slots 0..count-1 (slot 0 must be attached already); the missing ones are added, trainable.

    Adding a slot draws its random initialisation from torch's generator; every caller loads a state into a
    slot before using it, and the trainer reseeds before training, so the draws change no result.
    """
    names = [slot_name(i) for i in range(count)]
    have = set(model.adapters_config.adapters)
    if DELTA_NAME not in have:
        raise ValueError(f"attach the delta module ({DELTA_NAME!r}) before adding slots")
    mixin_logger = logging.getLogger("adapters.model_mixin")  # the library warns while nothing is active
    level = mixin_logger.level
    mixin_logger.setLevel(logging.ERROR)
    device = next(model.parameters()).device
    try:
        for name in names:
            if name not in have:
                model.add_adapter(name, config=library_config(cfg, family_of(model).width(model.config)))
                for param in slot_params(model, name).values():
                    param.requires_grad_(True)
    finally:
        mixin_logger.setLevel(level)
    model.to(device)  # new slots are built on the CPU
    return names


def slot_state(model: nn.Module, slot: str) -> dict[str, torch.Tensor]:
    """A slot's tensors as detached, contiguous CPU copies under canonical names (``delta_state_dict``'s form)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in sorted(slot_params(model, slot).items())}


def load_slot_state(model: nn.Module, slot: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy canonical-named ``tensors`` into ``slot``; keys and shapes must match exactly."""
    if slot == DELTA_NAME:
        check_delta_shapes(model, {n: tuple(t.shape) for n, t in tensors.items()}, source)
    params = slot_params(model, slot)
    if set(params) != set(tensors):
        raise ValueError(f"{source}: tensors do not match slot {slot!r}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def composition(slots: Sequence[str], batch_sizes: Sequence[int] | None = None):
    """The active setup for ``slots``: one alone, Parallel (shared batch) or BatchSplit (a slice each)."""
    from adapters.composition import BatchSplit, Parallel

    if len(slots) == 1:
        return slots[0]
    if batch_sizes is None:
        return Parallel(*slots)
    return BatchSplit(*slots, batch_sizes=list(batch_sizes))


def activate(model: nn.Module, slots: Sequence[str], batch_sizes: Sequence[int] | None = None) -> None:
    """Make ``slots`` the active modules (see ``composition``); train/eval mode and gradients stay as they are."""
    model.set_active_adapters(composition(slots, batch_sizes))


@contextmanager
def active(model: nn.Module, slots: Sequence[str], batch_sizes: Sequence[int] | None = None):
    """``activate`` for a block, then slot 0 alone again: code outside a group sees a single-module model."""
    activate(model, slots, batch_sizes)
    try:
        yield
    finally:
        activate(model, [DELTA_NAME])


def shared_batch(model: nn.Module, slots: Sequence[str], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What to feed the model so that ``slots`` run on one shared ``batch``, inside an ``active(model, slots)``
    block. Under its ``Parallel`` that is the batch itself; for a family whose library cannot run Parallel
    (models/backbones/) it is one copy of the batch per slot, under a ``BatchSplit`` activated here for this
    batch's size. Either way slot g's output rows are rows g*B..(g+1)*B-1."""
    if len(slots) == 1 or family_of(model).parallel_composition:
        return batch
    rows = len(next(iter(batch.values())))
    activate(model, slots, [rows] * len(slots))
    return {k: v.repeat(len(slots), *[1] * (v.dim() - 1)) for k, v in batch.items()}


def channel_rows(tensor: torch.Tensor, channels: int) -> list[torch.Tensor]:
    """Split an output of a Parallel forward (channels * B rows) into each slot's B rows."""
    if tensor.shape[0] % channels:
        raise ValueError(f"{tensor.shape[0]} rows do not split into {channels} channels")
    return list(tensor.chunk(channels, dim=0))


# --------------------------------------------------------------------------------------------------
# Group sizes

MAX_AUTO_GROUP = 32  # beyond this the per-module optimiser steps and bookkeeping dominate a step
AUTO_MEMORY_FRACTION = 0.25  # of the device's total memory


def total_memory_bytes(device: torch.device) -> int:
    """The device's total memory (the GPU's, or the host's RAM): fixed per machine, so ``auto`` gives the same
    group size on every run there, and a resumed run regroups its modules as the first run did."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def slot_bytes(model_config, rows: int, length: int, training: bool) -> int:
    """A deliberately high estimate of what one more module in a group costs: the activations of ``rows``
    sequences of ``length`` tokens through every layer (about 24 values of width max(d_model, d_ff/4) per
    token and layer: a block's attention, feed-forward and norms; x3 when their gradients are kept) plus
    the vocabulary logits. A delta module's own parameters are a small fraction of that and are left out."""
    c = model_config
    family = family_of(c)
    layers = sum(family.layer_counts(c).values())
    width = max(family.width(c), family.ffn_width(c) // 4)
    per_token = layers * 24 * width + int(c.vocab_size)
    return rows * length * per_token * 4 * (3 if training else 1)


def pick_group_size(requested: int | str, runs: int, model_config, device: torch.device, rows: int,
                    length: int, training: bool, memory_fraction: float = AUTO_MEMORY_FRACTION) -> tuple[int, str]:
    """The group size for ``runs`` runs, and a line saying how it was chosen.

    A number is taken as given (capped at ``runs``). ``auto`` takes the largest G, at most ``runs`` and
    ``MAX_AUTO_GROUP``, whose modules' activations (``slot_bytes``) fit in ``memory_fraction`` of the device's
    total memory.
    """
    if runs <= 0:
        return 1, "nothing to group"
    if requested != AUTO:
        size = min(int(requested), runs)
        return size, f"group size {size} (asked {requested}, {runs} run(s))"
    total = total_memory_bytes(device)
    per_slot = max(1, slot_bytes(model_config, rows, length, training))
    fits = max(1, int(total * memory_fraction // per_slot))
    size = min(fits, runs, MAX_AUTO_GROUP)
    return size, (f"group size {size} (auto: {memory_fraction:.0%} of {total / 2**30:.1f} GiB on {device.type} "
                  f"at about {per_slot / 2**20:.0f} MiB per module holds {fits}; at most {min(runs, MAX_AUTO_GROUP)})")


def chunks(items: Sequence, size: int) -> list[list]:
    """``items`` in order, in as few groups of at most ``size`` as possible, their sizes as equal as possible
    (20 items at size 19: two groups of 10, not 19 and 1: a group costs what its largest batch costs)."""
    count = -(-len(items) // max(1, size))
    if count == 0:
        return []
    small, extra = divmod(len(items), count)
    groups, start = [], 0
    for i in range(count):
        end = start + small + (1 if i < extra else 0)
        groups.append(list(items[start:end]))
        start = end
    return groups
