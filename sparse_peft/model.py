"""``MaskModel``: the PEFT tuner that injects :class:`~sparse_peft.layer.MaskedLinear` layers.

It owns what happens per model rather than per layer: the annealing schedule of each adapter, the prior masks
before injection (:mod:`sparse_peft.prior_masks`), adding the sparse regulariser to the loss, and converting
between the in-memory logits and the packed file format (PEFT's ``_get_adapter_state_dict`` /
``_remap_adapter_state_dict_for_load`` hooks, with :mod:`sparse_peft.codec`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils import transpose
from transformers.pytorch_utils import Conv1D

from .adapter_io import (
    MaskAdapter,
    adapter_weights_file,
    check_adapter_file,
    check_base,
    decode_records,
    load_general_mask,
    load_mask_adapter,
)
from .annealing import MaskSchedule, schedule_at
from .codec import (
    PATTERN_BITS,
    PATTERN_CODES,
    MaskRecord,
    encode_record,
    pattern_bytes,
    split_records,
    uses_pattern_codes,
    weight_fingerprint,
)
from .config import DEFAULT_TARGET_MODULES, AdapterLocation, MaskConfig
from .constants import FSDP_PREFIX, LOGITS, LORA_A, LORA_B, PREFIX, plain_name
from .layer import MaskedLinear, encode_mask, mask_layers, stored_indices
from .lowrank_init import init_lowrank_from_calibration
from .patterns import check_groupable, num_candidates
from .prior_masks import prior_masks
from .utils import fan_in_fan_out, format_bytes, output_layer, weight_out_in


class MaskModel(BaseTuner):
    """Learnable N:M masks on a frozen model (MaskLLM). Created by ``get_peft_model(model, MaskConfig(...))``.

    Besides PEFT's tuner API it offers :meth:`set_mask_schedule` (tau / kappa / lambda for a training step) and
    adds the sparse weight regulariser to ``outputs.loss`` of training forwards (:func:`_add_sparse_reg_to_loss`).
    """

    prefix: str = PREFIX
    tuner_layer_cls = MaskedLinear
    target_module_mapping = DEFAULT_TARGET_MODULES
    # Each adapter's schedule lives on the tuner and is shared by its layers, so PEFT's inject_adapter_in_model
    # (which returns the bare model and drops the tuner) must refuse this method.
    uses_shared_state = True

    # -- injection ------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: MaskConfig, model_config: dict) -> MaskConfig:
        return _with_default_targets(peft_config, model_config)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, preceded by checks and the per-adapter set-up (schedule, prior masks, regulariser hook),
        all-or-nothing.

        Every target is checked (type, not the output layer, groupable by ``m``) before any is replaced. When PEFT's
        loader is injecting an adapter it is about to load (see :meth:`MaskConfig.take_pending_load`), its weights
        file is checked against the config's N:M and the targets' weights first
        (:func:`~sparse_peft.adapter_io.check_adapter_file`). If anything fails, the model is restored to what it
        was before the call (modules, parameters, ``requires_grad``, train/eval mode, hooks) and the error re-raised.

        Overridden rather than using PEFT's pre/post-injection hooks because ``PeftModel.add_adapter`` calls
        ``inject_adapter`` without them.
        """
        config = self.peft_config[adapter_name]
        pending = config.take_pending_load() if isinstance(config, MaskConfig) else None
        self.__dict__.pop("_pending_load_undo", None)
        undo = _Injection(self, model, adapter_name)
        try:
            self._check_and_set_up(model, adapter_name, config, pending, low_cpu_mem_usage, state_dict)
            try:
                super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
            finally:
                self._prior_masks.pop(adapter_name, None)
            if _calibrates_lowrank(config, low_cpu_mem_usage):
                init_lowrank_from_calibration(model, adapter_name, config.calibration, factor=config.eora_scale)
        except BaseException:
            undo.restore()
            raise
        if pending is not None:  # the load's weights file is read next; a failure there undoes this injection
            self._pending_load_undo = undo

    def _check_and_set_up(
        self,
        model: nn.Module,
        adapter_name: str,
        config: MaskConfig,
        pending: Optional[AdapterLocation],
        low_cpu_mem_usage: bool,
        state_dict: Optional[dict[str, torch.Tensor]],
    ) -> None:
        """:meth:`inject_adapter`'s checks and set-up, before PEFT's injection: nothing is replaced here."""
        targets = check_targets(model, config, state_dict)
        if pending is not None:
            weights_file = adapter_weights_file(pending.name_or_path, pending.subfolder, pending.hub_kwargs)
            if weights_file is not None:
                weights = {plain_name(key): weight_out_in(_base_of(target)) for key, target in targets.items()}
                check_adapter_file(weights_file, config.n, config.m, weights, config.base_model_name_or_path, model)
        if "_schedules" not in self.__dict__:  # first adapter
            self._schedules: dict[str, MaskSchedule] = {}  # adapter -> schedule shared by its layers
            self._prior_masks: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> {module name: bool [out, in]}
            # On the wrapped model itself: PeftModel calls it directly when no task_type is set, bypassing us.
            self._sparse_reg_hook = model.register_forward_hook(_add_sparse_reg_to_loss)
        self._schedules[adapter_name] = schedule_at(config, 0, 1)
        if _calibrates_lowrank(config, low_cpu_mem_usage) and config.calibration is None:
            raise ValueError(
                "MaskConfig(init_lora_weights='eora') computes the low-rank update from calibration inputs: pass "
                "calibration=token_ids (a LongTensor [num_samples, seq_len], e.g. from "
                "sparse_peft.data.calibration_from_texts(texts, tokenizer)), or init_lora_weights=True to start the "
                "update at zero."
            )
        if config.init_weights and config.prior is not None and not low_cpu_mem_usage:
            self.disable_adapter_layers()  # the calibrated pruners run the dense model
            try:
                self._prior_masks[adapter_name] = prior_masks(model, config)
            finally:
                self.enable_adapter_layers()

    def _take_pending_load_undo(self, adapter_name: str) -> Optional["_Injection"]:
        """The undo of the injection of ``adapter_name`` whose weights PEFT's loader is loading now, if any."""
        undo = self.__dict__.get("_pending_load_undo")
        if undo is None or undo.adapter_name != adapter_name:
            return None
        del self.__dict__["_pending_load_undo"]
        return undo

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's adapter dtype cast, after which the logits have ``MaskConfig.logits_dtype`` whatever the base
        model's dtype; ``autocast_adapter_dtype=False`` cannot keep them in the base dtype, so it warns."""
        logits_dtype = self.peft_config[adapter_name].logits_dtype
        if not autocast_adapter_dtype:
            warnings.warn(
                f"autocast_adapter_dtype=False has no effect on mask adapters: their logits are "
                f"MaskConfig.logits_dtype ({logits_dtype}; an adapter loaded for inference holds uint8 pattern "
                "indices), whatever the base model's dtype.",
                UserWarning,
                stacklevel=3,
            )
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        dtype = getattr(torch, logits_dtype)
        for module in self.model.modules():
            if isinstance(module, MaskedLinear) and adapter_name in module.maskllm_logits:
                logits = module.maskllm_logits[adapter_name]
                if logits.is_floating_point() and logits.dtype != dtype:
                    logits.data = logits.data.to(dtype)

    def _create_and_replace(
        self,
        peft_config: MaskConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("MaskConfig does not support target_parameters; use target_modules.")
        _check_target(self.model, current_key, target, peft_config.m)
        schedule = self._schedules[adapter_name]
        prior_mask = self._prior_masks.get(adapter_name, {}).get(current_key)
        if isinstance(target, MaskedLinear):
            target.update_layer(adapter_name, peft_config, schedule, prior_mask)
            return
        new_module = MaskedLinear(target, adapter_name, peft_config, schedule, prior_mask, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # -- training -------------------------------------------------------------------------------------------
    def set_mask_schedule(self, step: int, max_steps: int) -> None:
        """Set tau, kappa and lambda of every adapter for optimizer step ``step`` of ``max_steps``."""
        for adapter_name, schedule in self._schedules.items():
            values = schedule_at(self.peft_config[adapter_name], step, max_steps)
            schedule.tau, schedule.kappa, schedule.sparse_reg = values.tau, values.kappa, values.sparse_reg

    def mask_schedule(self, adapter_name: str = "default") -> MaskSchedule:
        """The schedule values currently in force for ``adapter_name``."""
        return self._schedules[adapter_name]

    def trainable_parameters_summary(self) -> str:
        """What ``PeftModel.print_trainable_parameters()`` prints for a mask model: per mask adapter what is trained
        and what ``save_pretrained`` writes, then any other trainable parameters (``modules_to_save``).

        One line per adapter: ``<name>: trainable: G mask groups x C logits (G*C values, fp32) over W masked
        weights in L layers || saved: <what>``, where ``<what>`` is the packed N:M mask with its bits per masked
        weight and size, the same plus the float32 logits (``save_logits``), or the changes to the general mask
        (``save_delta``). An adapter loaded for inference holds its hard mask only and says ``frozen``. The packed
        sizes count the pattern field alone (each layer also stores its shape and a small weight fingerprint).
        """
        lines = []
        for adapter_name, config in self.peft_config.items():
            if not isinstance(config, MaskConfig):
                continue
            layers = list(mask_layers(self.model, adapter_name).values())
            if not layers:
                continue
            n, m = config.n, config.m
            shapes = [tuple(weight_out_in(layer.get_base_layer()).shape) for layer in layers]
            weights = sum(rows * cols for rows, cols in shapes)
            groups = weights // m
            candidates = num_candidates(n, m)
            field = PATTERN_CODES if uses_pattern_codes(n, m) else PATTERN_BITS
            mask_bytes = sum(pattern_bytes(field, shape, n, m) for shape in shapes)
            over = f"over {weights:,} masked weights in {len(layers)} layers"
            if all(layer.holds_indices(adapter_name) for layer in layers):
                trained = f"frozen {n}:{m} mask (loaded for inference, no logits) {over}"
            else:
                trained = (f"trainable: {groups:,} mask groups x {candidates} logits ({groups * candidates:,} values, "
                           f"fp32) {over}")
            packed = f"packed {n}:{m} mask, {8 * mask_bytes / weights:.3f} bit per masked weight"
            if config.save_logits:
                saved = f"{packed} + float32 logits ({format_bytes(mask_bytes + 4 * groups * candidates)})"
            elif config.save_delta:
                saved = (f"the groups whose pattern differs from the general mask {config.prior!r} (where few "
                         f"groups change, a fraction of the {packed}, {format_bytes(mask_bytes)})")
            else:
                saved = f"{packed} ({format_bytes(mask_bytes)})"
            lowrank = [layer.lowrank(adapter_name) for layer in layers if layer.lowrank(adapter_name) is not None]
            if lowrank:
                values = sum(a.numel() + b.numel() for a, b, _ in lowrank)
                where = config.lora_placement.replace("_", " ")
                what = "frozen" if all(layer.holds_indices(adapter_name) for layer in layers) else "trainable"
                if not config.train_mask:
                    trained = f"frozen {n}:{m} mask {over}"
                trained += f"; {what}: rank-{config.lora_rank} update ({where}, {values:,} values, fp32)"
                width = 2 if config.lora_save_dtype == "bfloat16" else 4
                saved += f" + the update in {config.lora_save_dtype} ({format_bytes(values * width)})"
            lines.append(f"{adapter_name}: {trained} || saved: {saved}")
        others = sum(
            p.numel() for name, p in self.model.named_parameters() if p.requires_grad and f".{PREFIX}" not in name
        )
        if others:
            lines.append(f"also trainable: {others:,} other parameters (modules_to_save), saved in full")
        return "\n".join(lines)

    # -- inference ------------------------------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's mixed-adapter batches: ``model(input_ids, adapter_names=[...])`` and ``model.generate(...)``.

        ``PeftModel.forward`` / ``generate`` enter this context with their kwargs. ``adapter_names`` holds one
        adapter name per row of the batch (``"__base__"``: the dense base model); while the context is open every
        mask layer receives it, and each row goes through its own adapter's hard mask
        (:meth:`~sparse_peft.layer.MaskedLinear.forward`). Eval mode only, and no adapter may be merged. With
        ``num_beams > 1`` each name is repeated for its row's beams. The active adapter is not changed.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "adapter_names (a mixed-adapter batch) is for inference only, but the model is in training mode. "
                "Call model.eval() first, or train one adapter at a time with set_adapter."
            )
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(
                f"adapter_names must be a list of adapter names (str), one per row of the batch; got {adapter_names!r}."
            )
        layers = mask_layers(self.model).values()
        known = {name for layer in layers for name in layer.maskllm_logits}
        unknown = sorted(set(adapter_names) - known - {"__base__"})
        if unknown:
            raise ValueError(
                f"adapter_names names adapter(s) {unknown} that the model does not hold; it holds {sorted(known)} "
                "('__base__' means the model without adapter). Load them with load_adapter first."
            )
        merged = sorted({name for layer in layers for name in layer.merged_adapters})
        if merged:
            raise ValueError(
                f"Cannot serve a mixed-adapter batch while adapter(s) {merged} are merged into the weights. Call "
                "unmerge_adapter() first."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]

        def inject(module: nn.Module, args: tuple, layer_kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
            return args, {**layer_kwargs, "adapter_names": names}

        handles = [
            layer.register_forward_pre_hook(partial(inject, names=list(adapter_names)), with_kwargs=True)
            for layer in layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        """PEFT's unload; with ``merge``, every layer is checked before any is merged, so a refused merge leaves the
        model exactly as it was.

        Refused: a layer that would take several masks or a second one on top of a merged one, and, with
        ``safe_merge``, NaN or infinite logits in any layer. Without ``safe_merge`` such logits still merge (their
        argmax is a valid-looking mask), with one warning naming the layers.
        """
        if merge:
            self._check_merge_allowed()
            self._check_mergeable(safe_merge, adapter_names)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=False, adapter_names=adapter_names
        )
        self._sparse_reg_hook.remove()
        return model

    def _check_mergeable(self, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Raise if merging ``adapter_names`` (default: the active ones) into any layer would fail; warn about
        non-finite logits that ``safe_merge=False`` lets through."""
        non_finite = []
        for name, layer in mask_layers(self.model).items():
            names = [a for a in (layer.active_adapters if adapter_names is None else adapter_names)
                     if a not in layer.merged_adapters]
            if names and (len(names) > 1 or layer.merged):
                raise ValueError(
                    f"Cannot merge {names} into {name}, which already holds {layer.merged_adapters}: a weight takes "
                    "one mask. Nothing was merged. Pass adapter_names=[<one name>], or unmerge first."
                )
            if names and names[0] in layer.maskllm_logits:
                layer.check_mergeable(names[0])
            if names and names[0] in layer.maskllm_logits and not torch.isfinite(layer.maskllm_logits[names[0]]).all():
                non_finite.append(name)
        if not non_finite:
            return
        shown = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
        count = f"{len(non_finite)} layer has" if len(non_finite) == 1 else f"{len(non_finite)} layers have"
        problem = f"{count} NaN or infinite mask logits ({shown}); the training run diverged"
        if safe_merge:
            raise ValueError(f"{problem}. Nothing was merged: restore an earlier checkpoint.")
        warnings.warn(
            f"{problem}, and their merged masks are argmaxes of those logits. Restore an earlier checkpoint, or pass "
            "safe_merge=True to refuse such merges.",
            UserWarning,
            stacklevel=4,
        )

    # -- the adapter file format (PEFT's internal save / load hooks) -----------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Replace each layer's float logits by its packed hard mask (or its delta to the general mask), shape and
        base fingerprint."""
        general = _general_for_save(config)
        to_return = {}
        for name, module in model.named_modules():
            if not (isinstance(module, MaskedLinear) and adapter_name in module.maskllm_logits):
                continue
            key = name.removeprefix(FSDP_PREFIX)
            logits = state_dict[f"{key}.{LOGITS}.{adapter_name}"]  # or uint8 indices, if loaded for inference
            if config.save_logits and not logits.is_floating_point():
                raise ValueError(
                    f"{key}: adapter {adapter_name!r} was loaded for inference and holds no logits, so "
                    "save_logits=True cannot be honoured; nothing was saved. Load it with is_trainable=True, or set "
                    "save_logits=False."
                )
            if not torch.isfinite(logits).all():
                raise ValueError(
                    f"{key}: adapter {adapter_name!r} has NaN or infinite mask logits; nothing was saved. The "
                    "training run diverged: restore an earlier checkpoint."
                )
            base = module.get_base_layer()
            base_weight = state_dict.get(f"{key}.base_layer.weight", base.weight)
            base_weight = transpose(base_weight.detach(), fan_in_fan_out(base))  # [out, in]
            record = MaskRecord(
                shape=module.weight_shape,
                indices=stored_indices(logits),
                fingerprint=weight_fingerprint(base_weight),
                logits=logits if config.save_logits else None,
            )
            general_record = None if general is None else general.records.get(plain_name(key))
            if general is not None and (general_record is None or general_record.shape != record.shape):
                raise ValueError(
                    f"{plain_name(key)}: the general mask {config.prior!r} has no mask of shape {record.shape} for "
                    "this layer, so it cannot be saved as a delta to it; nothing was saved. Set "
                    f"model.peft_config[{adapter_name!r}].save_delta = False to save the full mask."
                )
            spec = module.maskllm_spec[adapter_name]
            general_indices = None if general_record is None else general_record.indices
            for field, tensor in encode_record(record, spec.n, spec.m, general_indices).items():
                to_return[f"{key}.{field}.{adapter_name}"] = tensor.cpu()
            if module.lowrank(adapter_name) is not None:
                dtype = getattr(torch, config.lora_save_dtype)
                for field in (LORA_A, LORA_B):
                    tensor = state_dict[f"{key}.{field}.{adapter_name}"]
                    if not torch.isfinite(tensor).all():
                        raise ValueError(
                            f"{key}: adapter {adapter_name!r} has NaN or infinite low-rank update values; nothing "
                            "was saved. The training run diverged: restore an earlier checkpoint."
                        )
                    to_return[f"{key}.{field}.{adapter_name}"] = tensor.detach().to("cpu", dtype).contiguous()
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the file matches this base model, then turn packed masks (or deltas) back into logits, or into
        uint8 pattern indices for layers that hold an inference-only adapter.

        If this is PEFT's loader loading the adapter it just injected and the file is refused, the injection is
        undone (and the adapter's config forgotten) before the error propagates.
        """
        tuner = getattr(model, "base_model", None)
        undo = tuner._take_pending_load_undo(adapter_name) if isinstance(tuner, MaskModel) else None
        try:
            return cls._decode_for_load(model, config, adapter_name, state_dict)
        except BaseException:
            if undo is not None:
                undo.restore()
                tuner.peft_config.pop(adapter_name, None)
            raise

    @classmethod
    def _decode_for_load(cls, model, config, adapter_name, state_dict):
        grouped, rest = split_records(state_dict)
        layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, MaskedLinear) and adapter_name in module.maskllm_logits
        }
        records = decode_records(
            grouped, config.n, config.m, config.prior, config.prior_sha256, config.prior_revision
        )
        weights = {plain_name(name): module.base_weight() for name, module in layers.items()}
        check_base(records, weights, config.base_model_name_or_path, model, "This mask adapter")
        for name, module in layers.items():
            record = records[plain_name(name)]
            if module.holds_indices(adapter_name):
                logits = record.indices.to(torch.uint8)
            elif record.logits is not None:
                logits = record.logits
            else:
                logits = encode_mask(record.mask(config.n, config.m), config)
            rest[f"{name}.{LOGITS}.{adapter_name}"] = logits
            if module.lowrank(adapter_name) is not None:
                for field in (LORA_A, LORA_B):
                    saved = rest.pop(f"{name}.{field}", None)
                    if saved is None:
                        raise ValueError(
                            f"{plain_name(name)}: the adapter's config asks for a rank-{config.lora_rank} update "
                            f"but its weights file has no {field!r} for this layer. The file is incomplete, or "
                            "adapter_config.json belongs to another adapter."
                        )
                    expected = tuple(getattr(module, field)[adapter_name].shape)
                    if tuple(saved.shape) != expected:
                        raise ValueError(
                            f"{plain_name(name)}: the weights file's {field!r} has shape {tuple(saved.shape)}, but "
                            f"this adapter's config (lora_rank={config.lora_rank}) and layer need {expected}. The "
                            "file and adapter_config.json belong to different adapters."
                        )
                    rest[f"{name}.{field}.{adapter_name}"] = saved
        return rest


def check_targets(
    model: nn.Module, config: MaskConfig, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, nn.Module]:
    """``{module name: module}`` that a mask adapter with ``config`` masks in ``model``, after checking that each of
    them can take an N:M mask with groups of ``config.m`` (a ``ValueError`` / ``TypeError`` naming the module and
    the fix otherwise).

    These are the modules PEFT's ``inject_adapter`` passes to ``_create_and_replace``: matched by
    ``config.target_modules`` (``None``: the default for the model type; ``"all-linear"``), or named in
    ``state_dict`` when one is given, and not inside an existing tuner layer. Only module names, types and weight
    shapes are read, so a model built on the meta device from its config (no weights) is enough: the CLI checks
    ``--n`` / ``--m`` / ``--targets`` this way before it loads a model. Like PEFT's injection it fills in
    ``config.target_modules`` when that is None; pass a copy to keep the original.
    """
    config = _maybe_include_all_linear_layers(_with_default_targets(config, BaseTuner.get_model_config(model)), model)
    named = list(model.named_modules())
    inside = tuple(f"{key}." for key, module in named if isinstance(module, BaseTunerLayer))
    from_state_dict = None
    if state_dict is not None:
        from_state_dict = {k.rsplit(f".{PREFIX}", 1)[0].removeprefix("_orig_mod.") for k in state_dict}
    targets = {}
    for key, module in named:
        if not key or key.startswith(inside):
            continue
        if from_state_dict is not None:
            hit = key.removeprefix("_orig_mod.") in from_state_dict
        else:
            hit = BaseTuner._check_tied_module_exists(config, key) or check_target_module_exists(config, key)
        if hit:
            _check_target(model, key, module, config.m)
            targets[key] = module
    return targets


def _with_default_targets(config: MaskConfig, model_config: dict) -> MaskConfig:
    """``config`` with ``target_modules`` set to the default for ``model_config``'s model type when it is None
    (what PEFT's ``BaseTuner._prepare_adapter_config`` does, with an error that names the fix)."""
    if config.target_modules is None:
        model_type = model_config.get("model_type")
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"MaskConfig has no target_modules and there is no default for model_type {model_type!r}. Pass "
                "target_modules=[...] (module name suffixes) or target_modules='all-linear'."
            )
        config.target_modules = set(DEFAULT_TARGET_MODULES[model_type])
    return config


def _base_of(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def _check_target(model: nn.Module, key: str, target: nn.Module, m: int) -> None:
    """Raise unless ``target`` (module ``key`` of ``model``) can take an N:M mask with groups of ``m``."""
    base = _base_of(target)
    if base is output_layer(model):
        raise ValueError(
            f"{key} is the model's output layer (lm_head); it is never masked. Remove it from target_modules."
        )
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise TypeError(
            f"{key} is a {type(base).__name__}; mask adapters support nn.Linear and GPT-2 Conv1D layers only. Remove "
            "it from target_modules."
        )
    check_groupable(tuple(weight_out_in(base).shape), m, key)


class _Injection:
    """What one ``inject_adapter`` call may change, recorded before it, and :meth:`restore` to undo it.

    Recorded for every module of the model: its children, parameters and buffers, train/eval mode, forward hooks
    and, for tuner layers, the active adapter; every parameter's ``requires_grad``; the model's own attributes
    (PEFT adds ``peft_config``); and the tuner's adapter state. Modules are not copied: restoring puts the same
    objects back.
    """

    def __init__(self, tuner: MaskModel, model: nn.Module, adapter_name: str) -> None:
        self.tuner, self.model, self.adapter_name = tuner, model, adapter_name
        self.modules = [
            (module, dict(module._modules), dict(module._parameters), dict(module._buffers), module.training,
             dict(module._forward_hooks), dict(module._forward_pre_hooks), module.__dict__.get("_active_adapter"))
            for module in model.modules()
        ]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.attributes = dict(model.__dict__)
        self.tuner_state = {k: tuner.__dict__.get(k) for k in ("active_adapter", "targeted_module_names")}
        self.tuner_state["targeted_module_names"] = list(tuner.__dict__.get("targeted_module_names") or [])
        self.first = "_schedules" not in tuner.__dict__

    def restore(self) -> None:
        """Put the model and the tuner back as they were when this was recorded."""
        for module, *_ in self.modules:
            if isinstance(module, MaskedLinear) and self.adapter_name in module.maskllm_logits:
                module.delete_adapter(self.adapter_name)
        for module, children, parameters, buffers, training, hooks, pre_hooks, active in self.modules:
            for store, saved in ((module._modules, children), (module._parameters, parameters),
                                 (module._buffers, buffers), (module._forward_hooks, hooks),
                                 (module._forward_pre_hooks, pre_hooks)):
                store.clear()
                store.update(saved)
            module.training = training
            if active is not None:
                module._active_adapter = active
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)
        for key in [k for k in self.model.__dict__ if k not in self.attributes]:
            del self.model.__dict__[key]
        self.model.__dict__.update(self.attributes)
        self.tuner.__dict__.update(self.tuner_state)
        if self.first:
            for key in ("_schedules", "_prior_masks", "_sparse_reg_hook"):
                self.tuner.__dict__.pop(key, None)
        elif "_schedules" in self.tuner.__dict__:
            self.tuner._schedules.pop(self.adapter_name, None)


def _calibrates_lowrank(config: MaskConfig, low_cpu_mem_usage: bool) -> bool:
    """True if injecting ``config`` computes its low-rank update from calibration (not for saved adapters)."""
    eora = config.init_lora_weights == "eora"
    return bool(config.lora_rank) and eora and config.init_weights and not low_cpu_mem_usage


def _general_for_save(config: MaskConfig) -> Optional[MaskAdapter]:
    """The general mask a delta-coded save refers to, or None.

    Checks it is still the file whose hash was recorded when the adapter was initialised from it (recording the
    hash now if there is none), so that the saved delta and its reference agree.
    """
    if not config.save_delta:
        return None
    if config.prior_sha256 is None:
        general = load_mask_adapter(config.prior, config.prior_revision)
        config.prior_sha256 = general.sha256
        config.prior_revision = general.revision
        return general
    return load_general_mask(config.prior, config.prior_sha256, config.n, config.m, config.prior_revision)


def _add_sparse_reg_to_loss(model: nn.Module, args: Any, outputs: Any) -> Any:
    """Forward hook: in training, ``outputs.loss -= lambda * sum over layers of ||W * soft_mask||^2``.

    The regulariser's gradient is added inside each layer (exact under any gradient checkpointing); here only
    its value joins the reported loss, so a plain ``Trainer`` logs the full MaskLLM objective it optimises.
    """
    layers = mask_layers(model).values()
    penalties = [p for layer in layers if (p := layer.pop_sparse_reg()) is not None]
    loss = getattr(outputs, "loss", None)
    if model.training and penalties and loss is not None:
        outputs["loss"] = loss - torch.stack(penalties).sum().to(loss)
    elif not model.training and torch.is_grad_enabled() and loss is not None and not loss.requires_grad:
        trainable = next((logits for layer in layers for logits in layer.maskllm_logits.values()
                          if logits.requires_grad), None)
        if trainable is not None:
            outputs["loss"] = _EvalModeLoss.apply(loss, trainable)
    return outputs


class _EvalModeLoss(torch.autograd.Function):
    """The loss of an eval-mode forward, unchanged, whose backward explains why there is no gradient.

    In eval mode the layers apply the hard (argmax) mask, which has no gradient, so the loss does not depend on
    any trainable tensor and torch's own error would be the generic "does not require grad". One trainable logits
    tensor is an input only so that ``backward`` reaches this function.
    """

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise RuntimeError(
            "The model is in eval mode, where mask layers apply the hard mask, which has no gradient, so this loss "
            "cannot train the masks. Call model.train() before the training forward (and model.eval() for evaluation)."
        )
