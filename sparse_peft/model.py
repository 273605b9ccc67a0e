"""``MaskModel``: the PEFT tuner that injects :class:`~sparse_peft.layer.MaskedLinear` layers.

It also owns what happens per model rather than per layer: computing the prior masks before injection, the
annealing schedule, adding the sparse regulariser to the loss, and converting between the in-memory logits and
the packed file format (PEFT's ``_get_adapter_state_dict`` / ``_remap_adapter_state_dict_for_load`` hooks).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from transformers.pytorch_utils import Conv1D

from .config import CALIBRATED_PRIORS, DEFAULT_TARGET_MODULES, MaskConfig
from .layer import MaskedLinear, stored_indices
from .patterns import indices_from_mask, prior_logits
from .published import published_mask_file, read_published_masks
from .registration import PREFIX
from .schedule import MaskSchedule, schedule_at
from .storage import (
    LOGITS,
    MaskRecord,
    decode_records,
    encode_record,
    fingerprints_match,
    load_general_mask,
    load_mask_adapter,
    split_records,
    weight_fingerprint,
)

_FSDP_PREFIX = "_fsdp_wrapped_module."
_PEFT_PREFIX = "base_model.model."


def _plain_name(module_name: str) -> str:
    """A tuner-layer name as a base-model module name (no FSDP or PEFT prefix)."""
    return module_name.removeprefix(_FSDP_PREFIX).removeprefix(_PEFT_PREFIX)


def _mask_layers(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, MaskedLinear]:
    """``{base-model module name: layer}`` for every MaskedLinear (holding ``adapter_name``, if given)."""
    return {
        _plain_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, MaskedLinear) and (adapter_name is None or adapter_name in module.maskllm_logits)
    }


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(model, "name_or_path", None) or "<unnamed model>"


def base_mismatches(records: dict[str, MaskRecord], weights: dict[str, torch.Tensor]) -> list[str]:
    """What differs between saved mask records and a model's ``{name: weight [out, in]}``, one line each."""
    problems = []
    for name in sorted(weights.keys() - records.keys()):
        problems.append(f"{name}: this model masks it, the adapter has no mask for it")
    for name in sorted(records.keys() - weights.keys()):
        problems.append(f"{name}: the adapter has a mask for it, this model has no such target layer")
    for name in sorted(records.keys() & weights.keys()):
        saved, weight = records[name], weights[name]
        if tuple(weight.shape) != saved.shape:
            problems.append(
                f"{name}: adapter made for weight shape {saved.shape}, this model has {tuple(weight.shape)}"
            )
        elif not fingerprints_match(saved.fingerprint, weight_fingerprint(weight)):
            problems.append(f"{name}: same shape {saved.shape} but different weight values")
    return problems


