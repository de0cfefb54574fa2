"""A side CUDA stream for the memory-bound row kernel, so it runs under the compute-bound GEMMs.

The fused loss's chunk loop alternates cuBLAS GEMMs (compute-bound) with the cross-entropy row
kernel (memory-bound: it reads a logit chunk twice and writes it once). On one stream their times
add up. Split a chunk into sub-chunks and queue sub-chunk j's row kernel on a side stream, and the
main stream meanwhile runs the next sub-chunk's logits GEMM or the previous one's hidden-gradient
GEMM:

    main:  Z0=h0 W^T   Z1=h1 W^T   [wait R0] dh0=Z0 W   [wait R1] dh1=Z1 W   dW+=Z^T h
    side:              R0(Z0)                R1(Z1)

Ordering is by CUDA events only (no host synchronization), so the pattern also records into a CUDA
graph (the side stream forks from and joins the capturing stream). The caching allocator stays
safe because every tensor the side stream touches is freed on the main stream after the main
stream has waited for that work. On CPU, or with ``enabled=False``, work runs in place, in order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # One side stream per device, taken once from PyTorch's stream pool and kept.
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


class SideStream:
    """Queue work on a side stream after everything queued so far on the current stream."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.active = enabled and device.type == "cuda"
        if self.active:
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            self.main = torch.cuda.current_stream(device)
            self.side = _side_stream(device)

    def submit(self, work: Callable[[], None]) -> torch.cuda.Event | None:
        """Run ``work`` (kernel launches) on the side stream; returns the event marking its end."""
        if not self.active:
            work()
            return None
        queued = torch.cuda.Event()
        queued.record(self.main)
        self.side.wait_event(queued)
        with torch.cuda.stream(self.side):
            work()
        done = torch.cuda.Event()
        done.record(self.side)
        return done

    def wait(self, done: torch.cuda.Event | None) -> None:
        """Make the current stream wait for submitted work (the host never waits)."""
        if done is not None:
            self.main.wait_event(done)
