"""Zero-shot accuracy benchmark: lm-evaluation-harness tasks on the dense model and on mask adapters.

Rows: the dense model, then one per ``--adapters NAME=PATH`` (a saved mask adapter folder or Hub id, evaluated with
its hard mask). Columns: each task's accuracy ± standard error (lm-eval's), and Wikitext-2 perplexity with
``--ppl``. The default tasks are the local ones shipped with the package (``sst2_local``, ``agnews_local``,
``imdb_local``); any lm-eval task name also works (built-in tasks read their data from the Hub).

Writes ``--output`` (JSON: the settings and every row's results) and the same path with ``.md`` (the table) after
every row; ``--resume`` keeps the rows already in ``--output`` (measured with the same settings) and runs the rest.

    python -m sparse_peft.cli prune --method sparsegpt --num-samples 32 --calibration-len 256 --output runs/zs/sparsegpt
    python benchmarks/zero_shot.py --adapters sparsegpt=runs/zs/sparsegpt --limit 500 \\
        --output benchmarks/results/zero-shot-cpu-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from peft import PeftModel

import sparse_peft
from sparse_peft.data import load_model_and_tokenizer, load_texts
from sparse_peft.evaluation import perplexity
from sparse_peft.utils import atomic_write
from sparse_peft.zero_shot import write_zero_shot_json, zero_shot, zero_shot_table

#: Settings every row of one table shares: a ``--resume`` run must use the values the table was measured with.
SHARED_SETTINGS = ("model", "gguf_file", "tasks", "limit", "num_fewshot", "ppl", "eval_data", "window", "eval_windows")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=PATH", help="mask adapters (folder or Hub id)")
    p.add_argument("--tasks", default="sst2_local,agnews_local,imdb_local", help="comma-separated lm-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="documents scored per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--ppl", action="store_true", help="also Wikitext-2 perplexity (--window, --eval-windows)")
    p.add_argument("--eval-data", default="wikitext2")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--output", default="runs/zero_shot/zero_shot.json", help="JSON path; the table goes beside, .md")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --output")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for spec in args.adapters:
        if "=" not in spec:
            p.error(f"--adapters takes NAME=PATH, got {spec!r}")
    return args


def settings_of(args) -> dict:
    return {k: getattr(args, k) for k in SHARED_SETTINGS}


def resumed_rows(args) -> dict:
    if not (args.resume and os.path.isfile(args.output)):
        return {}
    with open(args.output) as f:
        saved = json.load(f)
    old = {k: saved["settings"].get(k) for k in SHARED_SETTINGS}
    if old != settings_of(args):
        raise SystemExit(f"--resume: {args.output} was measured with {old}, not {settings_of(args)}")
    return saved["rows"]


def write(args, rows: dict, environment: dict) -> None:
    write_zero_shot_json(args.output, rows, **settings_of(args), environment=environment)
    ppl = {name: row.get("ppl") for name, row in rows.items()} if args.ppl else None
    tasks = {name: row["tasks"] for name, row in rows.items()}
    lines = [
        f"Zero-shot accuracy (lm-eval {environment['lm_eval']}, {args.num_fewshot}-shot, "
        f"limit={args.limit} documents per task), mask adapters with their hard 2:4 masks.",
        "",
        zero_shot_table(tasks, ppl=ppl),
        "",
        "Seconds per row: " + ", ".join(f"{name} {row['seconds']:.0f}" for name, row in rows.items()) + ".",
    ]
    if args.ppl:
        lines.append(f"PPL: {args.eval_data}, {args.eval_windows} windows of {args.window} tokens.")
    markdown = os.path.splitext(args.output)[0] + ".md"
    atomic_write(markdown, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    import lm_eval

    environment = {"lm_eval": lm_eval.__version__, "torch": torch.__version__, "sparse_peft": sparse_peft.__version__,
                   "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    rows = resumed_rows(args)
    model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, device=args.device)
    texts = load_texts(args.eval_data, split="test") if args.ppl else None
    specs = [("dense", None)] + [tuple(spec.split("=", 1)) for spec in args.adapters]
    for name, adapter in specs:
        if name in rows:
            print(f"{name}: kept from {args.output}")
            continue
        evaluated = model if adapter is None else PeftModel.from_pretrained(model, adapter)
        start = time.perf_counter()
        row = {"adapter": adapter, "tasks": zero_shot(
            evaluated, tokenizer, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
            batch_size=args.batch_size, include_path=args.include_path,
        )}
        if args.ppl:
            row["ppl"] = perplexity(evaluated, tokenizer, texts, window=args.window, max_windows=args.eval_windows,
                                    show_progress=False)["ppl"]
        row["seconds"] = time.perf_counter() - start
        rows[name] = row
        write(args, rows, environment)
        print(f"{name}: {json.dumps(row)}")
        if adapter is not None:
            model = evaluated.unload()
    print(zero_shot_table({n: r["tasks"] for n, r in rows.items()},
                          ppl={n: r.get("ppl") for n, r in rows.items()} if args.ppl else None))
    return rows


if __name__ == "__main__":
    main()
