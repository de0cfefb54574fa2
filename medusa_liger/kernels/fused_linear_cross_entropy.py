"""PLACEHOLDER while the fused op is written (issue 3): delegates to the naive reference."""
from medusa_liger.kernels.reference import MultiHeadLossOutput, multi_head_linear_cross_entropy_reference


def multi_head_linear_cross_entropy(*args, **kwargs) -> MultiHeadLossOutput:
    kwargs.pop("accum_dtype", None)
    return multi_head_linear_cross_entropy_reference(*args, **kwargs)
