"""Batched Medusa decoding: every sequence decodes what it decodes alone, in as many steps.

The reference for each prompt is batch-1 Medusa decoding (``medusa_generate``, itself checked
against plain greedy decoding in test_generate.py): greedy acceptance makes both deterministic, and
a sequence accepts the same nodes whatever else is in the batch, so tokens and tokens-per-step
must match exactly. Prompts have different lengths (left padding), and the chain-trained model
accepts long paths while the random one rejects most, so the batch's sequences drift apart in both
directions at every step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.inference import BatchedMedusaDecoder, medusa_generate, medusa_generate_batch
from medusa_liger.kernels.utils import force_backend
# The same fixtures as test_generate.py: one intra-op thread, and the chain-trained model.
from tests.test_generate import _one_thread, trained  # noqa: F401 - fixtures used by name
from tests.test_generate import TREES, chain_batch, randomize_heads_, tiny_backbone, tiny_medusa


def varied_prompts(n: int, seed: int, vocab: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


def assert_matches_one_by_one(model, prompts, max_new_tokens, tree=None, seeds=None, **kwargs) -> list[int]:
    """Batched == batch-1 per prompt (tokens and tokens per step); returns the per-step counts.
    seeds: the batch's ``seed`` argument, and the seed of each prompt decoded alone."""
    batch = medusa_generate_batch(model, prompts, max_new_tokens, tree, seed=seeds, **kwargs)
    assert len(batch) == len(prompts)
    counts = []
    for b, (p, got) in enumerate(zip(prompts, batch)):
        seed = None if seeds is None else (seeds + b if isinstance(seeds, int) else seeds[b])
        want = medusa_generate(model, p.reshape(1, -1), max_new_tokens, tree, seed=seed, **kwargs)
        assert got.prompt_length == p.numel()
        assert got.sequences.tolist() == want.sequences.tolist(), f"prompt {p.tolist()}"
        assert got.stats.tokens_per_step == want.stats.tokens_per_step
        assert got.stats.steps == want.stats.steps and got.stats.new_tokens == want.stats.new_tokens
        counts += got.stats.tokens_per_step
    return counts


@pytest.mark.parametrize("tree", sorted(TREES))
def test_random_heads_batch_matches_batch_one(tree):
    with force_backend("torch"):
        assert_matches_one_by_one(tiny_medusa(), varied_prompts(5, seed=1), 24, TREES[tree])


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_trained_heads_batch_matches_batch_one_at_every_acceptance_length(trained, noise):  # noqa: F811
    model, perm = trained
    # Noisy heads (as in test_generate.py) accept paths of every length, so sequences drift apart.
    model = randomize_heads_(copy.deepcopy(model), noise, seed=5) if noise else model
    g = torch.Generator().manual_seed(5)
    prompts = [chain_batch(perm, g, 1, n, 0.5)[0] for n in (3, 9, 1, 16, 5)]
    with force_backend("torch"):
        counts = assert_matches_one_by_one(model, prompts, 40)
    if noise:
        assert len(set(counts)) >= 3  # several acceptance lengths within the batch's steps
    else:
        assert max(counts) == 5  # whole paths (the default tree's depth 4, plus the root)


def test_eos_and_budget_finish_sequences_independently(trained):  # noqa: F811
    model, perm = trained
    g = torch.Generator().manual_seed(2)
    prompts = [chain_batch(perm, g, 1, 4, 0.0)[0] for _ in range(3)]
    eos = int(perm[perm[prompts[1][-1]]])  # the second prompt's chain reaches it after two tokens
    with force_backend("torch"):
        out = medusa_generate_batch(model, prompts, 30, eos_token_id=eos)
        assert_matches_one_by_one(model, prompts, 30, eos_token_id=eos)
        for budget in (1, 2, 5):
            assert_matches_one_by_one(model, prompts, budget)
    assert out[1].new_tokens.tolist()[-1] == eos and out[1].stats.new_tokens <= 2


def test_sliding_window_backbone():
    """A window shorter than the decode: masks come from slot positions, so empty slots never count."""
    with force_backend("torch"):
        model = tiny_medusa("mistral", sliding_window=8, attn="eager")
        assert_matches_one_by_one(model, varied_prompts(4, seed=3), 20, TREES["mixed"])


