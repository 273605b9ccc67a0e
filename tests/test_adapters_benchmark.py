"""benchmarks/adapters.py on the shipped 231K-parameter model: a general and two delta-coded task masks on one base."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model

from conftest import AIDREAMS, load_benchmark
from sparse_peft import MaskConfig
from sparse_peft.data import load_model_and_tokenizer
from sparse_peft.oneshot import prune


def test_memory_sizes_and_switching_of_adapters_on_one_base(tmp_path):
    model = load_model_and_tokenizer(str(AIDREAMS))[0]
    general = tmp_path / "general"
    model = prune(model, "magnitude", show_progress=False)
    model.save_pretrained(general)
    model = model.unload()
    tasks = []
    for seed in (0, 1):
        task = get_peft_model(model, MaskConfig(prior=str(general)))
        torch.manual_seed(seed)
        with torch.no_grad():  # move a task mask off the general mask in some groups
            for p in task.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        tasks.append(str(tmp_path / f"task{seed}"))
        task.save_pretrained(tasks[-1])
        model = task.unload()

    out = tmp_path / "adapters.json"
    result = load_benchmark("adapters").main(["--model", str(AIDREAMS), "--general", str(general), "--adapters", *tasks,
                                    "--seq-len", "16", "--rounds", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # the file holds what was returned
    loads = {row["adapter"]: row for row in result["loads"]}
    assert list(loads) == ["base model", "general", "task0", "task1"]
    previous = loads["base model"]
    for name, source in (("general", general), ("task0", tasks[0]), ("task1", tasks[1])):
        row = loads[name]
        # an inference adapter holds one uint8 pattern index per group of 4 weights: exactly 0.25 byte per weight
        assert row["tensor_bytes"] * 4 == row["masked_weights"]
        assert row["file_bytes"] == os.path.getsize(os.path.join(source, "adapter_model.safetensors"))
        assert row["rss"] > 0 and row["bits_per_weight"] == 8 * row["file_bytes"] / row["masked_weights"]
        # Linux + glibc here: the trimmed reading exists, and trimming never leaves more resident than before
        assert 0 < row["rss_trimmed"] <= row["rss"]
        assert row["rss_trimmed_growth"] == row["rss_trimmed"] - previous["rss_trimmed"]
        previous = row
    for task in tasks:  # the task files are differences to the general mask, whose file they do not include
        assert json.loads((tmp_path / task / "adapter_config.json").read_text())["save_delta"] is True
    assert [row["adapter"] for row in result["switching"]] == ["general", "task0", "task1"]
    assert all(row["switch_and_forward"] > 0 and row["cached_forward"] > 0 for row in result["switching"])


def test_a_missing_adapter_fails_before_the_base_model_loads(tmp_path, monkeypatch):
    benchmark = load_benchmark("adapters")
    general = tmp_path / "general"
    prune(load_model_and_tokenizer(str(AIDREAMS))[0], "magnitude", show_progress=False).save_pretrained(general)

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(benchmark, "load_model_and_tokenizer", refuse)
    with pytest.raises(FileNotFoundError, match="No mask adapter at"):
        benchmark.main(["--model", str(AIDREAMS), "--general", str(general), "--adapters", str(tmp_path / "typo")])
