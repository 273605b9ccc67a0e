"""The mask-adapter format: round trips across processes, size, base checks, corrupt files, atomic writes."""

import json
import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import run_fresh_python, tiny_llama
from sparse_peft import MaskConfig, MaskedLinear, load_mask_adapter
from sparse_peft.codec import (
    digits_per_byte,
    pack_codes,
    pack_indices,
    unpack_codes,
    unpack_indices,
    uses_pattern_codes,
)
from sparse_peft.patterns import group_counts


def trained_adapter(path, seed=0, noise_seed=None, **config):
    """A mask adapter whose logits moved away from their init, saved to ``path``; returns the live model.

    ``seed`` fixes the base weights (and, by default, the logits); ``noise_seed`` draws other logits on that base.
    """
    model = get_peft_model(tiny_llama(seed), MaskConfig(**config))
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


def hard_masks(model):
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLinear)]
    return {n: m.hard_mask(m.active_adapter[0]).clone() for n, m in layers}


@pytest.mark.parametrize("bits, count", [(3, 1), (3, 7), (3, 8), (3, 1001), (1, 9), (7, 13)])
def test_pack_unpack_round_trip(bits, count):
    indices = torch.randint(0, 2**bits, (count,))
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_indices(packed, count, bits), indices)


@pytest.mark.parametrize("candidates, count", [(6, 1), (6, 2), (6, 3), (6, 1000), (3, 11), (2, 9), (70, 5), (256, 4)])
def test_pattern_codes_round_trip(candidates, count):
    indices = torch.randint(0, candidates, (count,), generator=torch.Generator().manual_seed(count))
    k = digits_per_byte(candidates)
    assert candidates**k <= 256 < candidates ** (k + 1)
    packed = pack_codes(indices, candidates)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // k)
    assert torch.equal(unpack_codes(packed, count, candidates), indices)
    # by hand for 2:4: byte = i0 + 6 * i1 + 36 * i2
    if candidates == 6 and count == 3:
        assert int(packed[0]) == int(indices[0] + 6 * indices[1] + 36 * indices[2])


def test_pattern_codes_only_where_they_beat_bit_packing_and_bad_bytes_are_rejected():
    assert uses_pattern_codes(2, 4) and uses_pattern_codes(1, 3)  # C = 6: 8/3 < 3 bits; C = 3: 1.6 < 2 bits
    assert not any(uses_pattern_codes(n, m) for n, m in [(1, 2), (1, 4), (4, 8), (2, 8)])
    with pytest.raises(ValueError, match="byte >= 6\\*\\*3"):
        unpack_codes(torch.tensor([216], dtype=torch.uint8), 3, 6)
    with pytest.raises(ValueError, match="expected uint8 \\[2\\]"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 6)


def test_adapters_saved_with_3_bit_patterns_still_load(tmp_path, tokens):
    """Files written before the base-6 coding hold ``maskllm_pattern_bits`` (3 bits per 2:4 group)."""
    from safetensors.torch import save_file

    model = trained_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    old = {}
    for key, value in state.items():
        if key.endswith("maskllm_pattern_codes"):
            groups = int(torch.prod(state[key.replace("pattern_codes", "shape")])) // 4
            old[key.replace("pattern_codes", "pattern_bits")] = pack_indices(unpack_codes(value, groups, 6), 3)
        else:
            old[key] = value
    save_file(old, weights)
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")(input_ids=tokens).logits,
                           model(input_ids=tokens).logits)


