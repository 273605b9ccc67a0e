"""``sparse-peft`` command line: prune, learn, eval, inspect, and the end-to-end demo.

Every ``--model``, ``--adapter`` and data argument takes a local path or a Hub id; data also takes the short
names of the shipped assets (``wikitext2``, ``c4``, ``tinystories``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import torch

logger = logging.getLogger("sparse_peft")


# -- shared pieces ----------------------------------------------------------------------------------------------
def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model: Hub id or local folder (default: the shipped SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model to dequantise and use")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def _add_n_m_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2, help="weights kept per group")
    parser.add_argument("--m", type=int, default=4, help="group size")
    parser.add_argument("--targets", default=None, help="comma-separated module names (default: per architecture)")


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", default="c4", help="calibration text: c4 | path | Hub dataset id")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--calibration-len", type=int, default=512, help="tokens per calibration sequence")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-data", default="wikitext2", help="perplexity text: wikitext2 | path | Hub id")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (default: context, max 2048)")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")


def _add_bf16_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bf16", action="store_true",
                        help="train under bf16 autocast (Trainer's bf16=True; logits stay fp32): fast on a CUDA GPU "
                             "or a CPU with AVX512-BF16 / AMX, slow where bf16 matmuls are emulated")


def _targets(args) -> Optional[list[str]]:
    return [t.strip() for t in args.targets.split(",")] if args.targets else None


def _load(args):
    from .data import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, dtype=getattr(torch, args.dtype))


def _calibration(args, tokenizer) -> torch.Tensor:
    from .data import load_texts
    from .priors import calibration_from_texts

    return calibration_from_texts(
        load_texts(args.calibration, split="train"), tokenizer, num_samples=args.num_samples,
        seq_len=args.calibration_len,
    )


def _ppl(model, tokenizer, args, texts: list[str]) -> dict:
    from .evaluation import perplexity

    return perplexity(model, tokenizer, texts, window=args.window, max_windows=args.max_windows)


def _markdown(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def _write_json(path: Optional[str], payload) -> None:
    if path:
        from .storage import atomic_write

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


# -- commands ---------------------------------------------------------------------------------------------------
def cmd_prune(args) -> dict:
    """One-shot N:M mask -> mask adapter (or, with --update-weights, a pruned model folder)."""
    from .priors import prune

    model, tokenizer = _load(args)
    calibration = None if args.method == "magnitude" else _calibration(args, tokenizer)
    start = time.perf_counter()
    peft_model = prune(model, args.method, calibration, n=args.n, m=args.m, target_modules=_targets(args),
                       update_weights=args.update_weights)
    seconds = time.perf_counter() - start
    if args.update_weights:
        pruned = peft_model.merge_and_unload()
        pruned.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    else:
        peft_model.save_pretrained(args.output)
    print(f"{args.method} {args.n}:{args.m} mask computed in {seconds:.1f} s -> {args.output}")
    return {"method": args.method, "seconds": seconds, "output": args.output}


def cmd_learn(args) -> dict:
    """Learn a mask with Trainer from a prior on a text dataset; save the mask adapter."""
    from peft import get_peft_model

    from .config import CALIBRATED_PRIORS, MaskConfig
    from .data import load_texts
    from .training import learn_mask, mask_training_arguments, text_windows

    model, tokenizer = _load(args)
    prior = None if args.prior in (None, "none") else args.prior
    calibration = _calibration(args, tokenizer) if prior in CALIBRATED_PRIORS else None
    config = MaskConfig(
        n=args.n, m=args.m, target_modules=_targets(args), prior=prior, calibration=calibration,
        prior_strength=args.prior_strength, tau_start=args.tau_start, tau_end=args.tau_end,
        kappa_start=args.kappa_start, kappa_end=args.kappa_end, sparse_reg=args.sparse_reg,
        save_logits=args.save_logits, task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    dataset = text_windows(load_texts(args.data, split="train"), tokenizer, args.seq_len,
                           max_windows=args.steps * args.batch_size * args.grad_accum)
    training_args = mask_training_arguments(
        os.path.join(args.output, "trainer"), args.steps, args.batch_size, learning_rate=args.lr,
        gradient_accumulation_steps=args.grad_accum, logging_steps=max(1, args.steps // 20),
        activation_checkpointing=args.gradient_checkpointing, seed=args.seed, bf16=args.bf16,
    )
    start = time.perf_counter()
    trainer = learn_mask(peft_model, dataset, training_args, recompute_soft_mask=args.recompute_soft_mask,
                         distill=args.distill)
    seconds = time.perf_counter() - start
    peft_model.save_pretrained(args.output)
    tokens = args.steps * args.batch_size * args.grad_accum * args.seq_len
    print(f"learned {args.n}:{args.m} mask from prior={prior} on {tokens} tokens in {seconds:.0f} s -> {args.output}")
    return {"prior": prior, "tokens": tokens, "seconds": seconds, "output": args.output,
            "train_loss": trainer.state.log_history[-1].get("train_loss")}


def cmd_eval(args) -> list[dict]:
    """Perplexity of the dense model and of each adapter (hard masks, eval mode)."""
    from peft import PeftModel

    from .data import load_texts

    model, tokenizer = _load(args)
    texts = load_texts(args.eval_data, split="test")
    rows = [{"model": "dense", **_ppl(model, tokenizer, args, texts)}]
    for adapter in args.adapter or []:
        peft_model = PeftModel.from_pretrained(model, adapter)
        rows.append({"model": adapter, **_ppl(peft_model, tokenizer, args, texts)})
        model = peft_model.unload()
    print(_markdown(rows, ("model", "ppl", "tokens", "windows")))
    _write_json(args.json, rows)
    return rows


def cmd_inspect(args) -> dict:
    """Per-layer sparsity, N:M validity, agreement with a reference, and size in bits per weight."""
    from .stats import format_stats, mask_stats
    from .storage import adapter_size, load_mask_adapter

    adapter = load_mask_adapter(args.adapter)
    rows = mask_stats(adapter, args.reference)
    print(format_stats(rows))
    size = adapter_size(args.adapter)
    valid = all(r.valid_n_m for r in rows)
    print(f"\n{len(rows)} layers, N:M valid: {'yes' if valid else 'NO'}; "
          f"{size['bytes']} bytes = {size['bits_per_weight']:.4f} bit per masked weight")
    payload = {"layers": [vars(r) | {"agreement": r.agreement} for r in rows], "valid": valid, **size}
    _write_json(args.json, payload)
    return payload


def cmd_demo(args) -> list[dict]:
    """The main job: dense vs one-shot SparseGPT vs learned 2:4 mask on the shipped real model."""
    os.makedirs(args.output, exist_ok=True)
    common = ["--model", args.model, "--dtype", args.dtype]
    calib = ["--calibration", args.calibration, "--num-samples", str(args.num_samples),
             "--calibration-len", str(args.calibration_len)]
    prior_dir, learned_dir = os.path.join(args.output, "sparsegpt"), os.path.join(args.output, "learned")
    run(["prune", *common, *calib, "--method", "sparsegpt", "--output", prior_dir])
    learned = run(["learn", *common, "--prior", prior_dir, "--data", args.data, "--steps", str(args.steps),
                    "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
                    "--sparse-reg", str(args.sparse_reg), *(["--bf16"] if args.bf16 else []), "--output",
                    learned_dir])
    rows = run(["eval", *common, "--eval-data", args.eval_data, "--window", str(args.window),
                 *(["--max-windows", str(args.max_windows)] if args.max_windows else []),
                 "--adapter", prior_dir, "--adapter", learned_dir, "--json", os.path.join(args.output, "ppl.json")])
    print(f"\nlearned mask: {learned['tokens']} training tokens, {learned['seconds']:.0f} s")
    return rows


# -- parser -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-peft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help=cmd_prune.__doc__)
    _add_model_args(p), _add_n_m_args(p), _add_calibration_args(p)
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="sparsegpt")
    p.add_argument("--update-weights", action="store_true", help="SparseGPT with its weight update (baseline)")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("learn", help=cmd_learn.__doc__)
    _add_model_args(p), _add_n_m_args(p), _add_calibration_args(p)
    p.add_argument("--prior", default="sparsegpt", help="none | magnitude | wanda | sparsegpt | adapter path/Hub id")
    p.add_argument("--data", default="c4", help="training text: c4 | tinystories | path | Hub dataset id")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prior-strength", type=float, default=3.0)
    p.add_argument("--tau-start", type=float, default=4.0)
    p.add_argument("--tau-end", type=float, default=0.05)
    p.add_argument("--kappa-start", type=float, default=100.0)
    p.add_argument("--kappa-end", type=float, default=500.0)
    p.add_argument("--sparse-reg", type=float, default=0.0,
                   help="regulariser lambda; the paper's 1e-5 is for ~1M tokens per step and collapses small-batch "
                        "runs")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--recompute-soft-mask", action="store_true",
                   help="regenerate the Gumbel sample in backward: 6 bytes per weight less memory, slower steps")
    p.add_argument("--distill", action="store_true",
                   help="train on the KL divergence from the dense model instead of the LM loss (1.3-1.5x the step "
                        "time on CPU in fp32; see the README for when it pays)")
    _add_bf16_arg(p)
    p.add_argument("--save-logits", action="store_true", help="also save float logits to continue training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    _add_model_args(p), _add_eval_args(p)
    p.add_argument("--adapter", action="append", help="mask adapter path / Hub id (repeatable)")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("adapter", help="mask adapter path / Hub id")
    p.add_argument("--reference", default=None, help="another adapter to compare with (e.g. the general mask)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    _add_model_args(p), _add_calibration_args(p), _add_eval_args(p)
    p.add_argument("--data", default="c4")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--sparse-reg", type=float, default=0.0)
    _add_bf16_arg(p)
    p.add_argument("--output", default="runs/demo")
    p.set_defaults(func=cmd_demo, num_samples=32, calibration_len=256, window=512, max_windows=8)
    return parser


def run(argv: Sequence[str]):
    """Run one command from Python and return its result; errors propagate as exceptions."""
    args = build_parser().parse_args(argv)
    import sparse_peft  # noqa: F401  (registers the method)

    return args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: clear one-line errors for bad input, exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import sparse_peft  # noqa: F401  (registers the method)

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError, OSError) as err:
        print(f"sparse-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
