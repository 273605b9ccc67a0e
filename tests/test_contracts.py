"""PEFT's tuner contracts, one table of tiny models run through one set of generic checks (issue 14, A.8).

In the style of PEFT's own ``testing_common.py``: ``TEST_CASES`` rows of (name, model factory, config kwargs,
inputs), and every check is parametrised over all rows. The models are built from configs with a fixed seed: an
MLP of plain ``nn.Linear`` layers, Llama, GPT-2 (``Conv1D``), Qwen2 and Mistral. Only the public API is used
(``sparse_peft``, ``peft``, ``transformers``).

Checks that fail today are ``xfail(strict=True)`` with the item of issue 14 part A they belong to; the fix
removes the marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from conftest import identical, snapshot

import sparse_peft  # noqa: F401  (registers the method)
from sparse_peft import MaskConfig, MaskedLinear

WEIGHTS = "adapter_model.safetensors"


# -- the models ---------------------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    """Three plain linears whose input sizes are multiples of 4 (and 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 32)
        self.lin2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _seeded(build: Callable[[], nn.Module], name: str) -> Callable[[int], nn.Module]:
    def factory(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = build()
        if getattr(model, "config", None) is not None:
            model.config.name_or_path = f"{name}-seed{seed}"
        return model.eval()

    return factory


_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)


def _tokens(rows: int) -> torch.Tensor:
    return torch.randint(0, 64, (rows, 6), generator=torch.Generator().manual_seed(rows))


def _floats(rows: int) -> torch.Tensor:
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(rows))


@dataclass
class Case:
    name: str
    factory: Callable[[int], nn.Module]
    config_kwargs: dict = field(default_factory=dict)
    inputs: Callable[[int], torch.Tensor] = _tokens


TEST_CASES = [
    Case("mlp", _seeded(TinyMLP, "mlp"), {"target_modules": ["lin0", "lin1", "lin2"]}, _floats),
    Case("llama", _seeded(lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)), "llama")),
    Case("gpt2", _seeded(lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                                           n_positions=32)), "gpt2")),
    Case("qwen2", _seeded(lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)), "qwen2")),
    Case("mistral", _seeded(lambda: MistralForCausalLM(MistralConfig(**_DECODER)), "mistral")),
]
CASES = pytest.mark.parametrize("case", TEST_CASES, ids=[c.name for c in TEST_CASES])


# -- helpers ------------------------------------------------------------------------------------------------------
def out(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        result = model(x, **kwargs)
    return result if isinstance(result, torch.Tensor) else result.logits


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for key, value in before.items():
        assert identical(now[key], value), key


def assert_plain(model: nn.Module) -> None:
    """No tuner layer anywhere: the model is what the user built."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert not wrapped, f"tuner layers left in the model: {wrapped[:3]}"


def mask_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def hard_masks(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: layer.hard_mask(adapter).clone() for n, layer in mask_layers(model).items()}


def assert_exact_n_m(mask: torch.Tensor, n: int = 2, m: int = 4) -> None:
    """Exactly n ones in every group of m consecutive inputs of the ``[out, in]`` mask; nothing but 0 and 1."""
    assert ((mask == 0) | (mask == 1)).all()
    counts = mask.reshape(mask.shape[0], -1, m).sum(-1)
    assert (counts == n).all()


def adapted(case: Case, seed: int = 0, logit_seed: int = 100, adapter_name: str = "default") -> PeftModel:
    """``get_peft_model`` on the case's model, logits moved well away from their init (fixed seed), eval mode."""
    model = get_peft_model(case.factory(seed), MaskConfig(**case.config_kwargs), adapter_name=adapter_name)
    scramble(model, adapter_name, logit_seed)
    return model.eval()


def scramble(model: nn.Module, adapter_name: str, logit_seed: int) -> None:
    generator = torch.Generator().manual_seed(logit_seed)
    with torch.no_grad():
        for layer in mask_layers(model).values():
            logits = layer.maskllm_logits[adapter_name]
            logits.add_(torch.randn(logits.shape, generator=generator))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


# -- the checks ---------------------------------------------------------------------------------------------------
@CASES
def test_targets_every_linear_but_the_output_layer_and_masks_are_exact_n_m(case):
    model = adapted(case)
    layers = mask_layers(model)
    assert layers, "nothing was masked"
    base = model.get_base_model()
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for layer in layers.values():
        assert layer.get_base_layer() is not output
        assert_exact_n_m(layer.hard_mask("default"))
    # only the mask logits train; the base stays frozen
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".maskllm_logits." in n for n in trainable)


