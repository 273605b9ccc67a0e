"""The shipped general mask (masks/smollm2-135m-instruct-c4-2of4): an exact 2:4 mask adapter of the shipped model
with its model card, found by shipped_general_mask()."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO_ROOT
from sparse_peft.adapter_io import load_mask_adapter
from sparse_peft.constants import SHIPPED_BASE_SOURCE
from sparse_peft.data import SHIPPED_GENERAL_MASK, shipped_general_mask
from sparse_peft.patterns import group_counts


def test_the_shipped_general_mask_is_an_exact_2_4_adapter_of_the_shipped_model_with_its_card():
    folder = Path(shipped_general_mask())
    assert folder == REPO_ROOT / "masks" / SHIPPED_GENERAL_MASK
    adapter = load_mask_adapter(folder)
    assert (adapter.n, adapter.m) == (2, 4)
    assert adapter.config["base_model_name_or_path"] == SHIPPED_BASE_SOURCE["hub_id"]
    assert not adapter.config["save_delta"]  # a general mask stands alone: task masks are deltas against it
    masks = adapter.masks()
    assert len(masks) == 30 * 7  # every attention and MLP linear of the 30 decoder blocks
    assert all((group_counts(mask, 4) == 2).all() for mask in masks.values())
    card = (folder / "README.md").read_text()
    assert f"base_model: {SHIPPED_BASE_SOURCE['hub_id']}" in card
    assert "layers with a valid 2:4 mask (exactly 2 kept in every group of 4): **210 of 210**" in card
    assert "sparse-peft learn --prior sparsegpt" in card  # the command that re-creates it
