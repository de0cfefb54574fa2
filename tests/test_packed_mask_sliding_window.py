"""A packed batch with an attention_mask keeps the backbone's sliding window (a custom 4-D mask is
used by HF's attention as given, so the window must be in it)."""

from __future__ import annotations

import pytest
import torch

from medusa_liger.heads import MedusaConfig, MedusaModel
from tests.test_generate import tiny_backbone


@pytest.mark.parametrize("model_type, extra", [
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}),  # mixed layers
])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_mask_keeps_sliding_window(model_type, extra, attn):
    backbone = tiny_backbone(model_type, attn=attn, **extra)
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2, mode="heads")).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, backbone.config.vocab_size, (1, 40), generator=g)
    with torch.no_grad():
        expected = backbone.get_decoder()(input_ids=ids).last_hidden_state
        one_segment = model.hidden_states(ids, torch.ones_like(ids), segment_ids=torch.zeros_like(ids))
        # two packed documents: the second starts afresh, with the window counted from its own start
        seg = torch.cat([torch.zeros(1, 25, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], 1)
        packed = model.hidden_states(ids, torch.ones_like(ids), segment_ids=seg)
        second = backbone.get_decoder()(input_ids=ids[:, 25:]).last_hidden_state
    torch.testing.assert_close(one_segment, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, :25], expected[:, :25], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 25:], second, rtol=1e-5, atol=1e-5)