def _raise_wrong_base(problems: list[str], made_for: Optional[str], model: nn.Module, what: str) -> None:
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise ValueError(
        f"{what} was made for a different base model (made for: {made_for!r}; this model: {_model_name(model)!r}).\n"
        f"  {shown}\nLoad it onto the base model it was trained on."
    )


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
            self._prior_masks[adapter_name] = self._compute_prior_masks(model, config)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        finally:
            self._prior_masks.pop(adapter_name, None)

    def _target_linears(self, model: nn.Module, config: MaskConfig) -> dict[str, str]:
        """``{target name: name of its linear module}`` for the layers ``config`` masks.

        The two names differ only for a layer that another adapter already wrapped (``<name>.base_layer``).
        """
        targets = {}
        for name, module in model.named_modules():
            if not self._check_target_module_exists(config, name):
                continue
            wrapped = isinstance(module, BaseTunerLayer)
            base = module.get_base_layer() if wrapped else module
            if isinstance(base, (nn.Linear, Conv1D)) and base is not _output_layer(model):
                targets[name] = f"{name}.base_layer" if wrapped else name
        return targets

    def _compute_prior_masks(self, model: nn.Module, config: MaskConfig) -> dict[str, torch.Tensor]:
        """Prior masks ``{module name: bool [out, in]}`` for the targets of ``config``."""
        targets = self._target_linears(model, config)
        if config.prior_is_adapter:
            return self._masks_from_prior_adapter(model, config, targets)
        from .priors import compute_prior_masks

        if config.prior in CALIBRATED_PRIORS and config.calibration is None:
            raise ValueError(
                f"prior={config.prior!r} needs calibration inputs: MaskConfig(prior={config.prior!r}, "
                "calibration=token_ids) with token_ids a LongTensor [num_samples, seq_len], e.g. from "
                "sparse_peft.priors.calibration_from_texts(texts, tokenizer)."
            )
        with _adapters_disabled(model):
            masks = compute_prior_masks(
                model, config.prior, config.n, config.m, list(targets.values()), calibration=config.calibration
            )
        return {name: masks[linear_name] for name, linear_name in targets.items()}

    def _masks_from_prior_adapter(
        self, model: nn.Module, config: MaskConfig, targets: dict[str, str]
    ) -> dict[str, torch.Tensor]:
        """Prior masks from a saved mask adapter or a published MaskLLM ``mask_compressed.npz`` (``config.prior``).

        For a mask adapter this also records what a delta-coded save refers to: ``config.prior`` becomes an absolute
        path if it is a local one, ``config.prior_sha256`` the hash of its weights file, ``config.prior_revision``
        the commit it was read at if it is a Hub id, and ``save_delta`` defaults to True.
        """
        weights = {name: _weight_out_in(model.get_submodule(linear)) for name, linear in targets.items()}
        npz = published_mask_file(config.prior, config.prior_revision)
        if npz is not None:
            if config.save_delta:
                raise ValueError(
                    f"save_delta=True needs a mask adapter as the general mask, but {config.prior!r} is a published "
                    "MaskLLM mask file. Import it once with sparse_peft.published.import_published_masks(prior, "
                    "base_model, 'general-mask') and pass prior='general-mask' (or its Hub id after pushing it)."
                )
            config.save_delta = False
            masks = read_published_masks(npz, model, config.n, config.m)
            shared = weights.keys() & masks.keys()
            if not shared:
                raise ValueError(
                    f"The MaskLLM mask file {config.prior!r} has masks for {len(masks)} layers (e.g. "
                    f"{sorted(masks)[0]}), none of which is a target of this MaskConfig (e.g. {sorted(weights)[0]}). "
                    "Set target_modules to the layers the file covers."
                )
        else:
            prior = load_mask_adapter(config.prior, config.prior_revision)
            if (prior.n, prior.m) != (config.n, config.m):
                raise ValueError(
                    f"The prior mask adapter {config.prior!r} is {prior.n}:{prior.m} sparse but this MaskConfig asks "
                    f"for {config.n}:{config.m}; use a prior with the same N:M."
                )
            shared = weights.keys() & prior.records.keys()
            made_for, what = prior.config.get("base_model_name_or_path"), f"The prior mask adapter {config.prior!r}"
            if not shared:
                _raise_wrong_base(base_mismatches(prior.records, weights), made_for, model, what)
            problems = base_mismatches({name: prior.records[name] for name in shared}, {n: weights[n] for n in shared})
            if problems:
                _raise_wrong_base(problems, made_for, model, what)
            masks = prior.masks()
            if os.path.isdir(config.prior):
                config.prior = os.path.abspath(config.prior)
            config.prior_sha256 = prior.sha256
            config.prior_revision = prior.revision  # pins a Hub prior to the commit read now
            if config.save_delta is None:
                config.save_delta = True
        uncovered = sorted(weights.keys() - shared)
        if uncovered:
            warnings.warn(
                f"The prior {config.prior!r} has no mask for {len(uncovered)} target layer(s) "
                f"(e.g. {uncovered[0]}); they start from random logits."
            )
        return {name: masks[name] for name in shared}

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
        if base is _output_layer(self.model):
            raise ValueError(
                f"{current_key} is the model's output layer (lm_head); it is never masked. Remove it from "
                "target_modules."
            )
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"{current_key} is a {type(base).__name__}; mask adapters support nn.Linear and GPT-2 Conv1D layers "
                "only. Remove it from target_modules."
            )
        layer_kwargs = dict(
            n=peft_config.n,
            m=peft_config.m,
            schedule=self._schedules[adapter_name],
            init_std=peft_config.logit_init_std,
            prior_mask=self._prior_masks.get(adapter_name, {}).get(current_key),
            prior_strength=peft_config.prior_strength,
            inference_only=peft_config.inference_mode,
        )
        if isinstance(target, MaskedLinear):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = MaskedLinear(target, adapter_name, layer_name=current_key, **layer_kwargs)
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
            key = name.removeprefix(_FSDP_PREFIX)
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
            base_weight = state_dict.get(f"{key}.base_layer.weight", module.get_base_layer().weight)
            if module._is_conv1d:
                base_weight = base_weight.T
            record = MaskRecord(
                shape=module.weight_shape,
                indices=stored_indices(logits),
                fingerprint=weight_fingerprint(base_weight),
                logits=logits if config.save_logits else None,
            )
            general_record = None if general is None else general.records.get(_plain_name(key))
            if general is not None and (general_record is None or general_record.shape != record.shape):
                raise ValueError(
                    f"{_plain_name(key)}: the general mask {config.prior!r} has no mask of shape {record.shape} for "
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
        weights = {_plain_name(name): module.base_weight() for name, module in layers.items()}
        problems = base_mismatches(records, weights)
        if problems:
            _raise_wrong_base(problems, config.base_model_name_or_path, model, "This mask adapter")
        for name, module in layers.items():
            record = records[_plain_name(name)]
            if module.holds_indices(adapter_name):
                logits = record.indices.to(torch.uint8)
            elif record.logits is not None:
                logits = record.logits
            else:
                logits = encode_mask(record.mask(config.n, config.m), config)
            rest[f"{name}.{LOGITS}.{adapter_name}"] = logits
        return rest


def _general_for_save(config: MaskConfig):
    """The general mask (a :class:`~sparse_peft.storage.MaskAdapter`) a delta-coded save refers to, or None.

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


def encode_mask(mask: torch.Tensor, config: MaskConfig) -> torch.Tensor:
    """Logits ``[G, C]`` whose argmax is exactly the hard ``mask``: the prior formula without its noise.

    Used where only a hard mask is known (a hard-mask-only adapter file, a one-shot pruner's output); training
    from these logits treats the mask as a prior of strength ``config.prior_strength``.
    """
    alpha = config.prior_strength if config.prior_strength > 0 else 1.0
    return prior_logits(mask, config.n, config.m, alpha, config.logit_init_std, noise=False)


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Make ``adapter_name``'s hard mask exactly ``masks`` (``{base-model module name: 0/1 [out, in]}``).

    The logits become :func:`encode_mask` of each mask. Used to turn one-shot pruner masks into a mask adapter.
    """
    layers = _mask_layers(model, adapter_name)
    if layers.keys() != masks.keys():
        raise ValueError(
            f"Masks given for {len(masks)} layers, the adapter has {len(layers)}; they differ at e.g. "
            f"{sorted(layers.keys() ^ masks.keys())[:3]}."
        )
    config = model.peft_config[adapter_name]
    for name, layer in layers.items():
        with torch.no_grad():
            state = layer.maskllm_logits[adapter_name]
            if layer.holds_indices(adapter_name):
                state.copy_(indices_from_mask(masks[name], config.n, config.m))
            else:
                state.copy_(encode_mask(masks[name], config))


def _add_sparse_reg_to_loss(model: nn.Module, args: Any, outputs: Any) -> Any:
    """Forward hook: in training, ``outputs.loss -= lambda * sum over layers of ||W * soft_mask||^2``.

    The regulariser's gradient is added inside each layer (exact under any gradient checkpointing); here only
    its value joins the reported loss, so a plain ``Trainer`` logs the full MaskLLM objective it optimises.
    """
    penalties = [p for layer in _mask_layers(model).values() if (p := layer.pop_sparse_reg()) is not None]
    loss = getattr(outputs, "loss", None)
    if model.training and penalties and loss is not None:
        outputs["loss"] = loss - torch.stack(penalties).sum().to(loss)
    return outputs


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return get_output() if callable(get_output) else None
    except (AttributeError, NotImplementedError):
        return None


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """A linear module's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


class _adapters_disabled:
    """Context manager: every mask layer of ``model`` forwards its dense base layer."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MaskedLinear) and not m.disable_adapters]

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.enable_adapters(True)
