"""The controls of ``benchmarks/sanitize_kernels.sh``: Triton kernels with a planted memory bug.

``--overrun N`` loads N elements of a 1000-element fp32 tensor without a mask (the bug of a kernel that
forgets its last block's mask). compute-sanitizer's memcheck must report it for a clean run of the kernel
tests to mean anything. With PyTorch's caching allocator off, memcheck knows each tensor's own size (here
4,000 bytes, not PyTorch's rounded 4,096): on the H200 (run 173) it reported a read 1 byte past the end.
``--unwritten`` reads a tensor no one wrote (``torch.empty``): initcheck must report it.

Two writers initcheck may not see, to tell its reports apart (run 180): ``--tma-written`` reads a tensor
that a Triton kernel wrote whole through a TMA descriptor (as the exp-operand GEMM writes E), and
``--cublas-written`` casts a float32 GEMM product of cuBLAS to bf16 (as the weight-gradient accumulator is
cast). A report for either is the tool's blind spot, not unwritten memory. Run 180: initcheck reports the
TMA-written tensor (16-byte reads of it, all ones). Run 182: it reports every 16-byte read of the cuBLAS
product (262,144 at 1024 x 1024; at 4096 x 4096 it did not finish within the call).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _read_without_mask(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets))  # no mask (with --overrun, BLOCK > x.numel())


@triton.jit
def _tma_fill(y_desc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    y_desc.store([tl.program_id(0) * BLOCK_M, 0], tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32).to(y_desc.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bug = parser.add_mutually_exclusive_group(required=True)
    bug.add_argument("--overrun", type=int, help="elements read of 1000: a power of 2 > 1000")
    bug.add_argument("--unwritten", action="store_true", help="read 1024 elements of an unwritten tensor")
    bug.add_argument("--tma-written", action="store_true", help="read a tensor written through a TMA descriptor")
    bug.add_argument("--cublas-written", action="store_true", help="cast cuBLAS's float32 product to bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sanitize_probe.py needs a CUDA device")
    if args.tma_written:
        from triton.tools.tensor_descriptor import TensorDescriptor

        y = torch.empty(64, 64, device="cuda", dtype=torch.bfloat16)
        _tma_fill[(2,)](TensorDescriptor.from_tensor(y, [32, 64]), BLOCK_M=32, BLOCK_N=64)
        out = torch.empty(y.numel(), device="cuda", dtype=torch.bfloat16)
        _read_without_mask[(1,)](y, out, BLOCK=y.numel())
        torch.cuda.synchronize()
        print(f"read a tensor written through TMA: all ones {bool((out == 1).all())}")
        return
    if args.cublas_written:
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        product = torch.mm(a, a, out_dtype=torch.float32)
        print(f"cast cuBLAS's float32 product: finite {bool(product.to(torch.bfloat16).isfinite().all())}")
        return
    n = 1024 if args.unwritten else args.overrun
    x = torch.empty(n, device="cuda") if args.unwritten else torch.ones(1000, device="cuda")
    out = torch.empty(n, device="cuda")
    _read_without_mask[(1,)](x, out, BLOCK=n)
    torch.cuda.synchronize()
    print("read an unwritten tensor" if args.unwritten else f"read {n} elements of a 1000-element tensor")


if __name__ == "__main__":
    main()
