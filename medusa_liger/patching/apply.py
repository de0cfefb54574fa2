"""``patch`` / ``unpatch``: put the fused kernels into HF Llama-family models, and take them out.

Two routes, one table (:mod:`medusa_liger.patching.table`):

* ``patch("llama")`` patches the *modeling module*, for models built afterwards: its RMSNorm and
  MLP class attributes become fused subclasses (``LlamaDecoderLayer.__init__`` looks them up at
  construction), its ``apply_rotary_pos_emb`` becomes the fused RoPE (looked up at every call), and
  ``LlamaForCausalLM.forward`` becomes the fused-loss forward *in place*, so the loss is fused
  however the class was imported (``AutoModelForCausalLM``, ``from transformers import ...``).
* ``patch(model)`` patches a *built* model (also peft-wrapped, or any module holding one): every
  RMSNorm / MLP / ``*ForCausalLM`` instance of a supported family gets its ``__class__`` swapped for
  the fused subclass, which keeps attribute names and state_dict keys. RoPE is a module-level
  function, so it is replaced in the family's modeling module while any patched model holds it.

Patching adds pieces and never removes any (patching twice is harmless; ``rope=False`` on a second
call does not take RoPE out). ``unpatch`` undoes its own route: ``unpatch("llama")`` restores the
module's classes, function and ``LlamaForCausalLM.forward`` (models already built keep their fused
RMSNorm / MLP instances; ``unpatch(model)`` reverts those); ``unpatch(model)`` restores the model's
classes, and the RoPE function once no patched model or module patch needs it (the class-level
fused loss of ``patch("llama")`` stays until ``unpatch("llama")``).

HF's optional hub-kernel decorators (``use_kernel_forward_from_hub``, ``use_kernelized_func``) only
tag classes, whether or not the ``kernels`` package is installed; a module whose forward was
replaced on the instance (``kernelize`` / ``use_kernels=True``) is left as it is, with a warning.
"""

from __future__ import annotations

import types
import warnings
import weakref
from dataclasses import dataclass, field

from torch import nn

from medusa_liger.patching import modules
from medusa_liger.patching.causal_lm import is_fused_forward, make_fused_forward, original_forward
from medusa_liger.patching.table import FamilySpec, family, supported_model_types

PIECES = ("rms_norm", "rope", "swiglu", "fused_loss")


@dataclass
class _FamilyState:
    """What is patched in one family's modeling module, to undo exactly that."""

    saved: dict[str, object] = field(default_factory=dict)  # module attribute -> HF original
    module_pieces: set[str] = field(default_factory=set)  # pieces patched by patch("<type>")
    rope_models: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # models that need RoPE


_STATES: dict[str, _FamilyState] = {}


def _state(spec: FamilySpec) -> _FamilyState:
    return _STATES.setdefault(spec.model_type, _FamilyState())


def _original(spec: FamilySpec, name: str) -> object:
    """The HF object behind module attribute ``name``, whether or not it is replaced now."""
    return _state(spec).saved.get(name, getattr(spec.modeling_module(), name))


def _replace(spec: FamilySpec, name: str, new: object) -> None:
    _state(spec).saved.setdefault(name, getattr(spec.modeling_module(), name))
    setattr(spec.modeling_module(), name, new)


def _restore(spec: FamilySpec, name: str) -> None:
    saved = _state(spec).saved
    if name in saved:
        setattr(spec.modeling_module(), name, saved.pop(name))


def _sync_rope(spec: FamilySpec) -> None:
    # The fused RoPE is in the module while the module patch or any live patched model wants it.
    state = _state(spec)
    if "rope" in state.module_pieces or len(state.rope_models) > 0:
        _replace(spec, spec.rope, modules.apply_rotary_pos_emb)
    else:
        _restore(spec, spec.rope)


def _class_swaps(spec: FamilySpec, pieces: set[str]) -> dict[type, type]:
    """HF class -> fused subclass, for the module classes that ``pieces`` patch."""
    swaps: dict[type, type] = {}
    if "rms_norm" in pieces:
        for name in spec.rms_norm:
            original = _original(spec, name)
            swaps[original] = modules.patched_class(original, "rms_norm")
    if "swiglu" in pieces:
        original = _original(spec, spec.mlp)
        swaps[original] = modules.patched_class(original, "swiglu")
    if "fused_loss" in pieces:
        original = _original(spec, spec.causal_lm)
        swaps[original] = modules.patched_class(original, "fused_loss")
    return swaps


def _patch_module(spec: FamilySpec, pieces: set[str]) -> None:
    for original, subclass in _class_swaps(spec, pieces - {"fused_loss"}).items():
        _replace(spec, original.__name__, subclass)
    if "fused_loss" in pieces:
        causal_lm = _original(spec, spec.causal_lm)
        if not is_fused_forward(causal_lm.__dict__["forward"]):
            causal_lm.forward = make_fused_forward(causal_lm.__dict__["forward"])
    state = _state(spec)
    state.module_pieces |= pieces
    _sync_rope(spec)


