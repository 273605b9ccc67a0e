"""Per-layer mask statistics: sparsity, exact N:M validity, agreement between two masks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from .adapter_io import MaskAdapter, load_mask_adapter
from .constants import plain_name
from .layer import MaskedLinear
from .patterns import group_counts

#: Anything that holds masks: a saved adapter (path / Hub id / MaskAdapter), a model with mask layers (its
#: active adapter), or ``{module name: 0/1 mask [out, in]}`` with explicit n, m.
MaskSource = Union[str, os.PathLike, MaskAdapter, nn.Module, dict]


@dataclass
class LayerMaskStats:
    """Statistics of one layer's hard mask ``[out, in]``."""

    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of weights pruned
    valid_n_m: bool  # every group of m keeps exactly n
    hamming: Optional[int] = None  # positions where the mask differs from the reference
    groups_changed: Optional[int] = None  # groups whose pattern differs from the reference

    @property
    def agreement(self) -> Optional[float]:
        """Fraction of positions equal to the reference (1 - normalised Hamming distance)."""
        if self.hamming is None:
            return None
        return 1.0 - self.hamming / (self.shape[0] * self.shape[1])


def _masks(source: MaskSource, adapter_name: Optional[str]) -> tuple[dict[str, torch.Tensor], Optional[tuple]]:
    """``({name: bool [out, in]}, (n, m) or None)`` from any :data:`MaskSource`."""
    if isinstance(source, (str, os.PathLike)):
        source = load_mask_adapter(source)
    if isinstance(source, MaskAdapter):
        return source.masks(), (source.n, source.m)
    if isinstance(source, dict):
        return {name: mask.bool() for name, mask in source.items()}, None
    masks, n_m = {}, None
    for name, layer in source.named_modules():
        if not isinstance(layer, MaskedLinear):
            continue
        adapter = adapter_name or layer.active_mask_adapter()
        if adapter is None:
            continue
        spec = layer.maskllm_spec[adapter]
        masks[plain_name(name)] = layer.hard_mask(adapter).bool().cpu()
        n_m = (spec.n, spec.m)
    if not masks:
        raise ValueError("The model has no mask layers with an active adapter; pass a model from get_peft_model.")
    return masks, n_m


def mask_stats(
    source: MaskSource,
    reference: Optional[MaskSource] = None,
    *,
    n: Optional[int] = None,
    m: Optional[int] = None,
    adapter_name: Optional[str] = None,
) -> list[LayerMaskStats]:
    """Per-layer sparsity and N:M validity of ``source``, and its Hamming distance to ``reference`` if given.

    Typical uses: ``mask_stats(peft_model)``, ``mask_stats("out/task-a", "out/general")`` (task vs general
    mask), ``mask_stats(peft_model, peft_model.peft_config["default"].prior)`` (drift from the prior).
    ``n``/``m`` are read from adapters and models; pass them for plain mask dicts.
    """
    masks, source_n_m = _masks(source, adapter_name)
    n_m = (n, m) if n is not None and m is not None else source_n_m
    if n_m is None:
        raise ValueError("Pass n= and m= to check N:M validity of plain mask dicts.")
    ref_masks = _masks(reference, adapter_name)[0] if reference is not None else {}
    stats = []
    for name in sorted(masks):
        mask = masks[name]
        row = LayerMaskStats(
            name=name,
            shape=tuple(mask.shape),
            sparsity=1.0 - mask.float().mean().item(),
            valid_n_m=bool((group_counts(mask, n_m[1]) == n_m[0]).all()),
        )
        ref = ref_masks.get(name)
        if ref is not None:
            if ref.shape != mask.shape:
                raise ValueError(f"{name}: mask shape {tuple(mask.shape)} differs from reference {tuple(ref.shape)}.")
            diff = mask != ref.bool()
            row.hamming = int(diff.sum())
            row.groups_changed = int(diff.reshape(-1, n_m[1]).any(dim=1).sum())
        stats.append(row)
    return stats


def format_stats(stats: list[LayerMaskStats]) -> str:
    """A Markdown table of :func:`mask_stats` rows."""
    with_ref = any(row.hamming is not None for row in stats)
    header = "| layer | shape | sparsity | N:M valid |"
    header += " hamming | agreement | groups changed |" if with_ref else ""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in stats:
        valid = "yes" if row.valid_n_m else "NO"
        line = f"| {row.name} | {row.shape[0]}x{row.shape[1]} | {row.sparsity:.4f} | {valid} |"
        if with_ref and row.hamming is not None:
            line += f" {row.hamming} | {row.agreement:.4f} | {row.groups_changed} |"
        elif with_ref:
            line += " - | - | - |"
        lines.append(line)
    return "\n".join(lines)
