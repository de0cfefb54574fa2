"""RoPE kernel vs HF's own apply_rotary_pos_emb in float64: layouts, GQA, broadcasting, gradients."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from medusa_liger.kernels.rope import RoPEFunction, apply_rotary_pos_emb, default_config
from medusa_liger.kernels.utils import force_backend
from tests.utils import DEVICE, DTYPES, MODEL_SHAPES, assert_close, poisoned_allocations

BACKENDS = ["triton", "torch"]
# (batch, n_q, n_kv, seq_len, head_dim): one token, GQA, odd sizes, a Llama-like head dim.
SHAPES = [(1, 1, 1, 1, 2), (2, 4, 2, 5, 16), (1, 3, 3, 7, 6), (2, 6, 2, 3, 128)]


def _hf_cos_sin(batch: int, seq_len: int, head_dim: int, dtype: torch.dtype):
    """cos/sin as HF's rotary embedding builds them: duplicated halves, per-batch positions."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).double() / head_dim))
    positions = torch.stack([torch.arange(seq_len, device=DEVICE) + 3 * b for b in range(batch)]).double()
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _make_qk(batch, n_q, n_kv, seq_len, head_dim, dtype, hf_layout):
    """q/k, either contiguous [B, n, T, D] or HF's transposed view of [B, T, n, D] storage."""
    if hf_layout:
        q = torch.randn(batch, seq_len, n_q, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, seq_len, n_kv, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, n_q, seq_len, head_dim, device=DEVICE, dtype=dtype)
        k = torch.randn(batch, n_kv, seq_len, head_dim, device=DEVICE, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_()


def _check(q, k, cos, sin, dtype, backend, unsqueeze_dim=1, forward=apply_rotary_pos_emb):
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    with force_backend(backend), poisoned_allocations():
        q_out, k_out = forward(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    cos_ref, sin_ref = cos.double(), sin.double()
    if cos_ref.dim() == 2:
        cos_ref, sin_ref = cos_ref[None], sin_ref[None]
    q_ref, k_ref = hf_apply_rotary_pos_emb(qd, kd, cos_ref, sin_ref, unsqueeze_dim=unsqueeze_dim)
    torch.autograd.backward((q_ref, k_ref), (dq_out.double(), dk_out.double()))
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    assert_close(q_out, q_ref, dtype, "q_embed")
    assert_close(k_out, k_ref, dtype, "k_embed")
    assert_close(q.grad, qd.grad, dtype, "dq")
    assert_close(k.grad, kd.grad, dtype, "dk")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hf_layout", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_hf(shape, dtype, hf_layout, backend):
    batch, n_q, n_kv, seq_len, head_dim = shape
    q, k = _make_qk(*shape, dtype, hf_layout)
    cos, sin = _hf_cos_sin(batch, seq_len, head_dim, dtype)
    _check(q, k, cos, sin, dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("hf_layout", [False, True])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_rope_gpu_bf16_model_sizes(model, hf_layout):
    _, _, n_q, n_kv, head_dim = MODEL_SHAPES[model]
    q, k = _make_qk(2, n_q, n_kv, 37, head_dim, torch.bfloat16, hf_layout)
    cos, sin = _hf_cos_sin(2, 37, head_dim, torch.bfloat16)
    _check(q, k, cos, sin, torch.bfloat16, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_general_cos_sin_and_broadcast_batch(backend):
    """Arbitrary (non-duplicated) cos/sin tables, batch-1 [1, T, D] and 2-D [T, D] broadcasting."""
    q, k = _make_qk(3, 4, 2, 5, 10, torch.float32, hf_layout=True)
    cos, sin = torch.randn(1, 5, 10, device=DEVICE), torch.randn(1, 5, 10, device=DEVICE)
    _check(q, k, cos, sin, torch.float32, backend)
    q.grad = k.grad = None
    _check(q, k, cos[0], sin[0], torch.float32, backend)


# Launch configs covering each code path: both program orders, shared vs per-head cos/sin loads,
# several positions per program with T % block_t != 0, head groups with n % heads != 0, a tile
# taller than T, a group wider than all heads, the evict hint.
CONFIGS = [
    {"heads": 4, "block_t": 2, "heads_fastest": True, "shared_cs": True},
    {"heads": 4, "block_t": 2, "heads_fastest": True, "shared_cs": False},
    {"heads": 1, "block_t": 4, "heads_fastest": False},
    {"heads": 2, "block_t": 8, "heads_fastest": False, "evict": True, "num_warps": 2},
    {"heads": 8, "block_t": 1, "heads_fastest": True, "shared_cs": True},
]


@pytest.mark.parametrize("hf_layout", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()))
def test_rope_launch_configs(config, hf_layout):
    """Every tile / order option against HF: GQA with 5 q and 3 k heads over 7 positions."""
    q, k = _make_qk(2, 5, 3, 7, 8, torch.float32, hf_layout)
    cos, sin = _hf_cos_sin(2, 7, 8, torch.float32)

    def forward(q, k, cos, sin, unsqueeze_dim):
        return RoPEFunction.apply(q, k, cos, sin, config)

    _check(q, k, cos, sin, torch.float32, "triton", forward=forward)


def test_rope_config_with_masked_columns():
    """A head dim whose half is not a power of two (6 -> 3 of a 4-wide block), general cos/sin."""
    q, k = _make_qk(1, 3, 2, 5, 6, torch.float32, hf_layout=True)
    cos, sin = torch.randn(1, 5, 6, device=DEVICE), torch.randn(1, 5, 6, device=DEVICE)
    config = {"heads": 2, "block_t": 2, "shared_cs": False}
    _check(q, k, cos, sin, torch.float32, "triton",
           forward=lambda q, k, cos, sin, unsqueeze_dim: RoPEFunction.apply(q, k, cos, sin, config))


def test_rope_default_config_is_the_tuned_tile():
    """Both layouts: 2 heads x a run of positions, positions-first (benchmarks/tune_rope.py's winner)."""
    for hf_layout in (False, True):
        cfg = default_config(*_make_qk(2, 32, 8, 64, 128, torch.float32, hf_layout))
        assert cfg["heads"] == 2 and cfg["block_t"] == 16 and not cfg["heads_fastest"] and cfg["shared_cs"]
    # Tiny inputs never get a tile taller than the sequence or wider than the heads.
    small = default_config(*_make_qk(1, 1, 1, 3, 8, torch.float32, hf_layout=True))
    assert small["heads"] == 1 and small["block_t"] <= 4


@pytest.mark.parametrize("hf_layout", [False, True])
@pytest.mark.parametrize("config", [None, CONFIGS[0]], ids=["default", "explicit"])
def test_rope_never_writes_inputs_or_gradients(config, hf_layout):
    """q/k and the incoming dq/dk stay untouched, in both layouts, default or explicit config.

    Liger's RoPE rotates HF-layout q/k (and dq/dk) in place; a benchmark that shares input sets
    between implementations then checks later ones against stale references (tune_rope.py's
    "FAIL q_out" rows). Ours must stay out of place, and repeat calls must give equal results.
    """
    q, k = _make_qk(2, 5, 3, 7, 8, torch.float32, hf_layout)
    cos, sin = _hf_cos_sin(2, 7, 8, torch.float32)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    saved = [t.detach().clone() for t in (q, k, dq_out, dk_out, cos, sin)]
    results = []
    for _ in range(2):
        q_out, k_out = RoPEFunction.apply(q, k, cos, sin, config)
        dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
        results.append([q_out, k_out, dq, dk])
    for name, before, after in zip(("q", "k", "dq_out", "dk_out", "cos", "sin"), saved,
                                   (q, k, dq_out, dk_out, cos, sin)):
        assert torch.equal(before, after.detach()), f"{name} was written"
    for name, first, second in zip(("q_out", "k_out", "dq", "dk"), *results):
        assert torch.equal(first, second), f"{name} differs between two identical calls"
        assert first.data_ptr() not in (q.data_ptr(), k.data_ptr(), dq_out.data_ptr(), dk_out.data_ptr())


def test_rope_bad_config():
    q, k = _make_qk(1, 2, 1, 3, 8, torch.float32, hf_layout=False)
    cos, sin = _hf_cos_sin(1, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="config keys"):
        RoPEFunction.apply(q, k, cos, sin, {"tile": 4})
    with pytest.raises(ValueError, match="power of two"):
        RoPEFunction.apply(q, k, cos, sin, {"block_t": 3})


def test_rope_unsqueeze_dim_2_layout():
    """[B, T, n, D] inputs with unsqueeze_dim=2, as HF allows."""
    q = torch.randn(2, 5, 4, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 2, 8, device=DEVICE, requires_grad=True)
    cos, sin = _hf_cos_sin(2, 5, 8, torch.float32)
    _check(q, k, cos, sin, torch.float32, "triton", unsqueeze_dim=2)


def test_rope_fifth_positional_int_is_unsqueeze_dim():
    """HF 5 calls apply_rotary_pos_emb(q, k, cos, sin, 2): the int is unsqueeze_dim, not positions."""
    q, k = torch.randn(1, 3, 2, 4, device=DEVICE), torch.randn(1, 3, 1, 4, device=DEVICE)
    cos, sin = _hf_cos_sin(1, 3, 4, torch.float32)
    with force_backend("triton"):
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, 2)
    q_ref, k_ref = hf_apply_rotary_pos_emb(q, k, cos, sin, 2)
    assert_close(q_out, q_ref, torch.float32, "q")
    assert_close(k_out, k_ref, torch.float32, "k")


def test_rope_position_ids_gather_a_table():
    """A [max_pos, D] table with position_ids [B, T] is gathered like the old HF signature."""
    q, k = _make_qk(2, 2, 1, 4, 8, torch.float32, hf_layout=False)
    table_cos, table_sin = _hf_cos_sin(1, 16, 8, torch.float32)
    position_ids = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]], device=DEVICE)
    with force_backend("triton"):
        q_out, k_out = apply_rotary_pos_emb(q, k, table_cos[0], table_sin[0], position_ids=position_ids)
    q_ref, k_ref = hf_apply_rotary_pos_emb(q, k, table_cos[0][position_ids], table_sin[0][position_ids])
    assert_close(q_out, q_ref, torch.float32, "q")
    assert_close(k_out, k_ref, torch.float32, "k")


