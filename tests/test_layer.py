"""The masked layer inside a PEFT model: training vs eval masks, gradients, adapters, merging, dtypes."""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import LlamaForCausalLM

from conftest import LLAMA_TARGETS, tiny_gpt2, tiny_llama
from sparse_peft import MaskConfig, MaskedLinear
from sparse_peft.layer import set_soft_mask_memory
from sparse_peft.patterns import draw_seed, group_counts


def mask_layers(model):
    return [m for m in model.modules() if isinstance(m, MaskedLinear)]


def test_only_logits_are_trainable_and_cover_every_target():
    model = get_peft_model(tiny_llama(), MaskConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".maskllm_logits.default" in n for n in trainable)
    layers = mask_layers(model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    for layer in layers:
        out, inp = layer.weight_shape
        assert layer.maskllm_logits["default"].shape == (out * inp // 4, 6)
        assert layer.maskllm_logits["default"].dtype == torch.float32
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in trainable)


def test_gradients_reach_logits_never_weights(tokens):
    model = get_peft_model(tiny_llama(), MaskConfig())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    logits_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical
        else:
            assert not torch.equal(p, logits_before[n]), n


def test_train_mode_is_stochastic_eval_mode_is_hard_and_cached(tokens):
    model = get_peft_model(tiny_llama(), MaskConfig())
    layer = mask_layers(model)[0]
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=tokens).logits, model(input_ids=tokens).logits
    assert not torch.equal(a, b)  # fresh Gumbel sample per forward
    model.eval()
    with torch.no_grad():
        c, d = model(input_ids=tokens).logits, model(input_ids=tokens).logits
    assert torch.equal(c, d)
    mask = layer.hard_mask("default")
    assert mask is layer.hard_mask("default")  # cached
    assert (group_counts(mask, 4) == 2).all()
    # eval forward is exactly the base weight times the hard mask
    x = torch.randn(3, layer.weight_shape[1])
    expected = torch.nn.functional.linear(x, layer.base_weight() * mask)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # an optimizer step changes the logits in place: the cache must follow
    logits = layer.maskllm_logits["default"]
    with torch.no_grad():
        logits.copy_(torch.randn_like(logits))
    new_mask = layer.hard_mask("default")
    assert new_mask is not mask
    assert torch.equal(new_mask.view(-1, 4), torch.eye(6)[logits.argmax(-1)] @ torch.tensor(
        [[1., 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]))


def test_eval_mask_follows_updates_that_bypass_the_version_counter(tokens):
    """Fused optimizers update in place without bumping ``_version``; switching to eval must refresh the mask."""
    model = get_peft_model(tiny_llama(), MaskConfig())
    layer = mask_layers(model)[0]
    model.eval()
    stale = layer.hard_mask("default").clone()
    model.train()
    logits = layer.maskllm_logits["default"]
    version = logits._version
    logits.data.copy_(torch.randn_like(logits))
    assert logits._version == version
    model.eval()
    fresh = layer.hard_mask("default")
    assert not torch.equal(fresh, stale)
    from sparse_peft.patterns import candidate_patterns, hard_mask

    assert torch.equal(fresh, hard_mask(logits, candidate_patterns(2, 4)).view(layer.weight_shape))


def test_disable_adapters_gives_the_dense_model(tokens):
    base = tiny_llama()
    with torch.no_grad():
        dense = base(input_ids=tokens).logits
    model = get_peft_model(tiny_llama(), MaskConfig())
    with torch.no_grad():
        masked = model(input_ids=tokens).logits
        with model.disable_adapter():
            disabled = model(input_ids=tokens).logits
    assert torch.equal(disabled, dense)
    assert not torch.allclose(masked, dense)


def test_two_adapters_switch_delete_and_only_one_active(tokens):
    model = get_peft_model(tiny_llama(), MaskConfig())
    model.add_adapter("other", MaskConfig(prior="magnitude"))
    model.eval()
    with torch.no_grad():
        out_default = model(input_ids=tokens).logits
        model.set_adapter("other")
        out_other = model(input_ids=tokens).logits
        model.set_adapter("default")
        assert torch.equal(model(input_ids=tokens).logits, out_default)
    assert not torch.equal(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") for n in trainable)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one mask adapter|a weight takes one mask"):
        model(input_ids=tokens)
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert all("other" not in layer.maskllm_logits for layer in mask_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, out_default)


def test_merge_unmerge_and_merge_and_unload_equal_eval_forward(tokens):
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude"))
    model.eval()
    dense_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        model.merge_adapter()
        assert torch.equal(model(input_ids=tokens).logits, expected)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in dense_weights:
                assert torch.equal(p, dense_weights[n])
        merged = model.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM)
    assert not any(isinstance(m, MaskedLinear) for m in merged.modules())
    with torch.no_grad():
        assert torch.equal(merged(input_ids=tokens).logits, expected)
    for name, module in merged.named_modules():
        if name.split(".")[-1] in LLAMA_TARGETS:
            assert (group_counts(module.weight, 4) <= 2).all()  # physically 2:4 sparse
            assert (module.weight == 0).float().mean() >= 0.5


