"""Tests of the one-shot N:M pruners (magnitude, Wanda, SparseGPT) against by-hand reference computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    GPTNeoConfig,
    GPTNeoForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from conftest import AIDREAMS, LLAMA_TARGETS, tiny_gpt2, tiny_llama

from sparse_peft.data import calibration_from_texts
from sparse_peft.patterns import group_counts, topn_mask
from sparse_peft.pruners import PRIOR_METHODS, compute_prior_masks

VOCAB = 128


# ----------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------


def llama_targets(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name.split(".")[-1] in LLAMA_TARGETS]


def gpt2_targets(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``); a view of the data."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


def calibration(samples: int = 16, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(1))


class ToyBlock(nn.Module):
    """A one-linear "transformer block"."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.proj(hidden)


class ToyModel(nn.Module):
    """Embedding + one block; the embedding rows are strongly correlated (rank-4 signal plus small noise)."""

    def __init__(self, d_in: int = 32, d_out: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d_in)
        self.embed.weight.data = torch.randn(VOCAB, 4) @ torch.randn(4, d_in) + 0.1 * torch.randn(VOCAB, d_in)
        self.layers = nn.ModuleList([ToyBlock(d_in, d_out)])

    def forward(self, input_ids: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def toy_inputs(model: ToyModel, calib: torch.Tensor) -> torch.Tensor:
    """The layer inputs X, ``[tokens, in]``."""
    with torch.no_grad():
        return model.embed(calib).reshape(-1, model.embed.embedding_dim)


def linear_inputs(model: nn.Module, names: list[str], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the whole model once and record each named linear's inputs ``[tokens, in]``."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def wanda_by_hand(weight: torch.Tensor, inputs: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return topn_mask(weight.abs() * inputs.pow(2).sum(dim=0).sqrt(), n, m)


def naive_sparsegpt(
    weight: torch.Tensor, inputs: torch.Tensor, n: int, m: int, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unblocked float64 OBS: one column at a time, with the inverse of the remaining columns' Hessian."""
    w = weight.double().clone()
    x = inputs.double()
    hessian = 2 * x.T @ x / x.shape[0]
    hessian += percdamp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    columns = w.shape[1]
    # Inverse Hessian of the columns j.. that are still unpruned when column j is reached.
    remaining_inverse = [torch.linalg.inv(hessian[j:, j:]) for j in range(columns)]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for j in range(columns):
        if j % m == 0:
            obs_diag = torch.stack([remaining_inverse[k][0, 0] for k in range(j, j + m)])
            mask[:, j : j + m] = topn_mask(w[:, j : j + m] ** 2 / obs_diag, n, m)
        inverse = remaining_inverse[j]
        kept = w[:, j] * mask[:, j]
        w[:, j:] -= ((w[:, j] - kept) / inverse[0, 0])[:, None] * inverse[0][None, :]
        w[:, j] = kept
    return mask, w


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((inputs @ weight.T - inputs @ pruned.T) ** 2).sum())


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(50)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Exact N:M masks; magnitude by hand
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", PRIOR_METHODS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_every_mask_is_exactly_n_m(method, n, m):
    model = tiny_llama()
    names = llama_targets(model)
    masks = compute_prior_masks(model, method, n, m, names, calibration(), show_progress=False)
    modules = dict(model.named_modules())
    assert set(masks) == set(names)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == modules[name].weight.shape
        assert (group_counts(mask, m) == n).all(), name


def test_magnitude_is_top_n_of_abs_weight_per_group():
    model = tiny_llama()
    names = llama_targets(model)
    masks = compute_prior_masks(model, "magnitude", 2, 4, names)
    for name in names:
        groups = dict(model.named_modules())[name].weight.detach().abs().reshape(-1, 4)
        expected = torch.zeros_like(groups, dtype=torch.bool)
        expected.scatter_(1, groups.argsort(dim=1, descending=True)[:, :2], True)
        assert torch.equal(masks[name], expected.view_as(masks[name])), name


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Wanda and SparseGPT on a single layer
# ----------------------------------------------------------------------------------------------------------------


def test_wanda_equals_abs_weight_times_input_column_norm():
    model, calib = ToyModel(), calibration()
    masks = compute_prior_masks(model, "wanda", 2, 4, ["layers.0.proj"], calib, batch_size=5, show_progress=False)
    expected = wanda_by_hand(model.layers[0].proj.weight.detach(), toy_inputs(model, calib), 2, 4)
    assert torch.equal(masks["layers.0.proj"], expected)
    assert not torch.equal(expected, topn_mask(model.layers[0].proj.weight.detach().abs(), 2, 4))  # not magnitude


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    model, calib = ToyModel(), calibration()
    weight = model.layers[0].proj.weight.detach().clone()
    inputs = toy_inputs(model, calib)
    errors = {}
    for method in ("magnitude", "wanda"):
        mask = compute_prior_masks(model, method, 2, 4, ["layers.0.proj"], calib, show_progress=False)["layers.0.proj"]
        errors[method] = reconstruction_error(weight, weight * mask, inputs)
    compute_prior_masks(model, "sparsegpt", 2, 4, ["layers.0.proj"], calib, update_weights=True, show_progress=False)
    sparsegpt = reconstruction_error(weight, model.layers[0].proj.weight.detach(), inputs)
    assert sparsegpt < 0.5 * min(errors.values()), (sparsegpt, errors)


@pytest.mark.parametrize("blocksize", [8, 12, 128])
def test_blocked_sparsegpt_equals_naive_obs(blocksize):
    model, calib = ToyModel(), calibration()
    weight = model.layers[0].proj.weight.detach().clone()
    expected_mask, expected_weight = naive_sparsegpt(weight, toy_inputs(model, calib), 2, 4)
    masks = compute_prior_masks(
        model, "sparsegpt", 2, 4, ["layers.0.proj"], calib, update_weights=True, blocksize=blocksize,
        batch_size=3, show_progress=False,
    )
    assert torch.equal(masks["layers.0.proj"], expected_mask)
    # float32 vs float64: allow 1e-4 of the largest weight.
    scale = float(expected_weight.abs().max())
    torch.testing.assert_close(model.layers[0].proj.weight.detach(), expected_weight.float(), rtol=0, atol=1e-4 * scale)


# ----------------------------------------------------------------------------------------------------------------
# 5. Mask-only leaves the model alone; update_weights writes sparse weights
# ----------------------------------------------------------------------------------------------------------------


def test_mask_only_sparsegpt_leaves_model_bit_identical_and_restores_training_flag():
    model = tiny_llama()
    model.train()
    before = copy.deepcopy(model.state_dict())
    masks = compute_prior_masks(model, "sparsegpt", 2, 4, llama_targets(model), calibration(), show_progress=False)
    after = model.state_dict()
    assert set(masks) == set(llama_targets(model))
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(module.training for module in model.modules())


def test_mask_only_sparsegpt_mask_equals_updating_run_mask():
    model, calib = ToyModel(), calibration()
    mask_only = compute_prior_masks(model, "sparsegpt", 2, 4, ["layers.0.proj"], calib, show_progress=False)
    updated = compute_prior_masks(
        model, "sparsegpt", 2, 4, ["layers.0.proj"], calib, update_weights=True, show_progress=False
    )
    assert torch.equal(mask_only["layers.0.proj"], updated["layers.0.proj"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_weights_writes_n_m_sparse_weights_matching_the_mask(dtype):
    model = tiny_llama().to(dtype)
    names = llama_targets(model)
    before = copy.deepcopy(model.state_dict())
    masks = compute_prior_masks(
        model, "sparsegpt", 2, 4, names, calibration(), update_weights=True, show_progress=False
    )
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        assert weight.dtype == dtype
        assert torch.equal(weight != 0, masks[name]), name
        assert not torch.equal(weight, before[f"{name}.weight"] * masks[name])  # kept weights were updated
    untouched = [key for key in before if not any(key.startswith(f"{name}.") for name in names)]
    assert untouched and all(torch.equal(before[key], model.state_dict()[key]) for key in untouched)


# ----------------------------------------------------------------------------------------------------------------
# 6. Layer by layer: block 2 sees the pruned block 1
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "targets", "prefix"),
    [(tiny_llama, llama_targets, "model.layers"), (tiny_gpt2, gpt2_targets, "transformer.h")],
    ids=["llama", "gpt2"],
)
def test_second_block_is_pruned_from_the_pruned_first_blocks_outputs(build, targets, prefix):
    model, calib = build(), calibration()
    names = targets(model)
    first = [name for name in names if name.startswith(f"{prefix}.0.")]
    second = [name for name in names if name.startswith(f"{prefix}.1.")]
    masks = compute_prior_masks(model, "wanda", 2, 4, names, calib, batch_size=8, show_progress=False)

    modules = dict(model.named_modules())
    dense_inputs = linear_inputs(model, names, calib)
    expected_first = {name: wanda_by_hand(weight_out_in(modules[name]), dense_inputs[name], 2, 4) for name in first}
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in first:
            weight_out_in(pruned.get_submodule(name)).mul_(expected_first[name])
    pruned_inputs = linear_inputs(pruned, second, calib)
    expected_second = {name: wanda_by_hand(weight_out_in(modules[name]), pruned_inputs[name], 2, 4) for name in second}
    dense_second = {name: wanda_by_hand(weight_out_in(modules[name]), dense_inputs[name], 2, 4) for name in second}

    for name in first:
        assert torch.equal(masks[name], expected_first[name]), name
    for name in second:
        assert torch.equal(masks[name], expected_second[name]), name
    assert any(not torch.equal(masks[name], dense_second[name]) for name in second)  # the propagation matters


def test_gpt_neo_blocks_under_transformer_h():
    torch.manual_seed(0)
    config = GPTNeoConfig(
        hidden_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB, intermediate_size=128,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=64, window_size=16,
    )
    model = GPTNeoForCausalLM(config)
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith("transformer.h.") and isinstance(module, nn.Linear)
    ]
    for method in ("wanda", "sparsegpt"):
        masks = compute_prior_masks(model, method, 2, 4, names, calibration(), show_progress=False)
        assert set(masks) == set(names) and all((group_counts(mask, 4) == 2).all() for mask in masks.values())


# ----------------------------------------------------------------------------------------------------------------
# 7. Clear errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="magnitude, wanda, sparsegpt"):
        compute_prior_masks(ToyModel(), "obs", 2, 4, ["layers.0.proj"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_missing_calibration(method):
    with pytest.raises(ValueError, match="needs calibration"):
        compute_prior_masks(ToyModel(), method, 2, 4, ["layers.0.proj"])


@pytest.mark.parametrize(
    ("name", "message"), [("layers.0.nope", "not a module"), ("embed", "Embedding, not an nn.Linear or a GPT-2 Conv1D")]
)
def test_bad_target_name(name, message):
    with pytest.raises(ValueError, match=message):
        compute_prior_masks(ToyModel(), "magnitude", 2, 4, [name])


def test_in_features_not_divisible_by_m_names_the_module():
    with pytest.raises(ValueError, match=r"layers\.0\.proj.*not divisible by m=4"):
        compute_prior_masks(ToyModel(d_in=30), "magnitude", 2, 4, ["layers.0.proj"])


def test_update_weights_only_for_sparsegpt():
    with pytest.raises(ValueError, match="only defined for method='sparsegpt'"):
        compute_prior_masks(ToyModel(), "wanda", 2, 4, ["layers.0.proj"], calibration(), update_weights=True)


def test_blocksize_must_be_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of m=4"):
        compute_prior_masks(ToyModel(), "sparsegpt", 2, 4, ["layers.0.proj"], calibration(), blocksize=6)


def test_target_outside_the_blocks_needs_magnitude():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"lm_head.*method='magnitude'"):
        compute_prior_masks(model, "wanda", 2, 4, [*llama_targets(model), "lm_head"], calibration())
    assert "lm_head" in compute_prior_masks(model, "magnitude", 2, 4, ["lm_head"])


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 Conv1D: weights stored [in, out], masks returned [out, in]
# ----------------------------------------------------------------------------------------------------------------


def test_gpt2_conv1d_magnitude_mask_is_in_out_in_layout():
    model = tiny_gpt2()
    masks = compute_prior_masks(model, "magnitude", 2, 4, gpt2_targets(model))
    for name, mask in masks.items():
        assert torch.equal(mask, topn_mask(weight_out_in(model.get_submodule(name)).abs(), 2, 4)), name


def test_gpt2_conv1d_sparsegpt_mask_only_and_update():
    model, calib = tiny_gpt2(), calibration()
    names = gpt2_targets(model)
    before = copy.deepcopy(model.state_dict())
    mask_only = compute_prior_masks(model, "sparsegpt", 2, 4, names, calib, show_progress=False)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    masks = compute_prior_masks(model, "sparsegpt", 2, 4, names, calib, update_weights=True, show_progress=False)
    for name in names:
        weight = weight_out_in(model.get_submodule(name))
        assert masks[name].shape == weight.shape and (group_counts(masks[name], 4) == 2).all(), name
        assert torch.equal(weight != 0, masks[name]), name
    first_block = [name for name in names if name.startswith("transformer.h.0.")]
    assert all(torch.equal(mask_only[name], masks[name]) for name in first_block)  # same inputs, same OBS


# ----------------------------------------------------------------------------------------------------------------
# 8. Calibration windows
# ----------------------------------------------------------------------------------------------------------------


def test_calibration_windows_from_a_word_tokenizer():
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(7 * i + j) % 50}" for j in range(40)) for i in range(5)]
    corpus = tokenizer("\n\n".join(texts))["input_ids"]
    calib = calibration_from_texts(texts, tokenizer, num_samples=6, seq_len=16, seed=3)
    assert calib.shape == (6, 16) and calib.dtype == torch.long
    windows = {tuple(corpus[s : s + 16]) for s in range(len(corpus) - 15)}
    assert all(tuple(row) in windows for row in calib.tolist())
    assert torch.equal(calib, calibration_from_texts(texts, tokenizer, num_samples=6, seq_len=16, seed=3))
    assert not torch.equal(calib, calibration_from_texts(texts, tokenizer, num_samples=6, seq_len=16, seed=4))
    assert calibration_from_texts(texts, tokenizer, num_samples=2, seq_len=len(corpus)).tolist() == [corpus] * 2


def test_calibration_text_too_short():
    with pytest.raises(ValueError, match="too short: it has 3 tokens.*seq_len=4"):
        calibration_from_texts(["w1 w2", "w3"], word_tokenizer(), num_samples=1, seq_len=4)


@pytest.mark.skipif(not AIDREAMS.is_dir(), reason=f"local model assets not found at {AIDREAMS}")
def test_calibration_with_the_real_sentencepiece_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(AIDREAMS)
    texts = ["Once upon a time there was a little girl who loved to play in the park."] * 4
    calib = calibration_from_texts(texts, tokenizer, num_samples=3, seq_len=12, seed=0)
    assert calib.shape == (3, 12) and calib.dtype == torch.long
    assert int(calib.max()) < tokenizer.vocab_size


# ----------------------------------------------------------------------------------------------------------
# Priors through the PEFT API
# ----------------------------------------------------------------------------------------------------------


def test_prune_returns_an_adapter_that_is_exactly_the_one_shot_mask(tmp_path):
    import sparse_peft  # noqa: F401
    from peft import PeftModel

    from sparse_peft.layer import mask_layers
    from sparse_peft.oneshot import prune

    calibration = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    targets = [name for name, _ in tiny_llama().named_modules() if name.endswith("proj")]
    expected = compute_prior_masks(tiny_llama(), "sparsegpt", 2, 4, targets, calibration, show_progress=False)
    pruned = prune(tiny_llama(), "sparsegpt", calibration, show_progress=False)
    pruned.eval()
    pruned.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    for model in (pruned, loaded):
        layers = mask_layers(model)
        assert layers.keys() == expected.keys()
        assert all(torch.equal(layers[k].hard_mask("default").bool(), expected[k]) for k in expected)


def test_mask_config_prior_uses_the_one_shot_mask_through_the_prior_formula():
    import sparse_peft  # noqa: F401
    from peft import get_peft_model

    from sparse_peft import MaskConfig
    from sparse_peft.layer import mask_layers

    calibration = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    targets = [name for name, _ in tiny_llama().named_modules() if name.endswith("proj")]
    expected = compute_prior_masks(tiny_llama(), "wanda", 2, 4, targets, calibration, show_progress=False)
    model = get_peft_model(tiny_llama(), MaskConfig(prior="wanda", calibration=calibration, prior_strength=100.0))
    model.eval()
    layers = mask_layers(model)
    assert all(torch.equal(layers[k].hard_mask("default").bool(), expected[k]) for k in expected)
