"""The control of ``benchmarks/sanitize_kernels.sh``: a Triton kernel that reads past a tensor's end.

``--overrun N`` loads N elements of a 1000-element fp32 tensor without a mask (the bug of a kernel that
forgets its last block's mask). compute-sanitizer's memcheck must report it for a clean run of the kernel
tests to mean anything. With PyTorch's caching allocator off, memcheck knows each tensor's own size (here
4,000 bytes, not PyTorch's rounded 4,096): on the H200 (run 173) it reported a read 1 byte past the end.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _read_without_mask(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets))  # no mask: BLOCK > x.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overrun", type=int, required=True, help="elements read: a power of 2 > 1000")
    args = parser.parse_args()
    x = torch.ones(1000, device="cuda")
    out = torch.empty(args.overrun, device="cuda")
    _read_without_mask[(1,)](x, out, BLOCK=args.overrun)
    torch.cuda.synchronize()
    print(f"read {args.overrun} elements of a 1000-element tensor")


if __name__ == "__main__":
    main()
