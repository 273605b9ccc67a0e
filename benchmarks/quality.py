"""Quality benchmark: Wikitext-2 perplexity of one-shot 2:4 masks and learned (MaskLLM) masks on a real model.

Rows: dense; magnitude, Wanda, SparseGPT mask-only and SparseGPT with its weight update (one-shot); masks learned
with ``Trainer`` from no prior and from the magnitude, Wanda and SparseGPT priors (the one-shot masks above, used
through the transfer path ``MaskConfig(prior=<saved adapter>)``); and, for the SparseGPT prior, one learned run per
training budget in ``--curve-steps`` (each a full schedule), which gives the PPL-vs-training-tokens curve.
For every learned row it reports the training tokens, wall time, and the fraction of the SparseGPT(mask-only)-to-
dense gap that it closes: ``(ppl_sparsegpt - ppl_learned) / (ppl_sparsegpt - ppl_dense)``.

Writes ``quality.md`` (table), ``quality.json`` (all numbers and the settings) and ``quality.png`` (the curves, one
per batch shape, regulariser and loss) into ``--output``. The JSON is rewritten after every row; ``--resume``
continues in the same ``--output``: rows already there (and the one-shot masks saved there) are kept and only
missing rows run, so a run can be extended with more ``--curve-steps``, another ``--batch-size``, ``--distill`` or
``--bf16``.
Defaults run on the shipped SmolLM2-135M-Instruct on 2 CPU cores; pass ``--device cuda`` and bigger ``--steps`` /
``--batch-size`` / ``--seq-len`` / ``--num-samples`` for real budgets.

    python benchmarks/quality.py --output runs/quality
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from peft import get_peft_model
from transformers import set_seed

import sparse_peft
from sparse_peft.cli import add_config_arg
from sparse_peft.data import calibration_from_texts, load_model_and_tokenizer, load_texts
from sparse_peft.evaluation import perplexity
from sparse_peft.oneshot import prune
from sparse_peft.training import learn_mask, mask_training_arguments, text_windows
from sparse_peft.utils import atomic_write, check_resumed_settings


#: Values of the learned rows' settings in rows written before the setting was recorded
ROW_DEFAULTS = {"logits_dtype": "float32", "seed": 42}
#: Settings all rows of one table share: a ``--resume`` run must use the values the table was measured with.
SHARED_SETTINGS = ("model", "gguf_file", "calibration", "num_samples", "calibration_len", "train_data", "lr",
                   "tau_start", "tau_end", "kappa_start", "kappa_end", "eval_data", "window", "eval_windows")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calibration", default="c4", help="calibration text for Wanda / SparseGPT")
    p.add_argument("--num-samples", type=int, default=64, help="calibration sequences (papers: 128)")
    p.add_argument("--calibration-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--train-data", default="c4", help="mask-learning text")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each learned row")
    p.add_argument("--curve-steps", default="30,60,120", help="budgets (steps) of the SparseGPT-prior curve")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    for name in ("tau_start", "tau_end", "kappa_start", "kappa_end"):
        add_config_arg(p, name)  # type, default and help of the MaskConfig field
    add_config_arg(p, "sparse_reg", default=0.0,
                   help="regulariser lambda (paper: 1e-5, for ~1M tokens per step; it collapses small-batch runs)")
    p.add_argument("--distill", action="store_true",
                   help="learned rows train on the KL divergence from the dense model instead of the LM loss")
    p.add_argument("--teacher-top-k", type=int, default=None,
                   help="with --distill: the teacher's top-k outputs computed once and cached (learn_mask's "
                        "teacher_top_k) instead of a teacher forward per step")
    add_config_arg(p, "logits_dtype")
    p.add_argument("--seed", type=int, default=ROW_DEFAULTS["seed"], help="Trainer's seed of the learned rows")
    p.add_argument("--bf16", action="store_true",
                   help="learned rows train under bf16 autocast (Trainer's bf16=True; the logits and their optimizer "
                        "state stay fp32, and perplexity is always measured in fp32). Needs bf16 matmuls: a CUDA GPU "
                        "or a CPU with AVX512-BF16 / AMX")
    p.add_argument("--priors", default="none,magnitude,wanda,sparsegpt", help="priors of the learned rows")
    p.add_argument("--eval-data", default="wikitext2")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="Wikitext-2 windows scored (None: all)")
    p.add_argument("--output", default="runs/quality")
    p.add_argument("--resume", action="store_true", help="keep the rows (and one-shot masks) already in --output")
    return p.parse_args(argv)


def resumed_rows(args, json_path: str) -> list[dict]:
    """The rows of an earlier run in ``--output`` (``--resume``), after checking it is comparable; else ``[]``.

    Raises ``ValueError`` naming the settings that differ from the saved table's, or a one-shot mask folder that a
    saved row needs and that is gone; nothing in ``--output`` is changed then.
    """
    if not (args.resume and os.path.isfile(json_path)):
        return []
    with open(json_path) as f:
        saved = json.load(f)
    check_resumed_settings(saved["settings"], args, SHARED_SETTINGS, json_path)
    for row in saved["rows"]:
        if row["kind"] == "one-shot" and not os.path.isdir(os.path.join(args.output, f"oneshot-{row['mask']}")):
            raise ValueError(f"--resume: {json_path} has a {row['mask']!r} row but its mask folder "
                             f"oneshot-{row['mask']} is gone from {args.output}; restore it, or start another "
                             "--output.")
        if row["kind"] == "learned":
            row.setdefault("distill", False)  # tables from before --distill trained on the LM loss
            row.setdefault("bf16", False)  # ... and from before --bf16 in fp32
    return saved["rows"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    json_path = os.path.join(args.output, "quality.json")
    rows = resumed_rows(args, json_path)  # checked before the slow model load
    os.makedirs(args.output, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, device=args.device)
    eval_texts = load_texts(args.eval_data, split="test")

    def ppl(m) -> float:
        return perplexity(m, tokenizer, eval_texts, window=args.window, max_windows=args.eval_windows)["ppl"]

    result = {"settings": vars(args), "device": str(args.device), "torch_threads": torch.get_num_threads(),
              "rows": rows}

    def add(row: dict) -> None:
        """Record a row and rewrite the JSON, so an interrupted run keeps what it measured."""
        rows.append(row)
        atomic_write(json_path, lambda f: f.write(json.dumps(result, indent=2).encode()))

    def measured(mask: str, **settings) -> bool:
        return any(
            r["mask"] == mask and all(r.get(k, ROW_DEFAULTS.get(k)) == v for k, v in settings.items()) for r in rows
        )

    if not measured("dense"):
        add({"mask": "dense", "kind": "-", "ppl": ppl(model)})
    calibration = None

    def calibration_set():
        """The calibration windows, tokenised on first use (a resumed run may not need them)."""
        nonlocal calibration
        if calibration is None:
            calibration = calibration_from_texts(
                load_texts(args.calibration, split="train"), tokenizer, args.num_samples, args.calibration_len
            )
        return calibration

    priors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        priors[method] = os.path.join(args.output, f"oneshot-{method}")
        if measured(method):  # resumed: resumed_rows checked that its folder is there
            continue
        start = time.perf_counter()
        peft_model = prune(model, method, None if method == "magnitude" else calibration_set())
        seconds = time.perf_counter() - start
        peft_model.save_pretrained(priors[method])
        add({"mask": method, "kind": "one-shot", "ppl": ppl(peft_model), "seconds": seconds})
        model = peft_model.unload()
    if not measured("sparsegpt+update"):
        start = time.perf_counter()
        updated = prune(copy.deepcopy(model), "sparsegpt", calibration_set(), update_weights=True).merge_and_unload()
        add({"mask": "sparsegpt+update", "kind": "one-shot, weights changed", "ppl": ppl(updated),
             "seconds": time.perf_counter() - start})
        del updated

    windows = text_windows(
        load_texts(args.train_data, split="train"), tokenizer, args.seq_len,
        max_windows=max([args.steps, *map(int, args.curve_steps.split(","))]) * args.batch_size,
    )
    runs = [(prior, args.steps) for prior in args.priors.split(",")]
    runs += [("sparsegpt", steps) for steps in map(int, args.curve_steps.split(",")) if steps != args.steps]
    # what distinguishes learned rows besides prior and steps: tokens per step, the regulariser, the loss, precision
    shape = {"batch_size": args.batch_size, "seq_len": args.seq_len, "sparse_reg": args.sparse_reg,
             "distill": args.distill, "bf16": args.bf16, "teacher_top_k": args.teacher_top_k}
    shape.update(logits_dtype=args.logits_dtype, seed=args.seed)
    for prior, steps in runs:
        if measured(f"learned from {prior}", steps=steps, **shape):
            continue
        config = sparse_peft.MaskConfig(
            # the saved one-shot masks are learned from as one-shot priors, with the paper's noise
            prior=None if prior == "none" else priors[prior], prior_noise=None if prior == "none" else True,
            tau_start=args.tau_start, tau_end=args.tau_end,
            kappa_start=args.kappa_start, kappa_end=args.kappa_end, sparse_reg=args.sparse_reg, task_type="CAUSAL_LM",
            logits_dtype=args.logits_dtype,
        )
        set_seed(args.seed)  # the prior's noise and Trainer's sampling
        peft_model = get_peft_model(model, config)
        training_args = mask_training_arguments(
            os.path.join(args.output, "trainer"), steps, args.batch_size, learning_rate=args.lr,
            logging_steps=max(1, steps // 10), use_cpu=args.device == "cpu", disable_tqdm=False, bf16=args.bf16,
            seed=args.seed,
        )
        # Trainer goes over the text again (reshuffled, and learn_mask warns) when the budget asks for more
        # sequences than it holds
        passes = steps * args.batch_size / len(windows)
        start = time.perf_counter()
        learn_mask(peft_model, windows.select(range(min(steps * args.batch_size, len(windows)))), training_args,
                   distill=args.distill, teacher_top_k=args.teacher_top_k)
        seconds = time.perf_counter() - start
        name = f"learned-{prior}-{steps}x{args.batch_size}x{args.seq_len}-reg{args.sparse_reg:g}"
        name += ("-distill" if args.distill else "") + ("-bf16" if args.bf16 else "")
        name += f"-top{args.teacher_top_k}" if args.teacher_top_k else ""
        name += "-bf16logits" if args.logits_dtype == "bfloat16" else ""
        name += f"-seed{args.seed}" if args.seed != ROW_DEFAULTS["seed"] else ""
        peft_model.save_pretrained(os.path.join(args.output, name))
        add({"mask": f"learned from {prior}", "kind": "learned", "ppl": ppl(peft_model), "seconds": seconds,
             "steps": steps, **shape, "tokens": steps * args.batch_size * args.seq_len, "passes": round(passes, 3),
             "torch_threads": torch.get_num_threads()})
        model = peft_model.unload()

    dense, sparsegpt = rows[0]["ppl"], next(r["ppl"] for r in rows if r["mask"] == "sparsegpt")
    for row in rows:
        if row["kind"] == "learned" and sparsegpt > dense:  # no gap to close if the one-shot mask is not worse
            row["gap_closed"] = (sparsegpt - row["ppl"]) / (sparsegpt - dense)
    table = markdown(rows)
    print(table)
    atomic_write(os.path.join(args.output, "quality.md"), lambda f: f.write((table + "\n").encode()))
    atomic_write(os.path.join(args.output, "quality.json"), lambda f: f.write(json.dumps(result, indent=2).encode()))
    plot(rows, dense, sparsegpt, os.path.join(args.output, "quality.png"))
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| mask | kind | Wikitext-2 PPL | steps x sequences x tokens | loss | training precision "
             "| regulariser lambda | training tokens | wall time (s) | SparseGPT gap closed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "-"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        shape = f"{r['steps']} x {r['batch_size']} x {r['seq_len']}" if "steps" in r else "-"
        reg = f"{r['sparse_reg']:g}" if "sparse_reg" in r else "-"
        loss = ("KL from dense" if r["distill"] else "LM") if "distill" in r else "-"
        if r.get("teacher_top_k"):
            loss += f" (cached top-{r['teacher_top_k']})"
        precision = ("bf16 autocast" if r["bf16"] else "fp32") if "bf16" in r else "-"
        if r.get("logits_dtype") == "bfloat16":
            precision += ", bf16 logits + moments (stochastic rounding)"
        tokens = str(r.get("tokens", "-"))
        if r.get("passes", 0) > 1:
            tokens += f" ({r['passes']:.2f} passes over the text)"
        mask = r["mask"] + (f" (seed {r['seed']})" if "seed" in r else "")
        lines.append(f"| {mask} | {r['kind']} | {r['ppl']:.2f} | {shape} | {loss} | {precision} | {reg} "
                     f"| {tokens} | {seconds} | {gap} |")
    return "\n".join(lines)


def plot(rows: list[dict], dense: float, sparsegpt: float, path: str) -> None:
    """PPL vs training tokens of the SparseGPT-prior runs (one curve per batch shape, regulariser, loss and training
    precision), with the dense and one-shot levels as labelled lines; points that went over the training text more
    than once are labelled. Log x when the budgets span a factor of 10 or more, else linear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    learned = [r for r in rows if r["mask"] == "learned from sparsegpt"]
    fig, ax = plt.subplots(figsize=(8, 5.5))

    def key(r):
        return r["batch_size"], r["seq_len"], r["sparse_reg"], r.get("distill", False), r.get("bf16", False)

    for batch, seq, reg, distill, bf16 in sorted({key(r) for r in learned}):
        curve = sorted((r["tokens"], r["ppl"]) for r in learned if key(r) == (batch, seq, reg, distill, bf16))
        loss = "KL from dense" if distill else "LM loss"
        label = f"{loss}{', bf16' if bf16 else ''}, {batch} x {seq} tokens/step, lambda {reg:g}"
        ax.plot(*zip(*curve), marker="o", label=label)
    for r in learned if len(learned) <= 4 else ():  # few points: write their values next to them
        ax.annotate(f"{r['ppl']:.1f}", (r["tokens"], r["ppl"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize="small")
    for r in learned:
        if r.get("passes", 0) > 1:  # the text came round again: not comparable with the one-pass points
            ax.annotate(f"{r['passes']:.2f} passes over the text", (r["tokens"], r["ppl"]), textcoords="offset points",
                        xytext=(-15, -30), ha="right", va="top", fontsize="small", arrowprops={"arrowstyle": "->"})

    update = next((r["ppl"] for r in rows if r["mask"] == "sparsegpt+update"), None)
    levels = [(dense, "dense", "green", "--"), (sparsegpt, "SparseGPT 2:4, mask only (one-shot)", "red", "--")]
    if update is not None:
        levels.append((update, "SparseGPT 2:4 with weight update (one-shot)", "darkorange", ":"))
    for level, name, color, style in levels:
        ax.axhline(level, color=color, linestyle=style, linewidth=1.2)
        ax.text(0.99, level, f"{name}: {level:.1f}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                color=color, fontsize="small")

    tokens = [r["tokens"] for r in learned]
    if tokens and max(tokens) >= 10 * min(tokens):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tokens (log scale)")
    else:
        ax.margins(x=0.15)
        ax.set_xlabel("training tokens")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x >= 1000 else f"{x:g}"))
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("Wikitext-2 perplexity (log scale; lower is better)")
    ax.set_title("2:4 masks learned from the SparseGPT prior", fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(learned) > 3 else 1,
              title="learned mask (loss, batch, regulariser)", title_fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sparse_peft.retain_freed_memory()  # reuse freed memory across steps (glibc); see docs/scale.md
    main()
