"""Tree buffers (mask, positions, candidate layout, leaves) against brute force; tree search."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from medusa_liger.inference.tree import (
    DEFAULT_TREE_SIZE,
    acceleration_by_size,
    build_tree_buffers,
    conditional_expected_acceleration,
    conditional_tree_search,
    default_tree,
    expected_acceleration,
    greedy_tree_search,
    normalize_tree,
    rank_accuracy_of,
    truncate_tree,
)


def random_tree(seed: int, num_nodes: int, max_depth: int, max_rank: int) -> list[list[int]]:
    """A random prefix-closed tree, listed in shuffled order (the builder must sort it)."""
    rng = random.Random(seed)
    nodes: set[tuple[int, ...]] = set()
    while len(nodes) < num_nodes:
        parent = rng.choice([()] + [p for p in nodes if len(p) < max_depth])
        nodes.add(parent + (rng.randrange(max_rank),))
    out = [list(p) for p in nodes]
    rng.shuffle(out)
    return out


TREES = {
    "chain": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
    "wide": [[r] for r in range(7)],
    "mixed": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2], [0, 0, 0, 0], [0, 1, 3]],
    "random": random_tree(1, 23, 4, 5),
    "default": default_tree(4),
}


def _is_prefix(a: tuple, b: tuple) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


@pytest.mark.parametrize("name", sorted(TREES))
@pytest.mark.parametrize("past_length", [0, 5, 123])
def test_buffers_match_brute_force(name, past_length):
    tree = TREES[name]
    buf = build_tree_buffers(tree, num_heads=4)
    nodes = [()] + [tuple(p) for p in sorted(tree, key=lambda p: (len(p), p))]
    assert buf.paths == nodes[1:]
    n = len(nodes)
    assert buf.num_nodes == n

    # Mask: cached tokens always visible; node j visible from node i iff path_j prefixes path_i.
    mask = buf.attention_mask(past_length, torch.float32)
    assert mask.shape == (1, 1, n, past_length + n) and mask.dtype == torch.float32
    expected = torch.full((n, past_length + n), torch.finfo(torch.float32).min)
    for i, j in itertools.product(range(n), range(past_length + n)):
        if j < past_length or _is_prefix(nodes[j - past_length], nodes[i]):
            expected[i, j] = 0.0
    torch.testing.assert_close(mask[0, 0], expected, rtol=0, atol=0)

    # Positions: past length + depth.
    assert buf.position_ids(past_length).tolist() == [[past_length + len(p) for p in nodes]]
    assert buf.parent.tolist() == [-1] + [nodes.index(p[:-1]) for p in nodes[1:]]

    # Candidate layout: node p's token is head (len(p) - 1)'s rank-p[-1] guess.
    K, R, V = 4, 10, 1000
    root = torch.tensor([V - 1])
    topk = torch.randint(0, V - 1, (K, R))
    flat = torch.cat([root] + [topk[k, : buf.top_k[k]] for k in range(K)])
    tokens = flat[buf.candidate_index]
    assert tokens.tolist() == [V - 1] + [int(topk[len(p) - 1, p[-1]]) for p in nodes[1:]]

    # Leaves: nodes without children, each row its root-to-leaf chain padded with -1.
    leaves = [p for p in nodes if not any(len(q) == len(p) + 1 and q[: len(p)] == p for q in nodes)]
    depth = max(len(p) for p in nodes)
    rows = buf.retrieve_indices.tolist()
    assert len(rows) == len(leaves)
    for row, leaf in zip(rows, leaves):
        assert row == [nodes.index(leaf[:d]) for d in range(len(leaf) + 1)] + [-1] * (depth - len(leaf))


@pytest.mark.parametrize("window", [1, 3, 6])
def test_sliding_window_mask(window):
    tree = TREES["mixed"]
    buf = build_tree_buffers(tree, num_heads=4)
    past = 9
    nodes = [()] + buf.paths
    mask = buf.attention_mask(past, torch.float16, sliding_window=window)[0, 0]
    key_pos = list(range(past)) + [past + len(p) for p in nodes]
    for i, j in itertools.product(range(len(nodes)), range(past + len(nodes))):
        visible = j < past or _is_prefix(nodes[j - past], nodes[i])
        visible = visible and key_pos[j] > past + len(nodes[i]) - window
        assert (mask[i, j] == 0) == visible, (i, j)
    assert (mask[mask != 0] == torch.finfo(torch.float16).min).all()


def test_empty_tree_is_root_only():
    buf = build_tree_buffers([], num_heads=3)
    assert buf.num_nodes == 1 and buf.retrieve_indices.tolist() == [[0]]
    assert buf.attention_mask(4, torch.float32).shape == (1, 1, 1, 5)


@pytest.mark.parametrize(
    "tree, match",
    [
        ("[[0]]", "list of paths"),
        ([[]], "non-empty"),
        ([[0], [-1]], "integer ranks"),
        ([[0], [0.5]], "integer ranks"),
        ([[0], [0]], "duplicate"),
        ([[0], [1, 0]], "parent"),
        ([[0], [0, 0], [0, 0, 0]], "head 2"),
    ],
)
def test_bad_trees(tree, match):
    with pytest.raises(ValueError, match=match):
        build_tree_buffers(tree, num_heads=2)


def test_truncate_keeps_prefix_closed():
    tree = TREES["random"]
    for depth in range(5):
        cut = truncate_tree(tree, depth)
        assert all(len(p) <= depth for p in cut)
        normalize_tree(cut)  # still valid


def test_truncate_keeps_every_path_up_to_the_depth():
    tree = [[0], [0, 0], [0, 0, 0], [1]]
    assert truncate_tree(tree, 2) == [[0], [0, 0], [1]] and truncate_tree(tree, 3) == tree
    assert truncate_tree(tree, 0) == []


def test_estimates_refuse_ranks_past_the_table_and_ambiguous_inputs():
    with pytest.raises(ValueError, match="uses a rank beyond"):
        expected_acceleration([[2]], torch.full((1, 2), 0.1))  # rank 2 of a table of ranks 0 and 1
    with pytest.raises(ValueError, match="exactly one"):
        acceleration_by_size([2], ranks=torch.zeros(4, 1, dtype=torch.long), rank_accuracy=torch.full((1, 2), 0.1))
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1, got True"):
        default_tree(True)


def test_tree_search_hand_computed():
    # Values: [0] .6, [0,0] .3, [1] .2, [0,1] .18, [2] .1, [1,0] .1, [0,2] .06 ...
    p = torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.3, 0.1]])
    tree, estimate = greedy_tree_search(p, 4)
    assert tree == [[0], [1], [0, 0], [0, 1]]
    assert estimate == pytest.approx(1 + 0.6 + 0.3 + 0.2 + 0.18)
    assert expected_acceleration(tree, p) == pytest.approx(estimate)
    # Ties ([2] and [1,0] are both 0.1): the shallower path first.
    tree, _ = greedy_tree_search(p, 5)
    assert tree == [[0], [1], [2], [0, 0], [0, 1]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [1, 5, 17])
def test_tree_search_is_optimal_for_monotone_tables(seed, size):
    # With accuracies falling in rank, a node is worth at most its parent, so the best tree of a
    # given size is the `size` most valuable nodes overall, which the greedy search must find.
    g = torch.Generator().manual_seed(seed)
    K, R = 3, 4
    p = torch.rand(K, R, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values * 0.9
    values = []
    for d in range(1, K + 1):
        for path in itertools.product(range(R), repeat=d):
            values.append(float(torch.prod(torch.stack([p[j, r] for j, r in enumerate(path)]))))
    best = 1 + sum(sorted(values, reverse=True)[:size])
    tree, estimate = greedy_tree_search(p, size)
    assert len(tree) == size
    normalize_tree(tree, K)
    assert estimate == pytest.approx(best)
    assert expected_acceleration(tree, p) == pytest.approx(best)


def test_tree_search_stops_when_every_node_is_in():
    tree, _ = greedy_tree_search(torch.full((2, 2), 0.5), 100)
    assert len(tree) == 2 + 4


def test_tree_search_skips_nodes_never_accepted():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    tree, estimate = greedy_tree_search(p, 63)
    assert tree == [[0], [0, 0], [0, 1]] and estimate == pytest.approx(3.0)
    assert greedy_tree_search(torch.zeros(2, 3), 5) == ([], 1.0)


def test_tree_search_bad_input():
    with pytest.raises(ValueError, match="rank_accuracy"):
        greedy_tree_search(torch.rand(3), 4)
    with pytest.raises(ValueError, match="size"):
        greedy_tree_search(torch.rand(2, 3), 0)
    # A tree with a rank the table lacks: named, not an IndexError.
    with pytest.raises(ValueError, match=r"tree path \[5\] uses a rank beyond the 3 in rank_accuracy"):
        expected_acceleration([[0], [5]], torch.rand(2, 3))
    # Probabilities outside [0, 1] (a table from counts gone wrong) are clamped, not extrapolated.
    assert expected_acceleration([[0]], torch.tensor([[1.5, 0.2]])) == 2.0
    assert expected_acceleration([[0]], torch.tensor([[-0.5, 0.2]])) == 1.0


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5])
def test_default_tree(num_heads):
    tree = default_tree(num_heads)
    normalize_tree(tree, num_heads)
    assert len(tree) == min(DEFAULT_TREE_SIZE, sum(10**d for d in range(1, num_heads + 1)))
    assert max(len(p) for p in tree) == num_heads or num_heads > 4
    with pytest.raises(ValueError, match="num_heads"):
        default_tree(0)


# ----------------------------------------------------------------------- conditional tree search
def random_ranks(seed: int, positions: int, num_heads: int, top_k: int, ends: bool) -> torch.Tensor:
    """A joint rank table with correlated heads (a position's heads share an easiness), misses
    (top_k) and, with ``ends``, positions near the end of the text whose deeper heads have no target (-1)."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.rand(positions, 1, generator=g)
    ranks = (torch.rand(positions, num_heads, generator=g) * (1.5 - easy) * top_k).long().clamp(max=top_k)
    if ends:
        cut = torch.randint(1, num_heads + 1, (positions,), generator=g)
        ranks[torch.arange(num_heads)[None, :] >= cut[:, None]] = -1
    return ranks


@pytest.mark.parametrize("seed", range(4))
def test_conditional_estimate_without_prior_is_the_empirical_acceptance(seed):
    # With a = 0 and a target for every head, P(path) telescopes to the share of positions whose
    # first heads' ranks are the path: the estimate is 1 + the mean number of tree nodes a position's
    # ranks accept, which brute force counts.
    ranks = random_ranks(seed, 300, 3, 4, ends=False)
    tree = random_tree(seed, 12, 3, 4)
    accepted = sum(sum(row[: len(p)] == p for p in tree) for row in ranks.tolist())
    assert conditional_expected_acceleration(tree, ranks, 4, 0.0) == pytest.approx(1 + accepted / 300)
    searched, estimate = conditional_tree_search(ranks, 12, 4, 0.0)
    assert conditional_expected_acceleration(searched, ranks, 4, 0.0) == pytest.approx(estimate)
    assert estimate >= 1 + accepted / 300 - 1e-12  # at least as good as the random tree, by its own estimate


@pytest.mark.parametrize("ends", [False, True])
def test_conditional_estimate_tends_to_the_independent_one(ends):
    # A prior of many pseudo-positions outweighs the counts: each q_d(r | path) tends to p_d(r).
    ranks = random_ranks(1, 200, 4, 5, ends=ends)
    tree = random_tree(1, 20, 4, 5)
    independent = expected_acceleration(tree, rank_accuracy_of(ranks, 5))
    assert conditional_expected_acceleration(tree, ranks, 5, 1e12) == pytest.approx(independent, rel=1e-9)
    (tree_c, estimate_c), (tree_i, estimate_i) = (conditional_tree_search(ranks, 20, 5, 1e12),
                                                  greedy_tree_search(rank_accuracy_of(ranks, 5), 20))
    assert tree_c == tree_i and estimate_c == pytest.approx(estimate_i, rel=1e-9)


def test_conditional_search_follows_heads_that_are_right_together():
    # Half the positions: every head's top guess is right; 30%: only head 0's second guess. Each head
    # alone is right half the time, so the product puts [0, 0, 0] at 1/8; together they are right half
    # the time, and the conditional search goes deep.
    ranks = torch.tensor([[0, 0, 0]] * 50 + [[1, 2, 2]] * 30 + [[2, 2, 2]] * 20)
    p = rank_accuracy_of(ranks, 2)
    assert p.tolist() == [[0.5, 0.3], [0.5, 0.0], [0.5, 0.0]]
    independent, estimate = greedy_tree_search(p, 3)
    assert independent == [[0], [1], [0, 0]] and estimate == pytest.approx(2.05)
    tree, estimate = conditional_tree_search(ranks, 3, 2, 0.0)
    assert tree == [[0], [0, 0], [0, 0, 0]] and estimate == pytest.approx(2.5)
    assert conditional_expected_acceleration(independent, ranks, 2, 0.0) == pytest.approx(2.3)  # < 2.5
    # The prior pulls toward the product: 10 pseudo-positions, q([0] -> 0) = (50 + 10 * 0.5) / 60.
    _, estimate = conditional_tree_search(ranks, 3, 2, 10.0)
    q = (50 + 5) / 60
    assert estimate == pytest.approx(1 + (50 + 5) / 110 * (1 + q + q * q))


def test_positions_without_a_target_count_only_where_they_have_one():
    # Head 1 has a target at 2 of the 4 positions where head 0's top guess was right; it was right at
    # one: q_1(0 | [0]) = 1/2, not 1/4.
    ranks = torch.tensor([[0, 0], [0, 1], [0, -1], [0, -1], [1, -1]])
    assert conditional_expected_acceleration([[0], [0, 0]], ranks, 2, 0.0) == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert rank_accuracy_of(ranks, 2).tolist() == [[0.8, 0.2], [0.5, 0.5]]
    # A head with no target anywhere (prompts shorter than its shift): accuracy 0, never NaN.
    assert rank_accuracy_of(torch.tensor([[0, -1], [1, -1]]), 2).tolist() == [[0.5, 0.5], [0.0, 0.0]]


@pytest.mark.parametrize("bad, message", [
    (dict(ranks=torch.tensor([[0, 5]])), r"ranks must lie in \[-1, top_k=4\]"),
    (dict(ranks=torch.tensor([[0, -2]])), r"ranks must lie in"),
    (dict(ranks=torch.tensor([[0.0, 1.0]])), "ranks must be an integer"),
    (dict(ranks=torch.tensor([0, 1])), "ranks must be an integer"),
    (dict(prior_strength=-1.0), "prior_strength must be a finite number >= 0"),
    (dict(prior_strength=float("inf")), "prior_strength must be a finite number >= 0"),
    (dict(size=0), "size must be an integer >= 1"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
])
def test_conditional_search_refuses_bad_input(bad, message):
    args = dict(ranks=torch.tensor([[0, 1], [4, -1]]), size=3, top_k=4, prior_strength=1.0) | bad
    with pytest.raises(ValueError, match=message):
        conditional_tree_search(**args)


@pytest.mark.parametrize("conditional", [False, True])
def test_acceleration_by_size_is_each_sizes_search(conditional):
    ranks = random_ranks(2, 200, 3, 4, ends=True)
    sizes = [1, 3, 10, 40, 100]  # 100: more than the 4 + 16 + 64 possible nodes, the search stops early
    if conditional:
        curve = acceleration_by_size(sizes, ranks=ranks, top_k=4, prior_strength=5.0)
        each = {n: conditional_tree_search(ranks, n, 4, 5.0)[1] for n in sizes}
    else:
        p = rank_accuracy_of(ranks, 4)
        curve = acceleration_by_size(sizes, rank_accuracy=p)
        each = {n: greedy_tree_search(p, n)[1] for n in sizes}
    assert list(curve) == sizes and curve == pytest.approx(each)
    assert all(a <= b for a, b in zip(list(curve.values()), list(curve.values())[1:]))
    with pytest.raises(ValueError, match="exactly one of ranks"):
        acceleration_by_size(sizes)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        acceleration_by_size([0], ranks=ranks, top_k=4)
