"""medusa-liger: train Medusa speculative-decoding heads with fused Triton kernels."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the patching module, not by ``import medusa_liger``
    from torch import nn

__version__ = "0.1.0"


def patch(target: str | nn.Module = "llama", **options: bool) -> str | nn.Module:
    """Patch a model family (a ``model_type`` string) or a built model with the fused kernels.

    See :func:`medusa_liger.patching.patch`.
    """
    from medusa_liger.patching import patch as _patch

    return _patch(target, **options)


def unpatch(target: str | nn.Module) -> str | nn.Module:
    """Undo :func:`patch` for a ``model_type`` string or a model. See :mod:`medusa_liger.patching`."""
    from medusa_liger.patching import unpatch as _unpatch

    return _unpatch(target)


__all__ = ["__version__", "patch", "unpatch"]