def test_rope_keeps_hf_memory_layout():
    q, k = _make_qk(1, 4, 2, 3, 8, torch.float32, hf_layout=True)
    cos, sin = _hf_cos_sin(1, 3, 8, torch.float32)
    with force_backend("triton"):
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


def test_rope_bad_inputs():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="k must have shape"):
        apply_rotary_pos_emb(q, torch.randn(1, 1, 4, 8), cos, sin)
    with pytest.raises(ValueError, match="cos must have shape"):
        apply_rotary_pos_emb(q, k, torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="sin must have"):
        apply_rotary_pos_emb(q, k, cos, torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="even"):
        apply_rotary_pos_emb(torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="q must have shape"):
        apply_rotary_pos_emb(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match=r"cos must have shape \[1 or 1, 3, 8\], got \[3, 3, 8\]"):  # not broadcast
        apply_rotary_pos_emb(q, k, torch.randn(3, 3, 8), torch.randn(3, 3, 8))


@pytest.mark.gpu
def test_rope_gpu_bf16_mid_size():
    q, k = _make_qk(2, 32, 8, 512, 128, torch.bfloat16, hf_layout=True)
    cos, sin = _hf_cos_sin(2, 512, 128, torch.bfloat16)
    _check(q, k, cos, sin, torch.bfloat16, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layouts", ["sin_transposed", "sin_expanded", "cos_expanded"])
def test_rope_cos_and_sin_with_different_strides(layouts, backend):
    """cos and sin laid out differently (the kernel reads both with one set of strides: they are
    made alike first); an expanded [1, T, D] table has batch stride 0 and a small storage."""
    q, k = _make_qk(3, 4, 2, 5, 8, torch.float32, hf_layout=True)
    cos, sin = torch.randn(3, 5, 8, device=DEVICE), torch.randn(3, 5, 8, device=DEVICE)
    if layouts == "sin_transposed":
        sin = sin.transpose(0, 1).contiguous().transpose(0, 1)
    elif layouts == "sin_expanded":
        sin = sin[:1].expand(3, 5, 8)
    else:
        cos = cos[:1].expand(3, 5, 8)
    _check(q, k, cos, sin, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_output_dtype_promotes_with_sin_too(backend):
    """HF computes q * cos + rotate_half(q) * sin: an fp32 sin makes fp16 q's output fp32."""
    q, k = _make_qk(2, 2, 1, 3, 8, torch.float16, hf_layout=False)
    cos, sin = _hf_cos_sin(2, 3, 8, torch.float16)
    with force_backend(backend):
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin.float())
    q_ref, k_ref = hf_apply_rotary_pos_emb(q.detach(), k.detach(), cos, sin.float())
    assert q_out.dtype == q_ref.dtype == torch.float32 and k_out.dtype == k_ref.dtype == torch.float32
    assert_close(q_out, q_ref.double(), torch.float16, "q_embed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["q_last_dim_strided", "cos_last_dim_strided", "q_not_dense"])
def test_rope_strided_last_dim_and_non_dense_inputs(layout, backend):
    """q with a last-dim stride of 2, cos/sin with a last-dim stride of 2, or q a slice of wider
    heads (not dense: its output is allocated contiguous, with strides other than q's)."""
    q = torch.randn(2, 3, 5, 16, device=DEVICE)[..., ::2] if layout == "q_last_dim_strided" else None
    if layout == "q_not_dense":
        q = torch.randn(2, 3, 5, 12, device=DEVICE)[..., 2:10]
    k = torch.randn(2, 2, 5, 8, device=DEVICE)
    cos, sin = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE)
    if layout == "cos_last_dim_strided":
        q = torch.randn(2, 3, 5, 8, device=DEVICE)
        cos, sin = torch.randn(2, 5, 16, device=DEVICE)[..., ::2], torch.randn(2, 5, 16, device=DEVICE)[..., 1::2]
    _check(q.requires_grad_(), k.requires_grad_(), cos, sin, torch.float32, backend)


def test_rope_more_bad_inputs():
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 1, 3, 8)
    cos, sin = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    # (the torch backend: without the checks, the kernel would read out of bounds, crashing the run)
    with force_backend("torch"), pytest.raises(ValueError, match="k must have shape"):
        apply_rotary_pos_emb(q, torch.randn(1, 1, 3, 8), cos, sin)  # batch (would broadcast)
    with force_backend("torch"), pytest.raises(ValueError, match="k must have shape"):
        apply_rotary_pos_emb(q, torch.randn(2, 1, 3, 6), cos, sin)  # head dim
    with pytest.raises(ValueError, match="cos must have shape"):
        apply_rotary_pos_emb(q, k, torch.randn(2, 4, 8), torch.randn(2, 4, 8))  # more positions than q
    with pytest.raises(ValueError, match=r"config\['heads'\] must be a power of two >= 1, got 0"):
        RoPEFunction.apply(q, k, cos, sin, {"heads": 0})
