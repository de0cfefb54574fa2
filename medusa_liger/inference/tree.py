"""Medusa candidate trees: ``medusa_choices`` paths, the tensors that verify them, and tree search.

A tree is a list of paths (``medusa_choices``). Path ``[r_1, ..., r_d]`` is the node at depth ``d``
whose token is head ``d - 1``'s rank-``r_d`` prediction (0 = most likely), continuing the path
``[r_1, ..., r_{d-1}]``. The root (depth 0, the empty path) is the backbone's own next token. Head
``k`` (0-based) predicts the token ``k + 2`` positions after the last accepted hidden state, so a
depth-``d`` node sits ``d`` positions after the root:

    position(node) = past_length + depth(node)

Node ``i`` may attend to every cached token and to node ``j`` exactly when ``j`` is ``i`` or one of
its ancestors (``path_j`` is a prefix of ``path_i``). Verifying the whole tree in one forward with
that mask gives, at every node, the backbone's distribution for the token after the node's path, so
every root-to-leaf path is checked at once.

Tree search (the Medusa paper's greedy sparse tree): with ``p_k(r)`` the probability that head
``k``'s rank-``r`` token is the right one, a node's path is fully accepted with probability

    P([r_1, ..., r_d]) = prod_{j=1..d} p_{j-1}(r_j)

and a tree accepts ``sum_nodes P(node)`` tokens in expectation on top of the root, so its expected
acceleration (tokens per step) is ``1 + sum_nodes P(node)``. Adding nodes one by one, always the
not-yet-chosen child of the current tree with the highest ``P``, builds a tree of a given size.

That product treats the heads as independent, and they are not: at a position where head 0 guesses
right, head 1 is more often right too (the text is predictable there), so deep paths are accepted
more often than the product says. The conditional search (``conditional_tree_search``) reads the
heads' joint ranks instead, a table ``ranks[t, k]`` of the rank of head k's right token at each
scored position t, and chains conditional probabilities

    P(path + [r]) = P(path) q_d(r | path),
    q_d(r | path) = (n(path + [r]) + a p_d(r)) / (m(path) + a)

with ``n(path)`` the positions whose first heads' ranks are ``path``, ``m(path)`` those of them
where head d (d = len(path)) has a target, and ``a`` pseudo-positions of the independent estimate
``p_d(r)`` (backoff: rare paths lean on the product, frequent ones on their own counts). It grows
the tree the same way. With ``a = 0``, and a target for every head at every scored position, it is
the empirical mean of accepted tokens per position (near a text's end the later heads have no
target, and those positions drop out of the later factors' denominators only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medusa_liger.numeric import is_int

Path = tuple[int, ...]
MedusaChoices = list[list[int]]

# Size of the built-in default tree (the Medusa paper's 63-node setting) and how many ranks per
# head the search may use.
DEFAULT_TREE_SIZE = 63
DEFAULT_TOP_K = 10
# A prior for the per-rank accuracy of an untrained-for-this-prompt head, used only to shape the
# built-in default tree: the rank-r token of head k is right with probability
# PRIOR_TOP1 * PRIOR_HEAD_DECAY**k * PRIOR_RANK_DECAY**r (top-1 accuracy falls with the distance
# ahead, and each lower rank is about half as likely as the one above it).
PRIOR_TOP1 = 0.6
PRIOR_HEAD_DECAY = 0.7
PRIOR_RANK_DECAY = 0.5
# Pseudo-positions of the independent estimate behind each conditional one (``conditional_tree_search``).
DEFAULT_PRIOR_STRENGTH = 20.0
TREE_SEARCHES = ("conditional", "independent")


def normalize_tree(tree: Sequence[Sequence[int]], num_heads: int | None = None, *, name: str = "tree") -> list[Path]:
    """Validate ``tree`` and return its paths as tuples, sorted by (depth, ranks): the node order.

    Checks: every path is a non-empty sequence of ints >= 0, no duplicates, every prefix of a path
    is itself in the tree, and (with ``num_heads``) no path is deeper than the number of heads.
    """
    if isinstance(tree, (str, bytes)) or not isinstance(tree, Sequence):
        raise ValueError(f"{name} must be a list of paths (lists of ranks), got {type(tree).__name__}")
    paths: list[Path] = []
    for path in tree:
        if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or len(path) == 0:
            raise ValueError(f"{name} paths must be non-empty lists of ranks, got {path!r}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise ValueError(f"{name} paths must hold integer ranks >= 0, got {list(path)!r}")
        paths.append(tuple(path))
    unique = set(paths)
    if len(unique) != len(paths):
        raise ValueError(f"{name} holds duplicate paths")
    for path in paths:
        if len(path) > 1 and path[:-1] not in unique:
            raise ValueError(f"{name} path {list(path)} needs its parent {list(path[:-1])} in the tree too")
        if num_heads is not None and len(path) > num_heads:
            raise ValueError(
                f"{name} path {list(path)} has depth {len(path)} and so needs head {len(path) - 1}, but the "
                f"model has {num_heads} Medusa head(s) (heads 0..{num_heads - 1}): use paths of length <= {num_heads}"
            )
    return sorted(paths, key=lambda p: (len(p), p))


def check_ranks_fit(tree: Sequence[Sequence[int]], vocab: int) -> int:
    """The deepest rank ``tree``'s paths use (-1 for the empty tree); ValueError when a vocabulary of
    ``vocab`` tokens has no token of that rank."""
    deepest = max((max(p) for p in tree), default=-1)
    if deepest >= vocab:
        raise ValueError(f"tree uses rank {deepest} but the vocabulary has only {vocab} tokens")
    return deepest


def truncate_tree(tree: Sequence[Sequence[int]], max_depth: int) -> MedusaChoices:
    """The paths of ``tree`` no deeper than ``max_depth`` (still closed under prefixes)."""
    return [list(p) for p in tree if len(p) <= max_depth]


@dataclass
class TreeBuffers:
    """Index tensors that lay a tree out for one verification forward (N = nodes + 1 for the root).

    paths:            the node paths in node order (node ``i + 1`` is ``paths[i]``; node 0 is the root).
    depth:            [N] long, node depth (root 0): position offsets from the past length.
    parent:           [N] long, parent node index (-1 for the root).
    ancestor_mask:    [N, N] bool, True where node i may attend to node j (j is i or an ancestor).
    candidate_index:  [N] long, index of each node's token in the flat candidate vector
                      ``[root, head0 top-k_0, head1 top-k_1, ...]``.
    retrieve_indices: [P, D + 1] long, for each of the P leaves the node indices root..leaf, padded
                      with -1 after the leaf (D = maximum depth).
    top_k:            per head, how many ranks the tree uses (0 for heads deeper than the tree).
    """

    paths: list[Path]
    depth: torch.Tensor
    parent: torch.Tensor
    ancestor_mask: torch.Tensor
    candidate_index: torch.Tensor
    retrieve_indices: torch.Tensor
    top_k: list[int]

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return int(self.depth.max().item())

    def to(self, device: torch.device | str) -> TreeBuffers:
        move = {
            name: getattr(self, name).to(device)
            for name in ("depth", "parent", "ancestor_mask", "candidate_index", "retrieve_indices")
        }
        return TreeBuffers(paths=self.paths, top_k=self.top_k, **move)

    def position_ids(self, past_length: int) -> torch.Tensor:
        """[1, N] positions of the tree nodes after ``past_length`` cached tokens."""
        return (self.depth + past_length).unsqueeze(0)

    def attention_mask(self, past_length: int, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
        """[1, 1, N, past_length + N] additive mask: 0 where attention is allowed, dtype's min elsewhere.

        Node i sees every cached token and its own ancestors (itself included); with a
        ``sliding_window`` w only keys at positions ``> position(i) - w`` (HF's sliding-window rule).
        Float (additive), not boolean, because eager attention adds the mask to the scores while
        SDPA accepts either; the dtype must be the attention's compute dtype.
        """
        n = self.num_nodes
        device = self.depth.device
        allowed = torch.ones(n, past_length + n, dtype=torch.bool, device=device)
        allowed[:, past_length:] = self.ancestor_mask
        if sliding_window is not None:
            query_pos = self.depth + past_length
            key_pos = torch.cat([torch.arange(past_length, device=device), query_pos])
            allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
        mask = torch.zeros(n, past_length + n, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]


def build_tree_buffers(tree: Sequence[Sequence[int]], num_heads: int | None = None) -> TreeBuffers:
    """Lay out ``tree`` (a ``medusa_choices`` list, validated against ``num_heads``) for verification."""
    paths = normalize_tree(tree, num_heads)
    n = len(paths) + 1
    # Node index of every path; the root is the empty path, node 0.
    index: dict[Path, int] = {(): 0}
    for i, path in enumerate(paths):
        index[path] = i + 1
    max_depth = max((len(p) for p in paths), default=0)
    # Ranks used per head: the candidate vector holds head d's top-k_d tokens for depth d + 1.
    top_k = [0] * (num_heads if num_heads is not None else max_depth)
    for path in paths:
        top_k[len(path) - 1] = max(top_k[len(path) - 1], path[-1] + 1)
    offsets = [1]
    for k in top_k:
        offsets.append(offsets[-1] + k)

    depth = torch.zeros(n, dtype=torch.long)
    parent = torch.full((n,), -1, dtype=torch.long)
    candidate_index = torch.zeros(n, dtype=torch.long)
    ancestor_mask = torch.eye(n, dtype=torch.bool)
    ancestor_mask[:, 0] = True  # every node continues the root
    for path in paths:
        i = index[path]
        depth[i] = len(path)
        parent[i] = index[path[:-1]]
        candidate_index[i] = offsets[len(path) - 1] + path[-1]
        # Ancestors: every proper prefix of the path.
        for d in range(1, len(path)):
            ancestor_mask[i, index[path[:d]]] = True

    # Leaves: nodes that are nobody's parent; a leaf's root-to-leaf chain is one candidate sequence.
    is_parent = torch.zeros(n, dtype=torch.bool)
    is_parent[parent[parent >= 0]] = True
    leaves = [path for path in [()] + paths if not is_parent[index[path]]]
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for d in range(len(leaf) + 1):
            retrieve[row, d] = index[leaf[:d]]
    return TreeBuffers(
        paths=paths,
        depth=depth,
        parent=parent,
        ancestor_mask=ancestor_mask,
        candidate_index=candidate_index,
        retrieve_indices=retrieve,
        top_k=top_k,
    )


def check_prior_strength(prior_strength: float) -> float:
    """``prior_strength`` as a float; ValueError unless it is a finite number >= 0."""
    if (isinstance(prior_strength, bool) or not isinstance(prior_strength, (int, float))
            or not 0.0 <= prior_strength < float("inf")):
        raise ValueError(f"prior_strength must be a finite number >= 0, got {prior_strength!r}")
    return float(prior_strength)


class PathEstimate:
    """One estimate of how often a tree path is accepted, and the tree search and scoring on it.

    ``child_value(path, P(path), r)`` gives P(path + (r,)): ``independent`` multiplies by head
    len(path)'s per-rank accuracy (the Medusa paper's product), ``conditional`` by the conditional
    probability from the heads' joint ranks (module docstring). Both search, score and size trees alike.
    """

    def __init__(self, child_value, num_heads: int, ranks: int, source: str):
        self.child_value, self.num_heads, self.ranks, self.source = child_value, num_heads, ranks, source

    @classmethod
    def independent(cls, rank_accuracy: torch.Tensor) -> PathEstimate:
        """The product over ``rank_accuracy`` [K, R] (per rank, not cumulative)."""
        if rank_accuracy.ndim != 2 or rank_accuracy.shape[0] < 1 or rank_accuracy.shape[1] < 1:
            raise ValueError(f"rank_accuracy must be a [num_heads, top_k] table, got shape "
                             f"{list(rank_accuracy.shape)}")
        acc = rank_accuracy.double().clamp(0.0, 1.0).tolist()
        return cls(lambda path, value, r: value * acc[len(path)][r], len(acc), len(acc[0]), "rank_accuracy")

    @classmethod
    def conditional(cls, ranks: torch.Tensor, top_k: int,
                    prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> PathEstimate:
        """The chained conditional probabilities of the joint rank table ``ranks`` [P, K] (see
        ``conditional_tree_search``), ``prior_strength`` pseudo-positions of the product behind each."""
        a = check_prior_strength(prior_strength)
        acc = rank_accuracy_of(ranks, top_k).tolist()
        # Counts of every prefix: with a target for the next head (m) and ending in a guessed rank (n).
        with_next: dict[Path, int] = {}
        ending: dict[Path, int] = {}
        for row in ranks.tolist():
            for d, r in enumerate(row):
                if r < 0:  # no target for this head (nor for any deeper one: theirs lie further on)
                    break
                prefix = tuple(row[:d])
                with_next[prefix] = with_next.get(prefix, 0) + 1
                if r >= top_k:
                    break
                ending[prefix + (r,)] = ending.get(prefix + (r,), 0) + 1

        def child_value(path: Path, value: float, r: int) -> float:
            m, prior = with_next.get(path, 0), acc[len(path)][r]
            q = prior if m + a == 0 else (ending.get(path + (r,), 0) + a * prior) / (m + a)
            return value * q
        return cls(child_value, ranks.shape[1], top_k, "ranks")

    def search_sizes(self, sizes: Sequence[int]) -> dict[int, tuple[MedusaChoices, float]]:
        """(tree, expected acceleration) of the greedy search for each size in ``sizes``, ascending.

        The frontier holds every child of the current tree (rank 0..R-1 one level deeper, up to depth
        K); each round moves its highest-valued node into the tree. Ties go to the shallower, then
        lexicographically smaller path, so the result is deterministic. Stops early when every
        possible node is in the tree, or when the best remaining node has expected acceptance 0 (it
        would cost attention and compute and never be accepted). Nodes join in a fixed order, so the
        tree of size n is the first n nodes of the largest one: one search gives every size.
        """
        if not sizes:
            raise ValueError("sizes must hold at least one size")
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"size must be an integer >= 1, got {size!r}")
        frontier: dict[Path, float] = {(r,): self.child_value((), 1.0, r) for r in range(self.ranks)}
        taken: list[tuple[Path, float]] = []  # (node, P(node)) in the order the search took them
        while frontier and len(taken) < max(sizes):
            path = min(frontier, key=lambda p: (-frontier[p], len(p), p))
            value = frontier.pop(path)
            if value <= 0.0:
                break
            taken.append((path, value))
            if len(path) < self.num_heads:
                for r in range(self.ranks):
                    frontier[path + (r,)] = self.child_value(path, value, r)
        results = {}
        for n in sorted(set(sizes)):
            expected = 1.0
            for _, value in taken[:n]:
                expected += value
            results[n] = [list(p) for p, _ in sorted(taken[:n], key=lambda t: (len(t[0]), t[0]))], expected
        return results

    def search(self, size: int) -> tuple[MedusaChoices, float]:
        """(tree, expected acceleration) of the greedy search for a ``size``-node tree."""
        return self.search_sizes([size])[size]

    def value(self, tree: Sequence[Sequence[int]]) -> float:
        """``tree``'s expected acceleration, 1 + sum of P(node) (parents first in normalize_tree's order)."""
        value: dict[Path, float] = {(): 1.0}
        for path in normalize_tree(tree, self.num_heads):
            if max(path) >= self.ranks:
                raise ValueError(f"tree path {list(path)} uses a rank beyond the {self.ranks} in {self.source}")
            value[path] = self.child_value(path[:-1], value[path[:-1]], path[-1])
        return 1.0 + sum(v for p, v in value.items() if p)


def expected_acceleration(tree: Sequence[Sequence[int]], rank_accuracy: torch.Tensor) -> float:
    """``1 + sum_nodes prod_j p_{j-1}(r_j)`` for ``rank_accuracy`` [K, R] (per-rank, not cumulative)."""
    return PathEstimate.independent(rank_accuracy).value(tree)


def greedy_tree_search(rank_accuracy: torch.Tensor, size: int) -> tuple[MedusaChoices, float]:
    """Grow a ``size``-node tree greedily by expected acceptance; returns (tree, expected acceleration).

    rank_accuracy: [K, R] float, probability that head k's rank-r token is the right one (per rank:
    a cumulative top-k table ``c`` converts with ``p[:, r] = c[:, r] - c[:, r - 1]``). The search:
    ``PathEstimate.search_sizes``.
    """
    return PathEstimate.independent(rank_accuracy).search(size)


def rank_hits(ranks: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a joint rank table ``ranks`` [P, K] (see ``conditional_tree_search``): ``hits`` [K, top_k]
    (positions where head k's rank-r guess was right) and ``scored`` [K] (positions with a target for head k)."""
    _check_ranks(ranks, top_k)
    return torch.stack([(ranks == r).sum(0) for r in range(top_k)], dim=1), (ranks >= 0).sum(0)


