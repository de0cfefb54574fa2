"""Medusa heads, the model wrapper that trains them, and export/import for serving engines.

    from medusa_liger.heads import MedusaConfig, MedusaModel
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=5, mode="heads"))
    out = model(input_ids)                 # out.loss, out.head_losses, out.head_accuracy, ...
    model.save_heads("out/", format="vllm")
"""

from medusa_liger.heads.config import MedusaConfig
from medusa_liger.heads.model import MedusaModel, MedusaOutput, packed_causal_mask, segment_position_ids
from medusa_liger.heads.modules import MedusaHeads, ResBlock

__all__ = [
    "MedusaConfig",
    "MedusaHeads",
    "MedusaModel",
    "MedusaOutput",
    "ResBlock",
    "packed_causal_mask",
    "segment_position_ids",
]
