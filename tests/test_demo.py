"""``sparse-peft demo`` end to end on the shipped 231K-parameter real model: one frozen base, the one-shot SparseGPT
mask, a general mask, a TinyStories task mask learned from it (delta-coded) and its table (seconds)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import pytest
import torch
from conftest import AIDREAMS
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparse_peft.cli as cli
import sparse_peft.commands as commands
import sparse_peft.data as data
from sparse_peft.adapter_io import adapter_size
from sparse_peft.cli import main, run
from sparse_peft.data import load_texts
from sparse_peft.evaluation import perplexity
from sparse_peft.patterns import is_n_m_sparse
from sparse_peft.tasks import load_task
from test_cli import STORY, refuse_model_loading
from test_cli_options import subparsers

WINDOW, MAX_WINDOWS = 32, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One small demo run: ``{"general", "text_file", "output", "payload" (demo.json), "out", "err", "warnings"}``."""
    folder = tmp_path_factory.mktemp("demo")
    text_file = folder / "story.txt"
    text_file.write_text(STORY)
    general = folder / "general"  # the tiny model's general mask: its magnitude 2:4 mask
    run(["prune", "--model", str(AIDREAMS), "--method", "magnitude", "--output", str(general)])
    output = folder / "out"
    argv = ["demo", "--model", str(AIDREAMS), "--general", str(general), "--calibration", str(text_file),
            "--num-samples", "4", "--calibration-len", "32", "--eval-data", str(text_file), "--window", str(WINDOW),
            "--max-windows", str(MAX_WINDOWS), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--output", str(output)]
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        assert main(argv) == 0, err.getvalue()[-2000:]
    return {"general": str(general), "text_file": str(text_file), "output": output,
            "payload": json.loads((output / "demo.json").read_text()), "out": out.getvalue(), "err": err.getvalue(),
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


def test_demo_prints_one_table_of_the_four_rows_and_writes_them_to_demo_json(demo):
    payload, out = demo["payload"], demo["out"]
    rows = payload["rows"]
    assert [r["row"] for r in rows] == ["dense", "sparsegpt", "general", "tinystories"]
    assert all(set(r) == {"row", "model", "adapter", "eval_ppl", "task_ppl", "bytes", "bits_per_weight",
                          "switch_seconds"} for r in rows)
    assert [r["adapter"] for r in rows] == [None, str(demo["output"] / "sparsegpt"), demo["general"],
                                            str(demo["output"] / "task-tinystories")]
    header = f"| model | {demo['text_file']} PPL | TinyStories held-out PPL | adapter size |"
    assert out.count(header) == 1 and out.count("|---|---|---|---|") == 1
    table = out[out.index(header):].splitlines()[2:6]
    for line, row in zip(table, rows):
        assert line.startswith(f"| {row['model']} | {row['eval_ppl']:.2f} | {row['task_ppl']:.2f} | ")
    assert table[0].endswith("| - (the shared base) |")
    assert table[3].endswith(f"{rows[3]['bits_per_weight']:.3f} bit/weight |")
    task = payload["task_mask"]
    assert (task["tokens"], task["steps"], task["batch_size"], task["seq_len"]) == (2 * 2 * 32, 2, 2, 32)
    assert (task["lora_rank"], task["lr"]) == (16, 2e-3)
    assert f"task adapter: {task['tokens']} TinyStories training tokens (2 steps x 2 x 32, lr 0.002) in " in out
    assert "a rank-16 update trained under the frozen general mask" in out
    assert rows[3]["model"] == "task adapter: general mask + rank-16 update"
    # the changed groups: what the delta-coded file itself records (maskllm_delta_info = [K, coding, gap bits])
    saved = load_file(demo["output"] / "task-tinystories" / "adapter_model.safetensors")
    assert task["groups_changed"] == sum(int(v[0]) for k, v in saved.items() if k.endswith(".maskllm_delta_info"))
    model = AutoModelForCausalLM.from_pretrained(AIDREAMS)
    assert task["groups"] == sum(module.weight.numel() // 4 for name, module in model.named_modules()
                                 if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")))
    assert (f"its mask changes {task['groups_changed']:,} of the general mask's {task['groups']:,} groups "
            f"({100 * task['groups_changed'] / task['groups']:.3f}%)") in out
    assert "one base, 3 mask adapters: switching takes at most" in out
    assert all(r["switch_seconds"] > 0 for r in rows[1:]) and rows[0]["switch_seconds"] is None
    assert payload["windows"]["eval"] == {"window": WINDOW, "windows": MAX_WINDOWS, "tokens": MAX_WINDOWS * 31}
    assert payload["windows"]["task"] == payload["windows"]["eval"]


def test_demo_prints_progress_bars_but_no_loss_dicts_and_no_warnings(demo):
    printed = demo["out"] + demo["err"]
    assert "perplexity: 100%" in demo["err"] and "2/2" in demo["err"]  # perplexity's and Trainer's bars
    assert "loss" not in printed and "train_runtime" not in printed and "{'" not in printed
    assert demo["warnings"] == []


def test_demo_task_mask_is_exact_2_4_and_delta_coded_against_the_general_mask(demo):
    task_dir = demo["output"] / "task-tinystories"
    config = json.loads((task_dir / "adapter_config.json").read_text())
    assert config["save_delta"] is True and config["prior"] == demo["general"]
    rows = {r["row"]: r for r in demo["payload"]["rows"]}
    for name in ("sparsegpt", "general", "tinystories"):
        size = adapter_size(rows[name]["adapter"])
        assert (rows[name]["bytes"], rows[name]["bits_per_weight"]) == (size["bytes"], size["bits_per_weight"])
        assert size["bytes"] == os.path.getsize(os.path.join(rows[name]["adapter"], "adapter_model.safetensors"))
    saved = load_file(task_dir / "adapter_model.safetensors")
    updates = {key: value.shape for key, value in saved.items() if ".maskllm_lora_" in key}
    assert len(updates) == 2 * 4 * 7 and all(16 in shape for shape in updates.values())
    assert demo["payload"]["task_mask"]["groups_changed"] == 0  # the general mask is frozen: its delta is empty
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(AIDREAMS), str(task_dir)).merge_and_unload()
    linears = {name: module for name, module in merged.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    assert len(linears) == 4 * 7 and all(is_n_m_sparse(module.weight, 2, 4) for module in linears.values())


def test_demo_perplexities_are_those_of_the_saved_adapters(demo):
    tokenizer = AutoTokenizer.from_pretrained(AIDREAMS)
    texts = {"eval_ppl": load_texts(demo["text_file"], split="test"), "task_ppl": load_task("tinystories").held_out}
    for row in demo["payload"]["rows"]:
        model = AutoModelForCausalLM.from_pretrained(AIDREAMS)
        if row["adapter"] is not None:
            model = PeftModel.from_pretrained(model, row["adapter"])
        for key, documents in texts.items():
            reference = perplexity(model, tokenizer, documents, window=WINDOW, max_windows=MAX_WINDOWS,
                                   show_progress=False)
            assert row[key] == pytest.approx(reference["ppl"], rel=1e-6), (row["row"], key)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--general is needed with --model"),
        (["--general", "runs/generl"], "Did you mean 'runs/general'?"),
        (["--general", "runs/general/adapter_config.json"], "is a file; pass the mask adapter's folder"),
        (["--general", "runs/general", "--eval-data", "wikitxt2"], "Did you mean 'wikitext2'?"),
        (["--general", "runs/general", "--lora-rank", "-1"], "MaskConfig.lora_rank must be an integer >= 0, got -1"),
    ],
)
def test_demo_bad_general_fails_before_any_model_is_loaded(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "general").mkdir(parents=True)
    (tmp_path / "runs" / "general" / "adapter_config.json").write_text("{}")
    refuse_model_loading(monkeypatch)
    assert main(["demo", "--model", str(AIDREAMS), *extra, "--output", "out"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("sparse-peft demo: error:") and message in last_line, last_line
    assert not (tmp_path / "out").exists()


def test_demo_general_defaults_to_the_shipped_general_mask_only_for_the_shipped_model(monkeypatch):
    monkeypatch.setattr(data, "shipped_general_mask", lambda: "/the/general/mask")
    demo = subparsers(cli.build_parser())["demo"]
    assert commands._resolve_general(demo.parse_args([])) == "/the/general/mask"
    with pytest.raises(ValueError, match=r"--general is needed with --model m --gguf-file f\.gguf.*sparse-peft learn "
                                         r"--model m --gguf-file f\.gguf --prior sparsegpt"):
        commands._resolve_general(demo.parse_args(["--model", "m", "--gguf-file", "f.gguf"]))


def test_demo_lora_rank_0_learns_a_mask_only_task_mask_stored_smaller_than_the_general_mask(demo, tmp_path):
    output = tmp_path / "out"
    argv = ["demo", "--model", str(AIDREAMS), "--general", demo["general"], "--calibration", demo["text_file"],
            "--num-samples", "4", "--calibration-len", "32", "--eval-data", demo["text_file"], "--window",
            str(WINDOW), "--max-windows", str(MAX_WINDOWS), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--lora-rank", "0", "--output", str(output)]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    payload = json.loads((output / "demo.json").read_text())
    rows = {r["row"]: r for r in payload["rows"]}
    assert (payload["task_mask"]["lora_rank"], payload["task_mask"]["lr"]) == (0, 5e-4)
    assert rows["tinystories"]["model"] == "task 2:4 mask (from the general)"
    assert rows["tinystories"]["bytes"] < rows["general"]["bytes"]  # only where it differs from the general mask
    saved = load_file(output / "task-tinystories" / "adapter_model.safetensors")
    assert not any(".maskllm_lora_" in key for key in saved)
    assert "task mask: 128 TinyStories training tokens (2 steps x 2 x 32, lr 0.0005) in " in out.getvalue()
