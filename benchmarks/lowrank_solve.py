"""The least-squares solve of the training-free start: conjugate gradients to a relative residual
(:func:`sparse_peft.lowrank.masked_least_squares_update`, ``--rtols``) against the exact per-row Cholesky solve.

On the first ``--blocks`` transformer blocks of the model with the general mask (``--general``, default the shipped
one), each masked layer's ``H = X^T X`` is taken from ``--num-samples`` x ``--calibration-len`` calibration tokens
through the mask-only model. Per layer and solver: the solve's time, and the output error on those inputs of the
rank-``--rank`` update built from its solution (:func:`sparse_peft.lowrank.calibrated_factors`) relative to that
of the mask alone, ``||(W - (W + B A) * mask) X^T||^2 / ||(W - W * mask) X^T||^2`` (lower is better). Writes
``lowrank_solve.json`` and ``lowrank_solve.md`` into ``--output``.

    OMP_NUM_THREADS=1 python benchmarks/lowrank_solve.py --output runs/lowrank-solve
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from peft import PeftModel

from sparse_peft.data import calibration_from_texts, default_general_mask, load_model_and_tokenizer, load_texts
from sparse_peft.layer import mask_layers
from sparse_peft.lowrank import calibrated_factors, masked_least_squares_update, output_error
from sparse_peft.pruners import find_blocks, targets_per_block
from sparse_peft.utils import atomic_write, comma_list


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--general", default=None, help="general mask adapter (default: the shipped one)")
    p.add_argument("--blocks", type=int, default=2, help="the first K transformer blocks' layers")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rtols", type=comma_list(float), default="0.1,0.01,0.001")
    p.add_argument("--calibration", default="c4")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--output", default="runs/lowrank-solve")
    args = p.parse_args(argv)
    args.general = default_general_mask(args.general, args.model, args.gguf_file)
    return args


def cholesky_update(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01,
                    rows_per_chunk: int = 64) -> torch.Tensor:
    """The reference: ``D_S = H_SS^-1 H_SP W_P`` per row by Cholesky in float32, ``H`` damped as the library's
    solver damps it (``+ damp * mean(diag H) * I``), for a mask with the same number of kept weights in every row."""
    h = hessian.double()
    h = (h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)).float()
    w, keep = weight.float(), mask.bool()
    rhs_full = (w * ~keep) @ h
    kept = keep.nonzero()[:, 1].view(weight.shape[0], -1)
    update = torch.zeros_like(w)
    for start in range(0, weight.shape[0], rows_per_chunk):
        idx = kept[start : start + rows_per_chunk]
        chol = torch.linalg.cholesky(h[idx[:, :, None], idx[:, None, :]])
        rhs = rhs_full[start : start + rows_per_chunk].gather(1, idx)
        update[start : start + rows_per_chunk].scatter_(1, idx, torch.cholesky_solve(rhs[..., None], chol)[..., 0])
    return update


def layer_hessians(model, calibration: torch.Tensor, blocks: int) -> dict[str, tuple]:
    """``{name: (W, mask, H)}`` of the mask layers in the first ``blocks`` blocks, ``H`` from the mask-only model."""
    module_names = {module: name for name, module in model.named_modules()}
    named = {module_names[layer]: layer for layer in mask_layers(model).values()}
    prefix, found = find_blocks(model, list(named))
    first = {id(layer) for block in targets_per_block(prefix, len(found), named)[:blocks] for layer in block.values()}
    layers = {n: layer for n, layer in mask_layers(model).items() if id(layer) in first}
    sums, handles = {}, []

    def record(name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.T @ x

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0])))
    with torch.no_grad():
        for batch in calibration.split(8):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: (layer.base_weight(), layer.hard_mask("default").float(), sums[n]) for n, layer in layers.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file)
    model = PeftModel.from_pretrained(model, args.general).eval()
    calibration = calibration_from_texts(load_texts(args.calibration, split="train"), tokenizer,
                                         num_samples=args.num_samples, seq_len=args.calibration_len)
    solvers = {"cholesky": cholesky_update}
    for rtol in args.rtols:
        solvers[f"cg rtol={rtol:g}"] = lambda w, m, h, rtol=rtol: masked_least_squares_update(w, m, h, rtol=rtol)
    rows = []
    for name, (weight, mask, hessian) in layer_hessians(model, calibration, args.blocks).items():
        alone = output_error(weight, weight * mask, hessian)
        row = {"layer": name, "shape": list(weight.shape)}
        for solver, solve in solvers.items():
            start = time.perf_counter()
            target = solve(weight, mask, hessian)
            seconds = time.perf_counter() - start
            b, a = calibrated_factors(weight, mask, hessian, args.rank, "under_mask", target=target)
            row[solver] = {"seconds": seconds, "relative_error": output_error(weight, (weight + b @ a) * mask,
                                                                              hessian) / alone}
        rows.append(row)
        print(name, {k: (round(v["seconds"], 2), round(v["relative_error"], 4)) for k, v in row.items()
                     if isinstance(v, dict)}, flush=True)
    result = {"settings": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(args.output, exist_ok=True)
    payload = json.dumps(result, indent=2).encode()
    atomic_write(os.path.join(args.output, "lowrank_solve.json"), lambda f: f.write(payload))
    table = markdown(rows, list(solvers))
    atomic_write(os.path.join(args.output, "lowrank_solve.md"), lambda f: f.write(table.encode()))
    print(table)
    return result


def markdown(rows: list[dict], solvers: list[str]) -> str:
    """Per solver: total solve time and the worst and mean ratio of its output error to the Cholesky solve's."""
    lines = ["| solver | solve time, all layers (s) | output error / Cholesky's: mean | worst |", "|---|---|---|---|"]
    for solver in solvers:
        ratios = [r[solver]["relative_error"] / r["cholesky"]["relative_error"] for r in rows]
        seconds = sum(r[solver]["seconds"] for r in rows)
        lines.append(f"| {solver} | {seconds:.1f} | {sum(ratios) / len(ratios):.4f} | {max(ratios):.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
