"""Medusa tree decoding (greedy = lossless, or typical acceptance) and the plain greedy reference.

One Medusa step, with ``x_1..x_n`` decoded so far (their keys/values cached), the backbone's logits
``l`` for the next token and the heads' logits ``m_k`` (all from the hidden state of ``x_n``):

1. root = argmax(l) (or a sample at ``temperature``); node ``[r_1..r_d]`` of the tree gets head
   ``d-1``'s rank-``r_d`` token of ``m_{d-1}`` (see ``tree.py``).
2. ONE backbone forward over the N tree nodes at positions ``n + depth``, attending to the cache
   and to their own ancestors only (a 4-D additive mask), gives logits ``L_i`` at every node.
3. Along every root-to-leaf path, node ``c`` (child of ``p``) is accepted while its parent was and
   * greedy:  ``token(c) == argmax L_p`` (then the accepted tokens are exactly what plain greedy
     decoding would produce: the decoding is lossless);
   * typical: ``softmax(L_p / T)[token(c)] > min(epsilon, alpha * exp(-H(softmax(L_p / T))))``
     (the Medusa paper's typical acceptance; epsilon = ``posterior_threshold``).
   The longest accepted path wins (typical: ties go to the highest log-probability); its
   ``1 + a`` tokens (root included) are emitted.
4. The cache holds the N tree nodes in node order after the ``n`` old tokens: the accepted nodes'
   keys/values are gathered into slots ``n .. n + a`` and the rest is cropped. The last accepted
   node's logits and hidden state give ``l`` and ``m_k`` for the next step.

Acceleration rate = new tokens / steps (plain greedy decoding: 1 by construction).
Batch size 1 only (each sequence would accept a different number of tokens). Attention must be
``eager`` or ``sdpa`` (the implementations that take a custom 4-D mask); backbones whose layers mix
sliding-window and full attention are not supported (a uniform sliding window is).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from medusa_liger.inference.backbone import BackboneRunner, check_generation_inputs
from medusa_liger.inference.tree import (
    TreeBuffers,
    build_tree_buffers,
    check_ranks_fit,
    default_tree,
    normalize_tree,
    truncate_tree,
)
from medusa_liger.numeric import is_real
from medusa_liger.seeds import torch_seed

Acceptance = Literal["greedy", "typical"]
MASK_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class DecodeStats:
    """Statistics of one decoding run: ``tokens_per_step[i]`` tokens were emitted by step i."""

    new_tokens: int
    steps: int
    wall_time_s: float
    tokens_per_step: list[int] = field(default_factory=list)

    @property
    def acceleration_rate(self) -> float:
        """Mean tokens emitted per decoding step. A step emits one token in plain greedy decoding, and
        the root plus its accepted path in Medusa decoding, where each step runs one verification
        forward (except a last step with a single token left, which emits the pending root alone)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "acceleration_rate": self.acceleration_rate,
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_step": list(self.tokens_per_step),
        }


@dataclass
class GenerationResult:
    """sequences: [1, T + new] prompt followed by the generated tokens; stats: see DecodeStats."""

    sequences: torch.Tensor
    prompt_length: int
    stats: DecodeStats

    @property
    def new_tokens(self) -> torch.Tensor:
        """[new] the generated tokens."""
        return self.sequences[0, self.prompt_length :]


