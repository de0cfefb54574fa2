"""Fused forwards for HF's RMSNorm and gated-MLP modules and RoPE function, and the class swap.

A patched module keeps its class's name, attributes and state_dict keys: the patcher swaps an
instance's ``__class__`` (or a modeling module's class attribute) for a *subclass* of the HF class
that overrides only ``forward``:

    RMSNorm:  y = rms_norm(x, weight, variance_epsilon)          (one fused kernel, fwd and bwd)
    MLP:      y = down_proj(swiglu(gate_proj(x), up_proj(x)))    (silu(g) * u fused)
    RoPE:     (q', k') = apply_rotary_pos_emb(q, k, cos, sin)    (q and k in one launch)

Because the subclass *is a* HF class, ``isinstance`` checks, HF's weight init (which matches norms
by class name), peft's ``target_modules`` and gradient checkpointing behave as before, and undoing
the patch is setting ``__class__`` back. The kernels are imported on first use, so importing
``medusa_liger.patching`` never needs Triton.
"""

from __future__ import annotations

import copyreg
import importlib
import sys
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

# Marks the subclasses made here; the value is the HF class a subclass replaces.
ORIGINAL_ATTR = "_medusa_liger_original"


_KERNELS: SimpleNamespace | None = None


def kernels() -> SimpleNamespace:
    """The fused ops, imported once (first patch, or first call of a patched forward). A global,
    not functools.cache: torch.compile traces a global read, but breaks the graph at a cached call."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _import_kernels()
    return _KERNELS


def _import_kernels() -> SimpleNamespace:
    from medusa_liger.kernels import fused_linear_cross_entropy as loss_module
    from medusa_liger.kernels.fused_linear_cross_entropy import multi_head_linear_cross_entropy
    from medusa_liger.kernels.rms_norm import rms_norm
    from medusa_liger.kernels.rope import apply_rotary_pos_emb
    from medusa_liger.kernels.swiglu import swiglu

    return SimpleNamespace(
        rms_norm=rms_norm,
        rope=apply_rotary_pos_emb,
        swiglu=swiglu,
        multi_head_linear_cross_entropy=multi_head_linear_cross_entropy,
        loss_module=loss_module,  # its reentrant_backward() flag, read at call time
    )


def rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """HF ``*RMSNorm.forward`` through the fused kernel: ``[..., H] -> [..., H]``."""
    return kernels().rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _is_silu(act: object) -> bool:
    # HF builds the activation from config.hidden_act: "silu" gives SiLUActivation, "swish" nn.SiLU.
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF gated-MLP forward with the fused SwiGLU: ``[..., H] -> [..., H]``.

    Only the SiLU gate is fused; a family configured with another activation keeps HF's forward.
    """
    if not _is_silu(self.act_fn):
        return getattr(type(self), ORIGINAL_ATTR).forward(self, x)
    # The projections' outputs feed only the activation, so its backward may overwrite them with
    # their gradients (saves two [..., intermediate] buffers per layer during the backward).
    # In place saves a buffer, unless the graph may be backpropagated twice (reentrant_backward()).
    ops = kernels()
    inplace = not ops.loss_module._reentrant
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), inplace_backward=inplace))


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for the modeling modules' ``apply_rotary_pos_emb`` (transformers 5.x signature).

    q ``[B, n_q, T, D]``, k ``[B, n_kv, T, D]``, cos/sin ``[B, T, D]``; returns the rotated (q, k).
    """
    return kernels().rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


apply_rotary_pos_emb._medusa_liger = True  # type: ignore[attr-defined]

# One subclass per HF class, made once, so patching twice yields the very same class.
_SUBCLASSES: dict[type, type] = {}


def _fused_forward(kind: str, original: type) -> Callable:
    """The forward a patched subclass of ``original`` gets for the patch piece ``kind``."""
    if kind == "rms_norm":
        return rms_norm_forward
    if kind == "swiglu":
        return swiglu_mlp_forward
    if kind == "fused_loss":
        from medusa_liger.patching.causal_lm import make_fused_forward  # (it imports this module)

        # make_fused_forward unwraps a forward already fused in place by the module route.
        return make_fused_forward(original.__dict__["forward"])
    raise ValueError(f"kind must be 'rms_norm', 'swiglu' or 'fused_loss', got {kind!r}")


def patched_class(original: type, kind: str) -> type:
    """The subclass of ``original`` whose ``forward`` is the fused one of the patch piece ``kind``
    ("rms_norm", "swiglu" or "fused_loss"), with the same name and module."""
    if original in _SUBCLASSES:
        return _SUBCLASSES[original]

    def __reduce_ex__(self, protocol):
        # pickle finds a class by module and name, which lead to the HF class, not to this one: an
        # instance is stored as the HF class's name and the piece, and rebuilt patched on load (by
        # torch.save/load, multiprocessing, and copy.deepcopy, which keeps it patched).
        if not is_patched_class(type(self)):  # a user's subclass of it: pickled by its own name
            return nn.Module.__reduce_ex__(self, protocol)
        return _reduce_by_name(self, original, kind)

    namespace = {
        "forward": _fused_forward(kind, original),
        "__reduce_ex__": __reduce_ex__,
        ORIGINAL_ATTR: original,
        # The same name, qualname and module: save_pretrained writes `architectures` from the
        # class name, HF's weight init matches norms by name, and annotations resolve as before.
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": f"HF's {original.__name__} whose forward runs medusa_liger's fused kernels.",
    }
    subclass = type(original.__name__, (original,), namespace)
    _SUBCLASSES[original] = subclass
    # While the module route has the subclass under the HF class's name, pickle could not store an
    # instance of the HF class itself (built before, or unpatched): it is stored by name, like ours.
    copyreg.pickle(original, _reduce_hf_instance)
    return subclass


def _reduce_hf_instance(module: nn.Module) -> tuple:
    # Only while the module route has put a patched subclass under the HF class's name (pickle would
    # find ours there); otherwise pickle's own way, so a file of an unpatched model (or one restored
    # by unpatch) loads where medusa_liger is not installed.
    cls = type(module)
    current = getattr(sys.modules.get(cls.__module__), cls.__name__, None)
    if not (isinstance(current, type) and is_patched_class(current)):
        return nn.Module.__reduce_ex__(module, 2)
    return _reduce_by_name(module, cls, None)


def _reduce_by_name(module: nn.Module, original: type, kind: str | None) -> tuple:
    """What pickle stores of ``module``: ``_rebuild`` with its HF class's name and patch piece, and its state."""
    reduced = nn.Module.__reduce_ex__(module, 2)  # (constructor, (cls, ...), state, ...)
    return (_rebuild, (original.__module__, original.__qualname__, kind), *reduced[2:])


def _rebuild(module: str, qualname: str, kind: str | None) -> nn.Module:
    """An empty instance of the HF class ``module.qualname`` (kind None) or of its patched subclass
    for the piece ``kind``: what pickle stores of either calls this on load."""
    cls = importlib.import_module(module)
    for name in qualname.split("."):
        cls = getattr(cls, name)
    cls = original_class(cls)  # the module route may have put the subclass there
    if kind is not None:
        cls = patched_class(cls, kind)
    return cls.__new__(cls)


def is_patched_class(cls: type) -> bool:
    """True for a subclass made by :func:`patched_class`."""
    return _SUBCLASSES.get(cls.__dict__.get(ORIGINAL_ATTR)) is cls


def original_class(cls: type) -> type:
    """The HF class behind a patched subclass (``cls`` itself otherwise)."""
    return cls.__dict__[ORIGINAL_ATTR] if is_patched_class(cls) else cls
