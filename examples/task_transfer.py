"""Step 2 of mask transfer: task-specific 2:4 masks learned from the general mask, compared on two tasks.

Tasks (shipped data, or any file / Hub dataset with the same columns):

* ``tinystories`` — a causal-LM domain: the task mask is learned on 80% of the TinyStories documents and scored
  by perplexity on the other 20%.
* ``sst2`` — classification as language modelling: training texts are ``"Review: <sentence>\nSentiment: <word>"``;
  the score is the accuracy (an ``evaluate`` metric) of predicting the likelier label word after the prompt.

For each task it compares the dense model, the general mask alone, the task mask learned from the general mask
(``MaskConfig(prior=<general>)``, the transfer; by default the shipped general mask) and a task mask learned "from
scratch" (by default from SparseGPT 2:4 calibrated on the task's own text), all with the same budget. All adapters
live on one base model (``load_adapter`` / ``set_adapter``). Writes ``transfer.md``, ``transfer.json`` and
``transfer.png`` (per-layer agreement of each task mask with the general mask, and the metric bars) into
``--output``.

    python examples/task_transfer.py        # from the shipped general mask, on the shipped model
    python examples/general_mask.py --output runs/general && python examples/task_transfer.py --general runs/general
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from peft import PeftModel, get_peft_model
from transformers import HfArgumentParser

import sparse_peft
from sparse_peft.adapter_io import adapter_size
from sparse_peft.data import (
    assets_dir,
    calibration_from_texts,
    default_general_mask,
    load_model_and_tokenizer,
    load_table,
    load_texts,
)
from sparse_peft.evaluation import label_word_predictions, metric_scores, perplexity
from sparse_peft.oneshot import prune
from sparse_peft.stats import mask_stats
from sparse_peft.training import learn_mask, mask_training_arguments, text_windows
from sparse_peft.utils import atomic_write

MASK_FIELDS = sparse_peft.MaskConfig.__dataclass_fields__  # MaskConfig options below take their help from here


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default and this docstring as written."""