def test_save_then_load_in_a_fresh_process_is_bit_exact(tmp_path, tokens):
    model = trained_adapter(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.save({"tokens": tokens, "logits": expected, "masks": hard_masks(model)}, tmp_path / "expected.pt")
    out = run_fresh_python(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        import sparse_peft
        from peft import PeftModel
        from sparse_peft import MaskedLinear
        from conftest import tiny_llama
        ref = torch.load(sys.argv[2])
        model = PeftModel.from_pretrained(tiny_llama(0), sys.argv[1])
        with torch.no_grad():
            logits = model(input_ids=ref["tokens"]).logits
        masks = {n: m.hard_mask("default") for n, m in model.named_modules() if isinstance(m, MaskedLinear)}
        assert masks.keys() == ref["masks"].keys()
        assert all(torch.equal(masks[k], ref["masks"][k]) for k in masks)
        assert torch.equal(logits, ref["logits"])
        assert not any(p.requires_grad for p in model.parameters())
        print("bit-exact")
        """,
        str(tmp_path / "adapter"),
        str(tmp_path / "expected.pt"),
    )
    assert "bit-exact" in out


def test_file_is_packed_hard_mask_and_small(tmp_path):
    model = trained_adapter(tmp_path / "a")
    files = sorted(os.listdir(tmp_path / "a"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert not any(k.endswith("maskllm_logits") for k in state)
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    masked_weights = sum(layer.weight_shape[0] * layer.weight_shape[1] for layer in layers)
    size_bits = os.path.getsize(tmp_path / "a" / "adapter_model.safetensors") * 8
    header_budget_bits = 8 * (256 + 400 * len(layers))  # safetensors JSON header, shapes, fingerprints
    assert size_bits <= 0.67 * masked_weights + header_budget_bits
    packed_bits = sum(v.numel() * 8 for k, v in state.items() if k.endswith("maskllm_pattern_codes"))
    assert packed_bits / masked_weights <= 2 / 3 + 1e-3  # 3 groups of 4 weights per byte
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MASKLLM (IMPORT SPARSE_PEFT)" and config["n"] == 2 and config["m"] == 4
    assert config["init_weights"] is False  # loading never recomputes a prior


def test_save_logits_round_trips_logits_for_further_training(tmp_path):
    model = trained_adapter(tmp_path / "a", save_logits=True)
    again = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a", is_trainable=True)
    live = dict(model.named_parameters())
    loaded = {n: p for n, p in again.named_parameters() if p.requires_grad}
    assert loaded and all(torch.equal(p, live[n]) for n, p in loaded.items())


def test_hard_only_adapter_continues_training_from_its_mask(tmp_path):
    model = trained_adapter(tmp_path / "a")
    again = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a", is_trainable=True)
    assert any(p.requires_grad for p in again.parameters())
    again.eval()
    assert all(torch.equal(hard_masks(again)[k], v) for k, v in hard_masks(model).items())


def test_auto_peft_model_and_peft_config_load(tmp_path, tokens):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_llama(0), MaskConfig(prior="magnitude"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.eval()
    model.save_pretrained(tmp_path / "a")
    config = PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(config, MaskConfig) and config.prior == "magnitude"
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(auto(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_loading_without_import_tells_the_user_to_import(tmp_path):
    trained_adapter(tmp_path / "a")
    out = run_fresh_python(
        """
        import sys
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained(sys.argv[1])
        except Exception as err:
            print(type(err).__name__, err)
        """,
        str(tmp_path / "a"),
    )
    assert "IMPORT SPARSE_PEFT" in out


def test_wrong_base_is_refused_with_what_differs(tmp_path):
    trained_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match="different base model(.|\n)*different weight values"):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "a")
    with pytest.raises(ValueError, match=r"made for weight shape \(128, 64\), this model has \(96, 64\)"):
        PeftModel.from_pretrained(tiny_llama(0, intermediate_size=96), tmp_path / "a")
    with pytest.raises(ValueError, match="this model has no such target layer"):
        PeftModel.from_pretrained(tiny_llama(0, num_hidden_layers=1), tmp_path / "a")
    # a bf16 copy of the right base is the same base
    model = PeftModel.from_pretrained(tiny_llama(0).to(torch.bfloat16), tmp_path / "a")
    assert any(isinstance(m, MaskedLinear) for m in model.modules())


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    trained_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)incomplete|deserializ|metadata|truncat"):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_mask_adapter(tmp_path / "a")
    # a structurally valid file whose packed mask has the wrong length
    state = load_file_from_bytes(data)
    key = next(k for k in state if k.endswith("maskllm_pattern_codes"))
    state[key] = state[key][:-1].clone()
    from safetensors.torch import save_file
    save_file(state, weights)
    with pytest.raises(ValueError, match="corrupt"):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")


def load_file_from_bytes(data):
    from safetensors.torch import load

    return dict(load(data))


def test_failed_save_leaves_the_earlier_adapter_intact(tmp_path, monkeypatch):
    model = trained_adapter(tmp_path / "a")
    before = {f: (tmp_path / "a" / f).read_bytes() for f in ("adapter_model.safetensors", "adapter_config.json")}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "a")
    monkeypatch.undo()
    layer = next(m for m in model.modules() if isinstance(m, MaskedLinear))
    with torch.no_grad():
        layer.maskllm_logits["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.save_pretrained(tmp_path / "a")
    after = {f: (tmp_path / "a" / f).read_bytes() for f in before}
    assert after == before
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]


def test_registration_is_guarded_against_a_second_registration():
    import sparse_peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method
    from peft.utils.peft_types import PeftType

    peft_type = sparse_peft.mask_peft_type()
    assert peft_type in list(PeftType) and PeftType(peft_type.value) is peft_type
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is MaskConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == "maskllm_"
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is sparse_peft.MaskModel
    sparse_peft.register()  # idempotent
    with pytest.raises(KeyError, match="already"):
        register_peft_method(name="maskllm (import sparse_peft)", config_cls=MaskConfig,
                             model_cls=sparse_peft.MaskModel, prefix="maskllm_")


def test_prior_from_a_saved_adapter_is_the_transfer_path(tmp_path):
    general = trained_adapter(tmp_path / "general")
    general_masks = hard_masks(general)
    torch.manual_seed(0)
    task = get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "general")))
    task.eval()
    # a general mask is the start of a task mask: its hard mask is exactly the general mask (no noise in the
    # prior formula), while Gumbel sampling in training still explores around it at the prior's strength
    assert all(torch.equal(hard_masks(task)[k], v) for k, v in general_masks.items())
    logits = {k: v.detach() for k, v in task.state_dict().items() if "maskllm_logits" in k}
    assert all(len(torch.unique(t)) == 3 for t in logits.values())  # +-alpha*std and 0: no random part
    oneshot = get_peft_model(tiny_llama(0), MaskConfig(prior="magnitude"))
    oneshot_logits = [v for k, v in oneshot.state_dict().items() if "maskllm_logits" in k]
    assert all(len(torch.unique(t)) > 3 for t in oneshot_logits)  # the paper's formula, noise and all
    # prior_noise=True: an adapter holding a one-shot mask to learn from gets the paper's formula, noise and all
    torch.manual_seed(0)
    noisy = get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "general"), prior_noise=True)).eval()
    noisy_logits = [v for k, v in noisy.state_dict().items() if "maskllm_logits" in k]
    assert all(len(torch.unique(t)) > 3 for t in noisy_logits)
    off = sum(int((hard_masks(noisy)[k] != v).sum()) for k, v in general_masks.items())
    assert 0 < off < 0.25 * sum(v.numel() for v in general_masks.values())
    no_noise = get_peft_model(tiny_llama(0), MaskConfig(prior="magnitude", prior_noise=False))
    assert all(len(torch.unique(v)) == 3 for k, v in no_noise.state_dict().items() if "maskllm_logits" in k)
    with pytest.raises(ValueError, match="different base model"):
        get_peft_model(tiny_llama(seed=5), MaskConfig(prior=str(tmp_path / "general")))
    with pytest.raises(ValueError, match="is 2:4 sparse but this MaskConfig asks for 1:4"):
        get_peft_model(tiny_llama(0), MaskConfig(n=1, m=4, prior=str(tmp_path / "general")))
    with pytest.raises(FileNotFoundError, match="No mask adapter at"):
        get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "missing")))


def test_every_loaded_mask_is_exactly_n_m(tmp_path):
    for n, m in [(1, 4), (4, 8)]:
        trained_adapter(tmp_path / f"a{n}{m}", n=n, m=m)
        adapter = load_mask_adapter(tmp_path / f"a{n}{m}")
        for mask in adapter.masks().values():
            assert (group_counts(mask, m) == n).all()
