"""The ``sparse-peft`` command line end to end on the shipped 231K-parameter real model (seconds per command)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import AIDREAMS
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_peft.adapter_io import load_mask_adapter
from sparse_peft.cli import main, run
from sparse_peft.data import calibration_from_texts, load_texts
from sparse_peft.evaluation import perplexity
from sparse_peft.pruners import compute_prior_masks

STORY = (
    "The little robot looked at the stars and dreamed of flying. Every night it counted the lights in the sky "
    "and wished to visit them. One day a bird taught it to jump, and the robot laughed.\n"
) * 40


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "story.txt"
    path.write_text(STORY)
    return str(path)


def common(text_file):
    return ["--model", str(AIDREAMS), "--calibration", text_file, "--num-samples", "4", "--calibration-len", "32"]


def test_prune_writes_exactly_the_one_shot_mask(tmp_path, text_file):
    out = tmp_path / "sparsegpt"
    run(["prune", *common(text_file), "--method", "sparsegpt", "--output", str(out)])
    adapter = load_mask_adapter(str(out))
    # Reference: the pruner called directly on the same calibration windows.
    model = AutoModelForCausalLM.from_pretrained(AIDREAMS)
    calibration = calibration_from_texts(
        load_texts(text_file), AutoTokenizer.from_pretrained(AIDREAMS), num_samples=4, seq_len=32
    )
    names = [name for name in adapter.records]
    assert len(names) == 4 * 7  # every attention and MLP projection of the 4 blocks
    expected = compute_prior_masks(model, "sparsegpt", 2, 4, names, calibration, show_progress=False)
    for name in names:
        assert torch.equal(adapter.records[name].mask(2, 4), expected[name])


def test_learn_eval_and_inspect(tmp_path, text_file, capsys):
    prior, learned = tmp_path / "magnitude", tmp_path / "learned"
    run(["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--output", str(prior)])
    result = run(["learn", *common(text_file), "--prior", str(prior), "--data", text_file, "--steps", "4",
                  "--batch-size", "2", "--seq-len", "32", "--output", str(learned)])
    assert result["tokens"] == 4 * 2 * 32
    rows = run(["eval", "--model", str(AIDREAMS), "--eval-data", text_file, "--window", "32",
                "--adapter", str(prior), "--adapter", str(learned), "--json", str(tmp_path / "ppl.json")])
    assert [r["model"] for r in rows] == ["dense", str(prior), str(learned)]
    assert json.loads((tmp_path / "ppl.json").read_text()) == rows
    # The adapter rows are the PPL of the merged model, i.e. of the hard mask.
    base = AutoModelForCausalLM.from_pretrained(AIDREAMS)
    merged = PeftModel.from_pretrained(base, str(learned)).merge_and_unload()
    reference = perplexity(merged, AutoTokenizer.from_pretrained(AIDREAMS), load_texts(text_file), window=32,
                           show_progress=False)
    assert rows[2]["ppl"] == pytest.approx(reference["ppl"], rel=1e-5)
    capsys.readouterr()
    payload = run(["inspect", str(learned), "--reference", str(prior)])
    assert payload["valid"] and payload["bits_per_weight"] < 1.0
    assert "| layer | shape | sparsity | N:M valid | hamming |" in capsys.readouterr().out


def test_learn_distill_trains_on_the_kl_from_the_dense_model(tmp_path, text_file, monkeypatch):
    import sparse_peft.training as training

    calls = []
    original = training.dense_distillation_loss
    monkeypatch.setattr(training, "dense_distillation_loss", lambda *a: calls.append(1) or original(*a))
    prior, learned = tmp_path / "magnitude", tmp_path / "learned"
    run(["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--output", str(prior)])
    run(["learn", *common(text_file), "--prior", str(prior), "--data", text_file, "--steps", "3", "--batch-size", "2",
         "--seq-len", "32", "--distill", "--output", str(learned)])
    assert len(calls) == 3  # one distillation loss per step
    adapter = load_mask_adapter(str(learned))
    assert all(record.mask(2, 4).view(-1, 4).sum(-1).eq(2).all() for record in adapter.records.values())
    # --teacher-top-k: the teacher's outputs are cached once and every step uses them
    cached_calls = []
    original_cached = training.top_k_distillation_loss
    monkeypatch.setattr(training, "top_k_distillation_loss",
                        lambda *a: cached_calls.append(a[1].shape) or original_cached(*a))
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path / "cache"))
    run(["learn", *common(text_file), "--prior", str(prior), "--data", text_file, "--steps", "3", "--batch-size", "2",
         "--seq-len", "32", "--distill", "--teacher-top-k", "8", "--output", str(tmp_path / "cached")])
    assert len(calls) == 3 and cached_calls == [torch.Size([2, 32, 8])] * 3
    assert len(os.listdir(tmp_path / "cache" / "teacher")) == 1


@pytest.mark.parametrize("bf16", [False, True])
def test_learn_bf16_trains_the_masked_layers_under_bf16_autocast(tmp_path, text_file, monkeypatch, bf16):
    import sparse_peft.training as training
    from sparse_peft.layer import MaskedLinear

    seen = set()  # (output dtype, logits dtype) of every training forward of a mask layer

    def record(module, inputs, output):
        if module.training:
            seen.add((output.dtype, module.maskllm_logits["default"].dtype))

    original = training.learn_mask

    def learn_mask(model, *args, **kwargs):
        for module in model.modules():
            if isinstance(module, MaskedLinear):
                module.register_forward_hook(record)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training, "learn_mask", learn_mask)
    learned = tmp_path / "learned"
    run(["learn", *common(text_file), "--prior", "magnitude", "--data", text_file, "--steps", "2", "--batch-size", "2",
         "--seq-len", "32", *(["--bf16"] if bf16 else []), "--output", str(learned)])
    assert seen == {(torch.bfloat16 if bf16 else torch.float32, torch.float32)}
    adapter = load_mask_adapter(str(learned))
    assert all(record.mask(2, 4).view(-1, 4).sum(-1).eq(2).all() for record in adapter.records.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "/no/such/folder"], "/no/such/folder"),
        (["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--targets", "nonexistent", "--output", "x"],
         "nonexistent"),
        (["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--n", "2", "--m", "6", "--output", "x"],
         "not divisible by m=6"),
        (["inspect", "/no/such/adapter"], "/no/such/adapter"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert last_line.startswith(f"sparse-peft {argv[0]}: error:") and message in last_line


def refuse_model_loading(monkeypatch) -> None:
    def refuse(cls, *args, **kwargs):
        raise AssertionError("the CLI loaded a model before checking its arguments")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--adapter", "runs/demo/learnd"], "Did you mean 'runs/demo/learned'?"),
        (["eval", "--eval-data", "wikitxt2"], "Did you mean 'wikitext2'?"),
        (["learn", "--data", "c5", "--prior", "magnitude", "--output", "out"], "Did you mean 'c4'?"),
        (["learn", "--prior", "runs/demo/sparsegtp", "--output", "out"], "Did you mean 'runs/demo/sparsegpt'?"),
        (["learn", "--prior", "wand", "--output", "out"], "Did you mean 'wanda'?"),
        (["prune", "--calibration", "c5", "--output", "out"], "Did you mean 'c4'?"),
        (["learn", "--prior", "none", "--n", "2", "--m", "6", "--output", "out"],
         "in_features=64 is not divisible by m=6"),
        (["prune", "--method", "magnitude", "--n", "2", "--m", "6", "--output", "out"],
         "in_features=64 is not divisible by m=6"),
        (["prune", "--method", "magnitude", "--targets", "q_prj", "--output", "out"],
         "--targets 'q_prj' matches no layer of the model"),
        (["learn", "--prior", "none", "--targets", "q_prj", "--output", "out"],
         "--targets 'q_prj' matches no layer of the model; its linear layers are named down_proj, gate_proj, "
         "k_proj, o_proj, q_proj, up_proj, v_proj."),
        (["prune", "--method", "magnitude", "--n", "2", "--m", "9", "--output", "out"], "Invalid N:M sparsity 2:9"),
        (["prune", "--model", "./models/no-such", "--method", "magnitude", "--output", "out"], "./models/no-such"),
        (["inspect", "runs/demo/learnd"], "Did you mean 'runs/demo/learned'?"),
        (["learn", "--prior", "none", "--teacher-top-k", "8", "--output", "out"], "together with --distill"),
    ],
)
def test_typos_fail_before_any_model_is_loaded_with_the_nearest_name(argv, message, tmp_path, monkeypatch, capsys):
    """Issue 19: every path and name is checked before the model is read (here: reading it is an error)."""
    monkeypatch.chdir(tmp_path)
    for name in ("sparsegpt", "learned"):
        (tmp_path / "runs" / "demo" / name).mkdir(parents=True)
        (tmp_path / "runs" / "demo" / name / "adapter_config.json").write_text("{}")
    refuse_model_loading(monkeypatch)
    if "--model" not in argv and argv[0] != "inspect":
        argv = [argv[0], "--model", str(AIDREAMS), *argv[1:]]
    assert main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"sparse-peft {argv[0]}: error:") and message in last_line, last_line
    assert not (tmp_path / "out").exists()


def test_a_failed_hub_dataset_lookup_names_the_id_and_the_offline_switch(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"'no-such-user-xyz/no-such-data'.*HF_HUB_OFFLINE"):
        load_texts("no-such-user-xyz/no-such-data")


@pytest.mark.parametrize("argv, what", [
    (["learn", "--prior", "none", "--output", "out"], "read its config"),  # the pre-load N:M check
    (["eval"], "load it"),
])
def test_a_hub_model_that_cannot_be_read_is_one_line_naming_the_flag_and_the_offline_switch(
    argv, what, monkeypatch, tmp_path, capsys
):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main([argv[0], "--model", "no-such-user-xyz/no-such-model", *argv[1:]]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"sparse-peft {argv[0]}: error: --model 'no-such-user-xyz/no-such-model': could not "
                                f"{what} from the Hub (") and "HF_HUB_OFFLINE is set" in last_line, last_line
    assert not (tmp_path / "out").exists()


def test_main_prints_library_log_lines_once(capsys):
    """No root handler (``logging.basicConfig``) beside huggingface_hub's and transformers' own handlers."""
    import logging

    root_handlers = list(logging.getLogger().handlers)
    for _ in range(2):
        assert main(["inspect", "/no/such/adapter"]) == 2
    assert logging.getLogger().handlers == root_handlers
    assert len(logging.getLogger("sparse_peft").handlers) == 1
    capsys.readouterr()


def test_learn_a_low_rank_update_on_a_frozen_mask(tmp_path, text_file):
    from safetensors.torch import load_file

    from sparse_peft.patterns import is_n_m_sparse

    prior, learned = tmp_path / "magnitude", tmp_path / "lowrank"
    run(["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--output", str(prior)])
    run(["learn", *common(text_file), "--prior", str(prior), "--data", text_file, "--steps", "2", "--batch-size", "2",
         "--seq-len", "32", "--lora-rank", "2", "--init-lora-weights", "eora", "--eora-scale", "0.5",
         "--freeze-mask", "--output", str(learned)])
    config = json.loads((learned / "adapter_config.json").read_text())
    assert (config["lora_rank"], config["train_mask"], config["init_lora_weights"]) == (2, False, "eora")
    assert config["eora_scale"] == 0.5
    saved = load_file(learned / "adapter_model.safetensors")
    assert sum(".maskllm_lora_B" in k for k in saved) == 4 * 7
    general, task = load_mask_adapter(str(prior)), load_mask_adapter(str(learned))
    assert all(torch.equal(task.records[n].indices, general.records[n].indices) for n in general.records)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(AIDREAMS), str(learned)).merge_and_unload()
    assert all(is_n_m_sparse(merged.get_submodule(n).weight, 2, 4) for n in general.records)


def test_eora_without_a_rank_or_frozen_mask_without_one_is_refused_before_loading(tmp_path, text_file):
    with pytest.raises(ValueError, match="lora_rank > 0"):
        run(["learn", *common(text_file), "--data", text_file, "--freeze-mask", "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