@dataclass
class Args:
    model: Optional[str] = field(default=None, metadata={"help": "Hub id or folder; None: the shipped SmolLM2-135M"})
    general: Optional[str] = field(
        default=None,
        metadata={"help": "the general mask adapter (path or Hub id); None: the shipped general mask (needs --model "
                  "None)"},
    )
    scratch_prior: Optional[str] = field(
        default=None,
        metadata={"help": "prior of the from-scratch task masks; None: SparseGPT 2:4 calibrated on each task's own "
                  "training text (64 x 256 tokens), saved as <output>/<task>-oneshot-sparsegpt"},
    )
    lm_data: str = field(default="tinystories", metadata={"help": "LM task text: asset name, file or Hub id"})
    sst2_train: str = field(
        default=os.path.join("{assets}", "sst2", "train.tsv"), metadata={"help": "SST-2 training table"}
    )
    sst2_dev: str = field(default=os.path.join("{assets}", "sst2", "dev.tsv"), metadata={"help": "SST-2 dev table"})
    steps: int = field(default=40, metadata={"help": "training steps per task mask"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training sequence"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate of the mask logits"})
    # 0, not MaskConfig's 1e-5: these batches are far below the ~1M tokens per step that value assumes.
    sparse_reg: float = field(default=0.0, metadata=MASK_FIELDS["sparse_reg"].metadata)
    window: int = field(default=256, metadata={"help": "perplexity window (tokens)"})
    eval_windows: int = field(default=16, metadata={"help": "perplexity windows scored"})
    eval_examples: int = field(default=400, metadata={"help": "SST-2 dev examples scored (at most all of them)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    output: str = field(default="runs/transfer", metadata={"help": "folder for the task masks and the report"})

    def __post_init__(self):
        self.sst2_train = self.sst2_train.format(assets=assets_dir())  # {assets}: the shipped data folder
        self.sst2_dev = self.sst2_dev.format(assets=assets_dir())


LABEL_WORDS = ("negative", "positive")


def sst2_prompt(sentence: str) -> str:
    return f"Review: {sentence.strip()}\nSentiment:"


def load_tasks(args: Args, tokenizer) -> dict[str, dict]:
    """Per task: training texts and an ``evaluate(model) -> {metric: value}`` function."""
    stories = load_texts(args.lm_data, split="train")
    cut = int(0.8 * len(stories))
    train_table = load_table(args.sst2_train, split="train").shuffle(seed=0)
    dev = load_table(args.sst2_dev, split="validation")
    dev = dev.select(range(min(args.eval_examples, len(dev))))

    def lm_metric(model) -> dict:
        result = perplexity(model, tokenizer, stories[cut:], window=args.window, max_windows=args.eval_windows)
        return {"ppl": result["ppl"]}

    def sst2_metric(model) -> dict:
        prompts = [sst2_prompt(s) for s in dev["sentence"]]
        predictions = label_word_predictions(model, tokenizer, prompts, LABEL_WORDS, batch_size=16)
        return metric_scores(predictions, dev["label"], metrics=("accuracy",))

    sst2_texts = [
        f"{sst2_prompt(s)} {LABEL_WORDS[label]}" for s, label in zip(train_table["sentence"], train_table["label"])
    ]
    return {
        "tinystories": {"texts": stories[:cut], "evaluate": lm_metric},
        "sst2": {"texts": sst2_texts, "evaluate": sst2_metric},
    }


def train_mask(model, tokenizer, prior: str, texts: list[str], output: str, args: Args) -> tuple[PeftModel, float]:
    """Learn a task mask from ``prior`` on ``texts``; save it to ``output``; return the model and the seconds."""
    config = sparse_peft.MaskConfig(prior=prior, sparse_reg=args.sparse_reg, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    windows = text_windows(texts, tokenizer, args.seq_len, max_windows=args.steps * args.batch_size)
    training_args = mask_training_arguments(
        os.path.join(output, "trainer"), args.steps, args.batch_size, learning_rate=args.lr,
        logging_steps=max(1, args.steps // 5), use_cpu=args.device == "cpu",
    )
    start = time.perf_counter()
    learn_mask(peft_model, windows, training_args)
    seconds = time.perf_counter() - start
    peft_model.save_pretrained(output)
    return peft_model, seconds


def main(argv=None) -> dict:
    parser = HfArgumentParser(Args, description=__doc__, formatter_class=HelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(argv)

    try:
        args.general = default_general_mask(args.general, args.model)
    except ValueError as err:
        parser.error(str(err))
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    tasks = load_tasks(args, tokenizer)
    results = {task: {"dense": spec["evaluate"](model)} for task, spec in tasks.items()}

    adapters, seconds = {}, {}
    for task, spec in tasks.items():
        scratch_prior = args.scratch_prior
        if scratch_prior is None:
            scratch_prior = os.path.join(args.output, f"{task}-oneshot-sparsegpt")
            oneshot = prune(model, "sparsegpt", calibration_from_texts(spec["texts"], tokenizer, 64, 256))
            oneshot.save_pretrained(scratch_prior)
            model = oneshot.unload()
        for source, prior in (("transfer", args.general), ("scratch", scratch_prior)):
            name = f"{task}-{source}"
            adapters[name] = os.path.join(args.output, name)
            peft_model, seconds[name] = train_mask(model, tokenizer, prior, spec["texts"], adapters[name], args)
            model = peft_model.unload()

    # Every adapter on one base model; switch between them.
    peft_model = PeftModel.from_pretrained(model, args.general, adapter_name="general")
    for name, path in adapters.items():
        peft_model.load_adapter(path, adapter_name=name)
    for task, spec in tasks.items():
        for adapter in ("general", f"{task}-transfer", f"{task}-scratch"):
            peft_model.set_adapter(adapter)
            results[task][adapter.replace(f"{task}-", "task mask ")] = spec["evaluate"](peft_model)

    agreement = {
        task: {row.name: row.agreement for row in mask_stats(adapters[f"{task}-transfer"], args.general)}
        for task in tasks
    }
    sizes = {name: adapter_size(path) for name, path in adapters.items()}
    payload = {"settings": dataclasses.asdict(args), "results": results, "train_seconds": seconds,
               "adapter_sizes": sizes, "agreement_with_general": agreement}
    table = markdown(results, sizes)
    print(table)
    os.makedirs(args.output, exist_ok=True)
    atomic_write(os.path.join(args.output, "transfer.md"), lambda f: f.write((table + "\n").encode()))
    atomic_write(os.path.join(args.output, "transfer.json"), lambda f: f.write(json.dumps(payload, indent=2).encode()))
    plot(results, agreement, os.path.join(args.output, "transfer.png"))
    return payload


def markdown(results: dict, sizes: dict) -> str:
    lines = ["| task | metric | dense | general mask | task mask (from general) | task mask (from scratch) |",
             "|---|---|---|---|---|---|"]
    for task, by_model in results.items():
        metric = next(iter(by_model["dense"]))
        cells = [by_model[k][metric] for k in ("dense", "general", "task mask transfer", "task mask scratch")]
        lines.append(f"| {task} | {metric} | " + " | ".join(f"{c:.4g}" for c in cells) + " |")
    lines += ["", "| adapter | bytes | bits per masked weight |", "|---|---|---|"]
    lines += [f"| {name} | {s['bytes']} | {s['bits_per_weight']:.3f} |" for name, s in sizes.items()]
    return "\n".join(lines)


def plot(results: dict, agreement: dict, path: str, one_shot: dict | None = None) -> None:
    """Per-layer agreement of each task mask with the general mask, and one bar chart per task (dense, general
    mask, the two task masks) with the dense level, and the one-shot level of ``one_shot[task]`` if given, as
    labelled lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"dense": "dense", "general": "general\nmask", "task mask transfer": "task mask\nfrom general",
             "task mask scratch": "task mask from\nSparseGPT prior"}
    titles = {"tinystories": "TinyStories", "sst2": "SST-2"}
    units = {"ppl": "perplexity (lower is better)", "accuracy": "accuracy (higher is better)"}
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(5 * (1 + len(results)), 4.6))
    for task, per_layer in agreement.items():
        axes[0].plot([100 * a for a in per_layer.values()], marker=".", linewidth=0.8, alpha=0.8, label=task)
    axes[0].set(title="task mask vs general mask", xlabel="masked linear layer (model order)",
                ylabel="groups with the general mask's pattern (%)")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(agreement), frameon=False)
    for ax, (task, by_model) in zip(axes[1:], results.items()):
        metric = next(iter(by_model["dense"]))
        values = [v[metric] for v in by_model.values()]
        bars = ax.bar([names.get(k, k) for k in by_model], values, color=["green"] + ["tab:blue"] * (len(values) - 1))
        ax.bar_label(bars, fmt="%.3g", fontsize="small")
        ax.axhline(by_model["dense"][metric], color="green", linestyle="--", linewidth=1)  # the bar says "dense"
        top = max(values)
        if one_shot and task in one_shot:
            ax.axhline(one_shot[task], color="red", linestyle="--", linewidth=1)
            ax.text(0.99, one_shot[task], f"SparseGPT 2:4 mask-only (one-shot): {one_shot[task]:.3g}",
                    transform=ax.get_yaxis_transform(), ha="right", va="bottom", color="red", fontsize="small")
            top = max(top, one_shot[task])
        ax.set_ylim(0, 1.15 * top)
        ax.set(title=titles.get(task, task), ylabel=f"{titles.get(task, task)} {units.get(metric, metric)}")
        ax.tick_params(axis="x", labelsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sparse_peft.retain_freed_memory()  # reuse freed memory across steps (glibc); see docs/scale.md
    main()
