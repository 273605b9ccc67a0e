"""Cost of mask learning vs LoRA vs full fine-tuning: step time, tokens/s, peak memory, trainable-state bytes.

    python benchmarks/cost.py                      # shipped SmolLM2-135M, batch 4 x 128 tokens, CPU, a few minutes
    python benchmarks/cost.py --device cuda --batch 8 --seq-len 512 --steps 10
    python benchmarks/cost.py --autocast bfloat16  # as Trainer(bf16=True): bf16 matmuls, fp32 weights and logits
    python benchmarks/cost.py --model <folder with config.json> --random-weights   # the shapes alone, no checkpoint

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
* ``mask-bf16``: ``mask-keep`` with ``MaskConfig(logits_dtype="bfloat16")`` and the stochastically rounding
  :class:`~sparse_peft.optim.BF16AdamW` with bfloat16 moments (``sparse_peft.training.bf16_logits_optimizer``, what
  ``learn_mask`` uses for bfloat16 logits);
* ``mask-distill``: ``mask-keep`` trained on the KL from the dense model (``learn_mask(distill=True)``: a teacher
  forward of the same base with the adapter disabled in every step);
* ``mask-distill-cached``: the same KL from the teacher's top-64 outputs computed once before timing
  (``learn_mask(distill=True, teacher_top_k=64)``: no teacher forward in the step);
* ``mask-lowrank``: ``mask`` with a rank-16 update under the mask trained with it (``MaskConfig(lora_rank=16)``;
  the PyTorch soft-mask path, which the fused kernel does not cover);
* ``lora``: ``LoraConfig(r=16, lora_alpha=32)`` on the same targets;
* ``full``: every parameter trains.

The mask methods start from random logits, or from ``--prior`` (e.g. the shipped general mask). Their timed steps
walk one annealing schedule of ``--warmup + --steps`` steps (tau from 4 down to 0.05), or all run at one point of
it with ``--anneal-at`` (0: the start, 1: the end, where a mask is nearly settled and small candidate weights
appear). Step time is the median over ``--steps`` timed steps after ``--warmup`` untimed ones (forward, backward,
clipping, optimizer step, zeroing the gradients), with the optimizer's share (clipping, step, zeroing) beside it; the
process's CPU time per step is reported too, which other processes on a shared machine disturb much less than wall
time. For the mask methods, ``per-weight s`` is the same step on a batch of one token: what a step costs whatever
its batch (sampling the soft mask, the mask products, the logits' gradient and their optimizer step), since every
GEMM shrinks to a matrix-vector product.

The GEMM floor (process ``gemm``): the matrix products a step cannot avoid, timed on this machine at the step's
token count in the step's matmul dtype (fp32, or bf16 under ``--autocast``): for every targeted linear and the
output layer, the forward ``x @ W.T``, the input gradient ``dY @ W`` and the weight gradient ``dY.T @ x``. A
method's floor sums the products it needs: full fine-tuning all three everywhere; LoRA forward and input gradient
(the frozen base needs no weight gradient; its rank-16 products are left out); the mask methods all three on the
targeted linears (the weight gradient is the mask's) and two on the output layer; distillation one more forward
of everything. ``GEMM fraction`` is floor / step time: how close a step runs to its matrix products. Attention's
own products (``QK^T``, ``AV``) and the embedding are left out. ``--autocast`` runs every method's forward under
``torch.autocast`` (as ``Trainer(bf16=True)`` does); weights, logits and optimizer state keep their dtype. Peak
memory is the process's peak RSS on CPU (it includes the model) and ``torch.cuda.max_memory_allocated`` on CUDA.
Trainable-state bytes count parameters + gradients + optimizer state of the trainable tensors, divided by the
number of masked weights (the weights of the targeted linears), so the three methods share one denominator. Prints
a table and writes JSON (``--json``) with the machine: CPU model and the vector instruction set torch's kernels use
(bf16 matmuls are fast only with AVX512-BF16 / AMX).

The kernel passes (process ``kernel``, CPU with the fused kernel built): one forward and one backward of the fused
soft-mask kernel over every targeted linear of the model (its own weights, random logits, the schedule's start),
regenerating the sample in backward (``mask``) or reading the one forward kept (``mask-keep``): the least of
``--kernel-repeats`` timings, at the process's thread count. That is the part of the per-weight column that
sampling costs; the rest is the weight-gradient GEMM's output, clipping and the optimizer step.

Every measuring process keeps freed memory for reuse, as the command line does (``--allocator retain``:
:func:`sparse_peft.retain_freed_memory`; ``--allocator default``: glibc's own settings). Not a test: nothing is
asserted; the targets are printed as ratios.
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
from typing import Optional

import torch

from sparse_peft.allocator import retain_freed_memory
from sparse_peft.utils import atomic_write

METHODS = ("mask", "mask-keep", "mask-ckpt", "mask-adam8bit", "mask-bf16", "mask-distill", "mask-distill-cached",
           "mask-lowrank", "lora", "full")
#: ``--anneal-at F`` runs every timed step at step ``round(F * SCHEDULE_STEPS)`` of ``SCHEDULE_STEPS + 1``.
SCHEDULE_STEPS = 1000
#: The teacher tokens kept per position by ``mask-distill-cached``.
TEACHER_TOP_K = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id or folder; default: the shipped SmolLM2-135M-Instruct; "
                        "'tiny': a 2-layer random Llama (a smoke run in seconds)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --model (a folder or Hub id holding at least config.json) from its config with "
                        "random weights and train on random token ids: step times depend only on the shapes, so a "
                        "machine that cannot hold the checkpoint can still be timed")
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
    parser.add_argument("--prior", default=None,
                        help="mask methods start from this mask adapter (path or Hub id) instead of random logits")
    parser.add_argument("--anneal-at", type=float, default=None,
                        help="run every step of the mask methods at this point of the annealing schedule (0: start, "
                             "1: end); default: the timed steps walk one schedule of --warmup + --steps steps")
    parser.add_argument("--text", default="wikitext2", help="text the fixed batch is cut from (sparse_peft.data)")
    parser.add_argument("--json", default="cost.json", help="where to write the results")
    parser.add_argument("--per-weight-steps", type=int, default=3,
                        help="timed one-token steps of each mask method (0: no per-weight column)")
    parser.add_argument("--gemm-repeats", type=int, default=3, help="timings per GEMM shape of the floor (0: none)")
    parser.add_argument("--kernel-repeats", type=int, default=3,
                        help="timings of the fused CPU soft-mask kernel's passes over the model (0: none)")
    parser.add_argument("--allocator", default="retain", choices=["retain", "default"],
                        help="retain: every measuring process keeps freed memory for reuse "
                             "(sparse_peft.retain_freed_memory, what the CLI does); default: glibc's own settings")
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
    if args.anneal_at is not None and not 0.0 <= args.anneal_at <= 1.0:
        parser.error(f"--anneal-at must be in [0, 1] (0: the start of the schedule, 1: its end), got {args.anneal_at}")
    if args.random_weights and args.model in (None, "tiny"):
        parser.error("--random-weights needs --model: a folder or Hub id with the config.json to build")
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
    elif args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len),
                              generator=torch.Generator().manual_seed(0))
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


def prepare(method: str, model, prior: Optional[str] = None):
    """Wrap ``model`` for ``method`` (the mask methods from ``prior``, a mask adapter, if given); returns the model to
    train."""
    from peft import LoraConfig, get_peft_model

    from sparse_peft import MaskConfig

    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    logits_dtype = "bfloat16" if method == "mask-bf16" else "float32"
    lora_rank = 16 if method == "mask-lowrank" else 0
    peft_model = get_peft_model(
        model, MaskConfig(target_modules=TARGETS, logits_dtype=logits_dtype, prior=prior, lora_rank=lora_rank)
    )
    if method in ("mask-keep", "mask-bf16", "mask-distill", "mask-distill-cached"):
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
    """AdamW with MaskLLM's settings; 8-bit moments (torchao) for ``mask-adam8bit``, the bfloat16 AdamW with
    stochastic rounding for ``mask-bf16``, else torch's fused AdamW."""
    kwargs = dict(lr=5e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    if method == "mask-bf16":
        from transformers import TrainingArguments

        from sparse_peft.training import bf16_logits_optimizer

        args = TrainingArguments("unused", learning_rate=kwargs["lr"], adam_beta1=0.9, adam_beta2=0.95,
                                 adam_epsilon=1e-5, report_to=[])
        optimizer_cls, optimizer_kwargs = bf16_logits_optimizer(args)
        return optimizer_cls(params, weight_decay=kwargs["weight_decay"], **optimizer_kwargs)
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


def loss_function(method: str, model, batches):
    """``tokens -> loss`` of ``method``: the LM loss, or the KL from the dense model over every position (by a
    teacher forward per step, or from its top-k outputs on each of ``batches``, computed here once, in fp32, as
    ``add_teacher_outputs`` does)."""
    from sparse_peft.teacher import teacher_top_k, top_k_distillation_loss
    from sparse_peft.training import dense_distillation_loss

    if method == "mask-distill":
        def distill(tokens):
            with torch.no_grad(), model.disable_adapter():
                dense_logits = model(input_ids=tokens).logits
            return dense_distillation_loss(model(input_ids=tokens).logits, dense_logits)
        return distill
    if method == "mask-distill-cached":
        cached = {}
        for tokens in batches:
            with torch.no_grad(), model.disable_adapter():
                cached[tuple(tokens.shape)] = teacher_top_k(model(input_ids=tokens).logits, TEACHER_TOP_K)
        return lambda tokens: top_k_distillation_loss(model(input_ids=tokens).logits, *cached[tuple(tokens.shape)])
    return lambda tokens: model(input_ids=tokens, labels=tokens).loss


def measure(method: str, args) -> dict:
    """Build, train ``args.warmup + args.steps`` steps and return the measurements of one method."""
    from sparse_peft import update_mask_schedule

    model, batch = load_model(args)
    torch.manual_seed(0)  # the same initial logits / LoRA weights and Gumbel noise in every run
    masked_weights = sum(
        module.weight.numel() for name, module in model.named_modules() if name.split(".")[-1] in TARGETS
    )
    model = prepare(method, model, args.prior)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(method, params)
    one_token = batch[:1, :1]  # the per-weight step's batch
    compute_loss = loss_function(method, model, (batch, one_token))
    total = args.warmup + args.steps
    setup_memory = peak_memory(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    device_type = torch.device(args.device).type
    autocast_dtype = None if args.autocast == "none" else getattr(torch, args.autocast)
    grad_bytes = 0

    def step(tokens, index: int, count: int) -> tuple[float, float, float, float]:
        """One optimizer step: (wall s, CPU s, optimizer wall s, loss)."""
        nonlocal grad_bytes
        if method.startswith("mask") and args.anneal_at is not None:
            update_mask_schedule(model, round(args.anneal_at * SCHEDULE_STEPS), SCHEDULE_STEPS + 1)
        elif method.startswith("mask"):
            update_mask_schedule(model, index, count)
        synchronize(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = compute_loss(tokens)
        loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in params)
        synchronize(args.device)
        optimizer_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        end = time.perf_counter()
        return end - start, time.process_time() - cpu_start, end - optimizer_start, loss.item()

    times, cpu_times, optimizer_times, losses = [], [], [], []
    for index in range(total):
        wall, cpu, optimizer_wall, loss = step(batch, index, total)
        if index >= args.warmup:
            times.append(wall)
            cpu_times.append(cpu)
            optimizer_times.append(optimizer_wall)
        losses.append(loss)
        print(f"  {method} step {index}: {wall:.2f} s, loss {loss:.4f}", file=sys.stderr)
    state_bytes = tensor_bytes(params) + grad_bytes
    state_bytes += tensor_bytes(t for state in optimizer.state.values() for t in state.values())
    step_time = statistics.median(times)
    result = {
        "method": method,
        "step_time_s": step_time,
        "step_times_s": times,
        "step_cpu_time_s": statistics.median(cpu_times),
        "optimizer_time_s": statistics.median(optimizer_times),
        "tokens_per_s": batch.numel() / step_time,
        "peak_memory_bytes": peak_memory(args.device),
        "setup_memory_bytes": setup_memory,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_state_bytes": state_bytes,
        "masked_weights": masked_weights,
        "trainable_state_bytes_per_masked_weight": state_bytes / masked_weights,
        "losses": losses,
    }
    if method.startswith("mask") and args.per_weight_steps > 0:
        step(one_token, 0, 1)  # warm-up at this shape
        result["per_weight_step_s"] = statistics.median(
            step(one_token, 0, 1)[0] for _ in range(args.per_weight_steps)
        )
    return result


def gemm_floor(args) -> dict:
    """Seconds of the matrix products of one step at this machine's measured rate: per kind (``forward``,
    ``input_grad``, ``weight_grad``) for the targeted linears and for the output layer, and each method's floor."""
    model, batch = load_model(args)
    tokens = batch.numel()
    dtype = torch.float32 if args.autocast == "none" else getattr(torch, args.autocast)
    output = model.get_output_embeddings()
    shapes: dict[tuple[int, int], int] = {}  # (out, in) of the targeted linears -> how many
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            shapes[tuple(module.weight.shape)] = shapes.get(tuple(module.weight.shape), 0) + 1
    del model

    def timed(fn) -> float:
        fn()  # warm-up
        synchronize(args.device)
        times = []
        for _ in range(args.gemm_repeats):
            start = time.perf_counter()
            fn()
            synchronize(args.device)
            times.append(time.perf_counter() - start)
        return min(times)

    def products(out_features: int, in_features: int) -> dict[str, float]:
        g = torch.Generator(device=args.device).manual_seed(0)
        x = torch.randn(tokens, in_features, device=args.device, generator=g).to(dtype)
        w = torch.randn(out_features, in_features, device=args.device, generator=g).to(dtype)
        dy = torch.randn(tokens, out_features, device=args.device, generator=g).to(dtype)
        return {"forward": timed(lambda: x @ w.t()), "input_grad": timed(lambda: dy @ w),
                "weight_grad": timed(lambda: dy.t() @ x)}

    linears = {kind: 0.0 for kind in ("forward", "input_grad", "weight_grad")}
    flops = 0
    for (out_features, in_features), count in shapes.items():
        for kind, seconds in products(out_features, in_features).items():
            linears[kind] += count * seconds
        flops += 3 * count * 2 * tokens * out_features * in_features
    head = products(*output.weight.shape)
    flops_head = 3 * 2 * tokens * output.weight.shape[0] * output.weight.shape[1]
    full = sum(linears.values()) + sum(head.values())
    two = linears["forward"] + linears["input_grad"] + head["forward"] + head["input_grad"]
    mask = sum(linears.values()) + head["forward"] + head["input_grad"]
    teacher = linears["forward"] + head["forward"]
    return {
        "method": "gemm", "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
        "linears_s": linears, "output_layer_s": head,
        "gflop_per_s": (flops + flops_head) / full / 1e9,
        "floor_s": {"full": full, "lora": two, "mask": mask, "mask-keep": mask, "mask-ckpt": mask + linears["forward"],
                    "mask-adam8bit": mask, "mask-bf16": mask, "mask-distill": mask + teacher,
                    "mask-distill-cached": mask, "mask-lowrank": mask},
    }


def kernel_passes(args) -> Optional[dict]:
    """Seconds of the fused CPU soft-mask kernel's forward and backward over every targeted linear of the model,
    regenerating the sample in backward and reading a kept one; None where the kernel does not run (not CPU, not
    built, not 2:4-compiled)."""
    from sparse_peft import MaskConfig
    from sparse_peft.fused import kernel_for
    from sparse_peft.patterns import candidate_patterns

    model, _ = load_model(args)
    weights = [module.weight.detach().float().contiguous() for name, module in model.named_modules()
               if name.split(".")[-1] in TARGETS]
    del model
    config = MaskConfig()
    patterns = candidate_patterns(config.n, config.m).float()
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(w.numel() // config.m, patterns.shape[0], generator=generator) * config.logit_init_std
              for w in weights]
    kernel = kernel_for(weights[0], logits[0], *patterns.shape) if args.device == "cpu" else None
    if kernel is None:
        return None
    grads = [torch.randn(w.shape, generator=generator) for w in weights]
    tau, kappa, no_probs = config.tau_start, config.kappa_start, torch.empty(0)

    def forward(keep: bool) -> list:
        return [kernel.forward(w, x, patterns, 1, kappa, tau, False, keep) for w, x in zip(weights, logits)]

    def backward(kept: list) -> list:
        return [kernel.backward(g, w, x, patterns, 1, kappa, tau, 0.0, True, p)
                for g, w, x, p in zip(grads, weights, logits, kept)]

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.kernel_repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    kept = [out[2] for out in forward(True)]
    return {
        "masked_weights": sum(w.numel() for w in weights), "threads": torch.get_num_threads(),
        "regenerate": {"forward_s": timed(lambda: forward(False)),
                       "backward_s": timed(lambda: backward([no_probs] * len(weights)))},
        "keep": {"forward_s": timed(lambda: forward(True)), "backward_s": timed(lambda: backward(kept))},
    }


def run_child(method: str, argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv, "--only", method], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed (exit status {result.returncode}); its error is above.")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args, show: bool = True) -> tuple[dict, str]:
    """The results as a Markdown table and the ratios to the targets, printed if ``show``; returns
    ``(ratios, table)``."""
    memory = "peak alloc (MiB)" if args.device.startswith("cuda") else "peak RSS (MiB)"
    precision = "fp32" if args.autocast == "none" else f"{args.autocast} autocast"
    point = "walked" if args.anneal_at is None else f"at {args.anneal_at:g}"
    start = "random" if args.prior is None else Path(args.prior).name
    header = (f"| batch | precision | annealing | mask start | method | step (s) | optimizer (s) | per-weight (s) "
              f"| CPU time / step (s) | tokens/s | {memory} | trainable state (B / masked weight) | GEMM floor (s) "
              "| GEMM fraction | vs full | vs LoRA |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in results.items():
        def ratio(base: str) -> str:
            return f"{r['step_time_s'] / results[base]['step_time_s']:.2f}" if base in results else "-"

        per_weight = f"{r['per_weight_step_s']:.2f}" if "per_weight_step_s" in r else "-"
        floor = f"{r['gemm_floor_s']:.2f}" if "gemm_floor_s" in r else "-"
        fraction = f"{100 * r['gemm_fraction']:.0f}%" if "gemm_fraction" in r else "-"
        lines.append(
            f"| {args.batch} x {args.seq_len} | {precision} | {point} | {start} | {name} | {r['step_time_s']:.2f} "
            f"| {r['optimizer_time_s']:.2f} | {per_weight} | {r['step_cpu_time_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['peak_memory_bytes'] / 2**20:,.0f} | {r['trainable_state_bytes_per_masked_weight']:.2f} "
            f"| {floor} | {fraction} | {ratio('full')} | {ratio('lora')} |"
        )
    table = "\n".join(lines)
    ratios = {}
    for mask in (m for m in results if m.startswith("mask")):
        for base in ("full", "lora"):
            for key, what in (("step_time_s", "step time"), ("step_cpu_time_s", "CPU time")):
                if base in results:
                    ratios[f"{mask}/{base} {what}"] = results[mask][key] / results[base][key]
    for distill in ("mask-distill", "mask-distill-cached"):
        if distill in results and "mask-keep" in results:
            ratios[f"{distill}/mask-keep step time"] = (results[distill]["step_time_s"]
                                                        / results["mask-keep"]["step_time_s"])
    if show:
        print("\n" + table)
    if show and ratios:
        print("\nratios (targets: mask/full <= 1.1, mask/lora <= 1.5, cached distillation / LM loss <= 1.05; "
              "on a busy machine trust CPU time):")
        for name, value in ratios.items():
            print(f"  {name:<40} {value:5.2f}")
    return ratios, table


def cpuinfo_field(name: str) -> str:
    """The first ``name : value`` line's value in ``/proc/cpuinfo`` (Linux), else ``""``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return ""


def cpu_vector_flags() -> list[str]:
    """The CPU's vector-instruction flags (AVX*, AMX*, FMA, F16C): which kernels ran decides the timings."""
    return sorted(f for f in cpuinfo_field("flags").split() if f.startswith(("avx", "amx", "fma", "f16c")))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only is not None:
        if args.allocator == "retain":
            retain_freed_memory()
        only = {"gemm": gemm_floor, "kernel": kernel_passes}.get(args.only)
        print(json.dumps(only(args) if only is not None else measure(args.only, args)))
        return
    child_argv = [a for a in argv if a != "--only"]
    results = {}
    for method in args.methods:
        print(f"measuring {method} ...", flush=True)
        results[method] = run_child(method, child_argv)
        write(results, None, args)  # a run stopped early keeps every method measured so far
    floor = None
    if args.gemm_repeats > 0:
        print("measuring the GEMM floor ...", flush=True)
        floor = run_child("gemm", child_argv)
        for method, result in results.items():
            result["gemm_floor_s"] = floor["floor_s"][method]
            result["gemm_fraction"] = floor["floor_s"][method] / result["step_time_s"]
    kernel = None
    if args.kernel_repeats > 0 and args.device == "cpu":
        print("measuring the fused kernel's passes ...", flush=True)
        kernel = run_child("kernel", child_argv)
    write(results, floor, args, final=True, kernel=kernel)


def write(results: dict[str, dict], floor: Optional[dict], args, final: bool = False,
          kernel: Optional[dict] = None) -> None:
    """Write ``--json`` and its Markdown table (atomically) with the methods measured so far (and the kernel passes
    under the table); print the table and the ratios when ``final``."""
    ratios, table = report(results, args, final)
    if kernel is not None:
        line = (f"\nFused soft-mask kernel over the {kernel['masked_weights'] / 1e6:.1f}M masked weights, "
                f"{kernel['threads']} threads: regenerating the sample, forward {kernel['regenerate']['forward_s']:.3f}"
                f" s + backward {kernel['regenerate']['backward_s']:.3f} s; keeping it, forward "
                f"{kernel['keep']['forward_s']:.3f} s + backward {kernel['keep']['backward_s']:.3f} s.")
        table += "\n" + line
        if final:
            print(line)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or cpuinfo_field("model name"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_vector_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "load_average": os.getloadavg(),
    }
    settings = {k: v for k, v in vars(args).items() if k != "only"}
    payload = json.dumps({"settings": settings, "machine": machine, "results": results, "gemm": floor,
                          "kernel": kernel, "ratios": ratios, "complete": final}, indent=2)
    atomic_write(args.json, lambda f: f.write(payload.encode()))
    markdown = str(Path(args.json).with_suffix(".md"))
    atomic_write(markdown, lambda f: f.write((table + "\n").encode()))
    if final:
        print(f"\nwrote {args.json} and {markdown}")


if __name__ == "__main__":
    main()