@CASES
def test_eval_forward_is_the_base_weight_times_the_hard_mask(case):
    """The masked model equals the dense model with ``W * hard_mask`` written into every target (reference)."""
    model = adapted(case)
    x = case.inputs(3)
    reference = case.factory(0)
    masks = hard_masks(model)
    with torch.no_grad():
        for name, mask in masks.items():
            module = reference.get_submodule(name)
            weight_out_in(module).mul_(mask)
    assert torch.allclose(out(model, x), out(reference, x), rtol=0, atol=1e-6)


@CASES
def test_save_load_round_trip_of_the_hard_mask(case, tmp_path):
    model = adapted(case)
    x = case.inputs(3)
    expected_masks, expected = hard_masks(model), out(model, x)
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(case.factory(0), tmp_path / "a").eval()
    got = hard_masks(loaded)
    assert got.keys() == expected_masks.keys()
    for name, mask in expected_masks.items():
        assert torch.equal(got[name], mask), name
        assert_exact_n_m(got[name])
    assert torch.equal(out(loaded, x), expected)
    # saving the loaded adapter again writes the same bytes
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    assert not (tmp_path / "b" / "adapter_model.bin").exists()


@CASES
def test_refused_load_leaves_the_base_untouched(case, tmp_path):
    adapted(case).save_pretrained(tmp_path / "a")
    other = case.factory(1)  # same architecture, other weights: the adapter was not made for it
    x = case.inputs(3)
    before, dense = snapshot(other), out(other, x)
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(other, tmp_path / "a")
    assert_plain(other)
    assert_same_state(other, before)
    assert torch.equal(out(other.eval(), x), dense)


@CASES
def test_merge_and_unload_writes_w_times_mask_and_equals_the_adapter_forward(case):
    model = adapted(case)
    x = case.inputs(3)
    masks, expected = hard_masks(model), out(model, x)
    original = {n: weight_out_in(layer.get_base_layer()).detach().clone() for n, layer in mask_layers(model).items()}
    merged = model.merge_and_unload()
    assert_plain(merged)
    for name, mask in masks.items():
        assert torch.equal(weight_out_in(merged.get_submodule(name)), original[name] * mask), name
    assert torch.allclose(out(merged, x), expected, rtol=0, atol=1e-6)