@dataclass
class MedusaGenerateOutput(GenerationResult):
    """A Medusa run, plus the plain greedy run of the same backbone when ``compare_greedy`` was set."""

    greedy: GenerationResult | None = None

    @property
    def speedup(self) -> float | None:
        """Greedy wall time / Medusa wall time (None without the greedy run)."""
        if self.greedy is None:
            return None
        return self.greedy.stats.wall_time_s / max(self.stats.wall_time_s, 1e-12)

    @property
    def matches_greedy(self) -> bool | None:
        """Whether the Medusa tokens equal the greedy tokens (None without the greedy run)."""
        if self.greedy is None:
            return None
        return torch.equal(self.sequences.cpu(), self.greedy.sequences.cpu())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):  # (a 0-d tensor is not iterable)
        eos_token_id = eos_token_id.flatten().tolist()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def _finish(tokens: list[int], emitted: list[int], eos: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Append ``emitted`` to ``tokens`` up to the first EOS or the budget; returns (kept, done)."""
    kept = []
    for tok in emitted:
        if len(tokens) + len(kept) >= max_new_tokens:
            break
        kept.append(tok)
        if tok in eos:
            break
    tokens.extend(kept)
    done = len(tokens) >= max_new_tokens or (bool(kept) and kept[-1] in eos)
    return kept, done


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | list[int] | None = None) -> GenerationResult:
    """Plain greedy decoding of the backbone (a MedusaModel's, or a causal LM): one token per forward.

    input_ids [1, T] -> GenerationResult with sequences [1, T + new] (new <= max_new_tokens; stops
    after an EOS token). The reference Medusa greedy decoding must reproduce token for token.
    """
    runner = BackboneRunner(model)
    T = check_generation_inputs(runner, input_ids, max_new_tokens)
    eos = _eos_set(eos_token_id)
    device = runner.device
    input_ids = input_ids.to(device)
    _sync(device)
    start = time.perf_counter()
    cache = runner.new_cache()
    positions = torch.arange(T, device=device)[None]
    hidden = runner.hidden(input_ids, cache, positions)
    tokens: list[int] = []
    while True:
        next_id = runner.logits(hidden[0, -1]).argmax().view(1, 1)  # stays on the device
        _, done = _finish(tokens, [int(next_id)], eos, max_new_tokens)
        if done:
            break
        position = torch.tensor([[T + len(tokens) - 1]], device=device)
        hidden = runner.hidden(next_id, cache, position)
    _sync(device)
    wall = time.perf_counter() - start
    sequences = torch.cat([input_ids, torch.tensor([tokens], device=device, dtype=input_ids.dtype)], dim=1)
    return GenerationResult(sequences, T, DecodeStats(len(tokens), len(tokens), wall, [1] * len(tokens)))


# ---------------------------------------------------------------------------------------------
# Medusa decoding
# ---------------------------------------------------------------------------------------------


MIN_TEMPERATURE = 1e-6  # the smallest sampling temperature taken; 0 is greedy


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` in torch's range (``seeds.torch_seed``), so any
    integer seed works, ``seed + i`` for prompt i included."""
    return torch.Generator(device=device).manual_seed(torch_seed(seed))


def check_acceptance(acceptance: str, temperature: float, posterior_threshold: float, posterior_alpha: float) -> None:
    """ValueError naming the first bad acceptance option (see ``medusa_generate``)."""
    if acceptance not in ("greedy", "typical"):
        raise ValueError(f"acceptance must be 'greedy' or 'typical', got {acceptance!r}")
    if not (is_real(temperature) and math.isfinite(temperature)
            and (temperature == 0 or temperature >= MIN_TEMPERATURE)):
        # (below it, logits / T overflows float32: the probabilities came out NaN)
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature!r}")
    if not (is_real(posterior_threshold) and 0 < posterior_threshold <= 1):
        raise ValueError(f"posterior_threshold (epsilon) must be in (0, 1], got {posterior_threshold!r}")
    if not (is_real(posterior_alpha) and posterior_alpha > 0 and math.isfinite(posterior_alpha)):
        raise ValueError(f"posterior_alpha must be a finite number > 0, got {posterior_alpha!r}")


class MedusaDecoder:
    """Step-by-step Medusa decoding of one sequence: ``prefill(prompt)``, then ``step()`` repeatedly.

    State between steps: ``cache`` (keys/values of every emitted token except the pending root),
    ``past_length`` (its length) and the backbone/head logits of the last emitted token.
    """

    def __init__(
        self,
        model: nn.Module,
        tree: list[list[int]] | None = None,
        *,
        acceptance: Acceptance = "greedy",
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.runner = BackboneRunner(model)
        if self.runner.medusa is None:
            raise ValueError(f"model must be a MedusaModel (with .backbone and .heads), got {type(model).__name__}")
        attn = getattr(self.runner.config, "_attn_implementation", None)
        if attn not in MASK_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"the backbone's attention implementation is {attn!r}, which does not take the custom 4-D tree "
                f"mask; load it with attn_implementation in {MASK_ATTENTION_IMPLEMENTATIONS}"
            )
        check_acceptance(acceptance, temperature, posterior_threshold, posterior_alpha)
        if acceptance == "greedy" and temperature != 0:  # it would decode greedily all the same
            raise ValueError(f"temperature={temperature!r} samples only with acceptance='typical'; greedy acceptance "
                             "decodes at temperature 0")
        num_heads = self.runner.num_heads
        # Validates the tree against the number of heads (ValueError naming the missing head), before
        # anything iterates its paths (a flat [0, 1] would be a TypeError there).
        if tree is not None:
            normalize_tree(tree, num_heads)
        self.tree = default_tree(num_heads) if tree is None else [list(p) for p in tree]
        full = build_tree_buffers(self.tree, num_heads)
        check_ranks_fit(self.tree, self.runner.lm_head.weight.shape[0])
        self.max_depth = max((len(p) for p in self.tree), default=0)
        self.uses_heads = self.max_depth > 0
        self._buffers: dict[int, TreeBuffers] = {self.max_depth: full.to(self.runner.device)}
        # temperature 0 makes typical acceptance greedy (as in the Medusa reference implementation).
        self.acceptance = "greedy" if temperature == 0 else acceptance
        self.temperature = float(temperature)
        self.epsilon = float(posterior_threshold)
        self.alpha = float(posterior_alpha)
        self.generator = None
        if seed is not None:
            self.generator = sampling_generator(seed, self.runner.device)
        self.window = self.runner.sliding_window()
        self.cache = None
        self.past_length = 0

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Run the prompt [1, T] through the backbone; the first step's root comes from its last logits."""
        device = self.runner.device
        T = input_ids.shape[1]
        self.cache = self.runner.new_cache()
        hidden = self.runner.hidden(input_ids.to(device), self.cache, torch.arange(T, device=device)[None])
        self.past_length = T
        self._set_last(hidden[0, -1], self.runner.logits(hidden[0, -1]))

    def _set_last(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        self.base_logits = logits  # [V]: the backbone's next-token logits
        # [K, V]: the heads' guesses further ahead; an empty tree (plain greedy) reads none of them.
        self.head_logits = self.runner.head_logits(hidden) if self.uses_heads else None

    def buffers(self, max_depth: int) -> TreeBuffers:
        """The tree cut to ``max_depth`` (so no node lies past the token budget), on the device."""
        depth = min(max_depth, self.max_depth)
        if depth not in self._buffers:
            cut = truncate_tree(self.tree, depth)
            self._buffers[depth] = build_tree_buffers(cut, self.runner.num_heads).to(self.runner.device)
        return self._buffers[depth]

    # ------------------------------------------------------------------ one step
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        # (MIN_TEMPERATURE keeps logits / T finite: below it, it overflowed into NaN probabilities)
        return torch.softmax(logits / self.temperature, dim=-1)

    def _root(self) -> torch.Tensor:
        if self.acceptance == "greedy":
            return self.base_logits.argmax().view(1)
        return torch.multinomial(self._probs(self.base_logits), 1, generator=self.generator)

    def _accept(self, buf: TreeBuffers, tokens: torch.Tensor, logits: torch.Tensor,
                max_depth: int | None = None) -> torch.Tensor:
        """Node indices root..last accepted node of the best root-to-leaf path.

        max_depth: accept no node deeper than this (the tree cut there would offer the same paths).
        """
        retrieve = buf.retrieve_indices  # [P, D + 1], -1 padded
        if retrieve.shape[1] == 1 or max_depth == 0:
            return retrieve[0, :1]
        valid = retrieve[:, 1:] >= 0
        if max_depth is not None:
            # Typical acceptance ranks equally long paths by likelihood: a deeper node the cut tree
            # lacks could make another path win over the nodes that tree would accept.
            valid[:, max_depth:] = False
        child = tokens[retrieve[:, 1:].clamp(min=0)]  # [P, D] candidate tokens after the root
        parent = retrieve[:, :-1].clamp(min=0)  # [P, D] the node whose logits judge them
        if self.acceptance == "greedy":
            ok = child == logits.argmax(-1)[parent]
            score = torch.zeros(child.shape, device=child.device)
        else:
            probs = self._probs(logits)  # [N, V]
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
            threshold = torch.clamp(self.alpha * torch.exp(-entropy), max=self.epsilon)  # [N]
            p_child = probs[parent, child]
            ok = p_child > threshold[parent]
            score = torch.log(p_child.clamp_min(1e-30))
        ok = ok & valid
        accepted = torch.cumprod(ok.long(), dim=1)  # 1 while every node so far was accepted
        length = accepted.sum(1)  # [P]
        # Longest path; among equally long ones the most likely (greedy: they are the same nodes).
        likelihood = (score * accepted).sum(1)
        best_len = length.max()
        best = torch.where(length == best_len, likelihood, torch.full_like(likelihood, -math.inf)).argmax()
        return retrieve[best, : int(best_len) + 1]

    def _keep_path(self, path: torch.Tensor, num_nodes: int) -> None:
        """Move the accepted nodes' keys/values to the slots after the past, crop the other nodes."""
        n, past = path.numel(), self.past_length
        if n > 1:  # the root (node 0) is already in slot ``past``: alone, it needs no move
            src = past + path
            for layer in self.cache.layers:
                # index_select copies, so overlapping source and destination slots are safe.
                layer.keys[..., past : past + n, :] = layer.keys.index_select(-2, src)
                layer.values[..., past : past + n, :] = layer.values.index_select(-2, src)
        if num_nodes > n:
            self.cache.crop(-(num_nodes - n))  # negative: remove that many (same in 5.17 and 5.2x)
        self.past_length = past + n

    @torch.no_grad()
    def step(self, max_tokens: int) -> list[int]:
        """Emit between 1 and ``max_tokens`` tokens with one tree-verification forward.

        With ``max_tokens == 1`` only the root is emitted and no forward runs: use it only as the
        last step (the cache then lacks that token).
        """
        if self.cache is None:
            raise RuntimeError("call prefill(input_ids) before step()")
        root = self._root()
        buf = self.buffers(max_tokens - 1)
        if max_tokens == 1:
            return [int(root)]
        # Candidate tokens: [root, head 0 top-k_0, head 1 top-k_1, ...], gathered into node order.
        flat = [root]
        for k, top in enumerate(buf.top_k):
            if top:
                flat.append(torch.topk(self.head_logits[k], top).indices)
        tokens = torch.cat(flat)[buf.candidate_index]  # [N]
        mask = buf.attention_mask(self.past_length, self.runner.dtype, self.window)
        hidden = self.runner.hidden(tokens[None], self.cache, buf.position_ids(self.past_length), mask)[0]
        logits = self.runner.logits(hidden)  # [N, V]
        path = self._accept(buf, tokens, logits)
        self._keep_path(path, buf.num_nodes)
        last = path[-1]
        self._set_last(hidden[last], logits[last])
        return tokens[path].tolist()


@torch.no_grad()
def medusa_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    tree: list[list[int]] | None = None,
    *,
    acceptance: Acceptance = "greedy",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    compare_greedy: bool = False,
) -> MedusaGenerateOutput:
    """Decode up to ``max_new_tokens`` tokens after ``input_ids`` [1, T] with Medusa tree decoding.

    model: a MedusaModel. tree: ``medusa_choices`` paths (default: ``tree.default_tree(num_heads)``).
    acceptance: "greedy" (lossless: identical to ``greedy_generate``) or "typical" with
    ``posterior_threshold`` (epsilon), ``posterior_alpha`` (delta) and ``temperature`` (typical at
    temperature 0 is greedy), sampled from ``seed``. Stops after ``eos_token_id``.
    compare_greedy: also run ``greedy_generate`` and attach it (``.greedy``, ``.speedup``,
    ``.matches_greedy``). Batch size 1 only (ValueError otherwise).
    """
    decoder = MedusaDecoder(
        model, tree, acceptance=acceptance, posterior_threshold=posterior_threshold,
        posterior_alpha=posterior_alpha, temperature=temperature, seed=seed,
    )
    T = check_generation_inputs(decoder.runner, input_ids, max_new_tokens)
    eos = _eos_set(eos_token_id)
    device = decoder.runner.device
    input_ids = input_ids.to(device)
    _sync(device)
    start = time.perf_counter()
    decoder.prefill(input_ids)
    tokens: list[int] = []
    per_step: list[int] = []
    done = False
    while not done:
        kept, done = _finish(tokens, decoder.step(max_new_tokens - len(tokens)), eos, max_new_tokens)
        per_step.append(len(kept))
    _sync(device)
    wall = time.perf_counter() - start
    sequences = torch.cat([input_ids, torch.tensor([tokens], device=device, dtype=input_ids.dtype)], dim=1)
    stats = DecodeStats(len(tokens), len(per_step), wall, per_step)
    greedy = greedy_generate(model, input_ids, max_new_tokens, eos_token_id) if compare_greedy else None
    return MedusaGenerateOutput(sequences, T, stats, greedy)
