"""medusa-liger: train Medusa speculative-decoding heads with fused Triton kernels."""

__version__ = "0.1.0"


def patch(target="llama", **options):
    """Patch a model family (a ``model_type`` string) or a built model with the fused kernels.

    See :func:`medusa_liger.patching.patch`.
    """
    from medusa_liger.patching import patch as _patch

    return _patch(target, **options)


def unpatch(target):
    """Undo :func:`patch` for a ``model_type`` string or a model. See :mod:`medusa_liger.patching`."""
    from medusa_liger.patching import unpatch as _unpatch

    return _unpatch(target)


__all__ = ["__version__", "patch", "unpatch"]
