"""Transfer from a general mask: a task head in modules_to_save, and the published MaskLLM npz masks."""

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForSequenceClassification

from conftest import LLAMA_TARGETS, tiny_gpt2, tiny_llama
from sparse_peft import MaskConfig, MaskedLinear, load_mask_adapter
from sparse_peft.patterns import group_counts, topn_mask
from sparse_peft.published import PUBLISHED_MASK_FILE, import_published_masks, read_published_masks
from test_save_load import hard_masks, trained_adapter


def test_sequence_classification_transfer_trains_saves_and_reloads_the_head(tmp_path):
    trained_adapter(tmp_path / "general")
    tiny_llama(0).save_pretrained(tmp_path / "base")

    def classifier(seed):
        torch.manual_seed(seed)  # the head is new; its init differs per seed
        model = LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
        model.config.pad_token_id = 0
        return model

    model = get_peft_model(classifier(1), MaskConfig(prior=str(tmp_path / "general"), task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("maskllm_logits" in n or ".score.modules_to_save." in n for n in trainable)
    assert any(".score." in n for n in trainable)
    head_before = model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    tokens = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = model(input_ids=tokens, labels=torch.tensor([0, 1, 2, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    head = model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(head, head_before)
    model.save_pretrained(tmp_path / "task")
    state = load_file(tmp_path / "task" / "adapter_model.safetensors")
    assert torch.equal(state["base_model.model.score.weight"], head)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        again = PeftModel.from_pretrained(classifier(2), tmp_path / "task")  # another random head, replaced
        assert torch.equal(again(input_ids=tokens).logits, expected)
    assert all(torch.equal(hard_masks(again)[k], v) for k, v in hard_masks(model).items())


def magnitude_masks(model):
    """{module name: bool [out, in]} 2:4 masks of every targeted linear of a tiny Llama."""
    return {
        name: topn_mask(module.weight.detach().abs(), 2, 4)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LLAMA_TARGETS
    }


def write_published(path, masks, layout=lambda name, mask: mask):
    """The reference tool's file: np.packbits of each parameter-shaped bool mask, np.savez_compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"{k}.weight.mask": np.packbits(layout(k, v).numpy()) for k, v in masks.items()})
    return path


def test_published_npz_is_read_exactly(tmp_path):
    masks = magnitude_masks(tiny_llama(0))
    npz = write_published(tmp_path / "hub" / PUBLISHED_MASK_FILE, masks)
    for source in (npz, tmp_path / "hub"):
        read = read_published_masks(source, tiny_llama(0))
        assert read.keys() == masks.keys() and all(torch.equal(read[k], v) for k, v in masks.items())
    # the bit order is big-endian: the first weight of a row is the most significant bit of its byte
    key = "model.layers.0.self_attn.q_proj"
    first_byte = int(np.load(npz)[f"{key}.weight.mask"][0])
    assert [bool(first_byte >> (7 - i) & 1) for i in range(8)] == masks[key][0, :8].tolist()
    # GPT-2 stores Conv1D weights [in, out]; the published layout is the parameter's own shape
    gpt2 = tiny_gpt2()
    conv_masks = {f"transformer.h.{i}.attn.c_attn": topn_mask(torch.randn(192, 64), 2, 4) for i in range(2)}
    gpt2_npz = write_published(tmp_path / "gpt2.npz", conv_masks, layout=lambda name, mask: mask.T.contiguous())
    read = read_published_masks(gpt2_npz, gpt2)
    assert all(torch.equal(read[k], v) for k, v in conv_masks.items())


def test_import_published_masks_writes_an_exact_adapter(tmp_path, tokens):
    masks = magnitude_masks(tiny_llama(0))
    npz = write_published(tmp_path / "m.npz", masks)
    import_published_masks(npz, tiny_llama(0), tmp_path / "general")
    adapter = load_mask_adapter(tmp_path / "general")
    assert adapter.masks().keys() == masks.keys()
    assert all(torch.equal(adapter.masks()[k], v) for k, v in masks.items())
    assert all((group_counts(v, 4) == 2).all() for v in adapter.masks().values())
    # loaded through PEFT it computes W * mask exactly
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "general")
    pruned = tiny_llama(0)
    with torch.no_grad():
        for name, mask in masks.items():
            pruned.get_submodule(name).weight.mul_(mask)
        assert torch.equal(peft_model(input_ids=tokens).logits, pruned(input_ids=tokens).logits)
    # and it is checked against its base like any adapter
    with pytest.raises(ValueError, match="different weight values"):
        PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "general")


def test_published_masks_as_prior(tmp_path):
    masks = magnitude_masks(tiny_llama(0))
    write_published(tmp_path / "hub" / PUBLISHED_MASK_FILE, masks)
    for prior in (tmp_path / "hub", tmp_path / "hub" / PUBLISHED_MASK_FILE):
        model = get_peft_model(tiny_llama(0), MaskConfig(prior=str(prior), prior_strength=100.0)).eval()
        assert all(torch.equal(hard_masks(model)["base_model.model." + k], v.float()) for k, v in masks.items())
        assert model.peft_config["default"].save_delta is False
    with pytest.raises(ValueError, match="import_published_masks"):
        get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "hub"), save_delta=True))


def test_published_masks_that_do_not_fit_are_refused_clearly(tmp_path):
    masks = magnitude_masks(tiny_llama(0))
    npz = write_published(tmp_path / "m.npz", masks)
    with pytest.raises(ValueError, match=r"gate_proj.weight.mask. is a uint8 array of shape \(1024,\).*"
                                         "different model"):
        read_published_masks(npz, tiny_llama(0, intermediate_size=96))
    with pytest.raises(ValueError, match="mask for 'model.layers.1.self_attn.q_proj', but this model has no such"):
        import_published_masks(npz, tiny_llama(0, num_hidden_layers=1), tmp_path / "a")
    partial = dict(masks)
    del partial["model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="no mask for 1 of the target layers .e.g. model.layers.1.self_attn.v_proj"):
        import_published_masks(write_published(tmp_path / "p.npz", partial), tiny_llama(0), tmp_path / "a")
    dense = dict(masks)
    dense["model.layers.0.mlp.up_proj"] = dense["model.layers.0.mlp.up_proj"].clone()
    dense["model.layers.0.mlp.up_proj"][5, :4] = True
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj is not a valid 2:4 mask.*group 80 keeps 4"):
        import_published_masks(write_published(tmp_path / "d.npz", dense), tiny_llama(0), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="No MaskLLM mask file"):
        read_published_masks(tmp_path / "nothing", tiny_llama(0))
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())  # nothing half-written
    # a prior whose layers are partly missing starts those layers from random logits, with a warning
    with pytest.warns(UserWarning, match="no mask for 1 target layer"):
        model = get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "p.npz")))
    assert sum(isinstance(m, MaskedLinear) for m in model.modules()) == 14
