"""Multi-process mask training on CPU (gloo): DDP through Trainer + Accelerate, and FSDP2 (fully_shard).

Each run launches ``tests/distributed_train.py`` in 2 processes with ``accelerate launch`` on a tiny model for a few
steps; both runs go in parallel to keep the wall time down.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from conftest import LLAMA_TARGETS, REPO_ROOT, tiny_llama
from sparse_peft import MaskedLinear
from sparse_peft.patterns import group_counts

MODES = {"ddp": "DistributedDataParallel", "fsdp2": "FSDP"}  # mode -> expected wrapper class name prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch every mode at once; ``{mode: output folder}`` once all have finished successfully."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = {}
    for mode in MODES:
        out = tmp_path_factory.mktemp(mode)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(REPO_ROOT / "tests" / "distributed_train.py"), str(out), mode,
        ]
        procs[mode] = (out, subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True))
    for mode, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode} run failed:\n{log[-4000:]}"
    return {mode: out for mode, (out, _) in procs.items()}


@pytest.mark.parametrize("mode", MODES)
def test_two_process_training_syncs_logits_and_rank0_saves_a_valid_adapter(mode, runs):
    out = runs[mode]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0["wrapper"].startswith(MODES[mode]) and rank1["wrapper"] == rank0["wrapper"]
    final = rank0["final"]
    assert final.keys() == rank1["final"].keys() == rank0["initial"].keys() and final
    for name, logits in final.items():
        assert torch.equal(logits, rank1["final"][name]), name  # gradients were averaged: identical ranks
    for initial in (rank0["initial"], rank1["initial"]):
        assert any(not torch.equal(final[n], initial[n]) for n in final)  # training moved the logits

    # is_trainable=True: the float logits (saved with save_logits=True) are kept, not only the hard mask
    model = PeftModel.from_pretrained(tiny_llama(), out / "adapter", is_trainable=True).eval()
    loaded = {n: p for n, p in model.named_parameters() if "maskllm_logits" in n}
    assert loaded.keys() == final.keys()
    for name, logits in final.items():
        assert torch.equal(loaded[name], logits), name  # the main process saved the trained state
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    assert len(layers) == len(final)
    for layer in layers:
        assert (group_counts(layer.hard_mask("default"), 4) == 2).all()
    merged = model.merge_and_unload()
    for name, module in merged.named_modules():
        if name.split(".")[-1] in LLAMA_TARGETS:
            assert (group_counts(module.weight, 4) <= 2).all(), name


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_written_without_logits_is_completed_with_the_trained_float_logits(mode, runs):
    out = runs[mode]
    final = torch.load(out / "rank0.pt")["final"]
    folder = {"ddp": out / "trainer" / "checkpoint-4", "fsdp2": out / "checkpoint"}[mode]
    model = PeftModel.from_pretrained(tiny_llama(), folder, is_trainable=True)
    assert model.peft_config["default"].save_logits is False
    loaded = {n: p for n, p in model.named_parameters() if "maskllm_logits" in n}
    assert loaded.keys() == final.keys() and loaded
    for name, logits in final.items():
        assert torch.equal(loaded[name], logits), name
