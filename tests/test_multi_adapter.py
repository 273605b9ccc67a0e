"""Many task adapters on one base model: shared weights, memory per adapter, switching equals separate loading."""

import pytest
import torch
from peft import PeftModel

from conftest import tiny_llama
from sparse_peft import MaskedLinear
from sparse_peft.patterns import num_candidates
from test_save_load import trained_adapter

TASKS = ("a", "b", "c")


def tensor_bytes(model):
    """Bytes of all parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def test_many_adapters_share_the_base_and_switch_exactly(tmp_path, tokens):
    for i, task in enumerate(TASKS):
        trained_adapter(tmp_path / task, noise_seed=i)
    base = tiny_llama(0)
    base_weights = {n: p.data_ptr() for n, p in base.named_parameters()}
    dense_bytes = tensor_bytes(base)
    model = PeftModel.from_pretrained(base, tmp_path / TASKS[0], adapter_name=TASKS[0])
    one_adapter = tensor_bytes(model) - dense_bytes
    for task in TASKS[1:]:
        model.load_adapter(tmp_path / task, adapter_name=task)
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    groups = sum(layer.weight_shape[0] * layer.weight_shape[1] // 4 for layer in layers)
    # each inference-only adapter adds its hard mask as uint8 pattern indices [G] per layer (0.25 byte per masked
    # weight) and nothing else: no weight copies, no float logits
    assert one_adapter == groups
    assert tensor_bytes(model) - dense_bytes == len(TASKS) * groups
    for layer in layers:
        assert layer.maskllm_logits.keys() == set(TASKS)
    # every base weight is still the original tensor, shared by all adapters
    current = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.data_ptr()
               for n, p in model.named_parameters() if "maskllm_" not in n}
    assert current == base_weights

    separate = {}
    with torch.no_grad():
        for task in TASKS:
            separate[task] = PeftModel.from_pretrained(tiny_llama(0), tmp_path / task)(input_ids=tokens).logits
        assert not torch.equal(separate["a"], separate["b"])
        for task in [*TASKS, *reversed(TASKS)]:
            model.set_adapter(task)
            assert torch.equal(model(input_ids=tokens).logits, separate[task])
            assert all(layer._hard_mask_cache.keys() == {task} for layer in layers)  # one cached eval mask
        # a mixed batch (one adapter per row) equals the separate models row by row and leaves the cache alone
        mixed = model(input_ids=tokens, adapter_names=["b", "c"]).logits
        assert torch.allclose(mixed[0], separate["b"][0], rtol=0, atol=1e-5)
        assert torch.allclose(mixed[1], separate["c"][1], rtol=0, atol=1e-5)
        assert all(layer._hard_mask_cache.keys() == {TASKS[0]} for layer in layers)
    assert tensor_bytes(model) - dense_bytes == len(TASKS) * groups
    # an adapter loaded for training holds float32 logits [G, C] instead
    model.load_adapter(tmp_path / "a", adapter_name="trainable", is_trainable=True)
    assert tensor_bytes(model) - dense_bytes == len(TASKS) * groups + 4 * num_candidates(2, 4) * groups


def test_inference_only_adapter_resaves_byte_for_byte_and_refuses_training(tmp_path, tokens):
    trained_adapter(tmp_path / "a")
    model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    assert all(layer.holds_indices("default") for layer in model.modules() if isinstance(layer, MaskedLinear))
    model.save_pretrained(tmp_path / "again")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    merged = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a").merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, merged(input_ids=tokens).logits)
    model.train()
    with pytest.raises(ValueError, match="is_trainable=True"):
        model(input_ids=tokens)
    model.peft_config["default"].save_logits = True
    with pytest.raises(ValueError, match="holds no logits"):
        model.save_pretrained(tmp_path / "logits")
