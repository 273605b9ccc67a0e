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

from peft import get_peft_model

import sparse_peft
from sparse_peft.data import calibration_from_texts, load_model_and_tokenizer, load_texts
from sparse_peft.oneshot import prune
from sparse_peft.training import learn_mask, mask_training_arguments, text_windows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="c4", help="broad text: shipped asset name, file or Hub dataset id")
    p.add_argument("--num-samples", type=int, default=32, help="SparseGPT calibration sequences")
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--sparse-reg", type=float, default=0.0, help="regulariser lambda (paper: 1e-5 at ~1M tokens/step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="runs/general")
    p.add_argument("--prior-output", default="runs/oneshot-sparsegpt")
    args = p.parse_args(argv)

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
    learn_mask(peft_model, windows, training_args, recompute_soft_mask=False)  # speed over 6 B/weight of memory
    peft_model.save_pretrained(args.output)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"general mask: {tokens} tokens of {args.data} in {time.perf_counter() - start:.0f} s -> {args.output}")


if __name__ == "__main__":
    main()
