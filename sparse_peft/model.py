"""``MaskModel``: the PEFT tuner that injects :class:`~sparse_peft.layer.MaskedLinear` layers.

It owns what happens per model rather than per layer: the annealing schedule of each adapter, the prior masks
before injection (:mod:`sparse_peft.prior_masks`), adding the sparse regulariser to the loss, and converting
between the in-memory logits and the packed file format (PEFT's ``_get_adapter_state_dict`` /
``_remap_adapter_state_dict_for_load`` hooks, with :mod:`sparse_peft.codec`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import transpose
from transformers.pytorch_utils import Conv1D

from .adapter_io import MaskAdapter, check_base, decode_records, load_general_mask, load_mask_adapter
from .annealing import MaskSchedule, schedule_at
from .codec import MaskRecord, encode_record, split_records, weight_fingerprint
from .config import DEFAULT_TARGET_MODULES, MaskConfig
from .constants import FSDP_PREFIX, LOGITS, PREFIX, plain_name
from .layer import MaskedLinear, encode_mask, mask_layers, stored_indices
from .prior_masks import prior_masks
from .utils import fan_in_fan_out, output_layer


class MaskModel(BaseTuner):
    """Learnable N:M masks on a frozen model (MaskLLM). Created by ``get_peft_model(model, MaskConfig(...))``.

    Besides PEFT's tuner API it offers :meth:`set_mask_schedule` (tau / kappa / lambda for a training step) and
    adds the sparse weight regulariser to ``outputs.loss`` of training forwards (:func:`_add_sparse_reg_to_loss`).
    """

    prefix: str = PREFIX
    tuner_layer_cls = MaskedLinear
    target_module_mapping = DEFAULT_TARGET_MODULES

    # -- injection ------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: MaskConfig, model_config: dict) -> MaskConfig:
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            raise ValueError(
                f"MaskConfig has no target_modules and there is no default for model_type "
                f"{model_config.get('model_type')!r}. Pass target_modules=[...] (module name suffixes) or "
                "target_modules='all-linear'."
            )
        return super()._prepare_adapter_config(peft_config, model_config)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, preceded by the per-adapter set-up: schedule, prior masks, regulariser hook.

        Overridden rather than using PEFT's pre/post-injection hooks because ``PeftModel.add_adapter`` calls
        ``inject_adapter`` without them.
        """
        if "_schedules" not in self.__dict__:  # first adapter
            self._schedules: dict[str, MaskSchedule] = {}  # adapter -> schedule shared by its layers
            self._prior_masks: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> {module name: bool [out, in]}
            # On the wrapped model itself: PeftModel calls it directly when no task_type is set, bypassing us.
            self._sparse_reg_hook = model.register_forward_hook(_add_sparse_reg_to_loss)
        config = self.peft_config[adapter_name]
        self._schedules[adapter_name] = schedule_at(config, 0, 1)
        if config.init_weights and config.prior is not None and not low_cpu_mem_usage:
            config = self._prepare_adapter_config(config, self.get_model_config(model))
            config = _maybe_include_all_linear_layers(config, model)
            self.disable_adapter_layers()  # the calibrated pruners run the dense model
            try:
                self._prior_masks[adapter_name] = prior_masks(model, config)
            finally:
                self.enable_adapter_layers()
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        finally:
            self._prior_masks.pop(adapter_name, None)

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
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if base is output_layer(self.model):
            raise ValueError(
                f"{current_key} is the model's output layer (lm_head); it is never masked. Remove it from "
                "target_modules."
            )
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"{current_key} is a {type(base).__name__}; mask adapters support nn.Linear and GPT-2 Conv1D layers "
                "only. Remove it from target_modules."
            )
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

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._sparse_reg_hook.remove()
        return model

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
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the file matches this base model, then turn packed masks (or deltas) back into logits, or into
        uint8 pattern indices for layers that hold an inference-only adapter."""
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
        return rest


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
    penalties = [p for layer in mask_layers(model).values() if (p := layer.pop_sparse_reg()) is not None]
    loss = getattr(outputs, "loss", None)
    if model.training and penalties and loss is not None:
        outputs["loss"] = loss - torch.stack(penalties).sum().to(loss)
    return outputs
