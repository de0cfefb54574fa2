"""Medusa tree decoding of a batch of prompts: one verification forward per step for all of them.

Each sequence accepts its own number of tokens a step, so the sequences drift apart: sequence b has
emitted ``next_pos[b]`` tokens (prompt included) while the cache holds as many slots for every
sequence. The batch keeps, per sequence and cache slot, the position of the token in that slot
(``slot_pos``, -1 for an empty slot), and builds every mask from it:

* prefill: prompts are left-padded to the longest; a pad slot is empty, and token i of a prompt
  sees the prompt's tokens at positions <= its own;
* step: the tree's N nodes of sequence b sit at positions ``next_pos[b] + depth`` (at most its
  last position ``next_pos[b] + remaining[b] - 1``, as its batch-1 tree would) and see the
  sequence's non-empty slots and their own ancestors (with a sliding window w, only keys at
  positions > position - w, as for one sequence);
* after the step, sequence b's a_b accepted nodes are gathered into the slots after the old ones,
  the slots up to the longest accepted path stay empty for the others, and the cache is cropped
  there. A finished sequence leaves the batch (its rows of the cache are dropped).

Greedy acceptance stays lossless per sequence: each decodes the tokens plain greedy decoding would,
in the steps batch-1 Medusa decoding would take (``medusa_generate``), up to float rounding of the
padded batch. So does typical acceptance: sequence b samples from its own generator (seeded with
``seed + b``, or ``seeds[b]``), as ``medusa_generate`` with that seed would.

One RoPE breaks this: HF's "longrope" picks its frequencies from the largest position in the whole
forward, so a sequence past the original context would change every other's. ``medusa_generate_batch``
then decodes the prompts one at a time (with a warning), unless no sequence can get that far. ("dynamic"
changes only past max_position_embeddings, where no sequence goes, nor any tree node: see ``step``.)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from medusa_liger.inference.backbone import check_generation_inputs
from medusa_liger.inference.generate import (
    Acceptance,
    DecodeStats,
    GenerationResult,
    MedusaDecoder,
    _eos_set,
    _finish,
    _sync,
    sampling_generator,
)
from medusa_liger.inference.tree import TreeBuffers
from medusa_liger.numeric import is_int


def per_prompt_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int | None]:
    """Prompt b's seed: ``seed + b`` for an int, ``seed[b]`` for a list (one per prompt), None for None."""
    if seed is None:
        return [None] * batch
    seeds = [seed + b for b in range(batch)] if is_int(seed) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed holds {len(seeds)} seeds for {batch} prompts; pass one per prompt or one int")
    return seeds


