"""``sparse-peft`` command line: prune, learn, eval, inspect, and the end-to-end demo.

Every ``--model``, ``--adapter`` and data argument takes a local path or a Hub id; data also takes the short
names of the shipped assets (``wikitext2``, ``c4``, ``tinystories``: in a project checkout or under
``$SPARSE_PEFT_ASSETS``). Paths and names are checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import MISSING, fields
from typing import Any, Optional, Sequence

from .allocator import retain_freed_memory
from .constants import DEFAULT_LR, DEMO_LORA_LR, DEMO_LORA_RANK, DEMO_TASK, ONE_SHOT_PRIORS, PRIOR_NAMES, TRAINER_DIR
from .options import MaskOptions, auto_or_number, fraction

logger = logging.getLogger("sparse_peft")
_CONFIG_FIELDS = {f.name: f for f in fields(MaskOptions)}
_LOG_HANDLER = "sparse-peft-cli"
#: Warnings third-party code gives on every run of a command, about nothing the user can or needs to change; the
#: command line does not print them. peft 0.21 reads a deprecated transformers alias in every ``get_peft_model`` /
#: ``from_pretrained``; peft's ``save_pretrained`` looks the base up on the Hub to see whether its vocabulary changed
#: (the commands never resize it), which warns twice offline for a model named by its Hub id, as the shipped one is.
EXPECTED_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"(?s)Unable to fetch remote file due to the following error .* for the file config\.json"),
    (UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified"),
)


#: One line per command: its ``--help`` summary (what it does; its options are in :func:`build_parser`).
SUMMARIES = {
    "prune": "One-shot N:M mask -> mask adapter (or, with --update-weights, a pruned model folder).",
    "learn": "Learn a mask with Trainer from a prior on a text dataset; save the mask adapter.",
    "eval": "Perplexity of the dense model and of each adapter (hard masks, eval mode).",
    "inspect": (
        "Per-layer sparsity, N:M validity, agreement with a reference, and size in bits per weight (layers in "
        "model order; --plot draws them)."
    ),
    "demo": (
        "The main job, many 2:4 masks on one frozen base: the one-shot SparseGPT mask, the general mask, and a "
        "TinyStories task adapter on the general one trained with Trainer and saved as its difference to it "
        "(default: a rank-16 update under the frozen general mask; ``--lora-rank 0``: a mask-only task mask "
        "learned from it); perplexity on Wikitext-2 and on held-out TinyStories of each, switching adapters on "
        "one base, and the adapter sizes."
    ),
    "push": "Upload a saved mask adapter folder and its model card to a Hub model repo (created if missing).",
    "repoint": "Point a delta-coded task adapter at a copy of its general mask (e.g. the pushed one), checked by hash.",
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse help with each option's default appended, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or (
            "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


# -- shared pieces ----------------------------------------------------------------------------------------------
def add_config_arg(parser: argparse.ArgumentParser, name: str, **overrides: Any) -> None:
    """``--<name>`` (dashes for underscores) for the :class:`~sparse_peft.MaskConfig` field ``name``.

    Type, default and help come from the dataclass field, so the CLI cannot drift from the config; ``overrides``
    (argparse keywords) replace them where the CLI deliberately differs.
    """
    f = _CONFIG_FIELDS[name]
    default = None if f.default is MISSING else f.default
    kwargs = {"default": default, "help": f.metadata.get("help")}
    if isinstance(default, bool):
        kwargs["action"] = "store_true"
    else:
        kwargs["type"] = type(default)
    kwargs.update(overrides)
    parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model: Hub id or local folder (default: the shipped SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model to dequantise and use")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the base model's weights (the mask logits stay float32)")


def _add_n_m_args(parser: argparse.ArgumentParser) -> None:
    add_config_arg(parser, "n")
    add_config_arg(parser, "m")
    parser.add_argument("--targets", default=None, help="comma-separated module names (default: per architecture)")


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", default="c4", help="calibration text: c4 | path | Hub dataset id")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--calibration-len", type=int, default=512, help="tokens per calibration sequence")


def _add_eval_args(parser: argparse.ArgumentParser, window: Optional[int] = None,
                   max_windows: Optional[int] = None) -> None:
    parser.add_argument("--eval-data", default="wikitext2", help="perplexity text: wikitext2 | path | Hub id")
    parser.add_argument("--window", type=int, default=window,
                        help="tokens per window, printed with the table" + (
                            " (default: the model's context, at most 2048)" if window is None else ""))
    parser.add_argument("--max-windows", type=int, default=max_windows,
                        help="evaluate only the first K windows" + (" (default: all)" if max_windows is None else ""))


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="c4",
                        help="training text: c4 | tinystories | .txt/.jsonl/.csv/.tsv file | Hub dataset id")
    parser.add_argument("--text-column", default=None,
                        help="the column of --data holding the text (tables: .csv/.tsv/.jsonl, Hub datasets; "
                             "default: the first of text, sentence, review, content)")


def _add_training_args(parser: argparse.ArgumentParser, steps: int, batch_size: int, seq_len: int,
                       lr: Optional[float] = DEFAULT_LR,
                       lr_help: str = "AdamW learning rate (cosine to lr/10)") -> None:
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="training windows per step and device")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=lr, help=lr_help)
    add_config_arg(parser, "sparse_reg", default=0.0,
                    help="regulariser lambda; the paper's 1e-5 is for ~1M tokens per step and collapses small-batch "
                         "runs")
    parser.add_argument("--bf16", action="store_true",
                        help="train under bf16 autocast (Trainer's bf16=True; logits stay fp32): fast on a CUDA GPU "
                             "or a CPU with AVX512-BF16 / AMX, slow where bf16 matmuls are emulated")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-to", default="none",
                        help="Trainer's report_to: none | all | comma-separated integrations (tensorboard, wandb, "
                             "...); the logs hold loss, tau, kappa, mask_flip_rate and mask_max_prob")
    parser.add_argument("--save-steps", type=int, default=None,
                        help=f"write a resumable Trainer checkpoint (with the float logits) every N steps into "
                             f"OUTPUT/{TRAINER_DIR}/ (default: no checkpoints)")
    parser.add_argument("--resume", default=None,
                        help=f"continue from a checkpoint folder, or 'last' for the newest in OUTPUT/{TRAINER_DIR}/; "
                             "use the same --steps, --batch-size, --seq-len and data as the interrupted run")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="log the hard mask's loss on --eval-data every N steps (default: no evaluation)")
    parser.add_argument("--eval-data", default=None,
                        help="held-out text for --eval-steps (its test split): wikitext2 | path | Hub dataset id")
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="--seq-len-token windows of --eval-data evaluated each time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-peft", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="print the package's INFO log lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name):
        return sub.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name], formatter_class=_HelpFormatter)

    p = add_parser("prune")
    _add_model_args(p), _add_n_m_args(p), _add_calibration_args(p)
    p.add_argument("--method", choices=ONE_SHOT_PRIORS, default="sparsegpt", help="one-shot pruner")
    p.add_argument("--update-weights", action="store_true",
                   help="SparseGPT with its weight update: write a pruned model folder instead of a mask adapter "
                        "(baseline)")
    p.add_argument("--output", required=True, help="folder to write the mask adapter (or pruned model) to")

    p = add_parser("learn")
    _add_model_args(p), _add_n_m_args(p), _add_calibration_args(p)
    add_config_arg(p, "prior", type=str, default=None,
                    help=f"{' | '.join(PRIOR_NAMES)} | adapter path/Hub id. shipped: the shipped general 2:4 mask "
                         "(a task mask transferred from it); default: shipped for the shipped model, sparsegpt "
                         "for any other --model")
    _add_data_args(p), _add_training_args(p, steps=100, batch_size=4, seq_len=256)
    _add_checkpoint_args(p)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    for name in ("prior_strength", "tau_start", "tau_end", "kappa_start", "kappa_end", "save_logits", "lora_rank"):
        add_config_arg(p, name)
    add_config_arg(p, "logits_dtype", choices=("float32", "bfloat16"))
    add_config_arg(p, "lora_alpha", type=float)
    add_config_arg(p, "lora_placement", choices=("under_mask", "dense_residual"))
    add_config_arg(p, "init_lora_weights", action="store", type=str, choices=("zeros", "eora"), default="zeros",
                   help="start of the low-rank update: zeros (B = 0: the mask alone) or eora (training-free, from "
                        "--calibration text; docs/lowrank.md)")
    add_config_arg(p, "eora_scale", type=auto_or_number)
    add_config_arg(p, "prior_reselect", type=fraction,
                   help="with an adapter --prior: re-select this fraction of the groups where it and a one-shot "
                        "SparseGPT mask of the --calibration text disagree (the task's text; docs/training.md)")
    p.add_argument("--freeze-mask", action="store_true",
                   help="keep the prior's hard mask and train only the low-rank update (needs --lora-rank; "
                        "MaskConfig(train_mask=False))")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, one more forward per step)")
    p.add_argument("--recompute-soft-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="regenerate the Gumbel sample in backward (default); --no-recompute-soft-mask keeps it "
                        "instead: 6 bytes per masked weight more memory, no faster on the machines measured "
                        "(docs/scale.md)")
    p.add_argument("--distill", action="store_true",
                   help="train on the KL divergence from the dense model instead of the LM loss (one extra forward "
                        "per step; docs/training.md says when it pays)")
    p.add_argument("--teacher-top-k", type=int, default=None, metavar="K",
                   help="with --distill: compute the dense model's top-K next-token distribution of the training text "
                        "once, cache it on disk ($SPARSE_PEFT_CACHE/teacher) and skip the teacher forward in every "
                        "step; the loss is then the KL over those K tokens and the rest (default: no cache)")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of the initial logits' noise and of Trainer (data order, Gumbel noise)")
    p.add_argument("--output", required=True, help="folder to write the mask adapter to")

    p = add_parser("eval")
    _add_model_args(p), _add_eval_args(p)
    p.add_argument("--adapter", action="append", help="mask adapter path / Hub id (repeatable)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks (e.g. sst2_local,agnews_local,imdb_local or "
                        "built-in names) instead of perplexity; needs pip install 'sparse-peft[eval]'")
    p.add_argument("--limit", type=float, default=None, help="with --tasks: score only the first N documents per task")
    p.add_argument("--num-fewshot", type=int, default=0, help="with --tasks: in-context examples")
    p.add_argument("--include-path", default=None, help="with --tasks: a folder of your own lm-eval task YAMLs")
    p.add_argument("--ppl", action="store_true", help="with --tasks: also the perplexity on --eval-data")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")

    p = add_parser("inspect")
    p.add_argument("adapter", help="mask adapter path / Hub id")
    p.add_argument("--reference", default=None, help="another adapter to compare with (e.g. the general mask)")
    p.add_argument("--json", default=None, help="also write the per-layer rows and the size to this JSON file")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the per-layer sparsity (and agreement with --reference) into this image (matplotlib)")

    p = add_parser("demo")
    _add_model_args(p), _add_calibration_args(p), _add_eval_args(p, window=256, max_windows=8)
    p.add_argument("--general", default=None,
                   help="the general 2:4 mask the task adapter starts from: adapter folder or Hub id (default: the "
                        "shipped general mask, for the shipped model; needed with any other --model)")
    _add_training_args(p, steps=16, batch_size=4, seq_len=128, lr=None,
                       lr_help=f"AdamW learning rate (cosine to lr/10); default {DEMO_LORA_LR:g} with --lora-rank > 0, "
                               f"{DEFAULT_LR:g} for a mask-only task mask")
    add_config_arg(p, "lora_rank", default=DEMO_LORA_RANK,
                   help="rank of the update trained under the frozen general mask as the task adapter; 0: a "
                        "mask-only task mask (the general mask's logits trained instead)")
    p.add_argument("--output", default="runs/demo",
                   help=f"folder for the SparseGPT mask (sparsegpt/), the task adapter (task-{DEMO_TASK}/) and "
                   "demo.json")
    p.set_defaults(num_samples=16, calibration_len=256)

    p = add_parser("push")
    p.add_argument("folder", help="a saved mask adapter folder")
    p.add_argument("repo_id", help="the Hub model repo, namespace/name")
    p.add_argument("--base-model", default=None,
                   help="Hub id of the base model for the card (default: the adapter's base_model_name_or_path)")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("--commit-message", default="Upload sparse-peft mask adapter", help="the Hub commit message")

    p = add_parser("repoint")
    p.add_argument("task_dir", help="a saved task adapter, delta-coded against a general mask")
    p.add_argument("--general", required=True, help="the general mask's new place: Hub repo id or local folder")
    p.add_argument("--revision", default=None, help="with a Hub repo: the branch or commit to use (default: main)")
    return parser


def _command(name: str):
    """The function that runs ``sparse-peft <name>``. Its module (:mod:`sparse_peft.commands`: torch, PEFT,
    transformers) is imported here, once the arguments have parsed: ``--help`` and usage errors load none of them."""
    from .commands import COMMANDS

    return COMMANDS[name]


def run(argv: Sequence[str]):
    """Run one command from Python and return its result; errors propagate as exceptions."""
    args = build_parser().parse_args(argv)
    return _command(args.command)(args)


def _log_to_stderr(verbose: bool) -> None:
    """Print the package's log records on stderr, INFO and up with ``-v``, else WARNING and up.

    Only the ``sparse_peft`` logger gets a handler (replaced on every call, so it writes to the current stderr):
    huggingface_hub, transformers and datasets print through handlers of their own, and a root handler
    (``logging.basicConfig``) would print each of their lines a second time.
    """
    for handler in [h for h in logger.handlers if h.get_name() == _LOG_HANDLER]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(_LOG_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: clear one-line errors for bad input, exit status 2; :data:`EXPECTED_WARNINGS` are not
    printed. The process keeps freed memory for reuse (:func:`~sparse_peft.allocator.retain_freed_memory`)."""
    args = build_parser().parse_args(argv)
    _log_to_stderr(args.verbose)
    retain_freed_memory()

    try:
        with warnings.catch_warnings():
            for category, message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            _command(args.command)(args)
    except (ValueError, FileNotFoundError, TypeError, OSError) as err:
        print(f"sparse-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
