"""Cost of mask learning vs LoRA vs full fine-tuning: step time, tokens/s, peak memory, trainable-state bytes.

    python benchmarks/cost.py                      # shipped SmolLM2-135M, batch 4 x 128 tokens, CPU, a few minutes
    python benchmarks/cost.py --device cuda --batch 8 --seq-len 512 --steps 10
    python benchmarks/cost.py --autocast bfloat16  # as Trainer(bf16=True): bf16 matmuls, fp32 weights and logits

Every method runs in its own process (so peak memory is its own) on the same model and the same fixed batch of
text, with the same optimizer step (fused AdamW, betas 0.9/0.95, eps 1e-5, weight decay 0.1, grad-norm clipping at
1.0):

* ``mask``: ``MaskConfig()`` on the default targets, memory-lean training forward (the soft mask is regenerated
  in backward from its noise seed);
* ``mask-keep``: the same, keeping the ``[C, G]`` Gumbel-softmax weights for backward
  (``set_soft_mask_memory(model, recompute=False)``);
* ``mask-ckpt``: ``mask`` with gradient checkpointing of the decoder blocks;
* ``mask-adam8bit``: ``mask`` with torchao's ``AdamW8bit`` (8-bit blockwise moments; what ``Trainer`` uses for
  ``optim="adamw_torch_8bit"``), needs ``pip install torchao``;
* ``lora``: ``LoraConfig(r=16, lora_alpha=32)`` on the same targets;
* ``full``: every parameter trains.

Step time is the median over ``--steps`` timed steps after ``--warmup`` untimed ones (forward, backward, clipping,
optimizer step, zeroing the gradients); the process's CPU time per step is reported too, which other processes on
a shared machine disturb much less than wall time. ``--autocast`` runs every method's forward under
``torch.autocast`` (as ``Trainer(bf16=True)`` does); weights, logits and optimizer state keep their dtype. Peak
memory is the process's peak RSS on CPU (it includes the model) and ``torch.cuda.max_memory_allocated`` on CUDA.
Trainable-state bytes count parameters + gradients + optimizer state of the trainable tensors, divided by the
number of masked weights (the weights of the targeted linears), so the three methods share one denominator. Prints
a table and writes JSON (``--json``) with the machine: CPU model and the vector instruction set torch's kernels use
(bf16 matmuls are fast only with AVX512-BF16 / AMX). Not a test: nothing is asserted; the targets of issue 5 are
printed as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("mask", "mask-keep", "mask-ckpt", "mask-adam8bit", "lora", "full")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id or folder; default: the shipped SmolLM2-135M-Instruct; "
                        "'tiny': a 2-layer random Llama (a smoke run in seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the base weights (mask logits stay float32)")
    parser.add_argument("--autocast", default="none", choices=["none", "bfloat16", "float16"],
                        help="run the forward under torch.autocast in this dtype (Trainer's bf16=True / fp16=True)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before timing")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--text", default="wikitext2", help="text the fixed batch is cut from (sparse_peft.data)")
    parser.add_argument("--json", default="cost.json", help="where to write the results")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.methods = methods
    return args


def load_model(args):
    """``(model, fixed batch [batch, seq_len] int64)`` on ``args.device``."""
    dtype = getattr(torch, args.dtype)
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=args.seq_len)
        model = LlamaForCausalLM(config).to(dtype)
        batch = torch.randint(0, 128, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        from sparse_peft.data import load_model_and_tokenizer, load_texts

        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        ids = tokenizer("\n\n".join(load_texts(args.text, max_documents=2000)), return_tensors="pt").input_ids[0]
        needed = args.batch * args.seq_len
        if ids.numel() < needed:
            raise SystemExit(
                f"--text {args.text!r} has {ids.numel()} tokens, fewer than --batch x --seq-len = {needed}"
            )
        batch = ids[:needed].view(args.batch, args.seq_len)
    return model.to(args.device), batch.to(args.device)


def prepare(method: str, model):
    """Wrap ``model`` for ``method``; returns the model to train."""
    from peft import LoraConfig, get_peft_model

    from sparse_peft import MaskConfig

    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    peft_model = get_peft_model(model, MaskConfig(target_modules=TARGETS))
    if method == "mask-keep":
        from sparse_peft.layer import set_soft_mask_memory

        set_soft_mask_memory(peft_model, recompute=False)
    if method == "mask-ckpt":
        peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors``; a tensor subclass (e.g. torchao's 8-bit optimizer state) counts its inner tensors."""
    total = 0
    for t in tensors:
        if hasattr(t, "__tensor_flatten__"):
            total += tensor_bytes(getattr(t, name) for name in t.__tensor_flatten__()[0])
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def make_optimizer(method: str, params: list):
    """AdamW with MaskLLM's settings; 8-bit moments (torchao) for ``mask-adam8bit``, else torch's fused AdamW."""
    kwargs = dict(lr=5e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    if method == "mask-adam8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise SystemExit("mask-adam8bit needs torchao: pip install torchao") from None
        return AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)


