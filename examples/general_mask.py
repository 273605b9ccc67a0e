"""Step 1 of mask transfer: learn a *general* 2:4 mask on broad text (C4), starting from the SparseGPT prior.

Writes two mask adapters: ``--prior-output`` (the one-shot SparseGPT mask, mask-only) and ``--output`` (the general
mask learned from it with ``Trainer``). ``task_transfer.py`` then learns task masks from the general one.

    python examples/general_mask.py --output runs/general --prior-output runs/oneshot-sparsegpt

Small defaults run in minutes on 2 CPU cores; for a real budget raise ``--steps``, ``--batch-size``,
``--seq-len`` and ``--num-samples`` (the paper: 2,000 steps of 256 x 4,096 tokens, 128 calibration sequences).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from peft import get_peft_model
from transformers import HfArgumentParser

import sparse_peft
from sparse_peft.data import calibration_from_texts, load_model_and_tokenizer, load_texts
from sparse_peft.oneshot import prune
from sparse_peft.training import learn_mask, mask_training_arguments, text_windows

MASK_FIELDS = sparse_peft.MaskConfig.__dataclass_fields__  # MaskConfig options below take their help from here


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default and this docstring as written."""


@dataclass
class Args:
    model: Optional[str] = field(default=None, metadata={"help": "Hub id or folder; None: the shipped SmolLM2-135M"})
    data: str = field(default="c4", metadata={"help": "broad text: shipped asset name, file or Hub dataset id"})
    num_samples: int = field(default=32, metadata={"help": "SparseGPT calibration sequences"})
    calibration_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    steps: int = field(default=60, metadata={"help": "training steps"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training sequence"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate of the mask logits"})
    # 0, not MaskConfig's 1e-5: these batches are far below the ~1M tokens per step that value assumes.
    sparse_reg: float = field(default=0.0, metadata=MASK_FIELDS["sparse_reg"].metadata)
    device: str = field(default="cpu", metadata={"help": "torch device"})
    output: str = field(default="runs/general", metadata={"help": "folder for the general mask adapter"})
    prior_output: str = field(default="runs/oneshot-sparsegpt", metadata={"help": "folder for the SparseGPT mask"})


def main(argv=None) -> None:
    parser = HfArgumentParser(Args, description=__doc__, formatter_class=HelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(argv)

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    texts = load_texts(args.data, split="train")
    if not os.path.isdir(args.prior_output):
        calibration = calibration_from_texts(texts, tokenizer, args.num_samples, args.calibration_len)
        oneshot = prune(model, "sparsegpt", calibration)
        oneshot.save_pretrained(args.prior_output)
        model = oneshot.unload()

    config = sparse_peft.MaskConfig(prior=args.prior_output, sparse_reg=args.sparse_reg, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    windows = text_windows(texts, tokenizer, args.seq_len, max_windows=args.steps * args.batch_size)
    training_args = mask_training_arguments(
        os.path.join(args.output, "trainer"), args.steps, args.batch_size, learning_rate=args.lr,
        logging_steps=max(1, args.steps // 10), use_cpu=args.device == "cpu",
    )
    start = time.perf_counter()
    learn_mask(peft_model, windows, training_args)
    peft_model.save_pretrained(args.output)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"general mask: {tokens} tokens of {args.data} in {time.perf_counter() - start:.0f} s -> {args.output}")


if __name__ == "__main__":
    sparse_peft.retain_freed_memory()  # reuse freed memory across steps (glibc); see docs/scale.md
    main()
