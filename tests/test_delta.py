"""Delta-coded task adapters: only the groups that differ from the general mask, plus a hashed reference to it."""

import hashlib
import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import tiny_llama
from sparse_peft import MaskConfig, MaskedLinear, load_mask_adapter
from sparse_peft.codec import (
    DELTA_BITMAP,
    DELTA_GAPS,
    DELTA_INFO,
    DELTA_PATTERNS,
    DELTA_POSITIONS,
    DELTA_RICE,
    decode_delta,
    encode_delta,
    pack_indices,
)
from test_save_load import hard_masks, trained_adapter


def task_from(general_dir, seed=1, flip=0.0, **config):
    """A task adapter initialised from the general mask; ``flip`` of its groups get a new random pattern."""
    base = tiny_llama(0)
    torch.manual_seed(seed)  # other logit noise than the general adapter's
    task = get_peft_model(base, MaskConfig(prior=str(general_dir), **config))
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                rows = torch.rand(p.shape[0]) < flip
                p[rows] = torch.randn(int(rows.sum()), p.shape[1]) * 100
    return task.eval()


def weights_sha256(folder):
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def reference_sizes(changed: list[int], num_groups: int) -> dict[int, int]:
    """Bytes of positions + patterns of each delta coding for 2:4, counted in plain Python."""
    gaps = [p - q - 1 for p, q in zip(changed, [-1] + changed[:-1])]
    count = len(changed)
    patterns = -(-count * 3 // 8)  # absolute indices, 3 bits
    sizes = {DELTA_GAPS: -(-count * max(1, max(gaps, default=0).bit_length()) // 8) + patterns,
             DELTA_BITMAP: -(-num_groups // 8) + patterns}
    if count:
        rice = min(-(-sum((g >> k) + 1 for g in gaps) // 8) + -(-count * k // 8) for k in range(64))
        sizes[DELTA_RICE] = rice + -(-count // 3)  # ranks among the 5 other patterns, 3 per byte
    return sizes


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.05, 0.17, 0.3, 1.0])
def test_encode_decode_delta_round_trip_and_picks_the_smallest_coding(fraction):
    gen = torch.Generator().manual_seed(0)
    general = torch.randint(0, 6, (4000,), generator=gen)
    task = general.clone()
    changed = torch.rand(4000, generator=gen) < fraction
    task[changed] = (task[changed] + torch.randint(1, 6, (int(changed.sum()),), generator=gen)) % 6
    tensors = encode_delta(task, general, 6)
    assert torch.equal(decode_delta(tensors, general, 6), task)
    count, coding, _ = tensors[DELTA_INFO].tolist()
    assert count == int(changed.sum())
    sizes = reference_sizes(changed.nonzero().flatten().tolist(), 4000)
    assert tensors[DELTA_POSITIONS].numel() + tensors[DELTA_PATTERNS].numel() == min(sizes.values())
    assert sizes[coding] == min(sizes.values())
    if 0.05 <= fraction <= 0.3:  # spread-out changes: Rice is the smallest
        assert coding == DELTA_RICE
    if fraction == 0.17:  # a re-selected general mask's share: a quarter smaller than the best fixed-width coding
        assert sizes[DELTA_RICE] <= 0.8 * min(sizes[DELTA_GAPS], sizes[DELTA_BITMAP])


def test_rice_coding_bytes_by_hand():
    """Groups 0, 6 and 9 of 10 change (gaps 0, 5, 2; k = 1): unary quotients 0, 2, 1 -> bits 0 110 10 (LSB first:
    0b010110 = 22), remainders 0, 1, 0 -> 0b010 = 2; the new patterns' ranks among the other five: 5 over 0 -> 4,
    1 over 0 -> 0, 0 over 5 -> 0 -> base-5 digits 4 + 0 * 5 + 0 * 25 = 4."""
    general = torch.tensor([0, 3, 3, 3, 3, 3, 0, 3, 3, 5])
    task = general.clone()
    task[[0, 6, 9]] = torch.tensor([5, 1, 0])
    tensors = encode_delta(task, general, 6)
    assert tensors[DELTA_INFO].tolist() == [3, DELTA_RICE, 1]
    assert tensors[DELTA_POSITIONS].tolist() == [22, 2]
    assert tensors[DELTA_PATTERNS].tolist() == [4]
    assert torch.equal(decode_delta(tensors, general, 6), task)


@pytest.mark.parametrize("coding", [DELTA_GAPS, DELTA_BITMAP])
def test_fixed_width_codings_are_still_read(coding):
    """Adapters written with codings 0 and 1 (absolute 3-bit patterns), built here from the format description."""
    gen = torch.Generator().manual_seed(3)
    general = torch.randint(0, 6, (4000,), generator=gen)
    task = general.clone()
    changed = (torch.rand(4000, generator=gen) < 0.1).nonzero().flatten()
    task[changed] = (task[changed] + 2) % 6
    gaps = torch.diff(changed, prepend=torch.tensor([-1])) - 1
    bitmap = torch.zeros(4000, dtype=torch.long)
    bitmap[changed] = 1
    gap_bits = int(gaps.max()).bit_length()
    tensors = {
        DELTA_INFO: torch.tensor([len(changed), coding, gap_bits if coding == DELTA_GAPS else 0]),
        DELTA_POSITIONS: pack_indices(gaps, gap_bits) if coding == DELTA_GAPS else pack_indices(bitmap, 1),
        DELTA_PATTERNS: pack_indices(task[changed], 3),
    }
    assert torch.equal(decode_delta(tensors, general, 6), task)


@pytest.mark.parametrize("candidates", [2, 3, 70])
def test_delta_round_trip_for_other_pattern_counts(candidates):
    """1:2 (C = 2: the new pattern is implied, no pattern bytes), C = 3 (bits) and C = 70 (4:8)."""
    gen = torch.Generator().manual_seed(1)
    general = torch.randint(0, candidates, (3000,), generator=gen)
    task = general.clone()
    changed = torch.rand(3000, generator=gen) < 0.1
    task[changed] = (task[changed] + torch.randint(1, candidates, (int(changed.sum()),), generator=gen)) % candidates
    tensors = encode_delta(task, general, candidates)
    assert torch.equal(decode_delta(tensors, general, candidates), task)
    if candidates == 2:
        assert tensors[DELTA_INFO][1] == DELTA_RICE and tensors[DELTA_PATTERNS].numel() == 0


def test_corrupt_rice_delta_is_refused():
    gen = torch.Generator().manual_seed(2)
    general = torch.randint(0, 6, (4000,), generator=gen)
    task = general.clone()
    changed = torch.rand(4000, generator=gen) < 0.15
    task[changed] = (task[changed] + 1) % 6
    tensors = encode_delta(task, general, 6)
    assert tensors[DELTA_INFO][1] == DELTA_RICE
    count, _, k = tensors[DELTA_INFO].tolist()
    positions = tensors[DELTA_POSITIONS]
    for broken in ({**tensors, DELTA_POSITIONS: positions[:-40]},
                   {**tensors, DELTA_POSITIONS: torch.cat([positions, torch.zeros(4, dtype=torch.uint8)])},
                   {**tensors, DELTA_PATTERNS: tensors[DELTA_PATTERNS][:-1]},
                   {**tensors, DELTA_INFO: torch.tensor([count + 100, DELTA_RICE, k])}):
        with pytest.raises(ValueError):
            decode_delta(broken, general, 6)


def test_delta_adapter_round_trips_exactly_and_records_its_general_mask(tmp_path, tokens):
    trained_adapter(tmp_path / "general")
    task = task_from(tmp_path / "general", flip=0.02)
    task.save_pretrained(tmp_path / "task")
    config = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    assert config["save_delta"] is True
    assert config["prior"] == str((tmp_path / "general").resolve())
    assert config["prior_sha256"] == weights_sha256(tmp_path / "general")
    state = load_file(tmp_path / "task" / "adapter_model.safetensors")
    assert not any(k.endswith(("maskllm_pattern_bits", "maskllm_pattern_codes")) for k in state)
    assert sum(k.endswith(DELTA_INFO) for k in state) == 14
    # the same masks from the file alone (no model) and in a fresh process through PEFT
    expected = hard_masks(task)
    loaded = load_mask_adapter(tmp_path / "task").masks()
    assert all(torch.equal(loaded[k.removeprefix("base_model.model.")], v.bool()) for k, v in expected.items())
    with torch.no_grad():
        reference = task(input_ids=tokens).logits
        again = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "task")
        assert torch.equal(again(input_ids=tokens).logits, reference)


def test_delta_is_much_smaller_than_the_raw_adapter(tmp_path):
    """2/3 bit per weight raw; ~5% changed groups cost ~8.5 bits each (Rice-coded gaps + the new pattern's rank
    among five, 2.67 bits) = ~0.1 bit."""
    model = get_peft_model(tiny_llama(0, hidden_size=128, intermediate_size=256), MaskConfig(prior="magnitude"))
    model.save_pretrained(tmp_path / "general")
    base = tiny_llama(0, hidden_size=128, intermediate_size=256)
    torch.manual_seed(1)
    task = get_peft_model(base, MaskConfig(prior=str(tmp_path / "general")))
    with torch.no_grad():  # a task mask starts at its general mask; move ~5% of its groups off it, as training does
        for p in task.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.01)
    task.save_pretrained(tmp_path / "delta")
    task.peft_config["default"].save_delta = False
    task.save_pretrained(tmp_path / "raw")
    masked = sum(m.weight_shape[0] * m.weight_shape[1] for m in task.modules() if isinstance(m, MaskedLinear))

    def payload_bits(folder):  # tensor bytes without the safetensors header, shapes and fingerprints
        state = load_file(folder / "adapter_model.safetensors")
        return 8 * sum(v.numel() for k, v in state.items() if k.rsplit(".", 1)[-1] in
                       ("maskllm_pattern_codes", "maskllm_delta_positions", "maskllm_delta_patterns")) / masked

    state = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    changed = sum(int(v[0]) for k, v in state.items() if k.endswith(DELTA_INFO)) / (masked / 4)
    assert 0.02 < changed < 0.1, changed  # the ~5% of groups moved off the general mask
    groups = [m.weight_shape[0] * m.weight_shape[1] // 4 for m in task.modules() if isinstance(m, MaskedLinear)]
    assert payload_bits(tmp_path / "raw") == 8 * sum(-(-g // 3) for g in groups) / masked  # 3 groups per byte
    assert payload_bits(tmp_path / "raw") == pytest.approx(2 / 3, abs=1e-3)
    assert payload_bits(tmp_path / "delta") <= 0.2
    # the rest: per layer shape, fingerprint, delta info (72 bytes) and 5 safetensors header entries (~150 bytes each)
    delta_size = (tmp_path / "delta" / "adapter_model.safetensors").stat().st_size
    assert delta_size <= payload_bits(tmp_path / "delta") * masked / 8 + 14 * (72 + 5 * 150) + 256
    assert delta_size < (tmp_path / "raw" / "adapter_model.safetensors").stat().st_size / 2
    raw, delta = load_mask_adapter(tmp_path / "raw").masks(), load_mask_adapter(tmp_path / "delta").masks()
    assert raw.keys() == delta.keys() and all(torch.equal(raw[k], v) for k, v in delta.items())


def test_missing_or_changed_general_mask_is_a_clear_error(tmp_path):
    trained_adapter(tmp_path / "general")
    task_from(tmp_path / "general").save_pretrained(tmp_path / "task")
    sha = weights_sha256(tmp_path / "general")
    shutil.move(tmp_path / "general", tmp_path / "moved")
    for load in (lambda: PeftModel.from_pretrained(tiny_llama(0), tmp_path / "task"),
                 lambda: load_mask_adapter(tmp_path / "task")):
        missing = f"general mask '{tmp_path / 'general'}' \\(sha256 {sha}\\), which is missing"
        with pytest.raises(FileNotFoundError, match=missing):
            load()
    # pointing the reference at the new place fixes it
    config_file = tmp_path / "task" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prior": str(tmp_path / "moved")}))
    assert load_mask_adapter(tmp_path / "task").records
    # another general mask at that place: refused by hash
    trained_adapter(tmp_path / "moved", noise_seed=1)
    with pytest.raises(ValueError, match=f"sha256 {sha}, but the adapter_model.safetensors found there has sha256"):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "task")


def test_general_mask_changed_between_init_and_save_is_refused_before_writing(tmp_path):
    trained_adapter(tmp_path / "general")
    task = task_from(tmp_path / "general")
    trained_adapter(tmp_path / "general", noise_seed=1)  # overwritten with other masks
    with pytest.raises(ValueError, match="general mask changed"):
        task.save_pretrained(tmp_path / "task")
    assert not (tmp_path / "task" / "adapter_model.safetensors").exists()
    task.peft_config["default"].save_delta = False  # the escape hatch the error names
    task.save_pretrained(tmp_path / "task")
    assert load_mask_adapter(tmp_path / "task").records


def test_save_delta_options(tmp_path):
    trained_adapter(tmp_path / "general")
    task_from(tmp_path / "general", save_delta=False).save_pretrained(tmp_path / "raw")
    assert any(k.endswith("maskllm_pattern_codes") for k in load_file(tmp_path / "raw" / "adapter_model.safetensors"))
    # without a prior loaded at init (init_weights=False) the hash is recorded when the delta is saved
    late = get_peft_model(
        tiny_llama(0), MaskConfig(prior=str(tmp_path / "general"), init_weights=False, save_delta=True)
    )
    assert late.peft_config["default"].prior_sha256 is None
    late.eval().save_pretrained(tmp_path / "late")
    assert json.loads((tmp_path / "late" / "adapter_config.json").read_text())["prior_sha256"] == weights_sha256(
        tmp_path / "general")
    assert all(torch.equal(load_mask_adapter(tmp_path / "late").masks()[k.removeprefix("base_model.model.")], v.bool())
               for k, v in hard_masks(late).items())
    shutil.rmtree(tmp_path / "general")
    assert load_mask_adapter(tmp_path / "raw").records  # a raw adapter does not need its prior
    with pytest.raises(ValueError, match="not a saved mask adapter"):
        MaskConfig(prior="magnitude", save_delta=True)
    one_shot = get_peft_model(tiny_llama(0), MaskConfig(prior="magnitude"))
    assert not one_shot.peft_config["default"].save_delta


def test_unchanged_task_mask_and_continued_training_stay_delta(tmp_path):
    trained_adapter(tmp_path / "general")
    same = task_from(tmp_path / "general", prior_strength=100.0)  # argmax is exactly the general mask
    same.save_pretrained(tmp_path / "same")
    state = load_file(tmp_path / "same" / "adapter_model.safetensors")
    assert all(v[0] == 0 for k, v in state.items() if k.endswith(DELTA_INFO))
    assert all(torch.equal(load_mask_adapter(tmp_path / "same").masks()[k], v)
               for k, v in load_mask_adapter(tmp_path / "general").masks().items())
    # a delta adapter loaded for training keeps its reference and saves as a delta again
    again = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "same", is_trainable=True)
    with torch.no_grad():
        layer = next(m for m in again.modules() if isinstance(m, MaskedLinear))
        layer.maskllm_logits["default"][:3] = torch.tensor([[9.0, 0, 0, 0, 0, 0]] * 3)
    again.eval()
    expected = hard_masks(again)
    again.save_pretrained(tmp_path / "continued")
    state = load_file(tmp_path / "continued" / "adapter_model.safetensors")
    assert 0 < sum(int(v[0]) for k, v in state.items() if k.endswith(DELTA_INFO)) <= 3
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "continued")
    assert all(torch.equal(hard_masks(reloaded)[k], v) for k, v in expected.items())
