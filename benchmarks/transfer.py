"""Transfer benchmark: task 2:4 masks learned from a general mask, against one-shot and from-scratch masks, per task.

Tasks (:mod:`sparse_peft.tasks`, shipped data): causal-LM domains (``tinystories``, ``agnews_text``, ``imdb_text``;
perplexity on held-out documents never trained on) and classification (``sst2``, ``agnews``, ``imdb``; accuracy
through ``evaluate`` on the dev / test split). Classification runs with one or both objectives (``--objective``):

* ``label_words``: the causal LM is trained on the label word after the prompt (the loss of that token alone) and
  scored by which label word it finds likelier;
* ``seq_cls``: ``AutoModelForSequenceClassification`` with ``MaskConfig(task_type="SEQ_CLS",
  modules_to_save=[<head>])``, a head trained next to the mask, scored by the head's argmax.

Rows (``--rows``), per task and objective; the learned ones at every ``--budgets`` (task tokens; every ``--seeds`` at
the largest budget, the first seed below it):

* ``dense``: the dense model (zero-shot; for ``seq_cls`` its head trained alone at the largest budget);
* ``lora``: classification only: dense + LoRA r=``--lora-r`` on the same task tokens (the price of sparsity);
* ``general``: the general mask alone (``--general``);
* ``sparsegpt`` / ``sparsegpt+update``: SparseGPT 2:4 calibrated on the task's own training text, mask only / with
  its weight update (the one-shot baselines; for ``seq_cls`` with a head trained alone at the largest budget);
* ``scratch``: a task mask learned from that SparseGPT mask as prior;
* ``transfer``: a task mask learned from the general mask as prior;
* ``transfer+lowrank``: the general mask kept frozen with a rank-``--lowrank-rank`` update under it
  (``MaskConfig(lora_rank=r, train_mask=False, init_lora_weights="eora")``: initialised from the task's calibration
  text, every ``B`` times ``--eora-scale`` (``auto``: the factor chosen on that text, recorded as ``eora_scale``),
  then trained at ``--lora-lr``; ``start_value``: the metric of that start); it merges into exactly 2:4 weights.
  The training-free start does not depend on the seed: the first row of a task and objective computes it, the
  others load it (``eora-start-<task>-<objective>.safetensors``, the fit before the factor);
* ``scratch+lowrank``: the same recipe on the task's SparseGPT mask instead of the general mask (from scratch,
  mask only: SparseGPT's mask kept frozen, its weight update not used; its start in
  ``eora-start-<task>-<objective>-scratch.safetensors``).

A step holds about ``--batch-size`` x ``--seq-len`` task tokens (causal-LM windows; for classification as many
examples as make that many tokens), so a row of budget B takes about B / (batch x seq_len) steps. Every learned mask
is saved delta-coded against the general mask (``adapters/<row>``; loading it needs the general mask) and its size is
reported raw and delta-coded, in bits per masked weight, with its per-layer agreement with the general mask.

``transfer.json`` and ``transfer.md`` are rewritten (atomically) after every row; ``--resume`` keeps the rows there
and runs only the missing ones (more tasks, budgets, seeds, rows or objectives), refusing an ``--output`` measured
with other shared settings. ``transfer.png``: metric vs task tokens per task and objective, and the per-layer
agreement of the task masks with the general mask.

    python benchmarks/transfer.py --output runs/transfer   # from the shipped general mask (--general to change)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from transformers import AutoModelForSequenceClassification, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer

import sparse_peft
from sparse_peft.adapter_io import adapter_size, load_mask_adapter
from sparse_peft.config import DEFAULT_TARGET_MODULES
from sparse_peft.data import calibration_from_texts, default_general_mask, load_model_and_tokenizer
from sparse_peft.evaluation import (
    label_word_predictions,
    metric_scores,
    perplexity,
    sequence_classification_predictions,
)
from sparse_peft.layer import mask_layers
from sparse_peft.lowrank_init import scale_update_to_calibration
from sparse_peft.oneshot import prune
from sparse_peft.options import auto_or_number, fraction
from sparse_peft.stats import mask_stats
from sparse_peft.tasks import (
    CLASSIFICATION_TASKS,
    DEFAULT_MAX_WORDS,
    LM_TASKS,
    LMTask,
    classification_examples,
    examples_for_budget,
    label_word_examples,
    load_task,
)
from sparse_peft.teacher import model_fingerprint
from sparse_peft.training import learn_mask, mask_training_arguments, text_windows
from sparse_peft.utils import atomic_write, check_resumed_settings, comma_list

ROW_KINDS = ("dense", "lora", "general", "sparsegpt", "sparsegpt+update", "scratch", "transfer",
             "transfer+lowrank", "scratch+lowrank")
LEARNED_ROWS = ("lora", "scratch", "transfer", "transfer+lowrank", "scratch+lowrank")
MASK_ROWS = ("scratch", "transfer", "transfer+lowrank", "scratch+lowrank")
LOWRANK_ROWS = ("transfer+lowrank", "scratch+lowrank")
FIXED_ROWS = ("dense", "general", "sparsegpt", "sparsegpt+update")
OBJECTIVES = ("label_words", "seq_cls")
#: Settings all rows of one table share: a ``--resume`` run must use the values the table was measured with.
SHARED_SETTINGS = ("model", "gguf_file", "general", "general_sha256", "seq_len", "batch_size", "lr", "lora_lr",
                   "lora_r", "lowrank_rank", "sparse_reg", "prior_strength", "tau_start", "tau_end",
                   "kappa_start", "kappa_end", "distill", "bf16", "window", "eval_windows", "eval_examples",
                   "num_samples", "calibration_len", "max_words", "held_out", "lowrank_init", "eora_scale",
                   "reselect")
NAMES = {"dense": "dense", "lora": "dense + LoRA", "general": "general mask", "sparsegpt": "SparseGPT 2:4 mask only",
         "sparsegpt+update": "SparseGPT 2:4 + weight update", "scratch": "task mask from SparseGPT prior",
         "transfer": "task mask from general mask",
         "transfer+lowrank": "general mask + rank-r update under it",
         "scratch+lowrank": "SparseGPT mask + rank-r update under it"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--general", default=None,
                   help="the general mask adapter (folder or Hub id), made for --model (default: the shipped general "
                        "mask of the shipped model)")
    p.add_argument("--tasks", type=comma_list(str), default="tinystories,agnews_text,sst2,agnews",
                   help=f"comma list of {', '.join(LM_TASKS + CLASSIFICATION_TASKS)}")
    p.add_argument("--budgets", type=comma_list(int), default="25000,100000,200000",
                   help="task tokens of the learned rows (comma list)")
    p.add_argument("--seeds", type=comma_list(int), default="0,1,2",
                   help="seeds of the learned rows at the largest budget; smaller budgets run the first one")
    p.add_argument("--rows", type=comma_list(str), default=",".join(ROW_KINDS),
                   help=f"row kinds: {', '.join(ROW_KINDS)}")
    p.add_argument("--objective", choices=(*OBJECTIVES, "both"), default="both", help="objective(s) of classification")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per causal-LM window; longest classification input")
    p.add_argument("--batch-size", type=int, default=8, help="sequences of --seq-len tokens per step")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the mask logits (and trained heads)")
    p.add_argument("--lora-lr", type=float, default=1e-3,
                   help="learning rate of the +lowrank rows' update and of LoRA (best of 2e-4 to 2e-3 on TinyStories "
                        "for both +lowrank rows; benchmarks/README.md)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lowrank-rank", type=int, default=16, help="rank of the +lowrank rows' update")
    p.add_argument("--lowrank-init", choices=("eora", "zeros"), default="eora",
                   help="start of the +lowrank rows' update: eora (training-free, from the task's calibration text) or "
                        "zeros (B = 0, LoRA's start: the mask alone)")
    p.add_argument("--eora-scale", type=auto_or_number, default="auto",
                   help="MaskConfig.eora_scale of the eora start: auto (the factor of every B chosen on the task's "
                        "calibration text; default) or a number (1: the fit as computed)")
    p.add_argument("--reselect", type=fraction, default=0.0,
                   help="MaskConfig.prior_reselect of the transfer rows: the fraction of the groups where the general "
                        "mask and the task's SparseGPT mask disagree that take SparseGPT's pattern (0: the general "
                        "mask as is)")
    p.add_argument("--sparse-reg", type=float, default=0.0, help="regulariser lambda (0 for small batches)")
    defaults = sparse_peft.MaskConfig()
    for name in ("prior_strength", "tau_start", "tau_end", "kappa_start", "kappa_end"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                       help=f"MaskConfig.{name} of the learned mask rows (default: %(default)s)")
    p.add_argument("--distill", action="store_true",
                   help="causal-LM mask rows train on the KL from the dense model (classification rows always train "
                        "on the task labels)")
    p.add_argument("--bf16", action="store_true", help="learned rows train under bf16 autocast")
    p.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows scored per causal-LM task")
    p.add_argument("--eval-examples", type=int, default=500, help="dev / test examples scored per classification task")
    p.add_argument("--num-samples", type=int, default=64, help="SparseGPT calibration sequences (task text)")
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS, help="words of an input kept in its prompt")
    p.add_argument("--held-out", type=float, default=0.1, help="TinyStories fraction held out (last documents)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="runs/transfer")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --output, run the missing ones")
    args = p.parse_args(argv)
    for name, values, known in (("--tasks", args.tasks, LM_TASKS + CLASSIFICATION_TASKS),
                                ("--rows", args.rows, ROW_KINDS)):
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            p.error(f"{name}: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    if not args.budgets or min(args.budgets) < 1 or not args.seeds:
        p.error("--budgets needs positive token counts and --seeds at least one seed")
    try:
        args.general = default_general_mask(args.general, args.model, args.gguf_file)
    except ValueError as err:
        p.error(str(err))
    return args


def resumed_rows(args, json_path: str) -> list[dict]:
    """The rows of an earlier run in ``--output`` (``--resume``), after checking it is comparable; else ``[]``.

    Raises ``ValueError`` if the folder holds a table and ``--resume`` is not given, or if the table's shared
    settings differ (naming them); nothing in ``--output`` is changed then.
    """
    if not os.path.isfile(json_path):
        return []
    if not args.resume:
        raise ValueError(f"{json_path} exists: pass --resume to add to it, or another --output.")
    with open(json_path) as f:
        saved = json.load(f)
    saved["settings"].setdefault("lowrank_init", "eora")  # tables from before the option: all eora
    saved["settings"].setdefault("eora_scale", 1.0)  # ... and the start as fitted
    saved["settings"].setdefault("reselect", 0.0)  # ... and the general mask as is
    check_resumed_settings(saved["settings"], args, SHARED_SETTINGS, json_path)
    return saved["rows"]


def row_key(row: dict) -> tuple:
    return row["task"], row["objective"], row["row"], row.get("budget"), row.get("seed")


class Benchmark:
    """The model, the tasks' data and the table; one method per row kind."""

    def __init__(self, args, model, tokenizer, result: dict):
        self.args, self.model, self.tokenizer, self.result = args, model, tokenizer, result
        self.done = {row_key(r) for r in result["rows"]}
        self.fixed_models: dict[str, torch.nn.Module] = {}
        self.tokenised: dict[tuple, object] = {}
        self.needed: dict[str, int] = {}
        self.calibrations: dict[str, torch.Tensor] = {}
        # (task, objective, kind) -> metric of a +lowrank row's start: the same for every seed (a loaded training-free
        # start, or B = 0) except with seq_cls, whose new head is drawn per seed
        self.start_values: dict[tuple, float] = {}
        self.start_scales: dict[tuple, float] = {}  # (task, objective, kind) -> eora_scale chosen (ditto)
        self.model_fingerprint = model_fingerprint(model)  # the base weights a training-free start was made from

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.args.output, *parts)

    def add(self, row: dict) -> None:
        """Record a row; rewrite the JSON and the Markdown, so an interrupted run keeps what it measured."""
        self.result["rows"].append(row)
        self.done.add(row_key(row))
        self.write()
        print(f"{row['task']} {row['objective']} {row['row']} budget={row.get('budget')} seed={row.get('seed')}: "
              f"{row['metric']} {row['value']:.4g}", flush=True)

    def write(self) -> None:
        data = json.dumps(self.result, indent=2).encode()
        atomic_write(self.path("transfer.json"), lambda f: f.write(data))
        table = markdown(self.result["rows"]).encode()
        atomic_write(self.path("transfer.md"), lambda f: f.write(table + b"\n"))

    # -- models ------------------------------------------------------------------------------------------------
    def classifier(self, num_labels: int, seed: int) -> torch.nn.Module:
        """A fresh ``AutoModelForSequenceClassification`` holding the loaded base model's weights; its new head
        initialised from ``seed``. Built from the loaded model, not from its name: the shipped model's name is the
        Hub id it was converted from, which need not be reachable."""
        torch.manual_seed(seed)
        config = copy.deepcopy(self.model.config)
        config.num_labels, config.pad_token_id = num_labels, self.tokenizer.pad_token_id
        model = AutoModelForSequenceClassification.from_config(config, dtype=self.model.dtype)
        model.base_model.load_state_dict(self.model.base_model.state_dict())
        model.name_or_path = self.model.name_or_path
        return model.to(self.model.device)

    def head_name(self, classifier) -> str:
        return "score" if hasattr(classifier, "score") else "classifier"

    def prior(self, task: str, spec) -> str:
        """The task's SparseGPT 2:4 mask (calibrated on its training text), computed once and saved in ``--output``."""
        folder = self.path(f"oneshot-sparsegpt-{task}")
        if self.result["priors"].get(task) == folder and os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return folder
        peft_model = prune(self.model, "sparsegpt", self.calibration(spec), show_progress=False)
        peft_model.save_pretrained(folder)
        self.model = peft_model.unload()
        self.result["priors"][task] = folder
        self.write()
        return folder

    def calibration(self, spec) -> torch.Tensor:
        """SparseGPT calibration windows from the task's training text (for classification: the prompts and label
        words of the examples the largest budget can use)."""
        if spec.name not in self.calibrations:
            text = spec.train if isinstance(spec, LMTask) else spec.train_text()[: self.examples_needed(spec)]
            self.calibrations[spec.name] = calibration_from_texts(
                text, self.tokenizer, self.args.num_samples, self.args.calibration_len
            )
        return self.calibrations[spec.name]

    def fixed_model(self, kind: str, task: str, spec) -> torch.nn.Module:
        """The causal LM of a fixed row: dense, or with the general / SparseGPT mask merged into its weights."""
        key = f"{task}:{kind}"
        if kind == "dense":
            return self.model
        if key not in self.fixed_models:
            if kind == "sparsegpt+update":
                pruned = prune(copy.deepcopy(self.model), "sparsegpt", self.calibration(spec), update_weights=True,
                               show_progress=False)
            else:
                source = self.args.general if kind == "general" else self.prior(task, spec)
                pruned = PeftModel.from_pretrained(copy.deepcopy(self.model), source)
            self.fixed_models[key] = pruned.merge_and_unload().eval()
        return self.fixed_models[key]

    # -- data and metrics --------------------------------------------------------------------------------------
    def examples(self, spec, objective: str):
        """The task's training examples for ``objective``, tokenised once."""
        key = (spec.name, objective)
        if key not in self.tokenised:
            self.tokenised[key] = self.tokenise(spec, objective)
        return self.tokenised[key]

    def tokenise(self, spec, objective: str):
        if objective == "lm":
            return text_windows(spec.train, self.tokenizer, self.args.seq_len)
        count = self.examples_needed(spec)
        prompts, labels = spec.train_prompts()[:count], spec.train_labels[:count]
        if objective == "label_words":
            return label_word_examples(prompts, labels, spec.label_words, self.tokenizer, self.args.seq_len)
        return classification_examples(prompts, labels, self.tokenizer, self.args.seq_len)

    def examples_needed(self, spec) -> int:
        """How many of a classification task's training examples (in order) the largest budget can use: those
        holding its tokens and two steps more (rounding to whole steps), so that only they are tokenised."""
        if spec.name not in self.needed:
            prompts, need, total, end = spec.train_prompts(), max(self.args.budgets) + 2 * self.tokens_per_step, 0, 0
            while end < len(prompts) and total < need:
                chunk = prompts[end : end + 1024]
                total += sum(len(ids) for ids in self.tokenizer(chunk, verbose=False)["input_ids"])
                end += len(chunk)
            self.needed[spec.name] = end
        return self.needed[spec.name]

    def collator(self, objective: str):
        if objective == "label_words":
            return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100)
        return DataCollatorWithPadding(self.tokenizer) if objective == "seq_cls" else None

    def evaluate(self, model, spec, objective: str) -> float:
        if objective == "lm":
            return perplexity(model, self.tokenizer, spec.held_out, window=self.args.window,
                              max_windows=self.args.eval_windows, show_progress=False)["ppl"]
        count = self.args.eval_examples
        prompts, labels = spec.eval_prompts()[:count], spec.eval_labels[:count]
        if objective == "label_words":
            predictions = label_word_predictions(model, self.tokenizer, prompts, spec.label_words, batch_size=16)
        else:
            predictions = sequence_classification_predictions(model, self.tokenizer, prompts, batch_size=16,
                                                              max_length=self.args.seq_len)
        return metric_scores(predictions, labels, metrics=(spec.metric,))[spec.metric]

    def training_arguments(self, steps: int, per_step: int, seed: int, lr: float):
        return mask_training_arguments(
            self.path("trainer"), steps, per_step, learning_rate=lr, seed=seed, logging_steps=max(1, steps // 5),
            use_cpu=str(self.args.device) == "cpu", bf16=self.args.bf16, disable_tqdm=True,
        )

    # -- rows --------------------------------------------------------------------------------------------------
    def fixed_row(self, kind: str, task: str, spec, objective: str) -> None:
        """dense / general / SparseGPT rows: evaluated as they are, or for ``seq_cls`` with the head trained alone
        on the largest budget (first seed)."""
        budget, seed = (max(self.args.budgets), self.args.seeds[0]) if objective == "seq_cls" else (None, None)
        row = {"task": task, "objective": objective, "row": kind, "budget": budget, "seed": seed,
               "metric": spec.metric}
        if row_key(row) in self.done:
            return
        start = time.perf_counter()
        base = self.fixed_model(kind, task, spec)
        if kind.startswith("sparsegpt"):
            row["calibration_tokens"] = self.args.num_samples * self.args.calibration_len
        if objective != "seq_cls":
            row["value"] = self.evaluate(base, spec, objective)
        else:
            classifier = self.classifier(spec.num_labels, seed)
            classifier.base_model.load_state_dict(base.base_model.state_dict())
            head = self.head_name(classifier)
            for name, parameter in classifier.named_parameters():
                parameter.requires_grad = name.startswith(f"{head}.")
            plan = examples_for_budget(self.examples(spec, objective), budget, self.tokens_per_step)
            Trainer(model=classifier, args=self.training_arguments(plan["steps"], plan["examples_per_step"], seed,
                                                                    self.args.lr),
                    train_dataset=plan["dataset"], data_collator=self.collator(objective)).train()
            row.update(trained="head only", **{k: plan[k] for k in ("tokens", "steps", "examples_per_step", "passes")})
            row["value"] = self.evaluate(classifier, spec, objective)
        row["seconds"] = time.perf_counter() - start
        self.add(row)

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len

    def learned_row(self, kind: str, task: str, spec, objective: str, budget: int, seed: int) -> None:
        row = {"task": task, "objective": objective, "row": kind, "budget": budget, "seed": seed,
               "metric": spec.metric}
        if row_key(row) in self.done:
            return
        plan = examples_for_budget(self.examples(spec, objective), budget, self.tokens_per_step)
        base = self.classifier(spec.num_labels, seed) if objective == "seq_cls" else self.model
        task_type = "SEQ_CLS" if objective == "seq_cls" else "CAUSAL_LM"
        extra = {"modules_to_save": [self.head_name(base)]} if objective == "seq_cls" else {}
        torch.manual_seed(seed)  # the initial logits' noise / LoRA's A matrices
        eora = kind in LOWRANK_ROWS and self.args.lowrank_init == "eora"
        if kind == "lora":
            targets = DEFAULT_TARGET_MODULES.get(base.config.model_type, "all-linear")
            config = LoraConfig(r=self.args.lora_r, lora_alpha=2 * self.args.lora_r, lora_dropout=0.0,
                                target_modules=targets, task_type=task_type, **extra)
        else:
            prior = self.args.general if kind.startswith("transfer") else self.prior(task, spec)
            schedule = {k: getattr(self.args, k) for k in ("prior_strength", "tau_start", "tau_end", "kappa_start",
                                                           "kappa_end")}
            if eora:
                start_file = self.lowrank_start_file(task, objective, kind)
                cached = self.has_lowrank_start(start_file, spec, kind)  # the first seed's start, for every seed
            reselect = self.args.reselect if kind.startswith("transfer") else 0.0
            fit = eora and not cached
            if fit or reselect:
                extra.update(calibration=self.calibration(spec), prior_reselect=reselect)
            if kind in LOWRANK_ROWS:
                # the start is cached as fitted (factor 1), the row's factor applied after
                extra.update(lora_rank=self.args.lowrank_rank, train_mask=False, eora_scale=1.0,
                             init_lora_weights="eora" if fit else True)
            # from scratch = the paper's one-shot prior formula with its noise, although the prior is a saved folder
            noise = None if kind.startswith("transfer") or kind in LOWRANK_ROWS else True
            config = sparse_peft.MaskConfig(prior=prior, prior_noise=noise, sparse_reg=self.args.sparse_reg,
                                            task_type=task_type, **schedule, **extra)
        start = time.perf_counter()
        peft_model = get_peft_model(base, config)
        if eora:
            if cached:
                load_lowrank(peft_model, start_file)
                config.init_lora_weights = "eora"  # what the loaded values are
            else:
                save_lowrank(peft_model, start_file, self.lowrank_start_settings(spec, kind))
            key = (task, objective, kind)  # the factor, like the start, is the same for every seed but seq_cls's
            cached_scale = key in self.start_scales and objective != "seq_cls"
            scales = self.start_scales[key] if cached_scale else self.args.eora_scale
            config.eora_scale = row["eora_scale"] = self.start_scales[key] = scale_update_to_calibration(
                peft_model, peft_model.active_adapter, self.calibration(spec), scales)
            row["init_cached"] = cached
        row["init_seconds"] = time.perf_counter() - start  # the prior (and a training-free update) computed / loaded
        if kind in LOWRANK_ROWS:  # the start itself (the training-free update, or B = 0), before any training
            key = (task, objective, kind)
            if key not in self.start_values or objective == "seq_cls":
                self.start_values[key] = self.evaluate(peft_model.eval(), spec, objective)
            row["start_value"] = self.start_values[key]
        distill = self.args.distill and objective == "lm" and kind != "lora"
        lr = self.args.lora_lr if kind in ("lora", *LOWRANK_ROWS) else self.args.lr
        training_args = self.training_arguments(plan["steps"], plan["examples_per_step"], seed, lr)
        start = time.perf_counter()
        if kind == "lora":
            Trainer(model=peft_model, args=training_args, train_dataset=plan["dataset"],
                    data_collator=self.collator(objective)).train()
            peft_model.eval()
        else:
            learn_mask(peft_model, plan["dataset"], training_args, distill=distill,
                       data_collator=self.collator(objective))
        row["seconds"] = time.perf_counter() - start
        row.update({k: plan[k] for k in ("tokens", "steps", "examples_per_step", "passes")})
        row["value"] = self.evaluate(peft_model, spec, objective)
        if objective == "lm":
            row["distill"] = distill
        if kind == "lora":
            row["trainable_parameters"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        else:
            row.update(self.save_mask(peft_model, f"{task}-{objective}-{kind}-{budget}-seed{seed}"))
        if objective != "seq_cls":
            self.model = peft_model.unload()
        self.add(row)

    def lowrank_start_file(self, task: str, objective: str, kind: str) -> str:
        """Where the ``kind`` rows (:data:`LOWRANK_ROWS`) keep their training-free start
        (``init_lora_weights="eora"``). It depends on the model, the mask (general or the task's SparseGPT one), the
        rank and the task's calibration tokens, not on the seed or the budget: the first row computes it, the others
        load it (a file made from other inputs is recomputed)."""
        suffix = "" if kind == "transfer+lowrank" else "-scratch"
        return self.path(f"eora-start-{task}-{objective}{suffix}.safetensors")

    def lowrank_start_settings(self, spec, kind: str) -> dict[str, str]:
        """What a ``kind`` row's training-free start depends on (safetensors metadata, JSON values): the base model's
        weights (:func:`~sparse_peft.teacher.model_fingerprint`), the general mask, the rank, the SHA-256 of the
        task's calibration token ids and, for a transfer row with ``--reselect``, that fraction."""
        settings = {k: json.dumps(getattr(self.args, k)) for k in ("general_sha256", "lowrank_rank")}
        settings["model_fingerprint"] = self.model_fingerprint
        settings["calibration_sha256"] = hashlib.sha256(self.calibration(spec).numpy().tobytes()).hexdigest()
        if kind.startswith("transfer") and self.args.reselect:  # (starts from before the option lack the key)
            settings["reselect"] = json.dumps(self.args.reselect)
        return settings

    def has_lowrank_start(self, path: str, spec, kind: str) -> bool:
        """True if ``path`` holds a training-free start computed from what this row's would be (else recompute)."""
        if not os.path.isfile(path):
            return False
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata()
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); delete it to recompute the "
                             f"training-free start.") from err
        return metadata == self.lowrank_start_settings(spec, kind)

    def save_mask(self, peft_model, name: str) -> dict:
        """Save the task mask delta-coded against the general mask (``adapters/<name>``) and, to measure it, raw;
        returns both sizes in bits per masked weight and the per-layer agreement with the general mask."""
        config = peft_model.peft_config["default"]
        folder = self.path("adapters", name)
        with tempfile.TemporaryDirectory(dir=self.args.output, prefix=".raw-") as raw:
            config.save_delta = False
            peft_model.save_pretrained(raw)
            bits_raw = adapter_size(raw)["bits_per_weight"]
        config.prior, config.prior_sha256, config.prior_revision = self.args.general, None, None
        config.save_delta = True  # also for a mask learned from the SparseGPT prior: its delta to the general mask
        peft_model.save_pretrained(folder)
        agreement = {s.name: s.agreement for s in mask_stats(folder, self.args.general)}
        return {"adapter": folder, "bits_raw": bits_raw, "bits_delta": adapter_size(folder)["bits_per_weight"],
                "agreement": agreement, "mean_agreement": statistics.fmean(agreement.values())}

    def run_task(self, task: str) -> None:
        spec = load_task(task, self.args.max_words, self.args.held_out)
        objectives = ["lm"] if isinstance(spec, LMTask) else (
            list(OBJECTIVES) if self.args.objective == "both" else [self.args.objective])
        top = max(self.args.budgets)
        for objective in objectives:
            for kind in FIXED_ROWS:
                if kind in self.args.rows:
                    self.fixed_row(kind, task, spec, objective)
            for kind in LEARNED_ROWS:
                if kind not in self.args.rows or (kind == "lora" and objective == "lm"):
                    continue
                for budget in sorted(self.args.budgets):
                    for seed in self.args.seeds if budget == top else self.args.seeds[:1]:
                        self.learned_row(kind, task, spec, objective, budget, seed)
        for cache in (self.fixed_models, self.tokenised, self.calibrations, self.start_values, self.start_scales):
            cache.clear()


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.general_sha256 = load_mask_adapter(args.general).sha256  # a missing general mask fails before the model loads
    json_path = os.path.join(args.output, "transfer.json")
    rows = resumed_rows(args, json_path)
    priors = {}
    if rows:
        with open(json_path) as f:
            priors = json.load(f).get("priors", {})
    os.makedirs(args.output, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, device=args.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training batches; label_word_predictions pads on the left by itself
    result = {"settings": vars(args), "device": str(args.device), "torch_threads": torch.get_num_threads(),
              "rows": rows, "priors": priors}
    bench = Benchmark(args, model, tokenizer, result)
    for task in args.tasks:
        bench.run_task(task)
    bench.write()
    plot(result["rows"], os.path.join(args.output, "transfer.png"))
    print(markdown(result["rows"]))
    return result


def save_lowrank(peft_model, path: str, metadata: dict[str, str]) -> None:
    """Every mask layer's update of the active adapter, ``<layer>.A`` ``[r, in]`` and ``<layer>.B`` ``[out, r]``
    (float32), to the safetensors file ``path`` (atomically) with ``metadata``."""
    name = peft_model.active_adapter
    tensors = {}
    for layer_name, layer in mask_layers(peft_model, name).items():
        lora_a, lora_b, _ = layer.lowrank(name)
        tensors[f"{layer_name}.A"], tensors[f"{layer_name}.B"] = lora_a.detach().cpu(), lora_b.detach().cpu()
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def load_lowrank(peft_model, path: str) -> None:
    """Set the active adapter's updates from a :func:`save_lowrank` file of the same layers and shapes."""
    name = peft_model.active_adapter
    tensors = load_file(path)
    layers = mask_layers(peft_model, name)
    if {f"{n}.{part}" for n in layers for part in "AB"} != set(tensors):
        raise ValueError(f"{path} holds the updates of other layers; delete it to recompute the training-free start.")
    with torch.no_grad():
        for layer_name, layer in layers.items():
            lora_a, lora_b, _ = layer.lowrank(name)
            lora_a.copy_(tensors[f"{layer_name}.A"])
            lora_b.copy_(tensors[f"{layer_name}.B"])


def summary(rows: list[dict]) -> dict:
    """``{(task, objective): {"levels": {kind: value}, "curves": {kind: [(tokens, mean, min, max, n)]}}}``."""
    out: dict = {}
    for r in rows:
        entry = out.setdefault((r["task"], r["objective"]), {"levels": {}, "curves": {}, "metric": r["metric"]})
        if r["row"] in FIXED_ROWS:
            entry["levels"][r["row"]] = r["value"]
    for key, entry in out.items():
        for kind in LEARNED_ROWS:
            groups: dict = {}
            for r in rows:
                if (r["task"], r["objective"], r["row"]) == (*key, kind):
                    groups.setdefault(r["budget"], []).append(r)
            entry["curves"][kind] = [
                {"budget": b, "tokens": statistics.fmean(r["tokens"] for r in g),
                 "mean": statistics.fmean(r["value"] for r in g), "min": min(r["value"] for r in g),
                 "max": max(r["value"] for r in g), "seeds": len(g),
                 "steps": g[0]["steps"], "passes": g[0]["passes"], "seconds": statistics.fmean(r["seconds"] for r in g),
                 "bits_raw": statistics.fmean(r["bits_raw"] for r in g) if "bits_raw" in g[0] else None,
                 "bits_delta": statistics.fmean(r["bits_delta"] for r in g) if "bits_delta" in g[0] else None}
                for b, g in sorted(groups.items())
            ]
    return out


def markdown(rows: list[dict]) -> str:
    lines = []
    for (task, objective), entry in summary(rows).items():
        metric = entry["metric"]
        lines += [f"### {task} ({'perplexity of held-out text' if objective == 'lm' else objective}; {metric})", "",
                  f"| row | task tokens | steps | seeds | {metric}: mean (min-max) | wall time (s) "
                  "| adapter bits / masked weight: raw | delta to general |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind, value in entry["levels"].items():
            lines.append(f"| {NAMES[kind]} | - | - | - | {value:.4g} | - | - | - |")
        for kind, curve in entry["curves"].items():
            for c in curve:
                spread = f" ({c['min']:.4g}-{c['max']:.4g})" if c["seeds"] > 1 else ""
                tokens = f"{c['tokens']:.0f}" + (f" ({c['passes']:.2f} passes)" if c["passes"] > 1.01 else "")
                bits = [f"{c[k]:.3f}" if c[k] is not None else "-" for k in ("bits_raw", "bits_delta")]
                lines.append(f"| {NAMES[kind]} | {tokens} | {c['steps']} | {c['seeds']} | {c['mean']:.4g}{spread} "
                             f"| {c['seconds']:.0f} | {bits[0]} | {bits[1]} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """One panel per task and objective: metric vs task tokens (log x) of the learned rows (mean over seeds, min-max
    bars), with the dense, general-mask and one-shot levels as labelled lines; and a panel of the per-layer
    agreement of the task masks (largest budget, first seed) with the general mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = summary(rows)
    columns = min(3, len(panels) + 1)
    lines_of = math.ceil((len(panels) + 1) / columns)
    fig, axes = plt.subplots(lines_of, columns, figsize=(5.6 * columns, 5.2 * lines_of), squeeze=False)
    axes = axes.ravel()
    colors = {"dense": "green", "general": "tab:purple", "sparsegpt": "red", "sparsegpt+update": "darkorange",
              "lora": "tab:gray", "scratch": "tab:red", "transfer": "tab:blue", "transfer+lowrank": "tab:cyan",
              "scratch+lowrank": "tab:olive"}
    units = {"ppl": "held-out perplexity (lower is better)", "accuracy": "accuracy (higher is better)"}
    for ax, ((task, objective), entry) in zip(axes, panels.items()):
        for kind, curve in entry["curves"].items():
            if not curve:
                continue
            x = [c["tokens"] for c in curve]
            y = [c["mean"] for c in curve]
            spread = [[c["mean"] - c["min"] for c in curve], [c["max"] - c["mean"] for c in curve]]
            ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, color=colors[kind], label=NAMES[kind])
        for i, (kind, value) in enumerate(entry["levels"].items()):
            trained = " (head trained alone)" if objective == "seq_cls" else ""
            ax.axhline(value, color=colors[kind], linestyle="--", linewidth=1,
                       label=f"{NAMES[kind]}{trained}: {value:.3g}")
            ax.text(0.01 if i % 2 == 0 else 0.99, value, NAMES[kind], transform=ax.get_yaxis_transform(),
                    ha="left" if i % 2 == 0 else "right", va="bottom", color=colors[kind], fontsize="x-small")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x >= 1000 else f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.set(title=f"{task} ({'causal LM' if objective == 'lm' else objective})",
               xlabel="task tokens trained on (log scale)", ylabel=units.get(entry["metric"], entry["metric"]))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax = axes[len(panels)]
    for kind, style in (("transfer", "-"), ("scratch", ":"), ("transfer+lowrank", "--"), ("scratch+lowrank", "-.")):
        for (task, objective), entry in panels.items():
            curve = entry["curves"].get(kind)
            if not curve:
                continue
            top = curve[-1]["budget"]
            row = next((r for r in rows if (r["task"], r["objective"], r["row"], r["budget"]) ==
                        (task, objective, kind, top) and "agreement" in r), None)
            if row is not None:
                ax.plot([100 * a for a in row["agreement"].values()], linestyle=style, marker=".", linewidth=0.8,
                        label=f"{task} {objective}, {NAMES[kind]}")
    ax.set(title="task mask vs general mask (largest budget, first seed)",
           xlabel="masked linear layer (sorted by module name)", ylabel="weights where the masks agree (%)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    else:
        ax.text(0.5, 0.5, "no task mask rows", ha="center", va="center", transform=ax.transAxes)
    for extra in axes[len(panels) + 1:]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sparse_peft.retain_freed_memory()  # reuse freed memory across steps (glibc); see docs/scale.md
    main()
