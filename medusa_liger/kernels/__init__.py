"""Fused Triton kernels (with PyTorch fallbacks for CPU) and their autograd Functions.

This package knows nothing of transformers: patching and the Medusa heads build on it.
"""

from medusa_liger.kernels.cross_entropy import cross_entropy
from medusa_liger.kernels.fused_linear_cross_entropy import (
    MultiHeadLinearCrossEntropy,
    multi_head_linear_cross_entropy,
)
from medusa_liger.kernels.head_by_head import head_by_head_linear_cross_entropy
from medusa_liger.kernels.reference import MultiHeadLossOutput, Teacher, multi_head_linear_cross_entropy_reference
from medusa_liger.kernels.utils import force_backend, use_triton

__all__ = [
    "MultiHeadLinearCrossEntropy",
    "MultiHeadLossOutput",
    "Teacher",
    "cross_entropy",
    "force_backend",
    "head_by_head_linear_cross_entropy",
    "multi_head_linear_cross_entropy",
    "multi_head_linear_cross_entropy_reference",
    "use_triton",
]
