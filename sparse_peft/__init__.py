"""sparse-peft: learnable N:M sparsity masks (MaskLLM) as PEFT mask adapters."""

__version__ = "0.1.0"
