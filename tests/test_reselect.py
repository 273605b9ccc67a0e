"""Task re-selection of a general mask (MaskConfig.prior_reselect): the selection rule against a reference, the
calibration statistics against the model's own hidden states, and the prior a task adapter starts from."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import identical, snapshot, tiny_llama
from sparse_peft import MaskConfig
from sparse_peft.patterns import group_counts, topn_mask
from sparse_peft.pruners import compute_prior_masks
from sparse_peft.reselect import input_column_norms, reselect_masks
from test_save_load import hard_masks, trained_adapter


def reference_reselect(general, task, score, fraction):
    """Group by group in Python: the differing groups sorted by gain, the first floor(fraction * count) switched."""
    g, t, s = general.reshape(-1, 4), task.reshape(-1, 4), score.reshape(-1, 4)
    differing = [i for i in range(g.shape[0]) if not torch.equal(g[i], t[i])]
    gains = {i: float((s[i] * t[i]).sum() - (s[i] * g[i]).sum()) for i in differing}
    switched = sorted(differing, key=lambda i: -gains[i])[: int(fraction * len(differing))]
    out = g.clone()
    for i in switched:
        out[i] = t[i]
    return out.reshape(general.shape), gains, set(switched)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_reselect_switches_the_differing_groups_that_gain_most(fraction):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=gen)
    general = topn_mask(torch.rand(16, 32, generator=gen), 2, 4)
    task = topn_mask(torch.rand(16, 32, generator=gen), 2, 4)
    score = weight.abs() * torch.rand(32, generator=gen)
    result = reselect_masks(general, task, score, 4, fraction)
    expected, gains, switched = reference_reselect(general, task, score, fraction)
    assert torch.equal(result, expected)
    assert (group_counts(result, 4) == 2).all()  # still exactly 2:4
    assert len(gains) > 20 and len(switched) == int(fraction * len(gains))
    if 0 < len(switched) < len(gains):  # every switched group gains at least as much as every kept differing one
        assert min(gains[i] for i in switched) >= max(gains[i] for i in gains if i not in switched)
    if fraction == 0.0:
        assert torch.equal(result, general)
    if fraction == 1.0:
        assert torch.equal(result, task)


def test_input_column_norms_match_the_models_hidden_states(tokens):
    model = tiny_llama(0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    norms = input_column_norms(model, names, tokens, batch_size=1)
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
        for i, name in enumerate(names):
            x = model.model.layers[i].input_layernorm(hidden[i]).reshape(-1, hidden[i].shape[-1])
            torch.testing.assert_close(norms[name], x.norm(dim=0), rtol=1e-5, atol=1e-6)


def test_task_adapter_starts_from_the_reselected_general_mask(tmp_path, tokens):
    general_model = trained_adapter(tmp_path / "general")
    general = hard_masks(general_model)
    names = list(general)
    plain = [n.removeprefix("base_model.model.") for n in names]
    task = compute_prior_masks(tiny_llama(0), "sparsegpt", 2, 4, plain, calibration=tokens)
    norms = input_column_norms(tiny_llama(0), plain, tokens)
    config = MaskConfig(prior=str(tmp_path / "general"), prior_reselect=0.5, calibration=tokens)
    model = get_peft_model(tiny_llama(0), config)
    masks = hard_masks(model)
    switched = 0
    for name, p in zip(names, plain):
        weight = tiny_llama(0).get_submodule(p).weight.detach()
        assert torch.equal(model.get_base_model().get_submodule(p).base_layer.weight, weight)  # left as it was
        expected = reselect_masks(general[name], task[p], weight.abs() * norms[p], 4, 0.5)
        assert torch.equal(masks[name], expected), name
        switched += int((masks[name] != general[name]).reshape(-1, 4).any(dim=1).sum())
    assert switched > 0
    # saved as a delta against the general mask, reloaded exactly
    model.save_pretrained(tmp_path / "task")
    assert MaskConfig.from_pretrained(tmp_path / "task").save_delta
    again = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "task")
    assert all(torch.equal(hard_masks(again)[k], v) for k, v in masks.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prior="sparsegpt", prior_reselect=0.5), "not a saved mask adapter"),
        (dict(prior_reselect=0.5), "not a saved mask adapter"),
        (dict(prior="general", prior_reselect=1.5), r"in \[0, 1\]"),
        (dict(prior="general", prior_reselect=float("nan")), r"in \[0, 1\]"),
        (dict(prior="general", prior_reselect=True), r"in \[0, 1\]"),
    ],
)
def test_bad_prior_reselect_is_refused_naming_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_reselect_without_calibration_names_the_fix(tmp_path, monkeypatch):
    trained_adapter(tmp_path / "general")
    base = tiny_llama(0)
    before = snapshot(base)
    config = MaskConfig(prior="general", prior_reselect=0.5)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="pass calibration=token_ids"):
        get_peft_model(base, config)
    assert all(identical(v, before[k]) for k, v in snapshot(base).items())
    assert (config.prior, config.prior_sha256, config.save_delta) == ("general", None, None)  # nothing recorded


def test_a_failed_reselect_leaves_a_peft_model_as_it_was(tmp_path, tokens):
    trained_adapter(tmp_path / "general")
    model = get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "general"))).eval()  # the hard mask
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    before = snapshot(model)
    with pytest.raises(ValueError, match="pass calibration=token_ids"):
        model.add_adapter("task", MaskConfig(prior=str(tmp_path / "general"), prior_reselect=0.5))
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert snapshot(model).keys() == before.keys() and all(identical(v, before[k]) for k, v in snapshot(model).items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, expected)
