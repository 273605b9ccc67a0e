"""Why a training-free update makes a learned mask worse: layer-wise least-squares updates, by layer group and size.

One pass of the model with the general mask (``--general``) over ``--num-samples`` x ``--calibration-len`` C4 tokens
gives every masked layer's input covariance ``H = X^T X``. Per layer, the full-rank change of the kept weights that
best restores the layer's dense output on those inputs (:func:`sparse_peft.lowrank.calibrated_target`, SparseGPT's
update without its column order) and its rank-``--rank`` approximation through the mask
(:func:`sparse_peft.lowrank.calibrated_factors`) are computed once; each row then adds one of them, times a scale,
under the mask of a group of layers (one pass: all fitted on the mask-only model's inputs) and measures Wikitext-2
perplexity and perplexity on C4 documents that the calibration never saw (the last ``--held-out-docs``).

Rows (``--rows``): ``mask`` (no update), else ``<update>-<layers>[-x<scale>]`` with update ``full`` or ``rank`` and
layers ``all``, ``qk`` (q/k projections), ``vo`` (v/o projections) or ``mlp``. ``layerwise.json`` / ``layerwise.md``
are rewritten after every row.

    python benchmarks/lowrank_layerwise.py --output runs/layerwise
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from peft import PeftModel

import sparse_peft  # noqa: F401  (registers the mask method with PEFT)
from sparse_peft.data import calibration_from_texts, default_general_mask, load_model_and_tokenizer, load_texts
from sparse_peft.evaluation import perplexity
from sparse_peft.layer import mask_layers
from sparse_peft.lowrank import calibrated_factors, calibrated_target
from sparse_peft.utils import atomic_write, comma_list

GROUPS = {"all": (), "qk": ("q_proj", "k_proj"), "vo": ("v_proj", "o_proj"), "mlp": ("mlp.",)}
DEFAULT_ROWS = "mask,full-all,full-all-x0.5,full-mlp,rank-all,rank-all-x0.5,rank-qk,rank-vo,rank-mlp"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--general", default=None, help="general mask adapter (default: the shipped one)")
    p.add_argument("--rows", type=comma_list(str), default=DEFAULT_ROWS)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--held-out-docs", type=int, default=100, help="last C4 documents: never calibrated on")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--output", default="runs/layerwise")
    args = p.parse_args(argv)
    if args.held_out_docs < 1:
        p.error(f"--held-out-docs must be at least 1 (the C4 documents scored, never calibrated on), got "
                f"{args.held_out_docs}.")
    for row in args.rows:
        parse_row(row)  # a typo fails before the model loads
    return args


def parse_row(row: str) -> tuple[str, str, float]:
    """``(update, layers, scale)`` of a row name; ``("none", "all", 0.0)`` for ``mask``."""
    if row == "mask":
        return "none", "all", 0.0
    parts = row.split("-")
    scale = 1.0
    if len(parts) == 3 and parts[2].startswith("x"):
        scale = float(parts[2][1:])
        parts = parts[:2]
    if len(parts) != 2 or parts[0] not in ("full", "rank") or parts[1] not in GROUPS:
        raise ValueError(f"--rows: {row!r} is not 'mask' or <full|rank>-<{'|'.join(GROUPS)}>[-x<scale>], "
                         "e.g. rank-mlp-x0.5.")
    return parts[0], parts[1], scale


def in_group(name: str, layers: str) -> bool:
    return not GROUPS[layers] or any(part in name for part in GROUPS[layers])


def input_covariances(model, calibration: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{layer name: X^T X}`` (float32 ``[in, in]``) of every mask layer's inputs in one eval pass."""
    hessians: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in mask_layers(model).items():
        def record(module, args, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            hessians[name] = hessians[name] + x.T @ x if name in hessians else x.T @ x
        handles.append(layer.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            for batch in calibration.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def markdown(result: dict) -> str:
    lines = ["| row | update | layers | scale | Wikitext-2 PPL | held-out C4 PPL |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['update']} | {r['layers']} | {r['scale']:g} | {r['wikitext2_ppl']:.2f} | "
                     f"{r['c4_held_out_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file)
    general = default_general_mask(args.general, args.model, args.gguf_file)
    model = PeftModel.from_pretrained(model, general).eval()
    c4 = load_texts("c4", split="train")
    calibration = calibration_from_texts(c4[: -args.held_out_docs], tokenizer, args.num_samples,
                                         args.calibration_len)
    texts = {"wikitext2_ppl": load_texts("wikitext2", split="test"), "c4_held_out_ppl": c4[-args.held_out_docs:]}
    layers = mask_layers(model)
    start = time.perf_counter()
    hessians = input_covariances(model, calibration)
    original = {name: layer.base_weight().detach().clone() for name, layer in layers.items()}
    updates: dict[str, dict[str, torch.Tensor]] = {"full": {}, "rank": {}}
    kinds = {parse_row(row)[0] for row in args.rows}
    for name, layer in layers.items():
        if kinds == {"none"}:
            break
        weight, mask = original[name].float(), layer.hard_mask("default").float()
        updates["full"][name] = calibrated_target(weight, mask, hessians[name], "under_mask")
        if "rank" in kinds:  # the rank-r update is fitted from the full-rank one
            b, a = calibrated_factors(weight, mask, hessians[name], args.rank, "under_mask",
                                      target=updates["full"][name])
            updates["rank"][name] = b @ a
    result = {"settings": {**vars(args), "general": general}, "fit_seconds": time.perf_counter() - start,
              "rows": []}
    print(f"fitted {len(layers)} layers in {result['fit_seconds']:.0f} s", flush=True)
    for row in args.rows:
        update, group, scale = parse_row(row)
        with torch.no_grad():
            for name, layer in layers.items():
                change = scale * updates[update][name] if update != "none" and in_group(name, group) else 0
                layer.base_weight().copy_(original[name] + change)  # (W + s U) * mask in the forward
        entry = {"row": row, "update": update, "layers": group, "scale": scale}
        for key, eval_texts in texts.items():
            entry[key] = perplexity(model, tokenizer, eval_texts, window=args.window, max_windows=args.eval_windows,
                                    show_progress=False)["ppl"]
        result["rows"].append(entry)
        print(f"{row}: Wikitext-2 {entry['wikitext2_ppl']:.2f}, held-out C4 {entry['c4_held_out_ppl']:.2f}",
              flush=True)
        for file, text in (("layerwise.json", json.dumps(result, indent=1)), ("layerwise.md", markdown(result))):
            atomic_write(os.path.join(args.output, file), lambda f, text=text: f.write(text.encode()))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.base_weight().copy_(original[name])
    return result


if __name__ == "__main__":
    main()
