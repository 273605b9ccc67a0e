"""Issue 19 item 4: the CLI's options (help and defaults, tables, checkpoints and resuming, evaluation during
training, tables of text) and item 3's tables and inspect plot, on the shipped 231K-parameter real model."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import AIDREAMS
from transformers import AutoModelForCausalLM

from sparse_peft.cli import build_parser, main, run
from sparse_peft.stats import mask_stats
from test_cli import STORY, common, refuse_model_loading


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "story.txt"
    path.write_text(STORY)
    return str(path)


def subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    for name, sub in {"": parser, **subparsers(parser)}.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            shown = sub._get_formatter()._get_help_string(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, f"{name} {action.option_strings}: default {action.default!r} not shown"
        assert "[More Information Needed]" not in text
    demo = subparsers(parser)["demo"]
    assert "(default: 256)" in " ".join(demo.format_help().split())  # the demo's window, as eval prints its own


def test_tsv_training_text_is_read_by_its_named_column(tmp_path, text_file, monkeypatch):
    table = tmp_path / "train.tsv"
    sentences = [line for line in STORY.splitlines() if line][:1] * 60
    table.write_text("id\tquestion\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(sentences)))
    import sparse_peft.training as training

    seen = []
    original = training.text_windows
    monkeypatch.setattr(training, "text_windows", lambda texts, *a, **k: seen.append(list(texts)) or original(
        texts, *a, **k))
    run(["learn", *common(text_file), "--prior", "magnitude", "--data", str(table), "--text-column", "question",
         "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--output", str(tmp_path / "out")])
    assert seen[0] == sentences  # the column's values, not raw lines with the header or the ids
    assert not (tmp_path / "out" / "trainer").exists()  # no empty Trainer folder left behind


def test_learn_resumes_from_its_last_checkpoint_to_the_same_adapter(tmp_path, text_file):
    out = tmp_path / "run"
    argv = ["learn", *common(text_file), "--prior", "magnitude", "--data", text_file, "--steps", "4", "--batch-size",
            "2", "--seq-len", "32", "--save-steps", "2", "--eval-steps", "2", "--eval-data", text_file,
            "--eval-windows", "2", "--output", str(out)]
    run(argv)
    uninterrupted = (out / "adapter_model.safetensors").read_bytes()
    state = json.loads((out / "trainer" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2, 4]
    assert all("tau" in e and "mask_flip_rate" in e for e in state["log_history"] if "loss" in e)
    # interrupt after step 2: drop the later checkpoint and the result, then resume from the newest checkpoint
    import shutil

    shutil.rmtree(out / "trainer" / "checkpoint-4")
    (out / "adapter_model.safetensors").unlink()
    run([*argv, "--resume", "last"])
    assert (out / "adapter_model.safetensors").read_bytes() == uninterrupted


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume", "last"], "no checkpoint in"),
        (["--resume", "nowhere"], "not a Trainer checkpoint folder"),
        (["--eval-steps", "5"], "--eval-steps needs --eval-data"),
        (["--save-steps", "0"], "--save-steps must be a positive"),
    ],
)
def test_training_options_are_checked_before_the_model_is_loaded(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refuse_model_loading(monkeypatch)
    assert main(["learn", "--model", str(AIDREAMS), "--prior", "magnitude", "--data", "c4", *extra,
                 "--output", "out"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "half", "inf", "nan"])
def test_eora_scale_must_be_auto_or_a_number(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["learn", "--prior", "magnitude", "--data", "c4", "--eora-scale", value, "--output", "out"])
    assert exit_info.value.code == 2
    assert f"--eora-scale: expected auto or a finite number >= 0, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1.5", "half", "nan"])
def test_prior_reselect_must_be_a_fraction(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["learn", "--data", "c4", "--prior-reselect", value, "--output", "out"])
    assert exit_info.value.code == 2
    assert f"--prior-reselect: expected a number in [0, 1], got '{value}'" in capsys.readouterr().err


def test_learn_reselect_needs_calibration_text_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refuse_model_loading(monkeypatch)
    (tmp_path / "general").mkdir()  # a general mask folder (never read: the missing calibration text stops first)
    assert main(["learn", "--model", str(AIDREAMS), "--prior", str(tmp_path / "general"), "--data", "c4",
                 "--prior-reselect", "0.5", "--calibration", str(tmp_path / "missing.txt"), "--output", "out"]) == 2
    assert "--calibration" in capsys.readouterr().err


def test_eval_table_states_data_window_and_sparsity(tmp_path, text_file, capsys):
    prior = tmp_path / "magnitude"
    run(["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--output", str(prior)])
    capsys.readouterr()
    rows = run(["eval", "--model", str(AIDREAMS), "--eval-data", text_file, "--window", "32", "--max-windows", "3",
                "--adapter", str(prior)])
    out = capsys.readouterr().out
    assert f"Perplexity on {text_file} (test split), windows of 32 tokens, first 3 windows (3 scored, 93 predicted " \
           "tokens):" in out
    assert "| model | sparsity | ppl | tokens | windows |" in out
    model = AutoModelForCausalLM.from_pretrained(AIDREAMS)
    total = sum(p.numel() for p in model.parameters())
    weights = sum(r.shape[0] * r.shape[1] for r in mask_stats(str(prior)))
    assert rows[1]["sparsity"] == f"2:4, {weights // 2 / total:.1%} of all weights"
    assert rows[0]["sparsity"] == "dense"


def test_inspect_lists_layers_in_model_order_and_draws_the_plot(tmp_path, capsys):
    prior = tmp_path / "magnitude"
    run(["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--output", str(prior)])
    capsys.readouterr()
    payload = run(["inspect", str(prior), "--plot", str(tmp_path / "layers.png")])
    names = [layer["name"] for layer in payload["layers"]]
    modules = [name for name, _ in AutoModelForCausalLM.from_pretrained(AIDREAMS).named_modules()]
    assert names == [name for name in modules if name in set(names)]
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot -> {tmp_path / 'layers.png'}" in capsys.readouterr().out


def test_mask_stats_of_plain_masks_sort_numbers_by_value():
    import torch

    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    rows = mask_stats({"layers.10.q": mask, "layers.2.q": mask, "layers.1.q": mask}, n=2, m=4)
    assert [r.name for r in rows] == ["layers.1.q", "layers.2.q", "layers.10.q"]


def test_prior_defaults_to_the_shipped_general_mask_only_for_the_shipped_model(monkeypatch):
    import sparse_peft.commands as commands

    monkeypatch.setattr(commands, "shipped_general_mask", lambda: "/the/general/mask")
    learn = subparsers(build_parser())["learn"]
    assert commands._resolve_prior(learn.parse_args(["--output", "o"])) == "/the/general/mask"
    assert commands._resolve_prior(learn.parse_args(["--prior", "shipped", "--output", "o"])) == "/the/general/mask"
    assert commands._resolve_prior(learn.parse_args(["--model", str(AIDREAMS), "--output", "o"])) == "sparsegpt"
    assert commands._resolve_prior(learn.parse_args(["--prior", "none", "--output", "o"])) is None
    with pytest.raises(ValueError, match="--prior sparsegpt to learn a general mask"):
        commands._resolve_prior(learn.parse_args(["--model", str(AIDREAMS), "--prior", "shipped", "--output", "o"]))


def test_missing_shipped_general_mask_names_the_fix(monkeypatch, tmp_path):
    import sparse_peft.data as data

    monkeypatch.setattr(data, "__file__", str(tmp_path / "sparse_peft" / "data.py"))
    with pytest.raises(FileNotFoundError, match="Pass a general mask adapter instead"):
        data.shipped_general_mask()
