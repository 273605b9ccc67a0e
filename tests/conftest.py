"""Shared fixtures: tiny models built from configs (no downloads) and helpers to run code in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import sparse_peft  # noqa: F401  (registers the method)
from sparse_peft import fused

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The shipped 231K-parameter real Llama (hidden 64, 5 layers, sentencepiece vocab 512) with its tokenizer.
AIDREAMS = REPO_ROOT.parent / "shared" / "assets" / "models" / "aidreams260K-hf"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(params=["cpu-kernel", "pytorch"])
def soft_mask_path(request, monkeypatch) -> str:
    """Run a test through the fused CPU soft-mask kernel (which must build on this machine) and through the
    PyTorch path (``SPARSE_PEFT_FUSED_CPU=0``)."""
    if request.param == "pytorch":
        monkeypatch.setenv(fused.ENV, "0")
    else:
        assert fused.cpu_kernel() is not None, "the fused CPU kernel did not build: see the log for the reason"
    return request.param


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights; the same seed gives bit-identical weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.config.name_or_path = f"tiny-llama-seed{seed}"
    return model.eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def run_fresh_python(code: str, *args: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported or registered) and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{result.stderr[-4000:]}")
    return result.stdout


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model.state_dict()``, to compare with later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, NaN included (``torch.equal`` counts a NaN as different from itself)."""
    if torch.equal(a, b):
        return True
    nan = a.isnan()
    return a.is_floating_point() and torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def reference_label_words(model, tokenizer, prompts, words) -> list[int]:
    """Per prompt, the index of the word whose first token (with its leading space) the model finds likeliest next:
    the reference for ``label_word_predictions``, one prompt at a time without padding."""
    first = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
            expected.append(int(logits[first].argmax()))
    return expected


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (its functions and ``main``; importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