def test_unload_restores_the_dense_model(tokens):
    base = tiny_llama()
    with torch.no_grad():
        dense = base(input_ids=tokens).logits
    unloaded = get_peft_model(tiny_llama(), MaskConfig()).unload()
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=tokens).logits, dense)


def test_safe_merge_rejects_nan_logits():
    model = get_peft_model(tiny_llama(), MaskConfig())
    layer = mask_layers(model)[3]
    with torch.no_grad():
        layer.maskllm_logits["default"][5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.merge_and_unload(safe_merge=True)


def test_bf16_base_weights_keep_fp32_logits(tokens):
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, MaskConfig(prior="magnitude"))
    layer = mask_layers(model)[0]
    assert layer.maskllm_logits["default"].dtype == torch.float32
    assert layer.base_weight().dtype == torch.bfloat16
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert layer.maskllm_logits["default"].grad.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        out = model(input_ids=tokens).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        merged = model.merge_and_unload()
        assert torch.equal(merged(input_ids=tokens).logits, out)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_any_n_m_and_gpt2_conv1d(n, m, tokens):
    model = get_peft_model(tiny_gpt2(), MaskConfig(n=n, m=m))
    layers = mask_layers(model)
    names = {name.split(".")[-1] for name, mod in model.named_modules() if isinstance(mod, MaskedLinear)}
    assert names == {"c_attn", "c_proj", "c_fc"}
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        merged = model.merge_and_unload()
        assert torch.equal(merged(input_ids=tokens).logits, expected)
    for layer in layers:
        assert (group_counts(layer.hard_mask("default"), m) == n).all()
    c_fc = merged.transformer.h[0].mlp.c_fc.weight  # Conv1D: [in, out], groups run along dim 0
    assert (group_counts(c_fc.T, m) <= n).all()


def test_gradient_checkpointing_gives_the_same_gradients(tokens):
    def grads(checkpointing: bool, reentrant: bool = True):
        model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude"))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(123)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = grads(False)
    for reentrant in (True, False):
        loss, got = grads(True, reentrant)
        torch.testing.assert_close(loss, ref_loss)
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-8)


def test_checkpoint_recompute_leaves_no_stale_regulariser_in_the_reported_loss(tokens):
    """Recomputing a forward in backward records a penalty; once lambda is 0 it must not reach the next loss."""
    model = get_peft_model(tiny_llama(), MaskConfig(sparse_reg=1e-2))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()  # lambda > 0: the recompute records a penalty
    model.base_model.set_mask_schedule(1, 2)  # the last step: lambda = 0
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        losses.append(model(input_ids=tokens, labels=tokens).loss.detach())
    assert torch.equal(losses[0], losses[1])


