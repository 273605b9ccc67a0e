"""benchmarks/lowrank.py end to end on the shipped 231K-parameter model: every row kind, merge checks, resume."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from conftest import AIDREAMS, load_benchmark
from sparse_peft.data import load_model_and_tokenizer, load_texts
from sparse_peft.evaluation import perplexity
from sparse_peft.lowrank_init import AUTO_SCALES
from sparse_peft.oneshot import prune

SMALL = ["--model", str(AIDREAMS), "--device", "cpu", "--ranks", "2,4", "--train-rank", "2", "--num-samples", "4",
         "--calibration-len", "32", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--window", "32",
         "--eval-windows", "2", "--eval-examples", "8"]


def test_rows_merge_checks_reference_and_resume(tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    general = str(tmp_path / "general")
    prune(model, "magnitude", show_progress=False).save_pretrained(general)
    lowrank = load_benchmark("lowrank")
    out = str(tmp_path / "out")
    result = lowrank.main([*SMALL, "--general", general, "--output", out])
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "mask", "eora-under-r2", "eora-under-r4", "eora-residual-r2", "trained-under-r2",
                          "naive-lora-r2"]
    for name in ("mask", "eora-under-r2", "eora-under-r4", "trained-under-r2"):
        assert rows[name]["merged_exactly_2of4"] and rows[name]["merged_zero_fraction"] >= 0.5, name
    assert "merged_exactly_2of4" not in rows["eora-residual-r2"]  # a dense residual does not merge
    assert not rows["naive-lora-r2"]["merged_exactly_2of4"]
    assert rows["naive-lora-r2"]["merged_zero_fraction"] < 0.5  # the merged LoRA fills the pruned weights
    assert rows["mask"]["bits_per_weight"] < rows["eora-under-r2"]["bits_per_weight"] < rows["eora-under-r4"][
        "bits_per_weight"]
    assert rows["trained-under-r2"]["tokens"] == 2 * 2 * 32
    for name in ("eora-under-r2", "eora-under-r4", "eora-residual-r2"):  # the factor the start was applied with
        assert rows[name]["eora_scale"] in AUTO_SCALES, name
    assert "eora_scale" not in rows["trained-under-r2"]  # started from zero

    # The mask row is the library's perplexity of the general mask adapter.
    texts = load_texts("wikitext2", split="test")
    masked = PeftModel.from_pretrained(load_model_and_tokenizer(str(AIDREAMS))[0], general).eval()
    reference = perplexity(masked, tokenizer, texts, window=32, max_windows=2, show_progress=False)["ppl"]
    assert abs(rows["mask"]["wikitext2_ppl"] - reference) <= 1e-6 * reference

    again = lowrank.main([*SMALL, "--general", general, "--output", out, "--resume"])
    assert again["rows"] == result["rows"]
    assert (tmp_path / "out" / "lowrank.md").read_text().count("\n") == len(rows) + 2


def test_lowrank_solve_compares_cg_with_the_cholesky_reference(tmp_path):
    model, _ = load_model_and_tokenizer(str(AIDREAMS))
    general = str(tmp_path / "general")
    prune(model, "magnitude", show_progress=False).save_pretrained(general)
    solve = load_benchmark("lowrank_solve")
    result = solve.main(["--model", str(AIDREAMS), "--general", general, "--blocks", "1", "--rank", "2",
                         "--rtols", "0.1,1e-6", "--num-samples", "4", "--calibration-len", "32",
                         "--output", str(tmp_path / "out")])
    assert len(result["rows"]) == 7  # q, k, v, o, gate, up, down of block 0
    for row in result["rows"]:
        exact, tight = row["cholesky"]["relative_error"], row["cg rtol=1e-06"]["relative_error"]
        assert 0 < exact < 1  # the rank-2 update lowers the mask's output error
        assert abs(tight - exact) <= 1e-3 * exact  # solved to 1e-6, CG gives the Cholesky answer
    table = (tmp_path / "out" / "lowrank_solve.md").read_text()
    assert table.count("\n") == 2 + 3 and "| cholesky | " in table


def test_layerwise_rows_and_reference(tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(AIDREAMS))
    general = str(tmp_path / "general")
    prune(model, "magnitude", show_progress=False).save_pretrained(general)
    layerwise = load_benchmark("lowrank_layerwise")
    with pytest.raises(ValueError, match="'rank-mpl' is not 'mask' or <full|rank>"):
        layerwise.main(["--model", str(AIDREAMS), "--rows", "mask,rank-mpl"])  # fails before the model loads
    with pytest.raises(SystemExit):  # argparse's usage error: no C4 document left to score
        layerwise.main(["--model", str(AIDREAMS), "--held-out-docs", "0"])
    rows = "mask,full-all,full-all-x0,rank-mlp-x0.5"
    result = layerwise.main(["--model", str(AIDREAMS), "--general", general, "--rows", rows, "--rank", "2",
                             "--num-samples", "4", "--calibration-len", "32", "--held-out-docs", "50", "--window",
                             "32", "--eval-windows", "2", "--output", str(tmp_path / "out")])
    got = {r["row"]: r for r in result["rows"]}
    assert list(got) == rows.split(",")
    assert (got["rank-mlp-x0.5"]["update"], got["rank-mlp-x0.5"]["layers"], got["rank-mlp-x0.5"]["scale"]) == (
        "rank", "mlp", 0.5)
    masked = PeftModel.from_pretrained(load_model_and_tokenizer(str(AIDREAMS))[0], general).eval()
    reference = perplexity(masked, tokenizer, load_texts("wikitext2", split="test"), window=32, max_windows=2,
                           show_progress=False)["ppl"]
    assert got["mask"]["wikitext2_ppl"] == reference
    assert got["full-all-x0"]["wikitext2_ppl"] == reference  # a zero-scaled update is the mask alone
    assert got["full-all"]["wikitext2_ppl"] != reference
    saved = json.loads((tmp_path / "out" / "layerwise.json").read_text())
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "out" / "layerwise.md").read_text().count("\n") == 2 + 4


def test_trained_full_row_keeps_the_general_masks_zeros(tmp_path):
    model, _ = load_model_and_tokenizer(str(AIDREAMS))
    general = str(tmp_path / "general")
    prune(model, "magnitude", show_progress=False).save_pretrained(general)
    lowrank = load_benchmark("lowrank")
    result = lowrank.main([*SMALL, "--general", general, "--rows", "mask,trained-full", "--distill", "--full-lr",
                           "1e-3", "--output", str(tmp_path / "out")])
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "mask", "trained-full"]
    full = rows["trained-full"]
    assert full["merged_exactly_2of4"] and full["merged_zero_fraction"] == rows["mask"]["merged_zero_fraction"]
    assert full["kept_weights_changed"] > 0.9  # AdamW moves every kept weight with a gradient
    assert full["wikitext2_ppl"] != rows["mask"]["wikitext2_ppl"]
    assert (full["tokens"], full["lr"], full["distill"]) == (2 * 2 * 32, 1e-3, True)


def test_train_kept_weights_masks_the_gradient_and_keeps_the_zeros():
    lowrank = load_benchmark("lowrank")
    model, _ = load_model_and_tokenizer(str(AIDREAMS))
    masked = prune(model, "magnitude", show_progress=False)
    masks = {n.removeprefix("base_model.model."): layer.hard_mask("default")
             for n, layer in lowrank.mask_layers(masked).items()}
    sparse = lowrank.train_kept_weights(masked.merge_and_unload(), masks)
    trainable = {n for n, p in sparse.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in masks}
    ids = torch.randint(0, sparse.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    sparse(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW([p for p in sparse.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    optimizer.step()
    for name, mask in masks.items():
        layer = sparse.get_submodule(name)
        grad = layer.weight.grad  # nn.Linear: [out, in] like the mask
        assert torch.equal(grad, grad * mask)  # nothing flows into a pruned weight
        assert bool((grad[mask.bool()] != 0).any())
        weight = layer.weight.detach()
        assert torch.equal(weight[~mask.bool()], torch.zeros_like(weight[~mask.bool()]))  # still exactly 0