def rank_accuracy_of(ranks: torch.Tensor, top_k: int) -> torch.Tensor:
    """[K, top_k] fp64 per-rank accuracy from a joint rank table ``ranks`` [P, K] (see
    ``conditional_tree_search``): the share of head k's scored positions where its rank-r guess is right."""
    hits, scored = rank_hits(ranks, top_k)
    return hits.double() / scored.clamp(min=1).double()[:, None]


def _check_ranks(ranks: torch.Tensor, top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if ranks.ndim != 2 or ranks.shape[1] < 1 or ranks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ranks must be an integer [positions, num_heads] table, got {ranks.dtype} "
                         f"of shape {list(ranks.shape)}")
    if ranks.numel() and (int(ranks.min()) < -1 or int(ranks.max()) > top_k):
        raise ValueError(f"ranks must lie in [-1, top_k={top_k}] (-1: no target, top_k: not in the top k)")


def conditional_tree_search(ranks: torch.Tensor, size: int, top_k: int,
                            prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> tuple[MedusaChoices, float]:
    """``greedy_tree_search`` on the heads' joint ranks: (tree, expected acceleration).

    ranks: [P, K] integers, for each scored position the rank (0..top_k-1) of the right token among
    head k's guesses, top_k where it is not among the top ``top_k``, -1 where head k has no target
    there (past the end of the text). prior_strength: ``a`` of the module docstring.
    """
    return PathEstimate.conditional(ranks, top_k, prior_strength).search(size)


def acceleration_by_size(sizes: Sequence[int], *, ranks: torch.Tensor | None = None,
                         rank_accuracy: torch.Tensor | None = None, top_k: int = DEFAULT_TOP_K,
                         prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> dict[int, float]:
    """The expected acceleration of the searched tree of each size in ``sizes``: conditional on
    ``ranks`` [P, K] (``conditional_tree_search``), or independent on ``rank_accuracy`` [K, R]
    (``greedy_tree_search``), from one search (``PathEstimate.search_sizes``). For choosing a size:
    a bigger tree accepts more but costs more per step once its nodes no longer ride free in the
    forward (large batches; benchmarks/decode_speed.py)."""
    if (ranks is None) == (rank_accuracy is None):
        raise ValueError("pass exactly one of ranks (conditional estimate) and rank_accuracy (independent)")
    estimate = (PathEstimate.conditional(ranks, top_k, prior_strength) if ranks is not None
                else PathEstimate.independent(rank_accuracy))
    return {n: expected for n, (_, expected) in estimate.search_sizes(sizes).items()}


def conditional_expected_acceleration(tree: Sequence[Sequence[int]], ranks: torch.Tensor, top_k: int,
                                      prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> float:
    """``tree``'s expected acceleration under the conditional estimate (``conditional_tree_search``)."""
    return PathEstimate.conditional(ranks, top_k, prior_strength).value(tree)


def prior_rank_accuracy(num_heads: int, top_k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """[num_heads, top_k] prior per-rank accuracy (see PRIOR_*), used for the built-in default tree."""
    heads = torch.arange(num_heads, dtype=torch.float64)[:, None]
    ranks = torch.arange(top_k, dtype=torch.float64)[None, :]
    return PRIOR_TOP1 * PRIOR_HEAD_DECAY**heads * PRIOR_RANK_DECAY**ranks


def default_tree(num_heads: int, size: int = DEFAULT_TREE_SIZE) -> MedusaChoices:
    """The built-in tree for ``num_heads`` heads: the greedy search over the prior accuracy table."""
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
    tree, _ = greedy_tree_search(prior_rank_accuracy(num_heads), size)
    return tree
