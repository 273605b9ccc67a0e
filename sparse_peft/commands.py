"""What the ``sparse-peft`` commands do (:mod:`sparse_peft.cli` parses their options): one ``cmd_<name>(args)`` per
command, the functions they share, and :data:`COMMANDS`. Imports torch, PEFT and transformers; the command line
imports this module only once it has parsed its arguments.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch
from peft import PeftModel, get_peft_model
from peft.utils import CONFIG_NAME
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
from transformers.trainer_utils import get_last_checkpoint

from . import training
from .adapter_io import adapter_size, load_mask_adapter, resolve_file
from .config import MaskConfig
from .constants import CALIBRATED_PRIORS, DEFAULT_LR, DEMO_LORA_LR, DEMO_TASK, PRIOR_NAMES, TRAINER_DIR
from .data import (
    calibration_from_texts,
    check_text_source,
    load_model_and_tokenizer,
    load_model_config,
    load_texts,
    looks_like_hub_id,
    looks_like_local_path,
    default_general_mask,
    shipped_general_mask,
    shipped_model,
    sibling_names,
)
from .download import offline_hint
from .evaluation import perplexity
from .hub import push_mask_adapter, repoint_general_mask
from .layer import mask_layers
from .model import check_targets
from .oneshot import prune
from .patterns import validate_n_m
from .published import published_mask_file
from .stats import format_stats, mask_stats, plot_stats
from .tasks import load_task
from .utils import atomic_write, did_you_mean, format_bytes, output_layer, weight_out_in
from .zero_shot import write_zero_shot_json, zero_shot, zero_shot_table

logger = logging.getLogger("sparse_peft")
#: The demo's task name in its table, and its rows: ``"dense"`` (the base with the adapters disabled) and its adapters'
#: names, with their labels.
DEMO_TASK_NAME = "TinyStories"
DEMO_ROWS = {"dense": "dense", "sparsegpt": "SparseGPT 2:4 one-shot (mask only)", "general": "general 2:4 mask",
             DEMO_TASK: "task 2:4 mask (from the general)"}


def _targets(args) -> Optional[list[str]]:
    return [t.strip() for t in args.targets.split(",")] if args.targets else None


@contextmanager
def _model_from_hub(args, what: str) -> Iterator[None]:
    """Re-raise an ``OSError`` of reading ``--model`` as a Hub id as one naming the flag, ``what`` failed, the
    first line of the reason and :func:`~sparse_peft.download.offline_hint`; for the shipped model and local paths
    the error is raised as it is."""
    try:
        yield
    except OSError as err:
        if args.model is None or os.path.exists(args.model):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"--model {args.model!r}: could not {what} from the Hub ({reason}). {offline_hint()}") from err


def _load(args):
    with _model_from_hub(args, "load it"):
        return load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, dtype=getattr(torch, args.dtype))


def _calibration(args, tokenizer) -> torch.Tensor:
    return calibration_from_texts(
        load_texts(args.calibration, split="train"), tokenizer, num_samples=args.num_samples,
        seq_len=args.calibration_len,
    )


# -- checks of the arguments, before any model is loaded -----------------------------------------------------------
def _check_model(args) -> None:
    """Fail at once for a ``--model`` / ``--gguf-file`` that is a missing local path, a folder without the model, a
    file, or the default model when it is not installed. A Hub id is looked up by the loader (see :func:`_load`)."""
    model, gguf = args.model, args.gguf_file
    if model is None:
        if gguf is None:
            shipped_model()
        return
    if os.path.isdir(model):
        if gguf is not None and not os.path.isfile(os.path.join(model, gguf)):
            raise FileNotFoundError(
                f"--gguf-file: {model!r} has no file {gguf!r}.{did_you_mean(gguf, os.listdir(model))}"
            )
        if gguf is None and not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(
                f"--model {model!r} is a folder without config.json, not a model folder (for a GGUF file in it, add "
                "--gguf-file)."
            )
    elif os.path.exists(model):
        raise ValueError(f"--model {model!r} is a file; pass the folder holding config.json, or a Hub id.")
    elif looks_like_local_path(model):
        raise FileNotFoundError(f"--model: no model folder at {model!r}.{did_you_mean(model, sibling_names(model))}")


def _check_targets(args, config: MaskConfig) -> None:
    """``--n`` / ``--m`` / ``--targets`` against the model's layer shapes, on the model built on the meta device
    from its config (no weights read: :func:`~sparse_peft.model.check_targets`)."""
    with _model_from_hub(args, "read its config"):
        model_config = load_model_config(args.model, gguf_file=args.gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    if not check_targets(skeleton, copy.copy(config)):
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                         if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output_layer(skeleton)})
        raise ValueError(f"--targets {args.targets!r} matches no layer of the model; its linear layers are named "
                         f"{', '.join(linear)}.")


def _check_adapter(flag: str, source: str) -> None:
    """A mask adapter argument: a folder holding adapter_config.json, or a Hub id (``owner/name``) whose
    adapter_config.json is fetched now (a small file, then cached for the load)."""
    if os.path.isfile(source):
        raise ValueError(f"{flag} {source!r} is a file; pass the mask adapter's folder (with {CONFIG_NAME}).")
    if not os.path.isdir(source) and not looks_like_hub_id(source):
        raise FileNotFoundError(
            f"{flag}: no mask adapter folder at {source!r}, and it is not a Hub id (owner/name)."
            f"{did_you_mean(source, sibling_names(source))}"
        )
    try:
        resolve_file(source, CONFIG_NAME)
    except (FileNotFoundError, ConnectionError) as err:
        raise type(err)(f"{flag}: {err}") from err


def _resolve_prior(args) -> Optional[str]:
    """``--prior`` as ``MaskConfig(prior=)`` takes it: ``none`` -> None (random logits); ``shipped`` -> the shipped
    general mask (:func:`~sparse_peft.data.shipped_general_mask`), which fits the shipped model only; not given ->
    ``shipped`` for the shipped model (a task mask transferred from it), ``sparsegpt`` for any other ``--model``."""
    prior = args.prior if args.prior is not None else ("shipped" if _is_shipped(args) else "sparsegpt")
    if prior == "shipped":
        if not _is_shipped(args):
            raise ValueError(
                "--prior shipped is the shipped general mask of the shipped SmolLM2-135M-Instruct, not of --model "
                f"{args.model!r}. Pass --prior sparsegpt to learn a general mask for it, or --prior <its general "
                "mask adapter: folder or Hub id>."
            )
        return shipped_general_mask()
    return None if prior == "none" else prior


def _is_shipped(args) -> bool:
    """Whether ``args`` name the shipped model (no ``--model``, no ``--gguf-file``)."""
    return args.model is None and args.gguf_file is None


def _resolve_general(args) -> str:
    """The demo's ``--general``, checked (see :func:`_check_adapter`); not given: the shipped general mask for the
    shipped model, an error naming the fix for any other ``--model``
    (:func:`~sparse_peft.data.default_general_mask`)."""
    if args.general is not None:
        _check_adapter("--general", args.general)
    return default_general_mask(args.general, args.model, args.gguf_file)


def _check_prior(prior: Optional[str]) -> None:
    """``--prior``: a name of :data:`PRIOR_NAMES`, an existing local adapter folder / MaskLLM masks, or a Hub id
    of either; a typo (neither, nor ``owner/name``) fails at once with the nearest name."""
    if prior is None or prior in PRIOR_NAMES or os.path.exists(prior):
        return  # what a local folder or file holds is checked when the prior is read
    if not looks_like_hub_id(prior):
        raise FileNotFoundError(
            f"--prior {prior!r} is not a prior name ({' | '.join(PRIOR_NAMES)}), an existing adapter folder or "
            f"file, or a Hub id (owner/name).{did_you_mean(prior, [*PRIOR_NAMES, *sibling_names(prior)])}"
        )
    try:
        published = published_mask_file(prior)
    except ConnectionError as err:
        raise ConnectionError(f"--prior: {err}") from err
    if published is None:  # a Hub repo of MaskLLM masks has no adapter_config.json
        _check_adapter("--prior", prior)


def _check_text(flag: str, source: str) -> None:
    """A text argument (``--data``, ``--calibration``, ``--eval-data``): see :func:`sparse_peft.data.check_text_source`;
    a Hub dataset id is looked up when it is read."""
    try:
        check_text_source(source)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{flag}: {err}") from err


def _markdown(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def _write_json(path: Optional[str], payload) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


# -- the steps, as functions of loaded models -------------------------------------------------------------------
def prune_and_save(model, tokenizer, method: str, output: str, calibration: Optional[torch.Tensor], *, n: int, m: int,
                   targets: Optional[list[str]], update_weights: bool) -> dict:
    """One-shot ``method`` mask of ``model`` saved to ``output`` as a mask adapter (with ``update_weights``: the
    pruned model and its tokenizer). ``calibration``: ``[num_samples, seq_len]`` token ids, None for magnitude.
    The adapter is unloaded again, so ``model`` is left as it was (with ``update_weights``: pruned in place).
    Returns ``{"method", "seconds", "output"}``."""
    start = time.perf_counter()
    peft_model = prune(model, method, calibration, n=n, m=m, target_modules=targets, update_weights=update_weights)
    seconds = time.perf_counter() - start
    if update_weights:
        pruned = peft_model.merge_and_unload()
        pruned.save_pretrained(output)
        tokenizer.save_pretrained(output)
    else:
        peft_model.save_pretrained(output)
        peft_model.unload()
    print(f"{method} {n}:{m} mask computed in {seconds:.1f} s -> {output}")
    return {"method": method, "seconds": seconds, "output": output}


def learn_and_save(model, tokenizer, config: MaskConfig, data: str | Sequence[str], output: str, *, steps: int,
                   batch_size: int, seq_len: int, lr: float, bf16: bool, grad_accum: int = 1,
                   gradient_checkpointing: bool = False, seed: int = 0, recompute_soft_mask: bool = True,
                   distill: bool = False, text_column: Optional[str] = None, report_to: str = "none",
                   save_steps: Optional[int] = None, resume: Optional[str] = None, eval_data: Optional[str] = None,
                   eval_steps: Optional[int] = None, eval_windows: int = 16, print_logs: bool = True,
                   teacher_top_k: Optional[int] = None) -> dict:
    """Learn the mask adapter ``config`` of ``model`` on the text ``data`` with ``Trainer``; save it to ``output``.

    ``data``: a text source (:func:`~sparse_peft.data.load_texts`, its train split) or the training documents
    themselves. ``steps`` optimizer steps of ``batch_size * grad_accum`` windows of ``seq_len`` tokens; the other
    options are :func:`~sparse_peft.training.mask_training_arguments`' and :func:`~sparse_peft.training.learn_mask`'
    (``print_logs``: a log every ``steps // 20`` steps, printed under the progress bar; False: the bar alone, no
    logs but the closing one, and that not printed). ``text_column``: the column of a table ``data``.
    ``report_to``: Trainer's (comma-separated). ``save_steps``: write a resumable checkpoint every that many steps
    into ``output/trainer``; ``resume``: a checkpoint folder or ``"last"`` (the newest there). ``eval_steps``: log
    the loss on ``eval_windows`` windows of ``eval_data``'s test split every that many steps. ``seed`` seeds the
    initial logits' noise and Trainer. ``teacher_top_k`` (with ``distill``): cache the dense model's top-k outputs
    once under ``$SPARSE_PEFT_CACHE`` instead of a teacher forward per step. ``output/trainer`` is removed again if
    it is left empty. The adapter is unloaded after saving, so ``model`` is left as it was.
    Returns ``{"prior", "tokens", "seconds", "output", "train_loss"}``.
    """
    texts = load_texts(data, split="train", text_column=text_column) if isinstance(data, str) else data
    dataset = training.text_windows(texts, tokenizer, seq_len,
                                    max_windows=steps * batch_size * grad_accum)  # read before the prior is computed
    eval_dataset = None
    if eval_steps is not None:
        eval_dataset = training.text_windows(load_texts(eval_data, split="test"), tokenizer, seq_len,
                                             max_windows=eval_windows)
    torch.manual_seed(seed)  # the initial logits' noise; Trainer seeds the rest with the same seed
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    trainer_dir = os.path.join(output, TRAINER_DIR)
    trainer_dir_existed = os.path.isdir(trainer_dir)
    checkpoints = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    evaluation = {"eval_strategy": "steps", "eval_steps": eval_steps} if eval_steps else {}
    logging = {"logging_steps": max(1, steps // 20)} if print_logs else {"logging_strategy": "no"}
    training_args = training.mask_training_arguments(
        trainer_dir, steps, batch_size, learning_rate=lr, gradient_accumulation_steps=grad_accum, **logging,
        activation_checkpointing=gradient_checkpointing, seed=seed, bf16=bf16,
        report_to=[] if report_to == "none" else report_to.split(","), **checkpoints, **evaluation,
    )
    start = time.perf_counter()
    try:
        trainer = training.learn_mask(peft_model, dataset, training_args, recompute_soft_mask=recompute_soft_mask,
                                      distill=distill, eval_dataset=eval_dataset, print_logs=print_logs,
                                      teacher_top_k=teacher_top_k,
                                      resume_from_checkpoint=True if resume == "last" else resume)
    finally:
        if not trainer_dir_existed and os.path.isdir(trainer_dir) and not _holds_files(trainer_dir):
            shutil.rmtree(trainer_dir)  # only empty folders: Trainer makes output_dir even without checkpoints
    seconds = time.perf_counter() - start
    peft_model.save_pretrained(output)
    peft_model.unload()
    tokens = steps * batch_size * grad_accum * seq_len
    print(f"learned {config.n}:{config.m} mask from prior={config.prior} on {tokens} tokens in {seconds:.0f} s -> "
          f"{output}")
    return {"prior": config.prior, "tokens": tokens, "seconds": seconds, "output": output,
            "train_loss": trainer.state.log_history[-1].get("train_loss")}


def _each_model(model, adapters: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """``("dense", model)``, then ``(adapter, PeftModel with that adapter)`` for each of ``adapters`` in turn; each
    adapter is unloaded again before the next one is loaded, so one base model serves them all."""
    yield "dense", model
    for adapter in adapters:
        peft_model = PeftModel.from_pretrained(model, adapter)
        yield adapter, peft_model
        model = peft_model.unload()


def _holds_files(folder: str) -> bool:
    """Whether ``folder`` or any folder below it holds a file."""
    return any(files for _, _, files in os.walk(folder))


def _check_training_options(args) -> None:
    """``--resume``, ``--eval-steps`` / ``--eval-data`` and ``--save-steps`` of ``learn``, before any model load."""
    for flag in ("save_steps", "eval_steps", "eval_windows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number of steps, got {value}.")
    if args.teacher_top_k is not None and (args.teacher_top_k < 1 or not args.distill):
        raise ValueError(f"--teacher-top-k {args.teacher_top_k}: pass a positive number of tokens, together with "
                         "--distill (it caches the dense model's outputs for distillation).")
    if args.eval_steps is not None and args.eval_data is None:
        raise ValueError("--eval-steps needs --eval-data (held-out text: wikitext2, a file or a Hub dataset id).")
    if args.eval_data is not None:
        _check_text("--eval-data", args.eval_data)
    if args.resume == "last":
        folder = os.path.join(args.output, TRAINER_DIR)
        if not os.path.isdir(folder) or get_last_checkpoint(folder) is None:
            raise FileNotFoundError(
                f"--resume last: no checkpoint in {folder}. Checkpoints are written with --save-steps N; pass the "
                "--output of the interrupted run."
            )
    elif args.resume is not None and not os.path.isfile(os.path.join(args.resume, "trainer_state.json")):
        raise FileNotFoundError(
            f"--resume {args.resume!r} is not a Trainer checkpoint folder (no trainer_state.json); pass "
            f"OUTPUT/{TRAINER_DIR}/checkpoint-<step> or 'last'."
        )


def evaluate_adapters(model, tokenizer, eval_data: str, adapters: Sequence[str], *, window: Optional[int],
                      max_windows: Optional[int], json_path: Optional[str]) -> list[dict]:
    """Perplexity on the text ``eval_data`` of the dense ``model`` and of each of ``adapters`` (hard masks, eval
    mode), ``window`` tokens per window; printed as a table under a line naming the data, the window and the
    windows scored, written to ``json_path`` if set. One row per model, with its ``sparsity``: ``dense`` or the
    adapter's N:M and the fraction of all the model's weights it prunes."""
    texts = load_texts(eval_data, split="test")
    total = sum(p.numel() for p in model.parameters())

    def sparsity(evaluated) -> str:
        if not isinstance(evaluated, PeftModel):
            return "dense"
        config = evaluated.active_peft_config
        masked = sum(weight_out_in(layer.get_base_layer()).numel() for layer in mask_layers(evaluated).values())
        pruned = masked * (config.m - config.n) // config.m
        return f"{config.n}:{config.m}, {pruned / total:.1%} of all weights"

    rows = [{"model": name, "sparsity": sparsity(evaluated),
             **perplexity(evaluated, tokenizer, texts, window=window, max_windows=max_windows)}
            for name, evaluated in _each_model(model, adapters)]
    scored = f"first {max_windows} windows" if max_windows is not None else "all windows"
    print(f"Perplexity on {eval_data} (test split), windows of {rows[0]['window']} tokens, {scored} "
          f"({rows[0]['windows']} scored, {rows[0]['tokens']} predicted tokens):")
    print(_markdown(rows, ("model", "sparsity", "ppl", "tokens", "windows")))
    _write_json(json_path, rows)
    return rows


def evaluate_on_one_base(model, tokenizer, adapters: dict[str, str], texts: dict[str, Sequence[str]], *,
                         window: Optional[int], max_windows: Optional[int]) -> tuple[dict, dict[str, float]]:
    """Perplexity on each of ``texts`` (``{text name: documents}``) of the dense ``model`` and of each of
    ``adapters`` (``{adapter name: folder or Hub id}``), all loaded as adapters of one ``PeftModel`` on ``model``
    and evaluated in turn after ``set_adapter``; the dense model is that ``PeftModel`` under ``disable_adapter()``.
    No base model is loaded here: ``model`` serves them all, and is left as it was (the adapters are unloaded at
    the end). Each result's ``tokens`` are the predicted tokens, ``window`` - 1 per scored window.

    Returns ``({"dense" or adapter name: {text name: perplexity() result}}, {adapter name: switch seconds})``; a
    switch is ``set_adapter`` plus a forward of one token, in which the new adapter's hard masks are built.
    """
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()

    def scores() -> dict[str, dict]:
        return {key: perplexity(peft_model, tokenizer, documents, window=window, max_windows=max_windows)
                for key, documents in texts.items()}

    with peft_model.disable_adapter():
        results = {"dense": scores()}
    one_token = torch.zeros((1, 1), dtype=torch.long, device=peft_model.get_input_embeddings().weight.device)
    switch = {}
    for name in names:
        start = time.perf_counter()
        peft_model.set_adapter(name)
        with torch.no_grad():
            peft_model(input_ids=one_token, use_cache=False)
        switch[name] = time.perf_counter() - start
        results[name] = scores()
    peft_model.unload()
    return results, switch


def zero_shot_adapters(model, tokenizer, tasks: Sequence[str], adapters: Sequence[str], *, limit: Optional[float],
                       num_fewshot: int, include_path: Optional[str], json_path: Optional[str],
                       ppl_data: Optional[str] = None, window: Optional[int] = None,
                       max_windows: Optional[int] = None) -> dict[str, dict]:
    """lm-evaluation-harness accuracy on ``tasks`` of the dense ``model`` and of each of ``adapters`` (hard masks),
    and with ``ppl_data`` also the perplexity on that text. Printed as one table (rows: models; columns: each task's
    accuracy +- stderr, and PPL), written to ``json_path`` if set. Returns ``{model: {task: {metric: value}}}``."""
    texts = None if ppl_data is None else load_texts(ppl_data, split="test")
    rows, ppls = {}, {}
    for name, evaluated in _each_model(model, adapters):
        rows[name] = zero_shot(evaluated, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot,
                               include_path=include_path)
        if texts is not None:
            ppls[name] = perplexity(evaluated, tokenizer, texts, window=window, max_windows=max_windows)["ppl"]
    print(zero_shot_table(rows, ppl=ppls or None))
    if json_path is not None:
        write_zero_shot_json(json_path, rows, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                             ppl=ppls or None, ppl_data=ppl_data, window=window, max_windows=max_windows)
    return rows


# -- commands ---------------------------------------------------------------------------------------------------
def cmd_prune(args) -> dict:
    """``sparse-peft prune`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    validate_n_m(args.n, args.m)
    _check_model(args)
    if args.method != "magnitude":
        _check_text("--calibration", args.calibration)
    _check_targets(args, MaskConfig(n=args.n, m=args.m, target_modules=_targets(args)))  # prune()'s config
    model, tokenizer = _load(args)
    calibration = None if args.method == "magnitude" else _calibration(args, tokenizer)
    return prune_and_save(model, tokenizer, args.method, args.output, calibration, n=args.n, m=args.m,
                          targets=_targets(args), update_weights=args.update_weights)


def cmd_learn(args) -> dict:
    """``sparse-peft learn`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    prior = _resolve_prior(args)
    if args.prior is None:
        print(f"prior: {prior} (--prior not given)")
    config = MaskConfig(
        n=args.n, m=args.m, target_modules=_targets(args), prior=prior,
        prior_strength=args.prior_strength, tau_start=args.tau_start, tau_end=args.tau_end,
        kappa_start=args.kappa_start, kappa_end=args.kappa_end, sparse_reg=args.sparse_reg,
        save_logits=args.save_logits, task_type="CAUSAL_LM", lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_placement=args.lora_placement, train_mask=not args.freeze_mask,
        init_lora_weights="eora" if args.init_lora_weights == "eora" else True, eora_scale=args.eora_scale,
        logits_dtype=args.logits_dtype, prior_reselect=args.prior_reselect,
    )
    _check_model(args)
    _check_prior(prior)
    _check_text("--data", args.data)
    _check_training_options(args)
    calibrated = prior in CALIBRATED_PRIORS or config.init_lora_weights == "eora" or config.prior_reselect
    if calibrated:
        _check_text("--calibration", args.calibration)
    _check_targets(args, config)
    model, tokenizer = _load(args)
    if calibrated:
        config.calibration = _calibration(args, tokenizer)
    return learn_and_save(
        model, tokenizer, config, args.data, args.output, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, bf16=args.bf16, grad_accum=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        recompute_soft_mask=args.recompute_soft_mask, distill=args.distill, text_column=args.text_column,
        report_to=args.report_to, save_steps=args.save_steps, resume=args.resume, eval_data=args.eval_data,
        eval_steps=args.eval_steps, eval_windows=args.eval_windows, teacher_top_k=args.teacher_top_k,
    )


