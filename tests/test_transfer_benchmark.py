"""benchmarks/transfer.py end to end on the shipped 231K-parameter model: rows, sizes, a reference number, resume."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import AIDREAMS, load_benchmark
from sparse_peft import MaskConfig
from sparse_peft.data import calibration_from_texts, load_model_and_tokenizer
from sparse_peft.evaluation import perplexity
from sparse_peft.layer import mask_layers
from sparse_peft.lowrank_init import AUTO_SCALES
from sparse_peft.oneshot import prune
from sparse_peft.tasks import load_task

SMALL = ["--model", str(AIDREAMS), "--device", "cpu", "--tasks", "tinystories,sst2", "--seq-len", "32",
         "--batch-size", "2", "--window", "32", "--eval-windows", "1", "--eval-examples", "8", "--num-samples", "2",
         "--calibration-len", "16"]


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    """A general mask for the tiny model (a magnitude 2:4 mask adapter stands in for a learned one)."""
    folder = tmp_path_factory.mktemp("general") / "general"
    prune(load_model_and_tokenizer(str(AIDREAMS))[0], "magnitude", show_progress=False).save_pretrained(folder)
    return str(folder)


def test_rows_sizes_reference_and_resume(tmp_path, general, monkeypatch):
    transfer = load_benchmark("transfer")
    out = str(tmp_path / "t")
    learned = []
    learn_mask = transfer.learn_mask
    monkeypatch.setattr(transfer, "learn_mask", lambda model, data, args, **kw: learned.append(args.seed)
                        or learn_mask(model, data, args, **kw))
    args = [*SMALL, "--general", general, "--output", out]
    first = transfer.main([*args, "--budgets", "64", "--seeds", "0,1", "--objective", "seq_cls"])
    keys = [(r["task"], r["objective"], r["row"], r["budget"], r["seed"]) for r in first["rows"]]
    fixed = [("tinystories", "lm", k, None, None) for k in ("dense", "general", "sparsegpt", "sparsegpt+update")]
    fixed += [("sst2", "seq_cls", k, 64, 0) for k in ("dense", "general", "sparsegpt", "sparsegpt+update")]
    masks = ("scratch", "transfer", "transfer+lowrank", "scratch+lowrank")
    learned_rows = [("tinystories", "lm", k, 64, s) for k in masks for s in (0, 1)]
    learned_rows += [("sst2", "seq_cls", k, 64, s) for k in ("lora", *masks) for s in (0, 1)]
    assert sorted(keys, key=str) == sorted(fixed + learned_rows, key=str)
    assert len(learned) == 16  # the mask rows; LoRA trains with a plain Trainer
    for row in first["rows"]:
        assert row["value"] == row["value"] and 0 <= row["value"] < float("inf")  # finite
        assert row["metric"] == ("ppl" if row["task"] == "tinystories" else "accuracy")
    for row in first["rows"]:
        if row["row"] in ("lora", *masks):
            assert row["steps"] >= 1 and row["tokens"] >= 64 and row["seconds"] > 0
    for row in [r for r in first["rows"] if r["row"] in masks]:
        assert row["bits_raw"] > 0 and row["bits_delta"] > 0 and 0 < row["mean_agreement"] <= 1
        config = json.loads((tmp_path / "t" / "adapters" / row["adapter"].rsplit("/", 1)[-1] /
                             "adapter_config.json").read_text())
        assert config["save_delta"] and config["prior"] == general  # delta-coded against the general mask
        # from scratch starts from the task's SparseGPT folder with the paper's noise; transfer exactly at the general
        assert config["prior_noise"] is (True if row["row"] == "scratch" else None)
        if row["row"] == "transfer":
            assert row["bits_delta"] < row["bits_raw"]
        if row["row"].endswith("+lowrank"):  # the start's factor, chosen on the calibration text, is recorded
            assert row["eora_scale"] in AUTO_SCALES and config["eora_scale"] == row["eora_scale"]
        if row["row"] == "transfer+lowrank":  # its mask is the general mask; the file holds the update
            assert row["mean_agreement"] == 1 and config["lora_rank"] == 16 and not config["train_mask"]
        if row["row"] == "scratch+lowrank":  # the task's SparseGPT mask (not the general one), frozen, + the update
            assert config["lora_rank"] == 16 and not config["train_mask"] and config["prior_noise"] is None
            assert row["mean_agreement"] < 1

    # The dense row is the library's perplexity on the held-out TinyStories documents.
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    dense = next(r for r in first["rows"] if r["task"] == "tinystories" and r["row"] == "dense")
    held_out = load_task("tinystories").held_out
    expected = perplexity(model, tokenizer, held_out, window=32, max_windows=1, show_progress=False)["ppl"]
    assert dense["value"] == expected

    # The training-free start is computed by the first seed and loaded by the second; it is EoRA's for the task.
    for kind in ("transfer+lowrank", "scratch+lowrank"):
        lowrank = [r for r in first["rows"] if r["row"] == kind]
        assert [(r["task"], r["seed"], r["init_cached"]) for r in lowrank] == [
            ("tinystories", 0, False), ("tinystories", 1, True), ("sst2", 0, False), ("sst2", 1, True)]
    assert (tmp_path / "t" / "eora-start-tinystories-lm-scratch.safetensors").is_file()
    for kind in ("transfer+lowrank", "scratch+lowrank"):  # an lm start does not depend on the seed
        starts = {r["seed"]: r["start_value"] for r in first["rows"] if (r["task"], r["row"]) == ("tinystories", kind)}
        assert starts[0] == starts[1] and 0 < starts[0] < float("inf")
    config = MaskConfig(prior=general, lora_rank=16, train_mask=False, init_lora_weights="eora", eora_scale=1.0,
                        calibration=calibration_from_texts(load_task("tinystories").train, tokenizer, 2, 16))
    reference = mask_layers(get_peft_model(model, config), "default")
    start = load_file(tmp_path / "t" / "eora-start-tinystories-lm.safetensors")
    assert set(start) == {f"{name}.{part}" for name in reference for part in "AB"}
    for name, layer in reference.items():
        lora_a, lora_b, _ = layer.lowrank("default")
        assert torch.equal(start[f"{name}.A"], lora_a) and torch.equal(start[f"{name}.B"], lora_b)
    fresh = get_peft_model(load_model_and_tokenizer(str(AIDREAMS))[0],
                           MaskConfig(prior=general, lora_rank=16, train_mask=False))  # B = 0
    transfer.load_lowrank(fresh, tmp_path / "t" / "eora-start-tinystories-lm.safetensors")
    for name, layer in mask_layers(fresh, "default").items():
        lora_a, lora_b, _ = layer.lowrank("default")
        assert torch.equal(start[f"{name}.A"], lora_a) and torch.equal(start[f"{name}.B"], lora_b)

    saved = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert saved["rows"] == first["rows"]
    table = (tmp_path / "t" / "transfer.md").read_text()
    assert "### sst2 (seq_cls; accuracy)" in table and "| task mask from general mask | " in table
    assert (tmp_path / "t" / "transfer.png").stat().st_size > 0

    # Resuming with a smaller budget and the other objective runs only the missing rows.
    learned.clear()
    second = transfer.main([*args, "--budgets", "32,64", "--seeds", "0,1", "--objective", "both",
                            "--rows", "dense,transfer", "--resume"])
    assert second["rows"][: len(first["rows"])] == first["rows"]
    new = [(r["task"], r["objective"], r["row"], r["budget"], r["seed"]) for r in second["rows"][len(first["rows"]):]]
    assert sorted(new, key=str) == sorted([
        ("tinystories", "lm", "transfer", 32, 0), ("sst2", "label_words", "dense", None, None),
        ("sst2", "label_words", "transfer", 32, 0), ("sst2", "label_words", "transfer", 64, 0),
        ("sst2", "label_words", "transfer", 64, 1), ("sst2", "seq_cls", "transfer", 32, 0)], key=str)
    assert sorted(learned) == [0, 0, 0, 0, 1]
    assert "### sst2 (label_words; accuracy)" in (tmp_path / "t" / "transfer.md").read_text()

    # Other shared settings, or no --resume, are refused before anything runs; the table is untouched.
    before = (tmp_path / "t" / "transfer.json").read_bytes()
    changed = [a if SMALL[i - 1] != "--seq-len" else "16" for i, a in enumerate(SMALL)]
    with pytest.raises(ValueError, match="--seq-len 32 there, 16 now"):
        transfer.main([*changed, "--general", general, "--output", out, "--budgets", "64", "--resume"])
    with pytest.raises(ValueError, match="pass --resume"):
        transfer.main([*args, "--budgets", "64"])
    assert (tmp_path / "t" / "transfer.json").read_bytes() == before


def test_unknown_task_and_missing_general_fail_before_any_model_load(tmp_path, general):
    transfer = load_benchmark("transfer")
    with pytest.raises(SystemExit):
        transfer.main([*SMALL[:4], "--general", general, "--tasks", "sst3", "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError):
        transfer.main([*SMALL, "--general", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_classifier_is_built_from_the_loaded_model_not_its_name():
    """The shipped model is named by the Hub id it was converted from; the seq_cls rows must not fetch that name."""
    transfer = load_benchmark("transfer")
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    model.name_or_path = "no-such-user/no-such-model"  # a name that resolves nowhere
    bench = transfer.Benchmark(transfer.parse_args([*SMALL, "--general", str(AIDREAMS)]), model, tokenizer,
                               {"rows": []})
    first, again, other = bench.classifier(3, seed=0), bench.classifier(3, seed=0), bench.classifier(3, seed=1)
    decoder = model.base_model.state_dict()
    assert first.base_model.state_dict().keys() == decoder.keys()
    assert all(torch.equal(first.base_model.state_dict()[k], v) for k, v in decoder.items())
    assert first.score.weight.shape == (3, model.config.hidden_size) and first.config.num_labels == 3
    assert torch.equal(first.score.weight, again.score.weight)  # the head is the seed's
    assert not torch.equal(first.score.weight, other.score.weight)


def test_a_training_free_start_from_other_inputs_is_not_reused(tmp_path, general):
    transfer = load_benchmark("transfer")
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    args = transfer.parse_args([*SMALL, "--general", general, "--output", str(tmp_path)])
    args.general_sha256 = "a" * 64
    bench = transfer.Benchmark(args, model, tokenizer, {"rows": []})
    spec, path = load_task("tinystories"), str(tmp_path / "start.safetensors")
    peft_model = get_peft_model(model, MaskConfig(prior=general, lora_rank=4, train_mask=False))
    kind = "transfer+lowrank"
    assert not bench.has_lowrank_start(path, spec, kind)  # no file
    transfer.save_lowrank(peft_model, path, bench.lowrank_start_settings(spec, kind))
    assert bench.has_lowrank_start(path, spec, kind)
    for name, value in (("general_sha256", "b" * 64), ("lowrank_rank", 8), ("calibration_len", 8), ("reselect", 0.5)):
        changed = transfer.Benchmark(transfer.parse_args([*SMALL, "--general", general]), model, tokenizer,
                                     {"rows": []})
        changed.args.general_sha256 = args.general_sha256
        setattr(changed.args, name, value)
        assert not changed.has_lowrank_start(path, spec, kind), name  # another general mask, rank, calibration, mask
    # --reselect (the last change) changes the transfer rows' mask, not the scratch rows' (the task's SparseGPT mask)
    transfer.save_lowrank(peft_model, path, bench.lowrank_start_settings(spec, "scratch+lowrank"))
    assert changed.has_lowrank_start(path, spec, "scratch+lowrank")
    transfer.save_lowrank(peft_model, path, bench.lowrank_start_settings(spec, kind))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # other base weights
    assert not transfer.Benchmark(args, model, tokenizer, {"rows": []}).has_lowrank_start(path, spec, kind)


def test_a_damaged_training_free_start_is_refused_with_the_fix(tmp_path, general):
    transfer = load_benchmark("transfer")
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    bench = transfer.Benchmark(transfer.parse_args([*SMALL, "--general", general, "--output", str(tmp_path)]), model,
                               tokenizer, {"rows": []})
    path = tmp_path / "start.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")  # a header cut short
    with pytest.raises(ValueError, match=r"start\.safetensors is not a readable safetensors file.*delete it"):
        bench.has_lowrank_start(str(path), load_task("tinystories"), "transfer+lowrank")


def test_lowrank_rows_from_zeros_and_tables_from_before_the_option(tmp_path, general):
    """``--lowrank-init zeros``: the +lowrank rows start at B = 0 (no training-free start is computed or saved); a
    table written before the option existed resumes as an eora table and refuses a zeros run."""
    transfer = load_benchmark("transfer")
    out = tmp_path / "z"
    args = [*SMALL, "--general", general, "--output", str(out), "--tasks", "tinystories", "--budgets", "32",
            "--seeds", "0", "--rows", "transfer+lowrank,scratch+lowrank"]
    result = transfer.main([*args, "--lowrank-init", "zeros"])
    assert [r["row"] for r in result["rows"]] == ["transfer+lowrank", "scratch+lowrank"]
    assert not list(out.glob("eora-start-*"))
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    general_alone = perplexity(PeftModel.from_pretrained(model, general).eval(), tokenizer,
                               load_task("tinystories").held_out, window=32, max_windows=1, show_progress=False)["ppl"]
    assert result["rows"][0]["start_value"] == general_alone  # B = 0: the start is the general mask alone
    for row in result["rows"]:
        assert "init_cached" not in row
        config = json.loads((out / "adapters" / row["adapter"].rsplit("/", 1)[-1] / "adapter_config.json").read_text())
        assert config["init_lora_weights"] is True and config["lora_rank"] == 16 and not config["train_mask"]

    saved = json.loads((out / "transfer.json").read_text())
    del saved["settings"]["lowrank_init"]  # as written before --lowrank-init
    (out / "transfer.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="--lowrank-init 'eora' there, 'zeros' now"):
        transfer.main([*args, "--lowrank-init", "zeros", "--resume"])
    again = transfer.main([*args, "--resume"])  # eora, as that table says: only the rows are kept, none rerun
    assert again["rows"] == saved["rows"]


def test_reselect_gives_the_transfer_rows_the_reselected_general_mask(tmp_path, general):
    transfer = load_benchmark("transfer")
    args = [*SMALL, "--general", general, "--output", str(tmp_path / "t"), "--tasks", "tinystories",
            "--budgets", "32", "--seeds", "0", "--rows", "transfer+lowrank,scratch+lowrank", "--reselect", "0.5"]
    rows = {r["row"]: r for r in transfer.main(args)["rows"]}
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    calibration = calibration_from_texts(load_task("tinystories").train, tokenizer, 2, 16)
    reference = get_peft_model(model, MaskConfig(prior=general, prior_reselect=0.5, calibration=calibration))
    adapter = tmp_path / "t" / "adapters" / rows["transfer+lowrank"]["adapter"].rsplit("/", 1)[-1]
    saved = PeftModel.from_pretrained(load_model_and_tokenizer(str(AIDREAMS))[0], adapter)
    expected, got = mask_layers(reference, "default"), mask_layers(saved, "default")
    assert all(torch.equal(got[name].hard_mask("default"), layer.hard_mask("default"))
               for name, layer in expected.items())
    assert rows["transfer+lowrank"]["mean_agreement"] < 1  # moved from the general mask
    assert json.loads((adapter / "adapter_config.json").read_text())["prior_reselect"] == 0.5
    scratch = tmp_path / "t" / "adapters" / rows["scratch+lowrank"]["adapter"].rsplit("/", 1)[-1]
    assert json.loads((scratch / "adapter_config.json").read_text())["prior_reselect"] == 0.0
