"""The one table of supported model families: which HF modeling module, which names to replace.

Every family the patcher supports is a row keyed by ``config.model_type``. A row names, inside the
family's ``transformers.models.<x>.modeling_<x>`` module:

* ``rms_norm``: the RMSNorm class(es). Every instance is patched, wherever the family uses it
  (decoder layers, the final norm, and Qwen3's per-head ``q_norm`` / ``k_norm``);
* ``mlp``: the gated MLP class ``down_proj(act(gate_proj(x)) * up_proj(x))``;
* ``rope``: the module-level ``apply_rotary_pos_emb`` function the attention forward calls;
* ``causal_lm``: the ``...ForCausalLM`` class whose forward gets the fused linear cross-entropy.

Adding a family with the same structure is one more row; nothing else in the package changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its modeling module and the names in it that the patcher replaces."""

    model_type: str
    module: str
    rms_norm: tuple[str, ...]
    mlp: str
    rope: str
    causal_lm: str

    def modeling_module(self) -> ModuleType:
        """The family's modeling module (imported on first use)."""
        return importlib.import_module(self.module)


def _row(model_type: str, prefix: str) -> FamilySpec:
    # The four supported families share HF's Llama layout; only the class-name prefix differs.
    return FamilySpec(
        model_type=model_type,
        module=f"transformers.models.{model_type}.modeling_{model_type}",
        rms_norm=(f"{prefix}RMSNorm",),
        mlp=f"{prefix}MLP",
        rope="apply_rotary_pos_emb",
        causal_lm=f"{prefix}ForCausalLM",
    )


FAMILIES: dict[str, FamilySpec] = {
    "llama": _row("llama", "Llama"),
    "mistral": _row("mistral", "Mistral"),
    "qwen2": _row("qwen2", "Qwen2"),
    "qwen3": _row("qwen3", "Qwen3"),  # q_norm / k_norm are Qwen3RMSNorm instances too
}


def supported_model_types() -> list[str]:
    """The ``model_type`` values the patcher knows, sorted."""
    return sorted(FAMILIES)


def family(model_type: str) -> FamilySpec:
    """The row for ``model_type``; ValueError naming the supported ones otherwise."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(
            f"model_type must be one of {supported_model_types()} (the supported families), "
            f"got {model_type!r}"
        )
    return FAMILIES[model_type]