def cmd_eval(args) -> list[dict]:
    """``sparse-peft eval`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    _check_model(args)
    _check_text("--eval-data", args.eval_data)
    for adapter in args.adapter or []:
        _check_adapter("--adapter", adapter)
    model, tokenizer = _load(args)
    if args.tasks:
        return zero_shot_adapters(
            model, tokenizer, args.tasks.split(","), args.adapter or [], limit=args.limit,
            num_fewshot=args.num_fewshot, include_path=args.include_path, json_path=args.json,
            ppl_data=args.eval_data if args.ppl else None, window=args.window, max_windows=args.max_windows,
        )
    return evaluate_adapters(model, tokenizer, args.eval_data, args.adapter or [], window=args.window,
                             max_windows=args.max_windows, json_path=args.json)


def cmd_inspect(args) -> dict:
    """``sparse-peft inspect`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    _check_adapter("adapter", args.adapter)
    if args.reference is not None:
        _check_adapter("--reference", args.reference)
    adapter = load_mask_adapter(args.adapter)
    rows = mask_stats(adapter, args.reference)
    print(format_stats(rows))
    if args.plot:
        plot_stats(rows, args.plot)
        print(f"plot -> {args.plot}")
    size = adapter_size(args.adapter)
    valid = all(r.valid_n_m for r in rows)
    print(f"\n{len(rows)} layers, N:M valid: {'yes' if valid else 'NO'}; "
          f"{size['bytes']} bytes = {size['bits_per_weight']:.4f} bit per masked weight")
    payload = {"layers": [vars(r) | {"agreement": r.agreement} for r in rows], "valid": valid, **size}
    _write_json(args.json, payload)
    return payload


def cmd_demo(args) -> dict:
    """``sparse-peft demo`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    _check_model(args)
    general = _resolve_general(args)
    for flag, source in (("--calibration", args.calibration), ("--eval-data", args.eval_data)):
        _check_text(flag, source)
    task = load_task(DEMO_TASK)
    texts = {"eval": load_texts(args.eval_data, split="test"), "task": task.held_out}
    rank = args.lora_rank
    config = MaskConfig(prior=general, sparse_reg=args.sparse_reg, task_type="CAUSAL_LM", lora_rank=rank,
                        train_mask=rank == 0)
    lr = args.lr if args.lr is not None else (DEMO_LORA_LR if rank else DEFAULT_LR)
    os.makedirs(args.output, exist_ok=True)
    sparsegpt_dir, task_dir = os.path.join(args.output, "sparsegpt"), os.path.join(args.output, f"task-{DEMO_TASK}")
    start = time.perf_counter()
    model, tokenizer = _load(args)
    load_seconds = time.perf_counter() - start
    prune_and_save(model, tokenizer, "sparsegpt", sparsegpt_dir, _calibration(args, tokenizer), n=config.n, m=config.m,
                   targets=None, update_weights=False)
    learned = learn_and_save(model, tokenizer, config, task.train, task_dir, steps=args.steps,
                             batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, bf16=args.bf16,
                             print_logs=False)
    drift = mask_stats(task_dir, general)
    learned["groups_changed"] = sum(row.groups_changed for row in drift)
    learned["groups"] = sum(row.shape[0] * row.shape[1] // config.m for row in drift)
    adapters = {"sparsegpt": sparsegpt_dir, "general": general, DEMO_TASK: task_dir}
    ppl, switch = evaluate_on_one_base(model, tokenizer, adapters, texts, window=args.window,
                                       max_windows=args.max_windows)
    rows = []
    labels = {**DEMO_ROWS, DEMO_TASK: f"task adapter: general mask + rank-{rank} update"} if rank else DEMO_ROWS
    for name, label in labels.items():
        size = adapter_size(adapters[name]) if name in adapters else {"bytes": None, "bits_per_weight": None}
        rows.append({"row": name, "model": label, "adapter": adapters.get(name), "eval_ppl": ppl[name]["eval"]["ppl"],
                     "task_ppl": ppl[name]["task"]["ppl"], "bytes": size["bytes"],
                     "bits_per_weight": size["bits_per_weight"], "switch_seconds": switch.get(name)})
    scored = {key: {k: ppl["dense"][key][k] for k in ("window", "windows", "tokens")} for key in texts}
    payload = {
        "rows": rows,
        "eval_data": args.eval_data, "task": DEMO_TASK, "general": general, "max_windows": args.max_windows,
        "windows": scored,
        "task_mask": {**learned, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "lr": lr, "lora_rank": rank},
        "base_load_seconds": load_seconds,
    }
    print(_demo_report(payload))
    json_path = os.path.join(args.output, "demo.json")
    _write_json(json_path, payload)
    print(f"-> {json_path}")
    return payload


def _demo_report(payload: dict) -> str:
    """The demo's closing lines: what the perplexity is over, the table (rows: dense and the masks; columns: the
    two perplexities and the adapter size in bytes and bits per masked weight), the task mask's training and the
    adapter switches."""
    eval_name = "Wikitext-2" if payload["eval_data"] == "wikitext2" else payload["eval_data"]
    columns = ("model", f"{eval_name} PPL", f"{DEMO_TASK_NAME} held-out PPL", "adapter size")
    table = [{columns[0]: row["model"], columns[1]: f"{row['eval_ppl']:.2f}", columns[2]: f"{row['task_ppl']:.2f}",
              columns[3]: "- (the shared base)" if row["bytes"] is None else
              f"{format_bytes(row['bytes'])}, {row['bits_per_weight']:.3f} bit/weight"} for row in payload["rows"]]
    windows = payload["windows"]
    scored = "all windows" if payload["max_windows"] is None else f"first {payload['max_windows']} windows"
    learned = payload["task_mask"]
    switches = [row["switch_seconds"] for row in payload["rows"] if row["switch_seconds"] is not None]
    return "\n".join([
        f"\nPerplexity, windows of {windows['eval']['window']} tokens, {scored}: {eval_name} test "
        f"({windows['eval']['windows']} scored, {windows['eval']['tokens']} predicted tokens), {DEMO_TASK_NAME} "
        f"held-out ({windows['task']['windows']} scored, {windows['task']['tokens']} predicted tokens; never "
        "trained on):",
        _markdown(table, columns),
        f"\ntask {'adapter' if learned['lora_rank'] else 'mask'}: {learned['tokens']} {DEMO_TASK_NAME} training "
        f"tokens ({learned['steps']} steps x {learned['batch_size']} x {learned['seq_len']}, lr {learned['lr']:g}) "
        f"in {learned['seconds']:.0f} s; "
        + (f"a rank-{learned['lora_rank']} update trained under the frozen general mask; " if learned["lora_rank"]
           else "")
        + f"its mask changes {learned['groups_changed']:,} of the general mask's {learned['groups']:,} groups "
        f"({100 * learned['groups_changed'] / learned['groups']:.3f}%) and is saved as that difference"
        + (" with the update" if learned["lora_rank"] else "") + f" -> {learned['output']}",
        f"one base, {len(switches)} mask adapters: switching takes at most {1000 * max(switches):.0f} ms "
        f"(set_adapter and the first forward); loading the base took {payload['base_load_seconds']:.1f} s",
    ])


def cmd_push(args) -> str:
    """``sparse-peft push`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    url = push_mask_adapter(args.folder, args.repo_id, base_model=args.base_model, private=args.private or None,
                            commit_message=args.commit_message)
    print(url)
    return url


def cmd_repoint(args) -> dict:
    """``sparse-peft repoint`` (:data:`sparse_peft.cli.SUMMARIES`)."""
    config = repoint_general_mask(args.task_dir, args.general, revision=args.revision)
    at = f" at revision {config['prior_revision']}" if config["prior_revision"] else ""
    print(f"{args.task_dir}: general mask is now {config['prior']!r}{at} (sha256 {config['prior_sha256']})")
    return config


# -- parser -----------------------------------------------------------------------------------------------------


#: ``sparse-peft <name>`` -> the function that runs it on the parsed arguments.
COMMANDS = {"prune": cmd_prune, "learn": cmd_learn, "eval": cmd_eval, "inspect": cmd_inspect, "demo": cmd_demo,
            "push": cmd_push, "repoint": cmd_repoint}
