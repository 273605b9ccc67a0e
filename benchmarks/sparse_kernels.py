"""Inference speed of a merged 2:4 model with PyTorch's semi-structured sparse kernels, against the same weights dense.

    python benchmarks/sparse_kernels.py --json results/kernels-cuda.json     # a CUDA GPU of compute capability >= 8.0
    python benchmarks/sparse_kernels.py --model <config folder> --random-weights --shapes 4096x4096,11008x4096

The model gets a 2:4 mask adapter (``--adapter``, default the magnitude 2:4 mask: the kernels' speed depends on the
shapes, not on which two weights of four are kept), is merged (``merge_and_unload``), moved to the GPU in
``--dtype`` and timed twice on the same weights: dense (zeros where pruned) and after
:func:`sparse_peft.export.to_semi_structured`.

* **Layers**: for every distinct ``[out, in]`` of the converted linears, and for the extra ``--shapes`` (e.g. a 7B
  model's, to see where the kernels pay), ``F.linear(x, W)`` with ``x`` of ``T`` tokens for each ``T`` in
  ``--tokens``: milliseconds dense and 2:4, the speed-up, and the dense product's TFLOP/s (``2 T out in`` per call).
* **Model**: the whole forward of ``--batch`` x ``--seq-len`` tokens (no KV cache), dense-masked vs converted, and
  the largest logit difference between the two.

Times are CUDA-event medians of ``--repeats`` calls after ``--warmup`` calls. JSON + Markdown (``--json x.json``
writes ``x.md``). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from cost import TARGETS, load_model
from sparse_peft import MaskConfig
from sparse_peft.adapter_io import adapter_size
from sparse_peft.export import default_backend, semi_structured_class, semi_structured_plan, to_semi_structured
from sparse_peft.patterns import topn_mask
from sparse_peft.utils import atomic_write, comma_list


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id or folder; default: the shipped SmolLM2-135M-Instruct")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --model from its config with random weights and random token ids (speed depends "
                        "only on the shapes)")
    parser.add_argument("--adapter", default=None, help="mask adapter to merge (default: the magnitude 2:4 mask)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--backend", default=None, choices=["cusparselt", "cutlass"],
                        help="semi-structured backend (default: cuSPARSELt where this torch has it, else CUTLASS)")
    parser.add_argument("--tokens", type=comma_list(int), default=[128, 2048, 16384],
                        help="tokens per layer product, comma-separated")
    parser.add_argument("--shapes", type=comma_list(str), default=[],
                        help="extra [out]x[in] layer shapes to time, comma-separated (e.g. 4096x4096,11008x4096)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per model forward")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence of the model forward")
    parser.add_argument("--text", default="wikitext2", help="text the model forward's batch is cut from")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="kernels.json", help="where to write the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        parser.error("2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0 (sparse tensor cores); "
                     "run this on such a machine")
    try:
        args.shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes [out]x[in] pairs such as 4096x11008, got {args.shapes}")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes takes [out]x[in] pairs such as 4096x11008, got {args.shapes}")
    if args.random_weights and args.model is None:
        parser.error("--random-weights needs --model: a folder or Hub id with the config.json to build")
    return args


def cuda_time_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (CUDA events) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_layer(weight: torch.Tensor, tokens: int, args, sparse_class) -> dict:
    """Dense vs 2:4 ``F.linear`` of ``tokens`` inputs through ``weight`` ``[out, in]`` (already 2:4, on the GPU)."""
    out_features, in_features = weight.shape
    x = torch.randn(tokens, in_features, device=weight.device, dtype=weight.dtype)
    sparse = sparse_class.from_dense(weight)
    with torch.no_grad():
        dense_ms = cuda_time_ms(lambda: F.linear(x, weight), args.warmup, args.repeats)
        sparse_ms = cuda_time_ms(lambda: F.linear(x, sparse), args.warmup, args.repeats)
        reference = F.linear(x, weight)
        error = ((F.linear(x, sparse) - reference).abs().max() / reference.abs().max()).item()
    flops = 2 * tokens * out_features * in_features
    return {"shape": [out_features, in_features], "tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "dense_tflop_per_s": flops / dense_ms / 1e9,
            "max_error_relative": error}


def merged_model(args):
    """The merged 2:4 model on the GPU in ``args.dtype`` and the forward batch."""
    model, batch = load_model(SimpleNamespace(model=args.model, random_weights=args.random_weights, dtype="float32",
                                              batch=args.batch, seq_len=args.seq_len, text=args.text, device="cpu"))
    if args.adapter is not None:
        peft_model = PeftModel.from_pretrained(model, args.adapter)
    else:
        peft_model = get_peft_model(model, MaskConfig(prior="magnitude", target_modules=TARGETS))
    merged = peft_model.merge_and_unload()
    return merged.to("cuda", getattr(torch, args.dtype)).eval(), batch.cuda()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.adapter is not None:
        adapter_size(args.adapter)  # a missing or unreadable adapter fails before the model loads
    backend = args.backend or default_backend()
    sparse_class = semi_structured_class(backend)
    model, batch = merged_model(args)
    plan = semi_structured_plan(model, backend)
    converted = [name for name, reason in plan.items() if reason is None]
    weights = {}  # [out, in] -> one 2:4 weight of that shape
    for name in converted:
        weight = model.get_submodule(name).weight.detach()
        weights.setdefault(tuple(weight.shape), weight)
    model_shapes = set(weights)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes:
        dense = torch.randn(shape, device="cuda", generator=generator).to(getattr(torch, args.dtype))
        weights.setdefault(shape, dense * topn_mask(dense.abs(), 2, 4).to(dense.dtype))  # magnitude 2:4
    layers = []
    for shape, weight in weights.items():
        for tokens in args.tokens:
            row = time_layer(weight, tokens, args, sparse_class)
            row["in_model"] = shape in model_shapes
            layers.append(row)
            print(f"  {shape[0]}x{shape[1]}, {tokens} tokens: dense {row['dense_ms']:.3f} ms, "
                  f"2:4 {row['sparse_ms']:.3f} ms ({row['speedup']:.2f}x)", file=sys.stderr)

    with torch.no_grad():
        forward = lambda: model(input_ids=batch, use_cache=False).logits  # noqa: E731
        dense_logits = forward()
        dense_ms = cuda_time_ms(forward, args.warmup, args.repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the output layer stays dense; torch's prototype warning
            to_semi_structured(model, args.backend)
        sparse_logits = forward()
        sparse_ms = cuda_time_ms(forward, args.warmup, args.repeats)
    tokens = batch.numel()
    model_row = {"batch": list(batch.shape), "converted_linears": len(converted), "dense_ms": dense_ms,
                 "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "dense_tokens_per_s": tokens / dense_ms * 1e3,
                 "sparse_tokens_per_s": tokens / sparse_ms * 1e3,
                 "max_logit_difference": (sparse_logits.float() - dense_logits.float()).abs().max().item()}

    lines = [f"2:4 kernels ({backend}, {args.dtype}) on {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| layer [out, in] | in the model | tokens | dense (ms) | 2:4 (ms) | speed-up | dense TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for row in layers:
        lines.append(f"| {row['shape'][0]} x {row['shape'][1]} | {'yes' if row['in_model'] else 'no'} "
                     f"| {row['tokens']} | {row['dense_ms']:.3f} | {row['sparse_ms']:.3f} | {row['speedup']:.2f} "
                     f"| {row['dense_tflop_per_s']:.1f} |")
    lines += ["", "| model forward | converted linears | dense (ms) | 2:4 (ms) | speed-up | tokens/s dense | "
              "tokens/s 2:4 | max logit difference |", "|---|---|---|---|---|---|---|---|",
              f"| {model_row['batch'][0]} x {model_row['batch'][1]} | {model_row['converted_linears']} "
              f"| {dense_ms:.2f} | {sparse_ms:.2f} | {model_row['speedup']:.2f} "
              f"| {model_row['dense_tokens_per_s']:,.0f} | {model_row['sparse_tokens_per_s']:,.0f} "
              f"| {model_row['max_logit_difference']:.3g} |"]
    table = "\n".join(lines)
    print("\n" + table)
    machine = {"cuda_device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
               "torch": torch.__version__, "cusparselt": torch.backends.cusparselt.is_available()}
    payload = json.dumps({"settings": vars(args), "machine": machine, "backend": backend, "layers": layers,
                          "model": model_row}, indent=2)
    atomic_write(args.json, lambda f: f.write(payload.encode()))
    markdown = str(Path(args.json).with_suffix(".md"))
    atomic_write(markdown, lambda f: f.write((table + "\n").encode()))
    print(f"\nwrote {args.json} and {markdown}")


if __name__ == "__main__":
    main()
