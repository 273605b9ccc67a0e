"""Mask adapters with a low-rank update (``MaskConfig(lora_rank=r)``): the EoRA-style initialisation against
reference computations, gradients against plain autograd, merging that stays exactly N:M, save / load contracts."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from conftest import tiny_gpt2, tiny_llama
from sparse_peft import MaskConfig, MaskedLinear
from sparse_peft.layer import mask_layers
from sparse_peft.lowrank_init import AUTO_SCALES, scale_update_to_calibration
from sparse_peft.lowrank import (
    calibrated_factors,
    lowrank_factors,
    masked_least_squares_update,
    output_error,
    refit_masked_b,
)
from sparse_peft.patterns import draw_seed, is_n_m_sparse, topn_mask


def layer_problem(out=24, inn=32, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inn, generator=g)
    x = torch.randn(tokens, inn, generator=g) @ torch.randn(inn, inn, generator=g)  # correlated inputs
    return weight, x, topn_mask(weight.abs(), 2, 4).float()


def explicit_error(weight, effective, x):
    """``||(W - W_eff) X^T||_F^2`` computed from the inputs themselves (not from ``H``)."""
    return float(((weight - effective).detach().double() @ x.double().T).square().sum())


def test_dense_residual_factors_are_the_eckart_young_optimum():
    weight, x, mask = layer_problem()
    error = weight - weight * mask
    for rank in (1, 4, 8):
        b, a = lowrank_factors(error, x.T @ x, rank, damp=0.0)
        tail = torch.linalg.svdvals((error @ x.T).double())[rank:].square().sum()
        got = explicit_error(weight, weight * mask + b @ a, x)
        assert got == pytest.approx(float(tail), rel=1e-6)
        assert b.shape == (24, rank) and a.shape == (rank, 32)


def test_masked_least_squares_update_matches_per_row_lstsq():
    weight, x, mask = layer_problem()
    update = masked_least_squares_update(weight, mask, x.T @ x, damp=0.0, rtol=1e-6)
    assert torch.all(update[mask == 0] == 0)
    for row in range(weight.shape[0]):
        kept = mask[row].bool()
        target = x[:, ~kept].double() @ weight[row, ~kept].double()
        reference = torch.linalg.lstsq(x[:, kept].double(), target[:, None]).solution.squeeze(1)
        torch.testing.assert_close(update[row, kept].double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rtol", [1e-1, 1e-2, 1e-3])
def test_masked_least_squares_update_stops_at_the_relative_residual(rtol):
    """Every row's normal-equation residual ``||H_SS d_S - H_SP w_P||`` is at most ``rtol`` of its right-hand side,
    and a looser tolerance is a worse fit: the solver stops where it says, not before nor much later."""
    weight, x, mask = layer_problem(out=40, inn=64, tokens=400)
    h = (x.T @ x).double()
    update = masked_least_squares_update(weight, mask, x.T @ x, damp=0.0, rtol=rtol).double()
    worst = 0.0
    for row in range(weight.shape[0]):
        kept = mask[row].bool()
        rhs = h[kept][:, ~kept] @ weight[row, ~kept].double()
        worst = max(worst, float((h[kept][:, kept] @ update[row, kept] - rhs).norm() / rhs.norm()))
    assert worst <= rtol * (1 + 1e-3)
    assert worst > rtol / 100  # not solved far past the tolerance it was given


def test_masked_least_squares_update_warns_when_it_runs_out_of_iterations():
    weight, x, mask = layer_problem()
    with pytest.warns(UserWarning, match="2 iterations left a relative residual.*raise max_iter"):
        masked_least_squares_update(weight, mask, x.T @ x, damp=0.0, rtol=1e-8, max_iter=2)


def test_refit_masked_b_matches_per_row_lstsq():
    weight, x, mask = layer_problem()
    target = weight - weight * mask
    a = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(2))
    b = refit_masked_b(target, mask, a, x.T @ x, damp=0.0, rows_per_chunk=5)
    for row in range(weight.shape[0]):
        design = x.double() @ (a.double() * mask[row].double()).T  # [tokens, r]: what row i's b_i multiplies
        reference = torch.linalg.lstsq(design, (x.double() @ target[row].double())[:, None]).solution.squeeze(1)
        torch.testing.assert_close(b[row].double(), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("placement", ["under_mask", "dense_residual"])
def test_calibrated_factors_reduce_the_layer_output_error(placement):
    weight, x, mask = layer_problem()
    none = explicit_error(weight, weight * mask, x)
    errors = []
    for rank in (2, 8):
        b, a = calibrated_factors(weight, mask, x.T @ x, rank, placement, damp=0.0)
        effective = (weight + b @ a) * mask if placement == "under_mask" else weight * mask + b @ a
        errors.append(explicit_error(weight, effective, x))
        assert output_error(weight, effective, x.T @ x) == pytest.approx(errors[-1], rel=1e-6)
    assert none > errors[0] > errors[1]
    if placement == "under_mask":  # no rank-r update beats the best full-rank change of the kept weights
        best = masked_least_squares_update(weight, mask, x.T @ x, 0.0, rtol=1e-6)
        full = explicit_error(weight, (weight + best) * mask, x)
        assert errors[1] >= full * (1 - 1e-6)


def layer_inputs(model, tokens):
    """``{layer: [tokens, in]}`` inputs of every mask layer in one eval forward."""
    inputs, handles = {}, []

    def record(module, args, output):
        inputs[module] = args[0].reshape(-1, args[0].shape[-1])

    for layer in model.modules():
        if isinstance(layer, MaskedLinear):
            handles.append(layer.register_forward_hook(record))
    model.eval()
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("placement", ["under_mask", "dense_residual"])
def test_eora_init_on_a_model_reduces_every_layers_output_error(placement):
    """Sequential: each layer's update was fitted to the inputs it gets in the finished model (the layers before it
    corrected), and on those inputs its output error is below that of the same mask without the update."""
    calibration = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    config = MaskConfig(prior="magnitude", lora_rank=4, lora_placement=placement, init_lora_weights="eora",
                        calibration=calibration, eora_scale=1.0)
    model = get_peft_model(tiny_llama(), config)
    inputs = layer_inputs(model, calibration)
    assert len(inputs) == 14
    for name, layer in mask_layers(model).items():
        x, weight, mask = inputs[layer], layer.base_weight(), layer.hard_mask("default")
        lora_a, lora_b, scale = layer.lowrank("default")
        assert lora_b.abs().sum() > 0, name
        if placement == "under_mask":
            effective = layer.effective_weight("default")
        else:
            effective = weight * mask + scale * lora_b @ lora_a
        assert explicit_error(weight, effective, x) < explicit_error(weight, weight * mask, x), name


def eora_updates(scale, calibration):
    torch.manual_seed(0)  # the same initial logits, so the same hard mask and fit
    config = MaskConfig(prior="magnitude", lora_rank=4, init_lora_weights="eora", calibration=calibration,
                        eora_scale=scale)
    model = get_peft_model(tiny_llama(), config)
    return model, {name: layer.lowrank("default")[1].detach().clone() for name, layer in mask_layers(model).items()}


def test_eora_scale_multiplies_the_fit_and_auto_picks_the_factor_closest_to_dense():
    """``eora_scale=0.5`` is half the fit's ``B``; ``"auto"`` is the factor of ``AUTO_SCALES`` whose last hidden
    states on the calibration tokens are nearest the dense model's, recomputed here through PEFT's
    ``disable_adapter``."""
    calibration = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(3))
    model, fitted = eora_updates(1.0, calibration)
    half = eora_updates(0.5, calibration)[1]
    assert half.keys() == fitted.keys() and all(torch.equal(b, fitted[name] * 0.5) for name, b in half.items())
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        dense = model(input_ids=calibration, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for factor in AUTO_SCALES:
        with torch.no_grad():
            for name, layer in mask_layers(model).items():
                layer.lowrank("default")[1].copy_(fitted[name] * factor)
            hidden = model(input_ids=calibration, output_hidden_states=True).hidden_states[-1]
        errors[factor] = (hidden - dense).double().square().sum().item()
    assert len({round(e, 6) for e in errors.values()}) == len(AUTO_SCALES)  # the choice is not a tie
    best = min(errors, key=errors.get)
    auto = eora_updates("auto", calibration)[1]
    assert all(torch.equal(b, fitted[name] * best) for name, b in auto.items()), (best, errors)
    assert scale_update_to_calibration(model, "default", calibration, 0.25) == 0.25  # one factor: just applied
    assert all(torch.equal(layer.lowrank("default")[1], fitted[name] * 0.25)
               for name, layer in mask_layers(model).items())


def test_a_failed_scale_choice_leaves_every_update_as_it_was(monkeypatch):
    from sparse_peft import lowrank_init

    calibration = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(3))
    model, fitted = eora_updates(1.0, calibration)
    calls = []

    def failing(module, batch):  # the dense forward and two factors' succeed, then one fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(module, batch)

    original = lowrank_init._last_hidden
    monkeypatch.setattr(lowrank_init, "_last_hidden", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        scale_update_to_calibration(model, "default", calibration)
    assert all(torch.equal(layer.lowrank("default")[1], fitted[name]) for name, layer in mask_layers(model).items())


def test_a_frozen_one_shot_mask_is_the_pruners_own():
    """``train_mask=False`` with a one-shot prior keeps exactly the pruner's mask: the prior formula's random part
    (on by default for a one-shot prior whose mask trains) would freeze a perturbed mask instead."""
    from sparse_peft.oneshot import prune

    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    pruned = {name: layer.hard_mask("default").clone()
              for name, layer in mask_layers(prune(tiny_llama(), "sparsegpt", calibration,
                                                   show_progress=False)).items()}
    cases = [(dict(train_mask=False, lora_rank=2), True),  # frozen: exactly SparseGPT's mask
             (dict(train_mask=False, lora_rank=2, prior_noise=True), False),  # asked for: perturbed
             (dict(), False)]  # a mask that trains starts from the paper's noisy formula
    for kwargs, same in cases:
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), MaskConfig(prior="sparsegpt", calibration=calibration, **kwargs))
        masks = {name: layer.hard_mask("default") for name, layer in mask_layers(model).items()}
        assert all(torch.equal(masks[name], mask) for name, mask in pruned.items()) is same, kwargs


def test_eora_init_groups_layers_by_their_shared_input(monkeypatch):
    """Llama: q/k/v, o, gate/up and down are fitted in that order, each group from one pass of its block."""
    from sparse_peft import lowrank_init

    groups = []
    original = lowrank_init._next_input_group

    def spy(block, remaining, inputs):
        group, hessians = original(block, remaining, inputs)
        groups.append([name.rsplit(".", 1)[-1] for name in group])
        return group, hessians

    monkeypatch.setattr(lowrank_init, "_next_input_group", spy)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", lora_rank=2, init_lora_weights="eora",
                                            calibration=calibration))
    block = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert groups == block + block


def test_eora_without_calibration_is_refused_before_anything_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration=token_ids"):
        get_peft_model(model, MaskConfig(lora_rank=4, init_lora_weights="eora"))
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_rank=4, lora_placement="beside"), "lora_placement"),
        (dict(lora_rank=4, init_lora_weights="pissa"), "init_lora_weights"),
        (dict(lora_rank=4, lora_save_dtype="float16"), "lora_save_dtype"),
        (dict(train_mask=False), "lora_rank > 0"),
        (dict(lora_rank=4, lora_alpha=0), "lora_alpha"),
        (dict(init_lora_weights="eora"), "lora_rank > 0"),
        (dict(lora_rank=4, eora_scale="best"), "eora_scale"),
        (dict(lora_rank=4, eora_scale=-0.5), "eora_scale"),
        (dict(lora_rank=4, eora_scale=float("inf")), "eora_scale"),
        (dict(lora_rank=4, eora_scale=True), "eora_scale"),
    ],
)
def test_bad_lowrank_options_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskConfig(**kwargs)


def nonzero_update_model(make=tiny_llama, **kwargs):
    """A mask model whose update starts non-zero (``init_lora_weights=False``), so every gradient is non-trivial."""
    torch.manual_seed(0)
    config = MaskConfig(prior="magnitude", lora_rank=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    return get_peft_model(make(), config)


def reference_forward(self, x, adapter_name):
    """Plain autograd: ``F.linear(x, (W + s B A) * soft_mask(seed))`` (under the mask) or ``W * soft_mask`` plus
    ``s (x A^T) B^T`` (dense residual), with the seed drawn like the fused forward."""
    weight = self.base_weight()
    lora_a, lora_b, scale = self.lowrank(adapter_name)
    soft = self.soft_mask(adapter_name, seed=draw_seed()).to(weight.dtype)
    if self.maskllm_spec[adapter_name].placement == "under_mask":
        return F.linear(x, (weight + scale * lora_b @ lora_a) * soft, self.get_base_layer().bias)
    return F.linear(x, weight * soft, self.get_base_layer().bias) + scale * (x @ lora_a.T) @ lora_b.T


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("placement", ["under_mask", "dense_residual"])
def test_training_gradients_match_plain_autograd(make, placement, tokens, monkeypatch):
    model = nonzero_update_model(make, lora_placement=placement, sparse_reg=0.0)
    model.train()

    def grads():
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, got = grads()
    assert {n.rsplit(".", 2)[-2] for n in got} == {"maskllm_logits", "maskllm_lora_A", "maskllm_lora_B"}
    monkeypatch.setattr(MaskedLinear, "_train_forward", reference_forward)
    ref_loss, reference = grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, grad in got.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5 * float(reference[name].abs().max()))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_merge_with_an_update_is_exactly_n_m_and_equals_the_eval_forward(make, tokens):
    model = nonzero_update_model(make)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    names = list(mask_layers(model))
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, rtol=1e-5, atol=1e-6)
    for name in names:
        module = merged.get_submodule(name)
        weight = module.weight.T if make is tiny_gpt2 else module.weight
        assert is_n_m_sparse(weight, 2, 4), name


def test_unmerge_restores_the_dense_weight_bit_for_bit(tokens):
    model = nonzero_update_model()
    dense = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    model.unmerge_adapter()
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_dense_residual_refuses_to_merge_and_leaves_the_model_as_it_was(tokens):
    model = nonzero_update_model(lora_placement="dense_residual")
    model.eval()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="under_mask"):
        model.merge_and_unload()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "base_layer" in n)
    assert not any(layer.merged for layer in mask_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)


def files_of(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("placement", ["under_mask", "dense_residual"])
def test_save_load_round_trip_is_bit_exact(dtype, placement, tmp_path, tokens):
    model = nonzero_update_model(lora_placement=placement, lora_save_dtype=dtype)
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    for (_, layer), (_, again) in zip(mask_layers(model).items(), mask_layers(loaded).items()):
        for saved, read in zip(layer.lowrank("default")[:2], again.lowrank("default")[:2]):
            assert read.dtype == torch.float32 and not read.requires_grad
            assert torch.equal(read, saved.detach().to(getattr(torch, dtype)).float())
        with torch.no_grad():  # the original, with its update rounded as saved, gives the same forward
            for saved in layer.lowrank("default")[:2]:
                saved.copy_(saved.to(getattr(torch, dtype)).float())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, loaded(input_ids=tokens).logits)


def test_update_is_saved_at_two_bytes_per_value_in_bf16(tmp_path):
    from safetensors.torch import load_file

    model = nonzero_update_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    updates = {k: v for k, v in saved.items() if ".maskllm_lora_" in k}
    assert len(updates) == 2 * len(mask_layers(model))
    assert all(v.dtype == torch.bfloat16 for v in updates.values())


def test_inference_mode_freezes_the_update_and_is_trainable_trains_it(tmp_path):
    nonzero_update_model().save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    kinds = {n.rsplit(".", 2)[-2] for n, p in trainable.named_parameters() if p.requires_grad}
    assert kinds == {"maskllm_logits", "maskllm_lora_A", "maskllm_lora_B"}


def test_a_file_without_the_update_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    nonzero_update_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if ".maskllm_lora_" not in k}, path)
    with pytest.raises(ValueError, match="maskllm_lora_A"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_file_whose_update_has_another_rank_is_refused_and_the_base_stays_as_it_was(tmp_path):
    nonzero_update_model().save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "lora_rank": 2}))
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"has shape \(4, .*lora_rank=2"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, MaskedLinear) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_wrong_base_is_refused_with_an_update(tmp_path):
    nonzero_update_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base"):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)


def test_frozen_mask_trains_only_the_update_through_the_hard_mask(tokens):
    model = nonzero_update_model(train_mask=False)
    model.train()
    layer = next(iter(mask_layers(model).values()))
    mask = layer.hard_mask("default").clone()
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"maskllm_lora_A", "maskllm_lora_B"}
    outputs = [model(input_ids=tokens, labels=tokens).loss for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])  # the hard mask: no sampling noise
    outputs[0].backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(layer.hard_mask("default"), mask)
    assert layer.maskllm_lora_B["default"].grad is not None
    assert is_n_m_sparse(layer.effective_weight("default").detach(), 2, 4)
    assert "frozen 2:4 mask" in model.base_model.trainable_parameters_summary()


def test_adapters_with_and_without_update_switch_and_delete(tokens):
    model = nonzero_update_model()
    model.add_adapter("plain", MaskConfig(prior="magnitude"))
    model.eval()
    with torch.no_grad():
        with_update = model(input_ids=tokens).logits
        model.set_adapter("plain")
        plain = model(input_ids=tokens).logits
        model.set_adapter("default")
        assert torch.equal(model(input_ids=tokens).logits, with_update)
    assert not torch.equal(with_update, plain)
    model.set_adapter("plain")
    model.delete_adapter("default")
    layer = next(iter(mask_layers(model).values()))
    assert "default" not in layer.maskllm_lora_A and "default" not in layer.maskllm_lora_B


def test_delta_coded_task_adapter_keeps_its_update(tmp_path, tokens):
    get_peft_model(tiny_llama(), MaskConfig(prior="magnitude")).save_pretrained(tmp_path / "general")
    task = get_peft_model(tiny_llama(), MaskConfig(prior=str(tmp_path / "general"), lora_rank=4,
                                                   init_lora_weights=False))
    assert task.peft_config["default"].save_delta
    task.save_pretrained(tmp_path / "task")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "task")
    for (_, layer), (_, again) in zip(mask_layers(task).items(), mask_layers(loaded).items()):
        assert torch.equal(again.lowrank("default")[1], layer.lowrank("default")[1].detach().bfloat16().float())
        assert torch.equal(again.hard_mask("default"), layer.hard_mask("default"))


def test_mixed_adapter_batch_applies_each_rows_update(tokens):
    model = nonzero_update_model(lora_placement="dense_residual")
    model.add_adapter("under", MaskConfig(prior="magnitude", lora_rank=2, init_lora_weights=False))
    model.eval()
    expected = []
    with torch.no_grad():
        for name in ("default", "under"):
            model.set_adapter(name)
            expected.append(model(input_ids=tokens[:1]).logits)
        with model.disable_adapter():
            expected.append(model(input_ids=tokens[1:]).logits)
        mixed = model(input_ids=torch.cat([tokens[:1], tokens[:1], tokens[1:]]),
                      adapter_names=["default", "under", "__base__"]).logits
    for row, reference in enumerate(expected):
        torch.testing.assert_close(mixed[row : row + 1], reference, rtol=1e-5, atol=1e-6)
