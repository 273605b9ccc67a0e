"""benchmarks/quality.py end to end on the shipped 231K-parameter model: rows, gap arithmetic, resume."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import AIDREAMS, load_benchmark

SMALL = ["--model", str(AIDREAMS), "--device", "cpu", "--num-samples", "2", "--calibration-len", "16",
         "--batch-size", "1", "--seq-len", "16", "--window", "32", "--eval-windows", "2", "--priors", "sparsegpt",
         "--calibration", "tinystories", "--train-data", "tinystories", "--eval-data", "tinystories"]  # its own domain


def test_rows_gap_closed_and_resume_runs_only_missing_rows(tmp_path):
    quality = load_benchmark("quality")
    out = str(tmp_path / "q")
    first = quality.main([*SMALL, "--steps", "1", "--curve-steps", "1,2", "--output", out])
    masks = [(r["mask"], r.get("steps")) for r in first["rows"]]
    assert masks == [("dense", None), ("magnitude", None), ("wanda", None), ("sparsegpt", None),
                     ("sparsegpt+update", None), ("learned from sparsegpt", 1), ("learned from sparsegpt", 2)]
    dense, sparsegpt = first["rows"][0]["ppl"], first["rows"][3]["ppl"]
    for row in first["rows"][5:]:
        assert row["tokens"] == row["steps"] * 16
        assert (row["batch_size"], row["seq_len"], row["sparse_reg"]) == (1, 16, 0.0)
        assert abs(row["gap_closed"] - (sparsegpt - row["ppl"]) / (sparsegpt - dense)) < 1e-12
    assert (tmp_path / "q" / "quality.png").stat().st_size > 0
    assert "| learned from sparsegpt (seed 42) | learned |" in (tmp_path / "q" / "quality.md").read_text()

    # Resuming with one more budget keeps every measured row as it was and adds only the new one.
    second = quality.main([*SMALL, "--steps", "1", "--curve-steps", "1,2,3", "--output", out, "--resume"])
    assert [r["ppl"] for r in second["rows"][:7]] == [r["ppl"] for r in first["rows"]]
    assert [(r["mask"], r.get("steps")) for r in second["rows"][7:]] == [("learned from sparsegpt", 3)]
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["rows"] == second["rows"]

    # The same budget trained on the KL from the dense model is another row, not a measured one.
    third = quality.main([*SMALL, "--steps", "1", "--curve-steps", "1", "--distill", "--output", out, "--resume"])
    assert [(r["mask"], r.get("steps"), r.get("distill")) for r in third["rows"][5:]] == [
        ("learned from sparsegpt", 1, False), ("learned from sparsegpt", 2, False),
        ("learned from sparsegpt", 3, False), ("learned from sparsegpt", 1, True)]
    assert (tmp_path / "q" / "learned-sparsegpt-1x1x16-reg0-distill").is_dir()
    assert "| 1 x 1 x 16 | KL from dense | fp32 |" in (tmp_path / "q" / "quality.md").read_text()

    # So is the same budget trained under bf16 autocast; perplexity is still measured in fp32.
    fourth = quality.main([*SMALL, "--steps", "1", "--curve-steps", "1", "--bf16", "--output", out, "--resume"])
    assert [(r.get("steps"), r.get("distill"), r.get("bf16")) for r in fourth["rows"][5:]] == [
        (1, False, False), (2, False, False), (3, False, False), (1, True, False), (1, False, True)]
    assert (tmp_path / "q" / "learned-sparsegpt-1x1x16-reg0-bf16").is_dir()
    assert "| 1 x 1 x 16 | LM | bf16 autocast |" in (tmp_path / "q" / "quality.md").read_text()

    # Another seed, and bfloat16 logits, are new rows too; rows written before either was recorded count as
    # float32 logits at seed 42, so a resume at those values adds nothing.
    rows = json.loads((tmp_path / "q" / "quality.json").read_text())
    for row in rows["rows"]:
        row.pop("seed", None), row.pop("logits_dtype", None)
    (tmp_path / "q" / "quality.json").write_text(json.dumps(rows))
    fifth = quality.main([*SMALL, "--steps", "1", "--curve-steps", "1", "--output", out, "--resume"])
    assert len(fifth["rows"]) == 10
    sixth = quality.main([*SMALL, "--steps", "1", "--curve-steps", "1", "--seed", "1", "--logits-dtype", "bfloat16",
                          "--output", out, "--resume"])
    assert [(r["seed"], r["logits_dtype"]) for r in sixth["rows"][10:]] == [(1, "bfloat16")]
    assert (tmp_path / "q" / "learned-sparsegpt-1x1x16-reg0-bf16logits-seed1").is_dir()
    assert "| learned from sparsegpt (seed 1) | learned |" in (tmp_path / "q" / "quality.md").read_text()

    # A resume that would mix incomparable rows, or that lost a one-shot mask a row needs, stops before any work.
    saved = (tmp_path / "q" / "quality.json").read_bytes()
    changed = [a if a != "2" or SMALL[i - 1] != "--eval-windows" else "3" for i, a in enumerate(SMALL)]
    with pytest.raises(ValueError, match="--eval-windows 2 there, 3 now"):
        quality.main([*changed, "--steps", "1", "--curve-steps", "1", "--output", out, "--resume"])
    shutil.rmtree(tmp_path / "q" / "oneshot-wanda")
    with pytest.raises(ValueError, match="'wanda' row but its mask folder oneshot-wanda is gone"):
        quality.main([*SMALL, "--steps", "1", "--curve-steps", "1", "--output", out, "--resume"])
    assert (tmp_path / "q" / "quality.json").read_bytes() == saved


def test_budget_beyond_the_training_text_goes_over_it_again_with_a_warning(tmp_path):
    quality = load_benchmark("quality")
    text = tmp_path / "short.txt"
    text.write_text("The robot dreamed of a quiet garden where the flowers sang to the moon at night.\n" * 2)
    windows = len(quality.text_windows([text.read_text()], quality.load_model_and_tokenizer(str(AIDREAMS))[1], 16))
    args = [a if SMALL[i - 1] != "--train-data" else str(text) for i, a in enumerate(SMALL)]
    steps = 2 * windows + 1  # two passes and a bit: Trainer reshuffles the windows for each pass
    trainers = []
    learn_mask = quality.learn_mask
    quality.learn_mask = lambda *a, **k: trainers.append(learn_mask(*a, **k))
    with pytest.warns(UserWarning, match=f"{steps} steps x 1 sequences go over the {windows} training examples"):
        result = quality.main([*args, "--steps", str(steps), "--curve-steps", str(steps),
                               "--output", str(tmp_path / "q")])
    row = result["rows"][-1]
    assert (row["steps"], row["tokens"]) == (steps, steps * 16)
    assert row["passes"] == round(steps / windows, 3) and row["passes"] > 2
    assert [t.state.global_step for t in trainers] == [steps]
    assert f"| {steps * 16} ({row['passes']:.2f} passes over the text) |" in (tmp_path / "q" / "quality.md").read_text()
