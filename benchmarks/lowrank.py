"""Low-rank benchmark: a general 2:4 mask with a low-rank update (``MaskConfig(lora_rank=r)``), on a real model.

Rows (``--rows``), all on the general mask (``--general``, default the shipped one) and the same base:

* ``mask``: the general mask alone;
* ``eora-under-r<R>``: training-free update under the mask (``init_lora_weights='eora'``, rank R per ``--ranks``,
  every ``B`` times ``--eora-scale``; ``auto``: the factor chosen on the calibration text, recorded per row);
* ``eora-residual-r<R>``: training-free dense residual update (EoRA's projection of the compression error);
* ``trained-under-r<R>``: rank R (``--train-rank``) under the frozen general mask (``train_mask=False``), started
  from zero (``--trained-init zeros``) or from the training-free update (``eora``: the ``eora-under-r<R>`` row's
  adapter when it exists) and trained for ``--steps`` steps of ``--batch-size`` x ``--seq-len`` tokens (LM loss);
* ``naive-lora-r<R>``: what users do today: PEFT LoRA trained on the model with the mask merged, the same steps,
  then merged without the mask, which destroys the sparsity (its zero fraction and 2:4 validity are reported);
* ``trained-full``: the ceiling of any update under the mask at the row's budget: every kept weight of the
  targeted layers trained (full rank; the pruned ones held at exactly 0 by masking their gradient) on the model with
  the general mask merged, the same steps and loss as ``trained-under`` at ``--full-lr``. Not an adapter: the result
  is a whole sparse model (no size column).

Metrics: Wikitext-2 perplexity (``--window`` x ``--eval-windows``), SST-2 label-word accuracy through
``evaluate`` (``--eval-examples`` validation examples), the adapter's size in bits per masked weight (its mask saved
delta-coded against the general mask, plus the update in bf16), the fraction of zeros in the targeted weights after
``merge_and_unload`` and whether every merged weight is exactly 2:4. ``lowrank.json`` / ``lowrank.md`` are rewritten
after every row; ``--resume`` keeps the rows there. ``lowrank.png``: PPL against rank.

    python benchmarks/lowrank.py --output runs/lowrank
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, default_data_collator
from transformers.modeling_utils import PreTrainedModel

import sparse_peft
from sparse_peft.adapter_io import adapter_size
from sparse_peft.config import DEFAULT_TARGET_MODULES
from sparse_peft.data import calibration_from_texts, default_general_mask, load_model_and_tokenizer, load_texts
from sparse_peft.evaluation import label_word_predictions, metric_scores, perplexity
from sparse_peft.layer import mask_layers
from sparse_peft.lowrank_init import scale_update_to_calibration
from sparse_peft.options import auto_or_number
from sparse_peft.patterns import is_n_m_sparse
from sparse_peft.tasks import load_task
from sparse_peft.training import DenseDistillationTrainer, learn_mask, mask_training_arguments, text_windows
from sparse_peft.utils import atomic_write, check_resumed_settings, comma_list, fan_in_fan_out, weight_out_in

SHARED_SETTINGS = ("model", "gguf_file", "general", "calibration", "num_samples", "calibration_len", "train_data",
                   "batch_size", "seq_len", "lr", "window", "eval_windows", "eval_examples", "eora_scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--general", default=None, help="general mask adapter (default: the shipped one)")
    p.add_argument("--rows", type=comma_list(str), default="mask,eora-under,eora-residual,trained-under,naive-lora",
                   help="row kinds: mask, eora-under, eora-residual, trained-under, naive-lora, trained-full")
    p.add_argument("--ranks", type=comma_list(int), default="8,16,32", help="ranks of the eora-under rows")
    p.add_argument("--train-rank", type=int, default=16, help="rank of eora-residual, trained-under, naive-lora")
    p.add_argument("--trained-init", choices=("zeros", "eora"), default="zeros",
                   help="start of the trained-under row: B = 0, or the training-free update")
    p.add_argument("--eora-scale", type=auto_or_number, default="auto",
                   help="MaskConfig.eora_scale of the training-free updates (auto: chosen on the calibration text)")
    p.add_argument("--calibration", default="c4")
    p.add_argument("--num-samples", type=int, default=32, help="calibration sequences of the training-free init")
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--train-data", default="c4")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of the trained updates")
    p.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the trained-full row")
    p.add_argument("--distill", action="store_true",
                   help="the trained-under row trains on the KL from the dense model (default: the LM loss, as "
                        "naive-lora always does)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-examples", type=int, default=500, help="SST-2 validation examples (0: no SST-2 column)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="runs/lowrank")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    try:
        args.general = default_general_mask(args.general, args.model, args.gguf_file)
    except ValueError as err:
        p.error(str(err))
    return args


def row_names(args) -> list[str]:
    names = []
    for kind in args.rows:
        if kind == "eora-under":
            names += [f"eora-under-r{r}" for r in args.ranks]
        elif kind in ("mask", "trained-full"):
            names.append(kind)
        else:
            names.append(f"{kind}-r{args.train_rank}")
    return names


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.model, self.tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file,
                                                              device=args.device)
        self.eval_texts = load_texts("wikitext2", split="test")
        self.sst2 = load_task("sst2") if args.eval_examples else None
        self.json_path = os.path.join(args.output, "lowrank.json")
        self.result = {"settings": {**vars(args)}, "rows": []}
        if os.path.isfile(self.json_path):
            if not args.resume:
                raise ValueError(f"{self.json_path} exists: pass --resume to add to it, or another --output.")
            with open(self.json_path) as f:
                saved = json.load(f)
            saved["settings"].setdefault("eora_scale", 1.0)  # tables from before the option: the fit as computed
            check_resumed_settings(saved["settings"], args, SHARED_SETTINGS, self.json_path)
            self.result["rows"] = saved["rows"]
        self._calibration = None

    @property
    def calibration(self) -> torch.Tensor:
        if self._calibration is None:
            texts = load_texts(self.args.calibration, split="train")
            self._calibration = calibration_from_texts(texts, self.tokenizer, self.args.num_samples,
                                                       self.args.calibration_len)
        return self._calibration

    def evaluate(self, model) -> dict:
        model.eval()
        row = {"wikitext2_ppl": perplexity(model, self.tokenizer, self.eval_texts, window=self.args.window,
                                           max_windows=self.args.eval_windows, show_progress=False)["ppl"]}
        if self.sst2 is not None:
            count = self.args.eval_examples
            predictions = label_word_predictions(model, self.tokenizer, self.sst2.eval_prompts()[:count],
                                                 self.sst2.label_words, batch_size=16)
            row["sst2_accuracy"] = metric_scores(predictions, self.sst2.eval_labels[:count])["accuracy"]
        return row

    @property
    def budget(self) -> dict:
        """``{"steps", "tokens"}`` of the trained rows."""
        return {"steps": self.args.steps, "tokens": self.args.steps * self.args.batch_size * self.args.seq_len}

    def windows(self):
        steps, batch = self.args.steps, self.args.batch_size
        return text_windows(load_texts(self.args.train_data, split="train"), self.tokenizer, self.args.seq_len,
                            max_windows=steps * batch)

    def train(self, model, name: str) -> float:
        lr = self.args.full_lr if name == "trained-full" else self.args.lr
        args = mask_training_arguments(os.path.join(self.args.output, "trainer"), self.args.steps,
                                       self.args.batch_size, learning_rate=lr, disable_tqdm=True,
                                       logging_steps=max(1, self.args.steps // 5),
                                       use_cpu=str(self.args.device) == "cpu")
        start = time.perf_counter()
        if name == "trained-full":  # a plain sparse model: no adapter to disable, the dense model is the teacher
            kwargs = dict(model=model, args=args, train_dataset=self.windows(), data_collator=default_data_collator)
            trainer = DenseDistillationTrainer(teacher=self.model, **kwargs) if self.args.distill else Trainer(**kwargs)
            trainer.train()
        elif name.startswith("trained"):
            learn_mask(model, self.windows(), args, print_logs=False, distill=self.args.distill)
        else:
            Trainer(model=model, args=args, train_dataset=self.windows(), data_collator=default_data_collator).train()
        return time.perf_counter() - start

    def run_row(self, name: str) -> dict:
        rank = int(name.rsplit("-r", 1)[1]) if "-r" in name else 0
        row = {"row": name, "rank": rank}
        start = time.perf_counter()
        if name == "trained-full":
            masked = PeftModel.from_pretrained(copy.deepcopy(self.model), self.args.general)
            masks = {n.removeprefix("base_model.model."): layer.hard_mask("default")
                     for n, layer in mask_layers(masked).items()}
            model = train_kept_weights(masked.merge_and_unload(), masks)
            row.update(self.budget, lr=self.args.full_lr, distill=self.args.distill,
                       train_seconds=self.train(model, name))
            row.update(self.evaluate(model))
            row.update(merged_stats(model, list(masks)))
            row["kept_weights_changed"] = kept_weights_changed(model, self.model, masks)  # kept: dense values
        elif name.startswith("naive-lora"):
            sparse = PeftModel.from_pretrained(copy.deepcopy(self.model), self.args.general).merge_and_unload()
            targets = DEFAULT_TARGET_MODULES.get(sparse.config.model_type, "all-linear")
            model = get_peft_model(sparse, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                      target_modules=targets))
            row.update(self.budget, train_seconds=self.train(model, name), lora_alpha=2 * rank)
            row.update(self.evaluate(model))
            names = [n for n, _ in model.base_model.model.named_modules() if n.endswith(tuple(targets))]
            merged = model.merge_and_unload()
            row.update(merged_stats(merged, names))
        else:
            start_from = os.path.join(self.args.output, "adapters", f"eora-under-r{rank}")
            trained = name.startswith("trained")
            if trained and self.args.trained_init == "eora" and os.path.isfile(os.path.join(start_from,
                                                                                             "adapter_config.json")):
                # the training-free row of the same rank is this row's start: load it instead of recomputing it
                model = PeftModel.from_pretrained(copy.deepcopy(self.model), start_from, is_trainable=True)
                row["started_from"] = start_from
            else:
                if trained:
                    row["started_from"] = self.args.trained_init
                config = {"prior": self.args.general}
                if rank:
                    placement = "dense_residual" if "residual" in name else "under_mask"
                    config.update(lora_rank=rank, lora_placement=placement, train_mask=False)
                    if not (trained and self.args.trained_init == "zeros"):
                        # the fit as computed, then the row's factor, which is recorded
                        config.update(init_lora_weights="eora", calibration=self.calibration, eora_scale=1.0)
                model = get_peft_model(copy.deepcopy(self.model), sparse_peft.MaskConfig(**config))
                if config.get("init_lora_weights") == "eora":
                    model.peft_config["default"].eora_scale = row["eora_scale"] = scale_update_to_calibration(
                        model, "default", self.calibration, self.args.eora_scale)
            row["init_seconds"] = time.perf_counter() - start
            if trained:
                row["distill"] = self.args.distill
                row.update(self.budget, train_seconds=self.train(model, name))
            row.update(self.evaluate(model))
            folder = self.args.general  # the mask row is the general mask itself: nothing new to save
            if rank:
                folder = os.path.join(self.args.output, "adapters", name)
                model.save_pretrained(folder)
            row["bits_per_weight"] = adapter_size(folder)["bits_per_weight"]
            names = list(mask_layers(model))
            if "residual" not in name:
                row.update(merged_stats(model.merge_and_unload(), names))
        row["seconds"] = time.perf_counter() - start
        return row

    def write(self) -> None:
        data = json.dumps(self.result, indent=2).encode()
        atomic_write(self.json_path, lambda f: f.write(data))
        table = markdown(self.result["rows"]).encode()
        atomic_write(os.path.join(self.args.output, "lowrank.md"), lambda f: f.write(table + b"\n"))

    def run(self) -> dict:
        os.makedirs(self.args.output, exist_ok=True)
        done = {r["row"] for r in self.result["rows"]}
        if "dense" not in done:
            self.result["rows"].append({"row": "dense", "rank": 0, **self.evaluate(self.model)})
            self.write()
        for name in row_names(self.args):
            if name in done:
                continue
            row = self.run_row(name)
            self.result["rows"].append(row)
            self.write()
            print(json.dumps(row), flush=True)
        plot(self.result["rows"], os.path.join(self.args.output, "lowrank.png"))
        return self.result


def train_kept_weights(sparse: PreTrainedModel, masks: dict[str, torch.Tensor]) -> PreTrainedModel:
    """``sparse`` (its masked weights already zero off ``masks``) with only the named layers' weights trainable and
    their gradients multiplied by the mask (``[out, in]``, 0/1), so that AdamW keeps every pruned weight at exactly 0
    (zero gradient, zero moments, decoupled decay of 0)."""
    sparse.requires_grad_(False)
    for name, mask in masks.items():
        layer = sparse.get_submodule(name)
        keep = mask.T if fan_in_fan_out(layer) else mask
        layer.weight.requires_grad_(True)
        layer.weight.register_hook(lambda grad, keep=keep.to(layer.weight.dtype): grad * keep)
    return sparse


def kept_weights_changed(trained: PreTrainedModel, start: PreTrainedModel, masks: dict[str, torch.Tensor]) -> float:
    """Fraction of the kept weights (``masks``' ones) of the named layers that differ between ``trained`` and
    ``start`` (the dense model: a merged mask keeps its values)."""
    changed = kept = 0
    for name, mask in masks.items():
        keep = mask.bool()
        new, old = weight_out_in(trained.get_submodule(name)), weight_out_in(start.get_submodule(name))
        changed += int((new[keep] != old[keep]).sum())
        kept += int(keep.sum())
    return changed / kept


def merged_stats(merged, names: list[str]) -> dict:
    """Zero fraction of the named layers' merged weights and whether each is exactly 2:4."""
    weights = [weight_out_in(merged.get_submodule(n.removeprefix("base_model.model."))) for n in names]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {"merged_zero_fraction": zeros, "merged_exactly_2of4": all(is_n_m_sparse(w, 2, 4) for w in weights)}


def markdown(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["row"] == "dense"), None)
    mask = next((r for r in rows if r["row"] == "mask"), None)
    lines = ["| row | rank | Wikitext-2 PPL | vs mask | gap closed | SST-2 acc | bits / masked weight | zeros after "
             "merge | exactly 2:4 after merge | tokens | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = r["wikitext2_ppl"]
        vs = f"{100 * (ppl / mask['wikitext2_ppl'] - 1):+.1f}%" if mask and r["row"] not in ("dense", "mask") else ""
        gap = ""
        if mask and dense and r["row"] not in ("dense", "mask"):
            gap = f"{100 * (mask['wikitext2_ppl'] - ppl) / (mask['wikitext2_ppl'] - dense['wikitext2_ppl']):.0f}%"
        acc = f"{r['sst2_accuracy']:.3f}" if "sst2_accuracy" in r else ""
        bits = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        zeros = f"{100 * r['merged_zero_fraction']:.1f}%" if "merged_zero_fraction" in r else ""
        exact = {True: "yes", False: "**no**"}.get(r.get("merged_exactly_2of4"), "")
        name = r["row"] + (f" (eora_scale {r['eora_scale']:g})" if "eora_scale" in r else "")
        lines.append(f"| {name} | {r['rank'] or ''} | {ppl:.2f} | {vs} | {gap} | {acc} | {bits} | {zeros} | "
                     f"{exact} | {r.get('tokens', '')} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    under = sorted((r["rank"], r["wikitext2_ppl"]) for r in rows if r["row"].startswith("eora-under"))
    if under:
        ax.plot(*zip(*under), "o-", label="training-free, under the mask")
    for r in rows:
        if r["row"] in ("dense", "mask"):
            ax.axhline(r["wikitext2_ppl"], ls="--", color="k" if r["row"] == "dense" else "r",
                       label=f"{r['row']} ({r['wikitext2_ppl']:.1f})")
        elif not r["row"].startswith("eora-under"):
            ax.plot([r["rank"]], [r["wikitext2_ppl"]], "s", label=r["row"])
    ax.set_xlabel("rank")
    ax.set_ylabel("Wikitext-2 PPL")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> dict:
    return Benchmark(parse_args(argv)).run()


if __name__ == "__main__":
    sparse_peft.retain_freed_memory()  # reuse freed memory across steps (glibc); see docs/scale.md
    main()
