"""The device names every command and config accepts (``cpu``, ``cuda``, ``cuda:N``; ``auto`` where
the caller allows it), checked against this machine before any model loads: torch itself would fail
only at the first transfer, with a traceback. The name check imports no torch (the config runs it
before torch loads)."""

from __future__ import annotations

import re

DEVICE_NAME = re.compile(r"cpu|cuda(?::\d+)?")


def is_device_name(text: object, *, allow_auto: bool = False) -> bool:
    """Whether ``text`` names a device this module accepts (availability is ``parse_device``'s check)."""
    return isinstance(text, str) and ((allow_auto and text == "auto") or DEVICE_NAME.fullmatch(text) is not None)


def parse_device(text: str, *, allow_auto: bool = False):
    """``text`` as a torch.device; ``auto`` (when allowed) is CUDA when available, else CPU.

    ValueError for any other name, for CUDA on a machine without it, and for ``cuda:N`` past the last
    CUDA device; the messages start with "got <text>" or "must be", for the caller to prefix with its flag
    or config key.
    """
    import torch

    if not is_device_name(text, allow_auto=allow_auto):
        names = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
        raise ValueError(f"must be {names}, got {text!r}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            alternatives = "cpu or auto" if allow_auto else "cpu"
            raise ValueError(f"got {text!r}, but CUDA is not available on this machine: use {alternatives}")
        if device.index is not None and device.index >= count:
            raise ValueError(f"got {text!r}, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return device
