"""AdamW for bfloat16 mask logits: float32 arithmetic, bfloat16 moments, the parameter rounded stochastically.

Plain AdamW on bfloat16 parameters rounds every update below half a bfloat16 step (2^-8 of the value) away, so small
learning rates never move a logit. :class:`BF16AdamW` computes the AdamW update in float32 (decoupled weight decay,
bias-corrected moments; the same order of operations as torchao's ``_AdamW(bf16_stochastic_round=True)``), keeps
both moments in bfloat16 rounded to nearest, and rounds the new parameter to bfloat16 stochastically (up with
probability equal to its distance from the lower neighbour, in bfloat16 steps), so the expected parameter is the
float32 one. State: 2 + 2 + 2 bytes per bfloat16 parameter beside its gradient.

On CPU with contiguous bfloat16 tensors the step is one fused pass (``csrc/adamw_bf16_cpu.cpp``, random bits from
splitmix64 of a per-step seed drawn from torch's global generator, so ``torch.manual_seed`` makes it reproducible);
elsewhere (CUDA, non-contiguous, ``SPARSE_PEFT_FUSED_CPU=0``) the same arithmetic in PyTorch operations with
``torch.randint`` bits. Parameters of other dtypes get the plain float32 AdamW update.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .fused import cpu_kernel
from .patterns import draw_seed

__all__ = ["BF16AdamW"]


def _stochastic_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 stochastically: 16 random bits added to its bits, then truncated."""
    bits = x.view(torch.int32) + torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return (bits & -65536).view(torch.float32).bfloat16()  # -65536 == 0xFFFF0000: the low half is cleared, exact


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW``'s arguments and update) whose bfloat16 parameters keep bfloat16 moments and are
    rounded stochastically after each step (see the module docstring)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"BF16AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}.")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BF16AdamW does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1  # an int; torchao's and torch's checkpoints hold a tensor
                self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2,
                             group["eps"], group["weight_decay"], 1 - beta1 ** state["step"],
                             1 - beta2 ** state["step"])
        return loss

    @staticmethod
    def _update(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias1, bias2) -> None:
        bf16 = p.dtype == torch.bfloat16
        tensors = (p, grad, exp_avg, exp_avg_sq)
        if bf16 and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors):
            kernel = cpu_kernel()
            if kernel is not None:
                kernel.adamw_bf16(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias1, bias2,
                                  draw_seed())
                return
        x = p.float()
        g = grad.float()
        x = x - (lr * weight_decay) * x
        m = exp_avg.float().lerp_(g, 1 - beta1)
        v = exp_avg_sq.float().lerp_(g.square(), 1 - beta2)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        x = x - (lr / bias1) * m / (v.sqrt() / bias2 ** 0.5 + eps)
        p.copy_(_stochastic_bf16(x) if bf16 else x)
