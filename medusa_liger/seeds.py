"""Seeds in torch's range.

``torch.manual_seed`` and ``Generator.manual_seed`` take integers in [-2**63, 2**64) and read a negative
one modulo 2**64; anything larger overflows. Seeds computed from a user's seed (``seed + rank``,
``seed * 1_000_003 + epoch``) are reduced here the same way, so any integer seed works.
"""

from __future__ import annotations


def torch_seed(value: int) -> int:
    """``value`` modulo 2**64: the seed torch would read for it, for any Python integer."""
    return int(value) % 2**64
