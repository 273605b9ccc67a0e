"""The fused CPU kernels, built on first use with ``torch.utils.cpp_extension`` into one extension: the training soft
mask (``csrc/soft_mask_cpu.cpp``: Gumbel noise, softmax, ``W * mask`` and the logits' gradient in one pass over the
logits per call) and the AdamW step of bfloat16 logits (``csrc/adamw_bf16_cpu.cpp``, used by
:class:`sparse_peft.optim.BF16AdamW`).

The plain PyTorch path makes about twenty passes over the ``[G, C]`` logits per training step (noise, two logs, the
softmax, the mask product, their backward); the kernel makes one in forward and one in backward, regenerating the
noise from a counter-based generator (two 23-bit uniforms ``(k + 0.5) / 2^23`` per splitmix64 hash of
``(seed, index)``, never 0 or 1) instead of storing it; where the layer keeps the soft mask
(:func:`sparse_peft.layer.set_soft_mask_memory` with ``recompute=False``), forward also returns the sample's
``y [C, G]`` (float32) and backward reads it instead of sampling again. The distribution is the method's:
``y = softmax((kappa * logits + g) / tau)`` with ``g = -log(-log(u))``. With AVX512, full blocks of 64 groups move
between the ``[G, C]`` / ``[G, M]`` layouts and the kernel's per-candidate columns by in-register permutes.

Used for training forwards on CPU with float32 weights ``[out, in]`` (contiguous), float32 or bfloat16 logits and
the N:M layouts it is compiled for (2:4, 1:4, 1:2, 4:8), without a low-rank update under the mask. The build needs a
C++ compiler with OpenMP and ``ninja``; it takes about a minute once per machine (torch's extension cache). Where
it fails, or with ``SPARSE_PEFT_FUSED_CPU=0``, the PyTorch path runs (logged once). On CPU every Gumbel sample,
of either path, uses the kernel's generator while the kernel is available, so a seed gives the same noise to both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

__all__ = ["ENV", "cpu_kernel", "kernel_for", "kernel_uniforms"]

logger = logging.getLogger(__name__)

#: Environment variable: ``0`` turns the fused CPU kernels off (the PyTorch paths run).
ENV = "SPARSE_PEFT_FUSED_CPU"

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("soft_mask_cpu.cpp", "adamw_bf16_cpu.cpp", "bindings.cpp")]
_HEADERS = [_CSRC / "splitmix64.h"]
# -ffast-math at compile time only (libmvec's vector log/exp; linking without it keeps the process's denormal mode
# unchanged); full-width vectors where the CPU has AVX512 (ignored elsewhere).
_CFLAGS = ["-O3", "-ffast-math", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
_LDFLAGS = ["-fopenmp", "-lm"]
_state: dict = {}  # "kernel": the loaded module, or None after a failed build


def _machine_tag() -> str:
    """Hash of what ``-march=native`` compiles for (the CPU's flags) and of the source: the extension's name, so a
    cache shared between different CPUs never loads code built for another."""
    flags = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), flags)
    except OSError:
        pass
    code = b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    digest = hashlib.sha256(flags.encode() + code + " ".join(_CFLAGS).encode())
    return digest.hexdigest()[:16]


def _build() -> Optional[ModuleType]:
    from torch.utils.cpp_extension import load

    logger.info("sparse-peft: building the fused CPU kernels (once per machine, about a minute)")
    try:
        return load(name=f"sparse_peft_cpu_{_machine_tag()}", sources=[str(path) for path in _SOURCES],
                    extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, verbose=False)
    except Exception as error:  # no compiler, no ninja, no OpenMP: the PyTorch path is exact, only slower
        logger.warning("sparse-peft: the fused CPU kernels could not be built (%s: %s); training uses "
                       "the PyTorch paths. Install a C++ compiler with OpenMP and `pip install ninja` to get them.",
                       type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "")
        return None


def cpu_kernel() -> Optional[ModuleType]:
    """The compiled kernel module (built on the first call of a process), or None where it is turned off
    (``SPARSE_PEFT_FUSED_CPU=0``) or could not be built."""
    if os.environ.get(ENV, "1") == "0":
        return None
    if "kernel" not in _state:
        _state["kernel"] = _build()
    return _state["kernel"]


def kernel_for(weight: torch.Tensor, logits: torch.Tensor, num_candidates: int, m: int) -> Optional[ModuleType]:
    """The kernel if it computes this layer's soft mask: ``weight [out, in]`` float32 contiguous on CPU, ``logits
    [G, C]`` float32 or bfloat16 contiguous, a compiled ``(C, M)`` layout; else None (use the PyTorch path)."""
    if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.is_contiguous()):
        return None
    kernel = cpu_kernel()
    return kernel if kernel is not None and kernel.supports(num_candidates, m) else None


def kernel_uniforms(seed: int, num_groups: int, num_candidates: int) -> Optional[torch.Tensor]:
    """The kernel's uniforms ``u`` in (0, 1) of ``seed``, float32 ``[C, G]`` (candidate-major; ``u[c, g]`` is the
    first or second uniform, as ``c`` is even or odd, of hash index ``(c // 2) * G + g``), or None without the
    kernel."""
    kernel = cpu_kernel()
    return None if kernel is None else kernel.uniforms(seed, num_groups, num_candidates)
