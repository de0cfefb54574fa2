"""Shared helpers of the patching tests: tiny HF models, batches, results compared with HF's,
the autouse fixture that restores HF's modeling modules, and the bf16 tolerances."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import medusa_liger
from medusa_liger.patching import FAMILIES
from medusa_liger.patching import apply as patching_apply
from medusa_liger.patching.modules import is_patched_class

FAMILY_NAMES = sorted(FAMILIES)
VOCAB = 163  # odd on purpose: no power-of-two block fits it exactly


def tiny_config(model_type: str, *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB, **extra):
    """A tiny GQA config of ``model_type`` (4 query heads, 2 kv heads, head_dim 16; ``extra``: more
    config keys)."""
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **extra,
    )


def build(model_type: str, *, attn: str = "sdpa", dtype=torch.float32, device="cpu", state=None, **cfg):
    """A tiny causal LM (seeded weights, or ``state`` loaded) in eval-free training mode."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **cfg), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def batch(vocab: int = VOCAB, B: int = 2, T: int = 19, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[-1, -2:] = -100
    return ids.to(device), labels.to(device)


def originals(model_type: str) -> dict[str, object]:
    """The HF objects the patch may replace in a family's modeling module (compared by identity)."""
    spec = FAMILIES[model_type]
    mod = spec.modeling_module()
    causal_lm = getattr(mod, spec.causal_lm)
    objects = {name: getattr(mod, name) for name in (*spec.rms_norm, spec.mlp, spec.rope, spec.causal_lm)}
    objects["forward"] = causal_lm.__dict__["forward"]
    return objects


_HF_ORIGINALS = {t: originals(t) for t in FAMILY_NAMES}


@pytest.fixture(autouse=True)
def _clean_patch_state():
    """Every test ends with HF's modeling modules untouched, whatever it patched."""
    yield
    for state in patching_apply._STATES.values():
        state.rope_models.clear()  # forget the test's patched models (a failed test's traceback keeps them)
    for model_type in FAMILY_NAMES:
        medusa_liger.unpatch(model_type)
        assert originals(model_type) == _HF_ORIGINALS[model_type], f"{model_type}: HF objects not restored"


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def results(model, ids, labels, **kwargs) -> dict:
    """Logits without labels; loss, logits and every parameter gradient with labels."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out, grads = loss_and_grads(model, ids, labels, **kwargs)
    return {"logits": logits, "loss": out.loss.detach(), "loss_logits": out.logits, "grads": grads}


def assert_results_agree(got: dict, want: dict, *, atol=1e-5, rtol=1e-4) -> None:
    """A patched model's :func:`results` match HF's (computed before anything was patched: RoPE
    is module-level, so a reference run after patching would use the fused RoPE too)."""
    torch.testing.assert_close(got["logits"], want["logits"], atol=atol, rtol=rtol)
    assert got["loss_logits"] is None, "the fused loss must not materialize logits"
    torch.testing.assert_close(got["loss"], want["loss"], atol=atol, rtol=rtol)
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=atol, rtol=rtol, msg=name)


def count_patched(model) -> int:
    return sum(is_patched_class(type(m)) for m in model.modules())


def expected_patched(model_type: str, layers: int = 2) -> int:
    # per layer: 2 norms + MLP (+ q_norm, k_norm for qwen3); the final norm; the causal LM
    per_layer = 3 + (2 if model_type == "qwen3" else 0)
    return layers * per_layer + 2


# bf16 has 8 mantissa bits; fused and unfused paths round at different points (the fused RMSNorm
# multiplies by the weight before rounding, the loss accumulates in fp32 chunk by chunk):
BF16_LOGITS_REL = 3e-2  # ||logits_p - logits_r|| / ||logits_r||
BF16_LOSS_REL = 1e-2  # |loss_p - loss_r| / loss_r
BF16_GRAD_REL = 1e-1  # per parameter ||g_p - g_r|| / ||g_r|| (a wrong kernel gives O(1))
BF16_CURVE_ABS = 5e-2  # per step |loss_p - loss_r| over 30 AdamW steps, plus 2% of the loss
