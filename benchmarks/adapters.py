"""Many task masks on one frozen base: memory per adapter (measured RSS), file sizes and switching cost.

    python benchmarks/adapters.py --adapters runs/transfer/adapters/* --json runs/adapters.json

Loads the base model once (``--model``; default: the shipped SmolLM2-135M-Instruct), then the general mask
(``--general``; default: the shipped general mask) and every ``--adapters`` folder for inference, all as adapters
of one ``PeftModel`` (``PeftModel.from_pretrained`` / ``load_adapter``). A forward of the base comes first, so the
weights of a memory-mapped checkpoint are resident before the first reading. After each load it records:

* the process's resident memory (``/proc/self/statm``; peak RSS from ``getrusage`` where there is no ``/proc``)
  and its growth, next to the bytes the adapter's own tensors hold (uint8 pattern indices: 0.25 byte per masked
  weight for 2:4), so memory can be seen to grow by the adapters only; and the same after ``gc.collect()`` and
  glibc's ``malloc_trim(0)`` (where glibc is the C library), which hands the freed decoding temporaries back to the
  system: ``rss`` counts what the allocator keeps for reuse, ``rss_trimmed`` what the process holds;
* the adapter's weights file: bytes and bits per masked weight (a task adapter is delta-coded against the general
  mask; its file does not include the general mask).

Then, over ``--rounds`` rounds through all adapters: the time of ``set_adapter`` plus the first forward of a fixed
batch (``--batch-size`` x ``--seq-len`` tokens of Wikitext-2; the adapter's hard mask is expanded and cached per
layer) and of the second forward (cached), medians. Prints a table; ``--json`` writes every number and the machine.
Nothing is asserted: ``tests/test_adapters_benchmark.py`` checks the numbers on a tiny model.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Optional

import torch
from peft import PeftModel

from sparse_peft.adapter_io import adapter_size
from sparse_peft.data import default_general_mask, load_model_and_tokenizer, load_texts
from sparse_peft.utils import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--general", default=None,
                   help="the general mask (folder or Hub id; default: the shipped one, for the shipped model)")
    p.add_argument("--adapters", nargs="*", default=[], help="task mask adapter folders / Hub ids")
    p.add_argument("--text", default="wikitext2", help="text of the fixed batch")
    p.add_argument("--batch-size", type=int, default=1, help="sequences of the fixed batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence of the fixed batch")
    p.add_argument("--rounds", type=int, default=3, help="rounds of switching through all adapters")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        args.general = default_general_mask(args.general, args.model)
    except ValueError as err:
        p.error(str(err))
    return args


def rss_bytes() -> tuple[int, str]:
    """``(bytes, kind)``: the current resident set size, or the peak one where ``/proc`` is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "current"
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "peak"


def trimmed_rss_bytes() -> Optional[int]:
    """The current RSS after ``gc.collect()`` and glibc's ``malloc_trim(0)``; None without glibc or ``/proc``."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim(0)
    rss, kind = rss_bytes()
    return rss if kind == "current" else None


def adapter_tensor_bytes(model: PeftModel, name: str) -> int:
    """Bytes of the tensors that belong to adapter ``name`` alone (its mask state in every layer)."""
    return sum(t.numel() * t.element_size() for key, t in model.state_dict(keep_vars=True).items()
               if key.endswith(f".{name}"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    sources = {"general": args.general, **{f"task{i}": path for i, path in enumerate(args.adapters)}}
    sizes = {name: adapter_size(source) for name, source in sources.items()}  # a bad path fails before the model loads
    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = tokenizer("\n\n".join(load_texts(args.text, split="test")[:400]), return_tensors="pt")["input_ids"]
    need = args.batch_size * args.seq_len
    if ids.shape[1] < need:
        raise ValueError(f"--text has {ids.shape[1]} tokens; the batch needs {need}: lower --batch-size/--seq-len")
    batch = ids[:, :need].reshape(args.batch_size, args.seq_len)
    with torch.no_grad():  # page in every base weight (a checkpoint loads memory-mapped) before the first reading
        model(input_ids=batch)
    rss, kind = rss_bytes()
    loads = [{"adapter": "base model", "source": args.model or "shipped", "rss": rss,
              "rss_trimmed": trimmed_rss_bytes()}]
    peft_model = None
    for name, source in sources.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, source, adapter_name=name)
        else:
            peft_model.load_adapter(source, adapter_name=name)
        rss, _ = rss_bytes()
        trimmed = trimmed_rss_bytes()
        size = sizes[name]
        growth = None if trimmed is None or loads[-1]["rss_trimmed"] is None else trimmed - loads[-1]["rss_trimmed"]
        loads.append({"adapter": name, "source": source, "rss": rss, "rss_growth": rss - loads[-1]["rss"],
                      "rss_trimmed": trimmed, "rss_trimmed_growth": growth,
                      "tensor_bytes": adapter_tensor_bytes(peft_model, name), "file_bytes": size["bytes"],
                      "bits_per_weight": size["bits_per_weight"], "masked_weights": size["masked_weights"]})
    peft_model.eval()
    times = {name: {"switch_and_forward": [], "cached_forward": []} for name in sources}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in sources:
                start = time.perf_counter()
                peft_model.set_adapter(name)
                peft_model(input_ids=batch)
                middle = time.perf_counter()
                peft_model(input_ids=batch)
                times[name]["switch_and_forward"].append(middle - start)
                times[name]["cached_forward"].append(time.perf_counter() - middle)
    switching = [{"adapter": name, **{k: statistics.median(v) for k, v in t.items()}} for name, t in times.items()]
    result = {"settings": vars(args), "rss_kind": kind, "loads": loads, "switching": switching,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    print(markdown(result))
    if args.json:
        data = json.dumps(result, indent=2).encode()
        atomic_write(args.json, lambda f: f.write(data))
    return result


def markdown(result: dict) -> str:
    mib = 2**20

    def mebibytes(value: Optional[int]) -> str:
        return "-" if value is None else f"{value / mib:.1f}"

    lines = [f"| loaded | RSS ({result['rss_kind']}, MiB) | RSS growth (MiB) | RSS after malloc_trim (MiB) "
             "| its growth (MiB) | adapter tensors (MiB) | file (KiB) | file bits / masked weight |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["loads"]:
        if "tensor_bytes" not in row:
            lines.append(f"| {row['adapter']} | {row['rss'] / mib:.1f} | - | {mebibytes(row['rss_trimmed'])} "
                         "| - | - | - | - |")
            continue
        lines.append(f"| {row['adapter']} | {row['rss'] / mib:.1f} | {row['rss_growth'] / mib:.1f} "
                     f"| {mebibytes(row['rss_trimmed'])} | {mebibytes(row['rss_trimmed_growth'])} "
                     f"| {row['tensor_bytes'] / mib:.1f} | {row['file_bytes'] / 1024:.0f} "
                     f"| {row['bits_per_weight']:.3f} |")
    lines += ["", "| adapter | set_adapter + first forward (ms) | cached forward (ms) |", "|---|---|---|"]
    for row in result["switching"]:
        lines.append(f"| {row['adapter']} | {1000 * row['switch_and_forward']:.1f} "
                     f"| {1000 * row['cached_forward']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