@CASES
def test_failed_safe_merge_leaves_the_model_exactly_as_it_was(case):
    model = adapted(case)
    x = case.inputs(3)
    last = list(mask_layers(model).values())[-1]
    with torch.no_grad():
        last.maskllm_logits["default"][0, 0] = float("nan")
    before, expected = snapshot(model), out(model, x)
    layers = mask_layers(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert mask_layers(model).keys() == layers.keys()
    assert not any(layer.merged for layer in mask_layers(model).values())
    assert_same_state(model, before)
    assert torch.equal(out(model, x), expected)


@CASES
def test_disable_adapter_gives_the_dense_model_and_re_enables(case):
    dense_model = case.factory(0)
    x = case.inputs(3)
    dense = out(dense_model, x)
    model = adapted(case)
    masked = out(model, x)
    assert not torch.allclose(masked, dense)
    with model.disable_adapter():
        assert torch.equal(out(model, x), dense)
    assert torch.equal(out(model, x), masked)


@CASES
def test_unload_returns_the_untouched_base(case):
    base = case.factory(0)
    x = case.inputs(3)
    before, dense = snapshot(base), out(base, x)
    model = adapted(case)
    model.eval()
    restored = model.unload()
    assert_plain(restored)
    assert_same_state(restored, before)
    assert torch.equal(out(restored, x), dense)


@CASES
def test_delete_adapter_removes_it_everywhere_and_keeps_the_other(case):
    model = adapted(case)
    x = case.inputs(3)
    expected = out(model, x)
    default_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    model.add_adapter("other", MaskConfig(**case.config_kwargs))
    scramble(model, "other", 7)
    model.set_adapter("other")
    model.eval()
    assert not torch.equal(out(model, x), expected)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for layer in mask_layers(model).values():
        assert "other" not in layer.maskllm_logits and "other" not in layer.maskllm_spec
    model.eval()
    assert torch.equal(out(model, x), expected)
    now = get_peft_model_state_dict(model)
    assert now.keys() == default_state.keys()
    assert all(torch.equal(now[k], v) for k, v in default_state.items())


@CASES
def test_get_and_set_peft_model_state_dict_round_trip(case):
    model = adapted(case)
    x = case.inputs(3)
    state = get_peft_model_state_dict(model)
    assert state and all(v.device.type == "cpu" for v in state.values())
    # the packed hard mask only: no float logits unless save_logits=True
    assert not any(k.endswith(".maskllm_logits") or ".maskllm_logits." in k for k in state)
    other = adapted(case, logit_seed=200)  # same base, other logits
    assert any(not torch.equal(hard_masks(other)[n], m) for n, m in hard_masks(model).items())
    result = set_peft_model_state_dict(other, state)
    assert not getattr(result, "unexpected_keys", [])
    other.eval()
    for name, mask in hard_masks(model).items():
        assert torch.equal(hard_masks(other)[name], mask), name
    assert torch.equal(out(other, x), out(model, x))


@CASES
def test_inject_adapter_in_model_is_refused_before_touching_the_model(case):
    """The schedule is shared state on the tuner; PEFT refuses ``inject_adapter_in_model`` for such methods."""
    base = case.factory(0)
    before = snapshot(base)
    with pytest.raises(ValueError, match="get_peft_model"):
        inject_adapter_in_model(MaskConfig(**case.config_kwargs), base)
    assert_plain(base)
    assert_same_state(base, before)


@CASES
def test_mixed_batch_rows_equal_their_own_adapter_forward(case):
    model = adapted(case, adapter_name="one")
    model.add_adapter("two", MaskConfig(**case.config_kwargs))
    scramble(model, "two", 7)
    model.eval()
    x = case.inputs(4)
    per_adapter = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        model.eval()
        per_adapter[name] = out(model, x)
    with model.disable_adapter():
        per_adapter["__base__"] = out(model, x)
    assert not torch.allclose(per_adapter["one"], per_adapter["two"])
    model.set_adapter("one")
    model.eval()
    rows = ["two", "one", "__base__", "two"]
    mixed = out(model, x, adapter_names=rows)
    for i, name in enumerate(rows):
        assert torch.allclose(mixed[i], per_adapter[name][i], rtol=0, atol=1e-5), (i, name)


@pytest.mark.parametrize("case", [c for c in TEST_CASES if c.name != "mlp"], ids=lambda c: c.name)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_mixed_adapter_names_equals_per_adapter_generate(case, num_beams):
    model = adapted(case, adapter_name="one")
    model.add_adapter("two", MaskConfig(**case.config_kwargs))
    scramble(model, "two", 7)
    model.eval()
    x = case.inputs(3)
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    per_adapter = {}
    with torch.no_grad():
        for name in ("one", "two"):
            model.set_adapter(name)
            per_adapter[name] = model.generate(input_ids=x, **settings)
        with model.disable_adapter():
            per_adapter["__base__"] = model.generate(input_ids=x, **settings)
        model.set_adapter("one")
        rows = ["two", "__base__", "one"]
        mixed = model.generate(input_ids=x, adapter_names=rows, **settings)
    assert not torch.equal(mixed, per_adapter["one"])  # the rows did not all use the active adapter
    for i, name in enumerate(rows):
        assert torch.equal(mixed[i], per_adapter[name][i]), (i, name)
