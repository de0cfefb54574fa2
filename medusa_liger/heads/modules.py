"""The Medusa heads: K stacks of residual blocks, each followed by a vocabulary projection.

Head k (0-based) maps the backbone's last hidden state h [B, T, H] to logits for the token k + 2
positions ahead:

    z_0 = h
    z_{l+1} = z_l + silu(W_{k,l} z_l + b_{k,l})          l = 0 .. num_layers - 1
    logits_k = z_L @ P_k^T                                P_k: [V, H]

``W`` and ``b`` start at zero, so at step 0 every block is the identity and, with ``P_k`` a copy of
the backbone's lm_head, every head predicts exactly what the backbone predicts. With
``shared_lm_head`` there is no ``P_k``: every head uses the backbone's own lm_head weight, which
the caller passes in (it is not registered here, so the heads' state dict never duplicates it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """y = x + silu(linear(x)), ``linear`` an [H, H] layer with bias, zero-initialized."""

    def __init__(self, hidden_size: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)
        # Zero weight AND bias: silu(0) = 0, so the block starts as the identity.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] -> [..., H]."""
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K Medusa heads: ``blocks[h][l]`` are ``ResBlock``s, ``lm_heads[h]`` Linear(H, V, bias=False).

    ``lm_heads`` is an empty ModuleList when ``shared_lm_head`` is True.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int,
        shared_lm_head: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``num_heads`` heads of ``num_layers`` ResBlocks (H = ``hidden_size``) each, and per head a
        Linear(H, V = ``vocab_size``) unless ``shared_lm_head`` (the backbone's lm_head serves every head)."""
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("vocab_size", vocab_size),
                            ("num_heads", num_heads), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # (True is an int: 1 head)
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(shared_lm_head, bool):  # ("yes" was taken for True)
            raise ValueError(f"shared_lm_head must be a bool, got {shared_lm_head!r}")
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.shared_lm_head = shared_lm_head
        self.blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(hidden_size, device=device, dtype=dtype) for _ in range(num_layers))
            for _ in range(num_heads)
        )
        self.lm_heads = nn.ModuleList(
            []
            if shared_lm_head
            else [nn.Linear(hidden_size, vocab_size, bias=False, device=device, dtype=dtype) for _ in range(num_heads)]
        )

    @torch.no_grad()
    def init_lm_heads_from(self, weight: torch.Tensor) -> None:
        """Per-head mode: set every projection to a copy of ``weight`` [V, H] (the backbone's lm_head)."""
        if self.shared_lm_head:
            return
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"lm_head weight must have shape [{self.vocab_size}, {self.hidden_size}], got {list(weight.shape)}"
            )
        for head in self.lm_heads:
            head.weight.copy_(weight)

    def forward(self, hidden_states: torch.Tensor, loss: Callable[[torch.Tensor], Any] | None = None):
        """hidden_states [B, T, H] -> K tensors [B, T, H]: each head's input to its projection.

        With ``loss``, returns ``loss(hidden_states)`` instead, computed inside this call, so that a
        wrapper of the heads (FSDP) has their parameters gathered while it runs. Have ``loss`` return
        tensors (or tuples of them): FSDP2 hooks its backward (gradient reduction) on the outputs it
        can flatten.
        """
        if loss is not None:
            return loss(hidden_states)
        return [self.head_input(k, hidden_states) for k in range(self.num_heads)]

    def head_input(self, k: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Head k's residual blocks: [B, T, H] -> its input to its projection [B, T, H]."""
        # The heads may be kept in another dtype than the backbone (e.g. fp32 heads on a bf16 model).
        z = hidden_states.to(self.blocks[k][0].linear.weight.dtype)
        for block in self.blocks[k]:
            z = block(z)
        return z

    def projection_weights(self, shared_weight: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The K [V, H] projection weights: the per-head ones, or ``shared_weight`` K times."""
        if self.shared_lm_head:
            if shared_weight is None:
                raise ValueError("shared_weight (the backbone's lm_head weight) is required in shared mode")
            return [shared_weight] * self.num_heads
        return [head.weight for head in self.lm_heads]

    def logits(
        self,
        hidden_states: torch.Tensor,
        shared_weight: torch.Tensor | None = None,
        shared_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, H] -> logits [K, B, T, V] (materialized: for inference and tests)."""
        weights = self.projection_weights(shared_weight)
        bias = shared_bias if self.shared_lm_head else None
        logits = []
        for z, w in zip(self.forward(hidden_states), weights):
            logits.append(F.linear(z, w.to(z.dtype), None if bias is None else bias.to(z.dtype)))
        return torch.stack(logits)