def batch_dependent_rope(config) -> tuple[str, int] | None:
    """(rope_type, positions) of a RoPE whose frequencies follow the largest position of the whole
    forward, the same for every sequence in it (HF's "longrope": long factors past the original
    context), with the number of positions up to which they do not change; None for any other RoPE."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict) or params.get("rope_type") != "longrope":
        return None
    original = params.get("original_max_position_embeddings") or config.max_position_embeddings
    return "longrope", int(original)


class BatchedMedusaDecoder(MedusaDecoder):
    """``MedusaDecoder`` over B sequences: ``prefill(prompts)``, then ``step(remaining)`` repeatedly,
    ``keep(rows)`` to drop finished sequences. Same options as ``MedusaDecoder``, except ``seed``:
    an int (sequence b's generator gets ``seed + b``), one int per prompt, or None (torch's default
    generator).

    State: ``cache`` ([B, ..., S, ...] per layer), ``slot_pos`` [B, S] (the position of each slot's
    token, -1: empty), ``next_pos`` [B] (tokens so far, prompt included), ``base_logits`` [B, V] and
    ``head_logits`` [B, K, V] (None for the empty tree) of each sequence's last token, and
    ``generators`` (one per sequence, or None each).
    """

    def __init__(self, model: nn.Module, tree: list[list[int]] | None = None, *,
                 seed: int | Sequence[int] | None = None, **options) -> None:
        super().__init__(model, tree, **options)
        if not (seed is None or is_int(seed) or (isinstance(seed, Sequence) and all(is_int(s) for s in seed))):
            raise ValueError(f"seed must be None, an int or a list of ints (one per prompt), got {seed!r}")
        self.seeds = seed
        self.generators: list[torch.Generator | None] = []
        self._rope = batch_dependent_rope(self.runner.config)  # warned about once a batch passes its positions

    def _mask(self, key_pos: torch.Tensor, query_pos: torch.Tensor, tree: torch.Tensor | None) -> torch.Tensor:
        """[B, 1, Q, S (+ Q)] additive mask for queries at ``query_pos`` [B, Q] over the slots at
        ``key_pos`` [B, S] (-1: empty) and, with ``tree`` [Q, Q] (the ancestor mask), over the queries."""
        allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query_pos[:, :, None])
        if self.window is not None:
            allowed &= key_pos[:, None, :] > query_pos[:, :, None] - self.window
        if tree is not None:
            own = tree[None].expand(query_pos.shape[0], -1, -1)
            if self.window is not None:
                own = own & (query_pos[:, None, :] > query_pos[:, :, None] - self.window)
            allowed = torch.cat([allowed, own], dim=-1)
        dtype = self.runner.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    @torch.no_grad()
    def prefill(self, prompts: Sequence[torch.Tensor]) -> None:
        """Run the prompts (1-D token id tensors, any lengths) through the backbone, left-padded."""
        device = self.runner.device
        lengths = torch.tensor([p.numel() for p in prompts], device=device)
        T = max(p.numel() for p in prompts)  # from the host's list: no device read
        ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)  # pad id 0: never attended to
        for b, p in enumerate(prompts):
            ids[b, T - p.numel():] = p.reshape(-1).to(device)
        slot_pos = torch.arange(T, device=device)[None] - (T - lengths)[:, None]
        self.slot_pos = slot_pos.masked_fill(slot_pos < 0, -1)
        mask = self._mask(self.slot_pos, self.slot_pos, None)
        # A pad query sees nothing; let it see itself so its (ignored) softmax row is not all -inf.
        mask.diagonal(dim1=-2, dim2=-1).zero_()
        self.cache = self.runner.new_cache()
        hidden = self.runner.hidden(ids, self.cache, self.slot_pos.clamp(min=0), mask)
        self.next_pos = lengths
        self.generators = self._new_generators(len(prompts))
        self._set_last(hidden[:, -1], self.runner.logits(hidden[:, -1]))

    def _new_generators(self, batch: int) -> list[torch.Generator | None]:
        """One generator per sequence, seeded as ``medusa_generate``'s would be for it alone."""
        return [None if s is None else sampling_generator(s, self.runner.device)
                for s in per_prompt_seeds(self.seeds, batch)]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these sequences (indices into the current batch), in this order."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.runner.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.slot_pos, self.next_pos = self.slot_pos[index], self.next_pos[index]
        self.base_logits = self.base_logits[index]
        self.generators = [self.generators[r] for r in rows]
        if self.head_logits is not None:
            self.head_logits = self.head_logits[index]

    def _roots(self) -> torch.Tensor:
        if self.acceptance == "greedy":
            return self.base_logits.argmax(-1)
        # Row by row, each from its sequence's generator: the draws batch-1 decoding would make.
        probs = self._probs(self.base_logits)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)])

    def _keep_paths(self, paths: list[torch.Tensor], buf: TreeBuffers) -> None:
        """Gather each sequence's accepted nodes into the slots after the old ones; crop the rest."""
        S = self.slot_pos.shape[1]
        n = torch.tensor([p.numel() for p in paths], device=self.runner.device)
        width = max(p.numel() for p in paths)  # from the host's list: no device read
        if width > 1:  # else every sequence kept its root alone, already in slot S: nothing moves
            index = torch.stack([torch.cat([p, p[-1:].expand(width - p.numel())]) for p in paths]) + S  # [B, width]
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)  # [B, heads, S + N, D]
                    picked = t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
                    t[:, :, S:S + width] = picked  # gather copied: overlapping slots are safe
        if buf.num_nodes > width:
            self.cache.crop(-(buf.num_nodes - width))
        offsets = torch.arange(width, device=n.device)
        new_pos = torch.where(offsets[None] < n[:, None], self.next_pos[:, None] + offsets[None], -1)
        self.slot_pos = torch.cat([self.slot_pos, new_pos], dim=1)
        self.next_pos = self.next_pos + n

    @torch.no_grad()
    def step(self, remaining: Sequence[int]) -> list[list[int]]:
        """Emit between 1 and ``remaining[b]`` tokens for every sequence b with one forward.

        With every ``remaining`` at 1 only the roots are emitted and no forward runs: use it only as
        the last step.
        """
        if self.cache is None:
            raise RuntimeError("call prefill(prompts) before step()")
        roots = self._roots()  # [B]
        most = max(remaining)
        if most == 1:
            return [[int(r)] for r in roots.tolist()]
        buf = self.buffers(most - 1)
        flat = [roots[:, None]]
        for k, top in enumerate(buf.top_k):
            if top:
                flat.append(torch.topk(self.head_logits[:, k], top, dim=-1).indices)
        tokens = torch.cat(flat, dim=1)[:, buf.candidate_index]  # [B, N]
        # One tree serves every sequence, so a sequence with fewer tokens left than the batch's most
        # gets nodes past its own budget: it can never emit their tokens, and they sit at its last
        # position instead of past it (past max_position_embeddings, a dynamic RoPE would rescale
        # its frequencies from the batch's largest position for every sequence).
        last_pos = self.next_pos + torch.tensor(remaining, device=self.next_pos.device) - 1  # [B]
        query_pos = torch.minimum(self.next_pos[:, None] + buf.depth[None], last_pos[:, None])  # [B, N]
        if self._rope is not None and tokens.shape[0] > 1 and int(query_pos.max()) >= self._rope[1]:
            warnings.warn(f"the backbone's rope_type {self._rope[0]!r} picks its frequencies from the largest "
                          f"position in the batch, and this batch passes {self._rope[1]} positions: its sequences "
                          "now decode what they decode in this batch, not alone (medusa_generate_batch decodes "
                          "such prompts one at a time)", stacklevel=2)
            self._rope = None  # once
        mask = self._mask(self.slot_pos, query_pos, buf.ancestor_mask)
        hidden = self.runner.hidden(tokens, self.cache, query_pos, mask)  # [B, N, H]
        logits = self.runner.logits(hidden)  # [B, N, V]
        # Sequence b accepts nodes up to depth remaining[b] - 1 only: the paths its batch-1 tree
        # (cut to its own budget) offers, so it picks what that tree would.
        paths = [self._accept(buf, tokens[b], logits[b], remaining[b] - 1) for b in range(tokens.shape[0])]
        self._keep_paths(paths, buf)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        last = torch.stack([p[-1] for p in paths])
        self._set_last(hidden[rows, last], logits[rows, last])
        return [tokens[b, p].tolist() for b, p in enumerate(paths)]