def peak_memory(device: str) -> int:
    """Peak bytes so far: CUDA allocator peak, or the process's peak RSS (Linux reports KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(method: str, args) -> dict:
    """Build, train ``args.warmup + args.steps`` steps and return the measurements of one method."""
    from sparse_peft import update_mask_schedule

    model, batch = load_model(args)
    torch.manual_seed(0)  # the same initial logits / LoRA weights and Gumbel noise in every run
    masked_weights = sum(
        module.weight.numel() for name, module in model.named_modules() if name.split(".")[-1] in TARGETS
    )
    model = prepare(method, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(method, params)
    total = args.warmup + args.steps
    setup_memory = peak_memory(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, losses, grad_bytes = [], [], [], 0
    device_type = torch.device(args.device).type
    autocast_dtype = None if args.autocast == "none" else getattr(torch, args.autocast)
    for step in range(total):
        if method.startswith("mask"):
            update_mask_schedule(model, step, total)
        synchronize(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
        print(f"  {method} step {step}: {time.perf_counter() - start:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr)
    state_bytes = tensor_bytes(params) + grad_bytes
    state_bytes += tensor_bytes(t for state in optimizer.state.values() for t in state.values())
    step_time = statistics.median(times)
    return {
        "method": method,
        "step_time_s": step_time,
        "step_times_s": times,
        "step_cpu_time_s": statistics.median(cpu_times),
        "tokens_per_s": batch.numel() / step_time,
        "peak_memory_bytes": peak_memory(args.device),
        "setup_memory_bytes": setup_memory,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_state_bytes": state_bytes,
        "masked_weights": masked_weights,
        "trainable_state_bytes_per_masked_weight": state_bytes / masked_weights,
        "losses": losses,
    }


def run_child(method: str, argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv, "--only", method], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed (exit status {result.returncode}); its error is above.")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args) -> dict:
    mib = 2**20
    memory = "peak alloc MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"\n{'method':<13} {'step s':>8} {'CPU s':>7} {'tokens/s':>9} {memory:>14} {'setup MiB':>10} "
          f"{'state B/masked w':>17}")
    for name, r in results.items():
        print(f"{name:<13} {r['step_time_s']:8.2f} {r['step_cpu_time_s']:7.2f} {r['tokens_per_s']:9.1f} "
              f"{r['peak_memory_bytes'] / mib:14.0f} "
              f"{r['setup_memory_bytes'] / mib:10.0f} {r['trainable_state_bytes_per_masked_weight']:17.2f}")
    ratios = {}
    for mask in (m for m in results if m.startswith("mask")):
        for base in ("full", "lora"):
            for key, what in (("step_time_s", "step time"), ("step_cpu_time_s", "CPU time")):
                if base in results:
                    ratios[f"{mask}/{base} {what}"] = results[mask][key] / results[base][key]
    if ratios:
        print("\nratios (issue 5 targets: mask/full <= 1.2, mask/lora <= 1.7; on a busy machine trust CPU time):")
        for name, value in ratios.items():
            print(f"  {name:<30} {value:5.2f}")
    return ratios


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``""``: which kernels ran decides the timings."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only is not None:
        print(json.dumps(measure(args.only, args)))
        return
    child_argv = [a for a in argv if a != "--only"]
    results = {}
    for method in args.methods:
        print(f"measuring {method} ...", flush=True)
        results[method] = run_child(method, child_argv)
    ratios = report(results, args)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or cpu_model_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "load_average": os.getloadavg(),
    }
    settings = {k: v for k, v in vars(args).items() if k != "only"}
    Path(args.json).write_text(json.dumps({"settings": settings, "machine": machine, "results": results,
                                           "ratios": ratios}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
