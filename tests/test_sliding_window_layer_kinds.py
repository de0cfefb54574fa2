"""Layer kinds besides full and sliding attention: a packed batch with an attention_mask gives HF's
per-layer-type mapping an entry for every kind the backbone has (hybrids indexed it by a kind the
mapping lacked: KeyError), and medusa_generate refuses backbones whose layers are neither all full nor
all sliding attention (a uniform linear/recurrent, hybrid, indexed or chunked kind read as full attention)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.inference.backbone import BackboneRunner


def _tiny(model_type: str, attn: str | None = "sdpa", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 5, **extra,
    })
    return AutoModelForCausalLM.from_config(config, **({"attn_implementation": attn} if attn else {})).eval()


def _packed(vocab: int):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, vocab, (1, n), generator=g) for n in (9, 7, 12)]
    ids = torch.cat(docs, 1)
    seg = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], 1)
    return docs, ids, seg


@pytest.mark.parametrize("model_type, layer_types", [
    ("lfm3", ["conv", "full_attention", "sliding_attention", "conv"]),
    ("lara_mini", ["linear_attention", "sliding_attention", "full_attention", "linear_attention"]),
])
def test_packed_mask_hybrid_layer_kinds_run(model_type, layer_types):
    pytest.importorskip(f"transformers.models.{model_type}")
    backbone = _tiny(model_type, layer_types=layer_types, num_hidden_layers=len(layer_types))
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2)).eval()
    _, ids, seg = _packed(97)
    with torch.no_grad():
        out = model.hidden_states(ids, torch.ones_like(ids), segment_ids=seg)
    assert torch.isfinite(out).all()


def test_packed_mask_indexed_and_sliding_layers_match_hf():
    pytest.importorskip("transformers.models.dots3_note")
    backbone = _tiny(
        "dots3_note_text", layer_types=["indexed_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense"] * 3, num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=64, index_n_heads=2,
        index_head_dim=16, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
    )
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2)).eval()
    docs, ids, seg = _packed(97)
    with torch.no_grad():
        packed = model.hidden_states(ids, torch.ones_like(ids), segment_ids=seg)
        start = 0
        for doc in docs:
            alone = backbone.get_decoder()(input_ids=doc).last_hidden_state
            torch.testing.assert_close(packed[:, start:start + doc.shape[1]], alone, rtol=1e-5, atol=1e-5)
            start += doc.shape[1]


@pytest.mark.parametrize("kinds", [
    ["linear_attention"] * 2, ["hybrid"] * 2, ["indexed_attention"] * 2, ["chunked_attention"] * 2,
    ["full_attention", "sliding_attention"], ["sliding_attention", "conv"],
])
def test_runner_refuses_layers_neither_all_full_nor_all_sliding(kinds):
    runner = BackboneRunner.__new__(BackboneRunner)
    runner.config = SimpleNamespace(model_type="x", sliding_window=8, layer_types=kinds)
    with pytest.raises(ValueError, match="same attention"):
        runner.sliding_window()
    runner.config = SimpleNamespace(model_type="x", sliding_window=None, layer_types=kinds)
    with pytest.raises(ValueError, match="same attention"):
        runner.sliding_window()


@pytest.mark.parametrize("config, window", [
    (dict(sliding_window=8, layer_types=["sliding_attention"] * 2), 8),
    (dict(sliding_window=8, layer_types=["full_attention"] * 2), None),
    (dict(sliding_window=8, layer_types=None), 8),
    (dict(sliding_window=8, layer_types=None, use_sliding_window=False), None),
    (dict(sliding_window=None, layer_types=["sliding_attention"] * 2), None),
    (dict(sliding_window=None, layer_types=None), None),
])
def test_runner_uniform_full_or_sliding(config, window):
    runner = BackboneRunner.__new__(BackboneRunner)
    runner.config = SimpleNamespace(model_type="x", **config)
    assert runner.sliding_window() == window


def test_medusa_generate_refuses_recurrent_backbone():
    """A Mamba-2 backbone (every layer linear_attention) was refused up front; read as full attention
    it failed deep inside decoding (IndexError)."""
    pytest.importorskip("transformers.models.mamba2")
    from medusa_liger.inference.generate import medusa_generate

    backbone = _tiny("mamba2", attn=None, num_hidden_layers=2, num_heads=8, n_groups=1, state_size=16, expand=2,
                     conv_kernel=4)
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2)).eval()
    with pytest.raises(ValueError, match="same attention"):
        medusa_generate(model, torch.randint(3, 97, (1, 6)), 4)