@torch.no_grad()
def medusa_generate_batch(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    tree: list[list[int]] | None = None,
    *,
    acceptance: Acceptance = "greedy",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    temperature: float = 0.0,
    seed: int | Sequence[int] | None = None,
    eos_token_id: int | list[int] | None = None,
) -> list[GenerationResult]:
    """``medusa_generate`` for several prompts at once: one verification forward per step for all.

    prompts: token id tensors of shape [T] or [1, T] (lengths may differ). Returns one
    ``GenerationResult`` per prompt, in order: its sequence [1, T + new], and its own steps and
    tokens per step; ``wall_time_s`` is the whole batch's (shared). Options as ``medusa_generate``,
    except ``seed`` (typical acceptance): an int gives prompt b the seed ``seed + b``, a list one
    seed per prompt; prompt b then decodes what ``medusa_generate`` with its seed decodes.
    """
    if isinstance(prompts, torch.Tensor) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id tensors ([T] or [1, T] each)")
    decoder = BatchedMedusaDecoder(
        model, tree, acceptance=acceptance, posterior_threshold=posterior_threshold,
        posterior_alpha=posterior_alpha, temperature=temperature, seed=seed,
    )
    flat = []
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() not in (1, 2) or (p.dim() == 2 and p.shape[0] != 1):
            raise ValueError(f"prompts[{i}] must be a token id tensor of shape [T] or [1, T], got "
                             f"{list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        check_generation_inputs(decoder.runner, p.reshape(1, -1), max_new_tokens)
        flat.append(p.reshape(-1))
    rope = batch_dependent_rope(decoder.runner.config)
    if rope is not None and len(flat) > 1 and max(p.numel() for p in flat) + max_new_tokens > rope[1]:
        warnings.warn(f"the backbone's rope_type {rope[0]!r} picks its frequencies from the largest position in "
                      f"the batch, and a sequence here can pass {rope[1]} positions: the prompts are decoded one "
                      "at a time, so that each decodes what it decodes alone (their times are not a batch's)",
                      stacklevel=3)  # (the caller's line, past torch.no_grad's wrapper)
        results = [medusa_generate_batch(model, [p], max_new_tokens, tree, acceptance=acceptance,
                                         posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha,
                                         temperature=temperature, seed=None if s is None else [s],
                                         eos_token_id=eos_token_id)[0]
                   for p, s in zip(flat, per_prompt_seeds(seed, len(flat)))]
        # wall_time_s is the whole call's, shared, as a batch's is (callers count it once per call).
        wall = sum(r.stats.wall_time_s for r in results)
        for r in results:
            r.stats.wall_time_s = wall
        return results
    eos = _eos_set(eos_token_id)
    device = decoder.runner.device
    _sync(device)
    start = time.perf_counter()
    decoder.prefill(flat)
    tokens: list[list[int]] = [[] for _ in flat]
    per_step: list[list[int]] = [[] for _ in flat]
    active = list(range(len(flat)))
    while active:
        emitted = decoder.step([max_new_tokens - len(tokens[b]) for b in active])
        still = []
        for row, (b, new) in enumerate(zip(active, emitted)):
            kept, done = _finish(tokens[b], new, eos, max_new_tokens)
            per_step[b].append(len(kept))
            if not done:
                still.append(row)
        if len(still) < len(active):
            active = [active[row] for row in still]
            if active:
                decoder.keep(still)
    _sync(device)
    wall = time.perf_counter() - start
    results = []
    for p, toks, steps in zip(flat, tokens, per_step):
        sequence = torch.cat([p.to(device), torch.tensor(toks, device=device, dtype=p.dtype)])[None]
        results.append(GenerationResult(sequence, p.numel(), DecodeStats(len(toks), len(steps), wall, steps)))
    return results
