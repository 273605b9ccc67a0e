"""``retain_freed_memory``: freed tensors stay in the process for reuse, and the command line applies it."""

import platform
import subprocess
import sys

import pytest

import sparse_peft
from sparse_peft import cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A "step" that allocates and frees a hundred tensors of ~1 MB (like a training step's W * mask and gradients),
# three times; prints the free memory glibc holds for reuse afterwards (mallinfo2's fordblks, MiB).
STEPS = """
import ctypes, sys, torch
import sparse_peft
if sys.argv[1] == "retain":
    assert sparse_peft.retain_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
for _ in range(3):
    tensors = [torch.ones(250_000 + 1000 * i) for i in range(100)]
    del tensors
print(libc.mallinfo2().fordblks >> 20)
"""


def held_free_mib(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_tensors_stay_in_the_process_for_reuse():
    # 105 MB freed: with the setting glibc keeps all of it (plus its 512 MiB top pad) for the next step; with its
    # defaults it trims the heap and unmaps large blocks, so the next step faults the memory in again
    assert held_free_mib("retain") >= 105
    assert held_free_mib("default") < 50


@pytest.mark.skipif(GLIBC, reason="only other C libraries")
def test_other_c_libraries_are_left_alone():
    assert sparse_peft.retain_freed_memory() is False


def test_the_command_line_retains_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True))
    assert cli.main(["inspect", "does-not-exist"]) == 2
    assert calls == [True]
