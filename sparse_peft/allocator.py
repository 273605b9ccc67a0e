"""Keep freed memory in the process (glibc), so that training steps stop page-faulting their tensors in again.

Every mask-training step allocates ``W * mask``, the weight gradient and the logits' gradient afresh: on
SmolLM2-135M about 2.5 GB of ``[out, in]`` and ``[G, C]`` tensors of a few MB each. With its default settings glibc
serves large blocks with ``mmap`` (from 128 KiB, a threshold it raises as such blocks are freed) and gives them,
and the free top of its heap, back to the kernel when they are freed, so a step can fault in and zero memory the
step before it had already used. :func:`retain_freed_memory` raises the
``mmap`` threshold to 32 MiB (glibc's largest), turns trimming off and pads every heap growth by 512 MiB: freed
blocks are reused by the next step, and the process keeps the memory of its largest step (its peak, which this does
not raise) until it exits. From inside a running process it does what ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=536870912`` in the environment does at its start.

The ``sparse-peft`` command line and the benchmarks call it; a training script of your own can too (once, first).
On other C libraries (macOS, musl, Windows) it does nothing and returns ``False``.
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["retain_freed_memory"]

logger = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: ``(parameter, bytes)``: 32 MiB is the largest ``mmap`` threshold glibc accepts on 64-bit; a trim threshold of -1
#: turns trimming off (mallopt(3)).
SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 512 << 20))


def retain_freed_memory() -> bool:
    """Set glibc's allocator to keep freed memory for reuse (module docstring). Process-wide, lasts until exit.

    Returns ``True`` if glibc accepted every setting, ``False`` on another C library or if one was refused (logged).
    Idempotent.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the running process's symbols: glibc's mallopt
    refused = [param for param, value in SETTINGS if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1]
    if refused:
        logger.warning("glibc refused mallopt parameters %s; freed memory is returned to the system as usual.",
                       refused)
    return not refused