@contextmanager
def straightforward_training_forward(penalties: list):
    """Swap the fused training forward for plain autograd: ``F.linear(x, W * soft_mask(seed), b)``.

    It draws its noise seed like the fused forward (same global RNG draws -> same Gumbel samples), adds no
    regulariser gradient and appends ``lam * ||W * mask||^2`` of each call to ``penalties`` instead.
    """
    def forward(self, x, adapter_name):
        weight = self.base_weight()
        masked = weight * self.soft_mask(adapter_name, seed=draw_seed()).to(weight.dtype)
        penalties.append(self.maskllm_spec[adapter_name].schedule.sparse_reg * masked.float().square().sum())
        return F.linear(x.to(weight.dtype), masked, self.get_base_layer().bias)

    original = MaskedLinear._train_forward
    MaskedLinear._train_forward = forward
    try:
        yield
    finally:
        MaskedLinear._train_forward = original


def loss_and_grads(model, tokens, seed=7):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_match(got: torch.Tensor, ref: torch.Tensor, low_precision: bool) -> None:
    if low_precision:  # bf16 weights: elementwise rounding noise, so compare the whole gradient
        assert (got - ref).norm() <= 1e-2 * ref.norm()
    else:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    "make, recompute, autocast",
    [
        (tiny_llama, True, False),
        (tiny_llama, False, False),
        (tiny_gpt2, True, False),  # Conv1D: [in, out] weights, with biases
        (lambda: tiny_llama().to(torch.bfloat16), True, False),  # bf16 weights, fp32 logits
        (tiny_llama, True, True),  # fp32 weights under bf16 autocast
    ],
    ids=["llama", "llama-saved-probs", "gpt2-conv1d", "llama-bf16", "llama-autocast-bf16"],
)
def test_fused_training_forward_matches_straightforward_autograd(make, recompute, autocast, tokens, soft_mask_path):
    """Same seed -> same loss (task - lambda * sum ||W * mask||^2) and same logit gradients as plain autograd."""
    lam = 1e-2
    model = get_peft_model(make(), MaskConfig(sparse_reg=lam, prior="magnitude"))
    set_soft_mask_memory(model, recompute=recompute)
    model.train()

    def context():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    with context():
        loss, got = loss_and_grads(model, tokens)
    low_precision = autocast or mask_layers(model)[0].base_weight().dtype == torch.bfloat16

    penalties = []
    with straightforward_training_forward(penalties), context():
        task, _ = loss_and_grads(model, tokens)  # reported loss = task loss: no penalty was recorded
        model.zero_grad()
        penalties.clear()
        torch.manual_seed(7)
        reference = model(input_ids=tokens, labels=tokens).loss - torch.stack(penalties).sum()
        reference.backward()
    torch.testing.assert_close(loss, reference.detach().to(loss.dtype), rtol=1e-2 if low_precision else 1e-5, atol=0)
    assert not torch.equal(loss, task)  # the regulariser is in the reported loss
    for name, grad in got.items():
        assert_grads_match(grad, dict(model.named_parameters())[name].grad, low_precision)


def test_frozen_base_weight_is_required_in_training(tokens):
    model = get_peft_model(tiny_llama(), MaskConfig())
    layer = mask_layers(model)[0]
    layer.get_base_layer().weight.requires_grad_(True)
    model.train()
    with pytest.raises(ValueError, match="requires grad.*requires_grad_\\(False\\)"):
        model(input_ids=tokens)


def test_lm_head_and_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="lm_head.*never masked"):
        get_peft_model(tiny_llama(), MaskConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="Embedding"):
        get_peft_model(tiny_llama(), MaskConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="not divisible by m=8"):
        narrow = tiny_llama(hidden_size=36, num_attention_heads=2, num_key_value_heads=2, intermediate_size=72)
        get_peft_model(narrow, MaskConfig(m=8, n=2))
    model = get_peft_model(tiny_llama(), MaskConfig(target_modules="all-linear"))
    assert len(mask_layers(model)) == 14  # every linear but lm_head