def test_nodes_past_a_sequence_budget_stay_at_its_last_position():
    """One tree serves the batch, so a sequence near its budget gets nodes past it. Past
    max_position_embeddings a dynamic RoPE rescales its frequencies from the batch's largest position
    for every sequence, so those nodes must sit no further than the sequence's last position."""
    rope = {"rope_type": "dynamic", "factor": 32.0, "rope_theta": 10000.0}
    with force_backend("torch"):
        model = tiny_medusa(max_position_embeddings=12, rope_parameters=rope, attn="eager").double()
        near_the_limit, short = varied_prompts(2, seed=4)[0][:1].repeat(10), varied_prompts(1, seed=5)[0][:3]
        batched = BatchedMedusaDecoder(model)
        batched.prefill([near_the_limit, short])
        got = batched.step([2, 10])  # 10 + 2 = 12 positions for the first; the tree reaches 3 + 4
        for b, (prompt, remaining) in enumerate([(near_the_limit, 2), (short, 10)]):
            alone = BatchedMedusaDecoder(model)
            alone.prefill([prompt])
            assert got[b] == alone.step([remaining])[0]
            torch.testing.assert_close(batched.base_logits[b], alone.base_logits[0], rtol=1e-9, atol=1e-9)


def test_longrope_decodes_one_prompt_at_a_time():
    """longrope picks its frequencies from the batch's largest position: a short prompt next to one past
    the original context decoded other tokens than alone."""
    import warnings

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "long_factor": [4.0 + i for i in range(8)], "short_factor": [1.0] * 8}
    with force_backend("torch"):
        model = tiny_medusa(rope_parameters=rope, attn="eager").double()
        prompts = [varied_prompts(1, seed=s)[0][:3] for s in range(3)] + [torch.arange(20) % 100]
        with pytest.warns(UserWarning, match="rope_type 'longrope' .* decoded one at a time"):
            assert_matches_one_by_one(model, prompts, 12, TREES["mixed"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no sequence can pass 16 positions (3 + 13): one batch
            assert_matches_one_by_one(model, prompts[:3], 13, TREES["mixed"])
        with pytest.warns(UserWarning, match="decoded one at a time"):  # 3 + 14: one may pass them
            assert_matches_one_by_one(model, prompts[:3], 14, TREES["mixed"])
        # Decoded one at a time, each sampling prompt keeps its seed (seed + b, as medusa_generate's).
        with pytest.warns(UserWarning, match="decoded one at a time"):
            assert_matches_one_by_one(model, prompts, 12, TREES["mixed"], seeds=5, acceptance="typical",
                                      temperature=0.7)
        # The decoder used directly batches what it is given: said once the batch passes 16 positions.
        decoder = BatchedMedusaDecoder(model, TREES["mixed"])
        decoder.prefill([prompts[0], torch.arange(14) % 100])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            decoder.step([2, 2])  # positions up to 15
        with pytest.warns(UserWarning, match="this batch passes 16 positions: its sequences now decode what"):
            decoder.step([8, 8])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            decoder.step([4, 4])  # said once


def test_longrope_one_at_a_time_shares_the_wall_time(monkeypatch):
    """Decoded one at a time, the prompts' wall_time_s is still the whole call's (shared, as a batch's), so
    eval's measured_batched (which counts it once per call) counts every prompt's decoding."""
    import warnings

    import medusa_liger.inference.batched as batched_module
    from medusa_liger.inference.evaluate import measure_batched

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "long_factor": [4.0 + i for i in range(8)], "short_factor": [1.0] * 8}
    clock = iter(range(10**6))  # every perf_counter read advances 1 s: each decoding alone takes 1 s
    monkeypatch.setattr(batched_module.time, "perf_counter", lambda: float(next(clock)))
    with force_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_medusa(rope_parameters=rope, attn="eager")
        prompts = [torch.tensor([1, 2, 3]) + i for i in range(3)]
        results = medusa_generate_batch(model, prompts, 20, TREES["mixed"])
        assert [r.stats.wall_time_s for r in results] == [3.0] * 3
        report = measure_batched(model, prompts, 20, TREES["mixed"], 3, warmup=False)
    assert report["medusa"]["wall_time_s"] == report["greedy"]["wall_time_s"] == 3.0


def test_typical_acceptance():
    with force_backend("torch"):
        model = tiny_medusa()
        prompts = varied_prompts(3, seed=4)
        # Temperature 0 makes typical acceptance greedy.
        assert_matches_one_by_one(model, prompts, 16, acceptance="typical", temperature=0.0)
        a = medusa_generate_batch(model, prompts, 16, acceptance="typical", temperature=0.7, seed=9)
        b = medusa_generate_batch(model, prompts, 16, acceptance="typical", temperature=0.7, seed=9)
    assert [r.sequences.tolist() for r in a] == [r.sequences.tolist() for r in b]
    assert all(r.stats.new_tokens == 16 for r in a)


@pytest.mark.parametrize("seeds", [9, [5, 1, 5, 30]])
def test_typical_acceptance_samples_what_each_sequence_samples_alone(trained, seeds):  # noqa: F811
    """Each sequence has its own generator: with seed s + b (or seeds[b]) it draws what batch-1
    decoding with that seed draws, whatever the others accept or when they finish."""
    model, perm = trained
    model = randomize_heads_(copy.deepcopy(model), 1.0, seed=3)  # accepts some nodes, rejects others
    g = torch.Generator().manual_seed(8)
    prompts = [chain_batch(perm, g, 1, n, 0.5)[0] for n in (3, 9, 1, 6)]
    with force_backend("torch"):
        counts = assert_matches_one_by_one(model, prompts, 24, seeds=seeds, acceptance="typical", temperature=1.5,
                                           eos_token_id=int(perm[0]))
        # Another seed draws other tokens: the test can tell generators apart.
        other = medusa_generate_batch(model, prompts, 24, seed=123, acceptance="typical", temperature=1.5)
        same = medusa_generate_batch(model, prompts, 24, seed=seeds, acceptance="typical", temperature=1.5)
    assert len(set(counts)) >= 3  # sequences accept different lengths, so their draws interleave
    assert all(a.sequences.tolist() != b.sequences.tolist() for a, b in zip(other, same))


@pytest.mark.parametrize("budget", [2, 3])
def test_typical_acceptance_near_a_budget_picks_what_the_cut_tree_picks(budget):
    """A sequence with fewer tokens left than the batch's most sees the batch's deeper tree; typical
    acceptance ranks equally long paths by likelihood, so a node past its budget must not take part,
    or it picks another path than its batch-1 tree (cut to its budget) does."""
    tree = [[0], [1], [2], [0, 0], [1, 0], [2, 0], [0, 0, 0], [1, 0, 0], [2, 0, 0]]
    options = dict(acceptance="typical", temperature=3.0)
    prompts = varied_prompts(40, seed=6)
    mismatched = 0
    with force_backend("torch"):
        # Heads near their init (the backbone's own guess) accept deep paths often.
        model = MedusaModel.from_backbone(tiny_backbone(), MedusaConfig(num_heads=3))
        model = randomize_heads_(model, 1.0, seed=2).eval()
        for i in range(0, len(prompts), 2):
            near, far = prompts[i], prompts[i + 1]
            batched = BatchedMedusaDecoder(model, tree, seed=[i, i + 1], **options)
            batched.prefill([near, far])
            got = batched.step([budget, 10])[0][:budget]
            alone = medusa_generate(model, near[None], budget, tree, seed=i, **options).new_tokens.tolist()
            assert got == alone, f"prompt {near.tolist()}"
            # Without the budget the batch's tree accepts deeper paths: the test can tell them apart.
            unlimited = BatchedMedusaDecoder(model, tree, seed=[i, i + 1], **options)
            unlimited.prefill([near, far])
            mismatched += unlimited.step([10, 10])[0][:budget] != alone
    assert mismatched


def test_a_float64_model_decides_on_float64_logits():
    """Logits were rounded to fp32 for every model: two head-0 logits 8e-9 apart tied or not depending
    on 1e-16 differences between the padded batch and batch-1 forwards, and the candidates swapped."""
    model = MedusaModel.from_backbone(tiny_backbone("qwen3", vocab=32, attn="eager", seed=804), MedusaConfig(num_heads=5))
    model = randomize_heads_(model, 0.05, seed=398).eval().double()
    prompts = [[4, 10, 9, 11, 14, 21, 19, 16, 5, 24, 9, 27, 21, 4, 31, 10],
               [22, 29, 21, 28, 17, 6, 2, 3, 28, 30, 14, 26, 27, 31, 1, 22, 11, 27, 9, 19],
               [29, 7, 5, 17, 18, 20, 16, 13, 3, 21, 16, 23, 27, 1, 5, 28, 18, 19, 11, 13, 11], [5, 9, 28, 29, 9, 20],
               [1, 2, 25, 2, 5], [26, 27, 11, 4, 25, 18, 29], [25, 3, 14, 19, 8, 29, 5, 2, 29, 14, 17, 31, 26, 29, 18],
               [26, 15, 18, 30, 5, 7, 12, 1, 30, 0, 28]]
    tree = [[5, 5], [3, 3], [5, 2, 3], [1, 0, 2, 5], [5, 2, 3, 5], [3], [5], [0, 3, 2, 0], [0, 3, 2], [3, 0, 0],
            [0, 3], [5, 1], [1], [1, 2, 1], [5, 2], [1, 1], [3, 1, 1, 3], [0, 1], [1, 0, 2, 5, 1], [1, 1, 1, 0],
            [3, 1, 0], [3, 0], [0], [1, 2, 1, 0], [3, 3, 0], [3, 1, 1], [1, 1, 1, 0, 0], [5, 5, 0], [5, 1, 1, 0],
            [0, 0], [1, 0, 3], [1, 0], [1, 1, 1], [1, 2], [5, 1, 1], [3, 1], [5, 5, 0, 0], [1, 0, 2]]
    options = dict(acceptance="typical", temperature=3.0, posterior_threshold=0.01, posterior_alpha=0.3,
                   eos_token_id=[17])
    with force_backend("torch"):
        decoder = BatchedMedusaDecoder(model, tree)
        decoder.prefill([torch.tensor(prompts[0])])
        assert decoder.base_logits.dtype == decoder.head_logits.dtype == torch.float64
        assert_matches_one_by_one(model, [torch.tensor(p) for p in prompts], 20, tree, seeds=46, **options)


def test_seeds_must_match_the_prompts():
    model = tiny_medusa()
    prompts = varied_prompts(2, seed=1)
    with pytest.raises(ValueError, match="2 prompts"):
        medusa_generate_batch(model, prompts, 4, acceptance="typical", temperature=0.5, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seed must be"):
        medusa_generate_batch(model, prompts, 4, acceptance="typical", temperature=0.5, seed="7")


def test_decoder_state_follows_the_batch():
    """After a step, every sequence's slots hold exactly its tokens' positions; keep() drops rows."""
    with force_backend("torch"):
        model = tiny_medusa()
        decoder = BatchedMedusaDecoder(model, TREES["mixed"])
        prompts = varied_prompts(3, seed=6)
        decoder.prefill(prompts)
        emitted = decoder.step([10, 10, 10])
        for b, p in enumerate(prompts):
            pos = decoder.slot_pos[b]
            assert sorted(pos[pos >= 0].tolist()) == list(range(p.numel() + len(emitted[b])))
            assert int(decoder.next_pos[b]) == p.numel() + len(emitted[b])
        assert decoder.cache.get_seq_length() == decoder.slot_pos.shape[1]
        decoder.keep([2, 0])
        assert decoder.slot_pos.shape[0] == decoder.cache.layers[0].keys.shape[0] == 2
        assert decoder.base_logits.shape[0] == decoder.head_logits.shape[0] == 2


def test_bad_prompts_are_refused():
    model = tiny_medusa()
    with pytest.raises(ValueError, match="non-empty list"):
        medusa_generate_batch(model, [], 4)
    with pytest.raises(ValueError, match="non-empty list"):
        medusa_generate_batch(model, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a token id tensor"):
        medusa_generate_batch(model, [torch.zeros(3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], 4)
    with pytest.raises(ValueError, match="empty"):
        medusa_generate_batch(model, [torch.zeros(0, dtype=torch.long)], 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batched_decoding(trained, dtype):  # noqa: F811
    model = copy.deepcopy(trained[0]).to("cuda", dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [chain_batch(trained[1], g, 1, n, 0.5)[0] for n in (6, 2, 11, 6)]
    results = medusa_generate_batch(model, prompts, 48)
    assert all(r.sequences.is_cuda and r.stats.new_tokens == 48 for r in results)
    assert all(r.stats.acceleration_rate > 2 for r in results)
    if dtype == torch.float32:  # exact up to rounding; bf16 batches may flip near-ties
        assert_matches_one_by_one(model, prompts, 48)


@pytest.mark.gpu
def test_gpu_batched_typical_acceptance(trained):  # noqa: F811
    # CUDA generators: each sequence draws from its own, as batch-1 decoding with its seed does (fp32).
    model = randomize_heads_(copy.deepcopy(trained[0]), 1.0, seed=3).to("cuda")
    g = torch.Generator().manual_seed(8)
    prompts = [chain_batch(trained[1], g, 1, n, 0.5)[0] for n in (3, 9, 1, 6)]
    counts = assert_matches_one_by_one(model, prompts, 24, seeds=11, acceptance="typical", temperature=1.5)
    assert len(set(counts)) >= 2
