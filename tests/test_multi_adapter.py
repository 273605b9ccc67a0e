"""Many task adapters on one base model: shared weights, memory per adapter, switching equals separate loading."""

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
    # each adapter adds its float32 logits [G, C] per layer and nothing else: no weight copies
    logit_bytes = sum(4 * layer.weight_shape[0] * layer.weight_shape[1] // 4 * num_candidates(2, 4) for layer in layers)
    assert one_adapter == logit_bytes
    assert tensor_bytes(model) - dense_bytes == len(TASKS) * logit_bytes
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
    assert tensor_bytes(model) - dense_bytes == len(TASKS) * logit_bytes
