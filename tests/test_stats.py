"""Mask statistics against direct computations."""

import pytest
import torch
from peft import get_peft_model

from conftest import tiny_llama
from sparse_peft import MaskConfig, MaskedLinear, mask_stats
from sparse_peft.patterns import topn_mask
from sparse_peft.stats import format_stats


def test_stats_of_a_model_and_against_its_saved_prior(tmp_path):
    general = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude"))
    general.eval()
    general.save_pretrained(tmp_path / "general")
    base = tiny_llama()
    torch.manual_seed(1)
    task = get_peft_model(base, MaskConfig(prior=str(tmp_path / "general")))
    with torch.no_grad():  # a task mask starts at its general mask; move ~5% of its groups off it, as training does
        for p in task.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.01)
    task.eval()
    rows = mask_stats(task, str(tmp_path / "general"))
    layers = {n: m for n, m in task.named_modules() if isinstance(m, MaskedLinear)}
    assert len(rows) == len(layers)
    general_layers = {n: m for n, m in general.named_modules() if isinstance(m, MaskedLinear)}
    for row in rows:
        key = "base_model.model." + row.name
        mask = layers[key].hard_mask("default").bool()
        ref = general_layers[key].hard_mask("default").bool()
        assert row.valid_n_m and row.sparsity == pytest.approx(0.5)
        assert row.hamming == int((mask != ref).sum())
        assert row.groups_changed == int((mask != ref).view(-1, 4).any(-1).sum())
        assert row.agreement == pytest.approx(1 - row.hamming / mask.numel())
    assert 0 < sum(r.groups_changed for r in rows)  # the ~5% of groups moved elsewhere
    table = format_stats(rows)
    assert table.splitlines()[0].startswith("| layer |") and len(table.splitlines()) == len(rows) + 2


def test_invalid_masks_are_reported():
    good = topn_mask(torch.randn(4, 8), 2, 4)
    bad = good.clone()
    bad[0, :4] = True
    rows = mask_stats({"good": good, "bad": bad}, n=2, m=4)
    assert {r.name: r.valid_n_m for r in rows} == {"bad": False, "good": True}
    assert {r.name: r.sparsity for r in rows}["bad"] == pytest.approx(1 - 18 / 32)
    with pytest.raises(ValueError, match="Pass n= and m="):
        mask_stats({"good": good})
