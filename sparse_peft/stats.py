"""Per-layer mask statistics: sparsity, exact N:M validity, agreement between two masks; as a table or a plot."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

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


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def module_order(base_model: Optional[str]) -> Optional[list[str]]:
    """The module names of ``base_model`` in model order, built on the meta device from its ``config.json`` alone (no
    weights are read, nothing is downloaded: a local folder, or a Hub id already in the local cache); None if the
    config is not at hand or cannot be built."""
    if not base_model:
        return None
    try:
        config = AutoConfig.from_pretrained(base_model, local_files_only=True)
    except (OSError, ValueError):
        return None
    for auto_class in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                model = auto_class.from_config(config)
        except (ValueError, KeyError, ImportError):
            continue
        return [name for name, _ in model.named_modules()]
    return None


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
    order: Optional[Sequence[str]] = None,
) -> list[LayerMaskStats]:
    """Per-layer sparsity and N:M validity of ``source``, and its Hamming distance to ``reference`` if given.

    Typical uses: ``mask_stats(peft_model)``, ``mask_stats("out/task-a", "out/general")`` (task vs general
    mask), ``mask_stats(peft_model, peft_model.peft_config["default"].prior)`` (drift from the prior).
    ``n``/``m`` are read from adapters and models; pass them for plain mask dicts.

    Rows come in model order: a model's module order; for a saved adapter (whose file keeps no order) the module
    order of its base model if :func:`module_order` can build it from ``base_model_name_or_path``; else
    ``order`` (module names) if given, else names with digit runs sorted by value (:func:`natural_key`).
    """
    if order is None and isinstance(source, nn.Module):
        order = [plain_name(name) for name, _ in source.named_modules()]
    elif order is None and isinstance(source, (str, os.PathLike)):
        source = load_mask_adapter(source)
    if order is None and isinstance(source, MaskAdapter):
        order = module_order(source.config.get("base_model_name_or_path"))
    masks, source_n_m = _masks(source, adapter_name)
    n_m = (n, m) if n is not None and m is not None else source_n_m
    if n_m is None:
        raise ValueError("Pass n= and m= to check N:M validity of plain mask dicts.")
    ref_masks = _masks(reference, adapter_name)[0] if reference is not None else {}
    rank = {name: i for i, name in enumerate(order or ())}
    stats = []
    for name in sorted(masks, key=lambda name: (rank.get(name, len(rank)), natural_key(name))):
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


def plot_stats(stats: list[LayerMaskStats], path: str | os.PathLike) -> None:
    """Draw :func:`mask_stats` rows as a per-layer plot, in their order, into the image file ``path`` (PNG, SVG, PDF
    by suffix): each layer's sparsity and, for rows with a reference, its agreement with the reference. Layers that
    are not exact N:M are marked red. Needs matplotlib (``pip install matplotlib``)."""
    try:
        from matplotlib.figure import Figure  # optional dependency, only for this plot
    except ImportError as err:
        raise ImportError("Plotting mask statistics needs matplotlib: pip install matplotlib") from err
    if not stats:
        raise ValueError("No layers to plot.")
    x = list(range(len(stats)))
    fig = Figure(figsize=(max(6.0, 0.12 * len(stats) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, [row.sparsity for row in stats], marker=".", label="sparsity")
    with_ref = [(i, row.agreement) for i, row in enumerate(stats) if row.agreement is not None]
    if with_ref:
        ax.plot(*zip(*with_ref), marker=".", label="agreement with reference")
    invalid = [i for i, row in enumerate(stats) if not row.valid_n_m]
    if invalid:
        ax.scatter(invalid, [stats[i].sparsity for i in invalid], color="red", zorder=3, label="not N:M")
    ax.set_xticks(x, [row.name for row in stats], rotation=90, fontsize=5 if len(stats) > 40 else 8)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(os.fspath(path), dpi=150)