def _unpatch_module(spec: FamilySpec) -> None:
    state = _state(spec)
    for name in (*spec.rms_norm, spec.mlp):
        _restore(spec, name)
    causal_lm = _original(spec, spec.causal_lm)
    if is_fused_forward(causal_lm.__dict__["forward"]):
        causal_lm.forward = original_forward(causal_lm.__dict__["forward"])
    state.module_pieces.clear()
    _sync_rope(spec)


def _family_roots(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The HF models inside ``model`` (itself included), grouped by ``config.model_type``."""
    from transformers import PreTrainedModel

    roots: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            roots.setdefault(getattr(module.config, "model_type", None), []).append(module)
    return roots


def _patch_model(model: nn.Module, pieces: set[str]) -> None:
    roots = _family_roots(model)
    supported = [t for t in roots if t in supported_model_types()]
    if not supported:
        found = sorted(str(t) for t in roots) or ["no transformers model"]
        raise ValueError(
            f"model's config.model_type must be one of {supported_model_types()}, found {found}"
        )
    swaps: dict[type, type] = {}
    for model_type in supported:
        swaps.update(_class_swaps(family(model_type), pieces))
    overridden = []
    for name, module in model.named_modules():
        subclass = swaps.get(type(module))
        if subclass is None:
            continue
        if "forward" in module.__dict__:  # forward replaced on the instance (hub kernelize, hooks)
            overridden.append(name or type(module).__name__)
            continue
        module.__class__ = subclass
    if overridden:
        warnings.warn(
            f"medusa_liger.patch left {len(overridden)} module(s) alone whose forward is set on the instance "
            f"(e.g. by kernelize or an accelerate hook): {overridden[:5]}",
            stacklevel=3,
        )
    if "rope" in pieces:
        for model_type in supported:
            _state(family(model_type)).rope_models.update(roots[model_type])
            _sync_rope(family(model_type))


def _unpatch_model(model: nn.Module) -> None:
    for module in model.modules():
        patched = type(module)
        if modules.is_patched_class(patched):
            module.__class__ = modules.original_class(patched)
            # An accelerate hook added after the patch keeps the forward it wraps, bound: the fused one.
            wrapped = module.__dict__.get("_old_forward")
            if getattr(wrapped, "__func__", None) is patched.__dict__["forward"]:
                module._old_forward = types.MethodType(type(module).forward, module)
    for model_type, roots in _family_roots(model).items():
        if model_type in supported_model_types():
            state = _state(family(model_type))
            for root in roots:
                state.rope_models.discard(root)
            _sync_rope(family(model_type))
            if state.module_pieces:
                # The module route's pieces reach this model through its classes (the fused loss is
                # LlamaForCausalLM.forward itself): only unpatch(model_type) takes those out.
                warnings.warn(
                    f"unpatch(model): the {model_type!r} modeling module is still patched "
                    f"({', '.join(sorted(state.module_pieces))}) by patch({model_type!r}), which this model "
                    f"still uses; call medusa_liger.unpatch({model_type!r}) too",
                    stacklevel=3,
                )


def _check_target(target: object) -> None:
    if not isinstance(target, (str, nn.Module)):
        raise ValueError(
            f"target must be a model_type string (one of {supported_model_types()}) or a model, "
            f"got {type(target).__name__}"
        )


def patch(
    target: str | nn.Module = "llama",
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    fused_loss: bool = True,
) -> str | nn.Module:
    """Patch a model family (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``) or a built model.

    Args:
        target: a ``model_type`` string (patches the modeling module, for models built afterwards)
            or a model (patches its modules in place; peft-wrapped models and wrappers work).
        rms_norm: fused RMSNorm for every RMSNorm module (Qwen3's q_norm / k_norm included).
        rope: fused rotary embedding (module-level function of the family's modeling module).
        swiglu: fused ``silu(gate) * up`` in the MLP.
        fused_loss: the causal-LM loss through the fused linear cross-entropy, in training mode (no
            logits; eval mode is HF's forward unless ``causal_lm.FUSE_IN_EVAL``).

    Returns ``target``. Raises ValueError for an unsupported model type, naming the supported ones.

    A patched model pickles (``torch.save``, ``copy.deepcopy``, multiprocessing) and loads with its
    fused modules: norms, MLPs and, patched in place, the loss. The fused RoPE and the module route's
    loss belong to the modeling module, not to the model: in another process, or after ``unpatch`` of
    the original, call ``patch(loaded_model)`` (idempotent) to have them too.
    """
    options = {"rms_norm": rms_norm, "rope": rope, "swiglu": swiglu, "fused_loss": fused_loss}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    _check_target(target)
    pieces = {name for name, on in options.items() if on}
    spec = family(target) if isinstance(target, str) else None  # validates the type up front
    if pieces:
        modules.kernels()  # import the fused ops now: a broken install fails here, not mid-forward
    if spec is not None:
        _patch_module(spec, pieces)
    else:
        _patch_model(target, pieces)
    return target


def unpatch(target: str | nn.Module) -> str | nn.Module:
    """Undo :func:`patch` for a ``model_type`` string (the module) or a model (its modules).

    Returns ``target``.
    """
    _check_target(target)
    if isinstance(target, str):
        _unpatch_module(family(target))
    else:
        _unpatch_model(target)
    return target
