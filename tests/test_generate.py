"""Medusa decoding: greedy acceptance is lossless, the KV cache stays exact, typical acceptance, errors.

Models are tiny and built offline: random backbones with random heads (little is accepted, so the
rejection paths run), and a "trained-ish" model whose backbone and heads learned a permutation
chain (most of the tree is accepted, so the gather-then-crop cache path runs at every depth), with
noise added to its heads to get every acceptance length in between.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.inference import MedusaDecoder, build_tree_buffers, default_tree, greedy_generate, medusa_generate
from medusa_liger.kernels.utils import force_backend
from tests.utils import HAS_CUDA

VOCAB = 128

TREES = {
    "default": None,
    "chain": [[0], [0, 0], [0, 0, 0]],
    "wide": [[r] for r in range(8)],
    "mixed": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1], [2, 3]],
    "empty": [],
}


def tiny_backbone(model_type: str = "llama", *, vocab: int = VOCAB, attn: str = "sdpa", seed: int = 0, **extra):
    """A 2-layer, hidden-64 causal LM of ``model_type`` with random weights, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **{"max_position_embeddings": 256, **extra},
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def randomize_heads_(model: MedusaModel, scale: float, seed: int = 0) -> MedusaModel:
    """Perturb every head parameter by N(0, (scale * its std)^2) (zero-init blocks: std 0.05)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale * std)
    return model


def tiny_medusa(model_type: str = "llama", num_heads: int = 4, *, seed: int = 0, **kwargs) -> MedusaModel:
    """A random tiny backbone with random (non-trivial) heads."""
    model = MedusaModel.from_backbone(tiny_backbone(model_type, seed=seed, **kwargs), MedusaConfig(num_heads=num_heads))
    return randomize_heads_(model, 3.0, seed).eval()


def chain_batch(perm: torch.Tensor, g: torch.Generator, batch: int, length: int, noise: float) -> torch.Tensor:
    """Sequences that follow x_{t+1} = perm[x_t], jumping to a random token with prob ``noise``."""
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, len(perm), (batch,), generator=g)
    for t in range(1, length):
        jump = torch.rand(batch, generator=g) < noise
        x[:, t] = torch.where(jump, torch.randint(0, len(perm), (batch,), generator=g), perm[x[:, t - 1]])
    return x


def train_chain_medusa(num_heads: int = 4, steps: int = 100, seed: int = 0) -> tuple[MedusaModel, torch.Tensor]:
    """Backbone + heads trained jointly (plain PyTorch losses) on a permutation chain; (model, perm)."""
    model = MedusaModel.from_backbone(tiny_backbone(seed=seed), MedusaConfig(num_heads=num_heads, mode="joint"))
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(VOCAB, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    decoder = model.backbone.get_decoder()
    for _ in range(steps):
        x = chain_batch(perm, g, 32, 48, 0.15)
        hidden = decoder(input_ids=x).last_hidden_state
        loss = F.cross_entropy(model.lm_head(hidden)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        for k, logits in enumerate(model.head_logits(hidden)):
            shift = k + 2
            loss = loss + 0.8**k * F.cross_entropy(logits[:, :-shift].reshape(-1, VOCAB), x[:, shift:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), perm


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread is fastest and immune to a busy machine's oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            return train_chain_medusa()
    finally:
        torch.set_num_threads(previous)


def prompts(n: int, seed: int, vocab: int = VOCAB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, int(torch.randint(1, 20, (1,), generator=g))), generator=g) for _ in range(n)]


def assert_lossless(model, tree, inputs, max_new_tokens, **kwargs) -> list[int]:
    """Medusa greedy == plain greedy on every prompt; returns all tokens-per-step counts."""
    per_step = []
    for ids in inputs:
        out = medusa_generate(model, ids, max_new_tokens, tree, compare_greedy=True, **kwargs)
        got, want = out.new_tokens.tolist(), out.greedy.new_tokens.tolist()
        assert out.matches_greedy, f"prompt {ids.tolist()}: {got} != {want}"
        assert out.stats.new_tokens == sum(out.stats.tokens_per_step) == out.new_tokens.numel()
        assert out.stats.steps == len(out.stats.tokens_per_step)
        per_step += out.stats.tokens_per_step
    return per_step


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize(
    "model_type, extra",
    [("llama", {}), ("llama", {"attn": "eager"}), ("qwen2", {}), ("mistral", {"sliding_window": 8})],
    ids=["llama-sdpa", "llama-eager", "qwen2", "mistral-window8"],
)
def test_greedy_lossless_random_models(model_type, extra, tree):
    model = tiny_medusa(model_type, 4, seed=3, **extra)
    with force_backend("torch"):
        assert_lossless(model, TREES[tree], prompts(5, seed=7), 30)


@pytest.mark.parametrize("noise", [0.0, 2.0, 3.0])
@pytest.mark.parametrize("tree", ["default", "chain", "mixed", "wide"])
def test_greedy_lossless_trained_model(trained, noise, tree):
    model = randomize_heads_(copy.deepcopy(trained[0]), noise, seed=5) if noise else trained[0]
    perm = trained[1]
    g = torch.Generator().manual_seed(11)
    inputs = [chain_batch(perm, g, 1, n, 0.5) for n in (1, 4, 9, 16)]
    with force_backend("torch"):
        per_step = assert_lossless(model, TREES[tree], inputs, 40)
    depth = max((len(p) for p in (TREES[tree] or default_tree(4))), default=0)
    if noise == 0.0:
        assert max(per_step) == depth + 1  # whole paths get accepted
        assert sum(per_step) / len(per_step) > (1.5 if tree == "wide" else 2.5)
    if noise == 2.0 and tree != "wide":
        assert len(set(per_step[:-1])) >= 3  # partial acceptance of several lengths


@pytest.mark.parametrize("model_type, extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_greedy_matches_transformers_generate(model_type, extra):
    model = tiny_medusa(model_type, 3, seed=1, **extra)
    with force_backend("torch"):
        for ids in prompts(3, seed=2):
            ref = model.backbone.generate(ids, max_new_tokens=25, min_new_tokens=25, do_sample=False)
            assert torch.equal(greedy_generate(model, ids, 25).sequences, ref)
            assert torch.equal(greedy_generate(model.backbone, ids, 25).sequences, ref)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7, 30])
def test_token_budget_is_exact(trained, max_new_tokens):
    ids = torch.tensor([[5, 9]])
    with force_backend("torch"):
        out = medusa_generate(trained[0], ids, max_new_tokens, compare_greedy=True)
    assert out.new_tokens.numel() == max_new_tokens and out.matches_greedy


def test_eos_stops_like_greedy(trained):
    model = trained[0]
    ids = torch.tensor([[3]])
    with force_backend("torch"):
        plain = greedy_generate(model, ids, 30)
        eos = int(plain.new_tokens[12])  # a token greedy emits mid-way
        first = plain.new_tokens.tolist().index(eos)
        out = medusa_generate(model, ids, 30, eos_token_id=eos, compare_greedy=True)
    assert out.matches_greedy
    assert out.new_tokens.tolist() == plain.new_tokens[: first + 1].tolist()


@pytest.mark.parametrize("tree", ["default", "mixed", "chain"])
def test_cache_after_steps_equals_fresh_forward(trained, tree):
    from transformers import DynamicCache

    model = trained[0]
    decoder = MedusaDecoder(model, TREES[tree])
    ids = chain_batch(trained[1], torch.Generator().manual_seed(3), 1, 6, 0.0)
    emitted = []
    with force_backend("torch"):
        decoder.prefill(ids)
        for _ in range(3):
            emitted += decoder.step(20)
        sequence = torch.cat([ids, torch.tensor([emitted])], dim=1)
        assert len(emitted) > 3  # something beyond the roots was accepted
        assert decoder.past_length == sequence.shape[1]
        fresh = DynamicCache()
        decoder.runner.hidden(sequence, fresh, torch.arange(sequence.shape[1])[None])
    for got, want in zip(decoder.cache.layers, fresh.layers):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-4)


def test_typical_acceptance_rule():
    # One chain node judged by the root's distribution: accept iff p > min(eps, alpha * exp(-H)).
    model = tiny_medusa("llama", 2, seed=0)
    decoder = MedusaDecoder(model, [[0], [0, 0]], acceptance="typical", temperature=0.5,
                            posterior_threshold=0.09, posterior_alpha=0.3)
    buf = build_tree_buffers([[0], [0, 0]], 2)
    tokens = torch.tensor([7, 3, 4])
    lengths = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        # Rows of different entropy (each node's own threshold differs from its parent's), and each
        # child's token raised by a random amount in its parent's row: accepted at some seeds, not others.
        logits = torch.randn(3, VOCAB, generator=g) * (1 + 4 * torch.rand(3, 1, generator=g))
        for parent, child in ((0, 1), (1, 2)):
            logits[parent, tokens[child]] += 12 * float(torch.rand(1, generator=g))
        path = decoder._accept(buf, tokens, logits)
        expected = [0]
        for parent, child in ((0, 1), (1, 2)):
            p = torch.softmax(logits[parent].double() / 0.5, -1)
            entropy = float(-(p * p.log()).sum())
            if float(p[tokens[child]]) > min(0.09, 0.3 * math.exp(-entropy)):
                expected.append(child)
            else:
                break
        assert path.tolist() == expected
        lengths.add(len(expected))
    assert lengths == {1, 2, 3}  # rejected at the first node, at the second, and accepted whole
    # Judged by the parent's threshold, not the node's own: a flat root (low threshold) gives token 3 a
    # small probability that passes, though under the peaked node 1 (threshold ~0.09) it would not.
    logits = torch.zeros(3, VOCAB)
    logits[0, 3] = 1.0  # p ~ e^2 / (VOCAB - 1 + e^2) at temperature 0.5
    logits[1, 4] = 20.0
    p3 = math.exp(2) / (VOCAB - 1 + math.exp(2))
    assert 0.3 * math.exp(-5.0) < p3 < 0.09
    assert decoder._accept(buf, tokens, logits).tolist()[:2] == [0, 1]


def test_typical_decoding_seeded(trained):
    model, perm = trained
    ids = chain_batch(perm, torch.Generator().manual_seed(4), 1, 5, 0.0)
    with force_backend("torch"):
        a = medusa_generate(model, ids, 32, acceptance="typical", temperature=0.7, seed=123)
        b = medusa_generate(model, ids, 32, acceptance="typical", temperature=0.7, seed=123)
        zero = medusa_generate(model, ids, 32, acceptance="typical", temperature=0.0, compare_greedy=True)
    assert torch.equal(a.sequences, b.sequences)
    assert a.stats.acceleration_rate > 1.5
    assert zero.matches_greedy  # typical at temperature 0 is greedy
    # Any integer seed (past torch's range it overflowed after the model loaded), and the smallest
    # temperature taken, which samples the greedy tokens here (logits / T overflowed into NaNs).
    with force_backend("torch"):
        huge = medusa_generate(model, ids, 8, acceptance="typical", temperature=0.7, seed=2**70 + 123)
        cold = medusa_generate(model, ids, 32, acceptance="typical", temperature=1e-6, compare_greedy=True, seed=1)
    assert torch.equal(huge.sequences, medusa_generate(model, ids, 8, acceptance="typical", temperature=0.7,
                                                       seed=123).sequences)
    assert cold.matches_greedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tree": [[0], [0, 0], [0, 0, 0]]}, "head 2"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "batch size 1"),
        ({"input_ids": torch.zeros(3, dtype=torch.long)}, r"\[1, T\]"),
        ({"input_ids": torch.full((1, 3), VOCAB)}, "token ids"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 250}, "max_position_embeddings"),
        ({"acceptance": "nucleus"}, "acceptance"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1e-39, "acceptance": "typical"}, r"temperature must be 0 \(greedy\) or .* >= 1e-06"),
        ({"temperature": 0.7}, "samples only with acceptance='typical'"),  # was ignored: decoded greedily
        ({"posterior_threshold": 0.0}, "posterior_threshold"),
        ({"posterior_alpha": 0.0, "acceptance": "typical", "temperature": 0.7}, "posterior_alpha"),
        ({"posterior_threshold": True, "acceptance": "typical", "temperature": 0.7}, "posterior_threshold"),
        ({"temperature": True, "acceptance": "typical"}, "temperature"),
        ({"tree": [0, 1]}, "non-empty lists"),
        ({"tree": [[0], [1, 0]]}, "parent"),
        ({"tree": [[VOCAB]]}, "vocabulary"),
    ],
)
def test_bad_input(kwargs, match):
    model = tiny_medusa("llama", 2)
    args = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "max_new_tokens": 5, "tree": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        medusa_generate(model, args.pop("input_ids"), args.pop("max_new_tokens"), **args)


def test_greedy_generate_bad_input():
    model = tiny_medusa("llama", 2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        greedy_generate(model, torch.zeros(1, 200, dtype=torch.long), 100)
    with pytest.raises(ValueError, match="must be a MedusaModel"):
        medusa_generate(model.backbone, torch.zeros(1, 2, dtype=torch.long), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decoding(trained, dtype):
    assert HAS_CUDA
    model = copy.deepcopy(trained[0]).to("cuda", dtype)
    g = torch.Generator().manual_seed(2)
    runs = [medusa_generate(model, chain_batch(trained[1], g, 1, 6, 0.5), 48, compare_greedy=True) for _ in range(4)]
    assert all(r.stats.acceleration_rate > 2 for r in runs)
    if dtype == torch.float32:  # exact up to rounding; bf16 trees may flip near-ties
        assert all(r.matches_greedy for r in runs)


def test_decoding_forwards_run_without_cudnn_attention():
    """Decoding brings a new key length every step, for which cuDNN's attention would build a new
    plan: the runner's forwards exclude that backend (and leave the global choice as it was)."""
    from medusa_liger.inference.backbone import BackboneRunner

    model = tiny_medusa()
    runner = BackboneRunner(model)
    seen = []
    hook = runner.decoder.register_forward_pre_hook(
        lambda module, args: seen.append((torch.backends.cuda.cudnn_sdp_enabled(),
                                          torch.backends.cuda.flash_sdp_enabled())))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        greedy_generate(model, torch.tensor([[1, 2, 3]]), 3)
    finally:
        hook.remove()
    assert seen and all(cudnn is False and flash is True for cudnn, flash in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_speedup_is_the_greedy_wall_time_over_medusa_s_and_eos_may_be_a_tensor():
    from medusa_liger.inference.generate import DecodeStats, GenerationResult, MedusaGenerateOutput, _eos_set

    ids = torch.zeros(1, 3, dtype=torch.long)
    greedy = GenerationResult(ids, 1, DecodeStats(2, 2, 4.0))
    assert MedusaGenerateOutput(ids, 1, DecodeStats(2, 1, 2.0), greedy=greedy).speedup == 2.0
    assert MedusaGenerateOutput(ids, 1, DecodeStats(2, 1, 2.0)).speedup is None
    assert _eos_set(torch.tensor(5)) == {5} and _eos_set(torch.tensor([5, 6])) == {5, 6} and _eos_set([7]) == {7}
