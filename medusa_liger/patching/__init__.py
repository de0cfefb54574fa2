"""One-line patching of Hugging Face Llama-family causal LMs with the fused kernels.

    import medusa_liger
    medusa_liger.patch("llama")        # before building: patches transformers' modeling_llama
    model = AutoModelForCausalLM.from_pretrained(...)
    medusa_liger.patch(model)          # or a built (also peft-wrapped) model
    medusa_liger.unpatch(model)        # restores HF's modules / functions

Importing this package needs neither Triton nor the kernels: they are imported by ``patch``.
"""

from medusa_liger.patching.apply import PIECES, patch, unpatch
from medusa_liger.patching.table import FAMILIES, FamilySpec, supported_model_types

__all__ = ["FAMILIES", "PIECES", "FamilySpec", "patch", "supported_model_types", "unpatch"]
