"""Shared helpers for the kernels: backend dispatch, block sizes and input checks.

Every op in this package has two implementations of the same math:

* a Triton kernel, used for CUDA tensors, and for CPU tensors when the Triton interpreter is on
  (``TRITON_INTERPRET=1`` set before Triton is imported; that is how CI tests the kernels);
* a plain PyTorch version, used for CPU tensors otherwise, so a CPU user gets a working library.

``use_triton(tensor)`` makes that choice in one place; ``force_backend`` overrides it (tests use it
to run model-level checks through the fast PyTorch path, or to compare the two paths).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

Backend = Literal["triton", "torch"]
_forced_backend: Backend | None = None


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def first_order_only(op: str):
    """Decorator for the ``backward`` of an autograd Function whose gradients are no differentiable
    function of its inputs (written by a kernel, or computed in forward): a backward pass with
    ``create_graph=True`` (a gradient penalty, a Hessian-vector product) raises, naming ``op``.

    ``@once_differentiable`` defers its error to when something differentiates through the gradients,
    and only marks them when an incoming gradient requires grad. A loss's incoming gradient (1) does
    not, so they came back as constants: a penalty with a differentiable part beside them silently lost
    the op's second-order terms. Refusing ``create_graph`` outright is the one check that holds for
    ``torch.autograd.grad`` with ``inputs`` too, where a deferred error's node is never run.
    (Inside a function compiled by ``torch.compile``, Dynamo traces the backward with grad mode off, so
    the check is not in the graph: ``aot_eager`` and ``inductor`` refuse double backward themselves,
    without naming the op; the ``eager`` backend does not refuse it.)
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if torch.is_grad_enabled():  # the engine runs backward under grad mode only for create_graph
                raise RuntimeError(f"{op} has no second derivative (its backward is a fused kernel), so a "
                                   "backward pass with create_graph=True cannot go through it; for higher-order "
                                   "gradients use plain PyTorch ops (an unpatched model)")
            return backward(ctx, *grad_outputs)

        return wrapper

    return decorate


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is absent on macOS/Windows CPU wheels)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` should run its Triton kernel (else the PyTorch version). Float64
    runs the PyTorch version unless forced: the kernels compute in fp32."""
    if _forced_backend is not None:
        return _forced_backend == "triton"
    if tensor.dtype == torch.float64:
        return False
    if tensor.is_cuda:  # (a CUDA torch without triton, e.g. on Windows: the PyTorch path)
        return triton_available()
    return tensor.device.type == "cpu" and triton_interpreter_enabled() and triton_available()


@contextlib.contextmanager
def force_backend(backend: Backend | None) -> Iterator[None]:
    """Run every op inside the block on ``backend`` ("triton" or "torch"); ``None`` restores auto."""
    global _forced_backend
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend 'triton' needs the triton package, which is not installed (it is a "
                         "dependency on Linux only); use 'torch' or None")
    previous, _forced_backend = _forced_backend, backend
    try:
        yield
    finally:
        _forced_backend = previous


# The interpreter's stand-in for a GPU's multiprocessor count: small, so CPU tests run the striding
# loops of persistent kernels.
CPU_MULTIPROCESSORS = 4


def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor (SM) count, the grid of a persistent kernel; CPU_MULTIPROCESSORS on
    the CPU (the Triton interpreter)."""
    if device.type != "cuda":
        return CPU_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def row_block_size(n_cols: int, max_block: int = 65536) -> int:
    """Block width for a kernel that holds one whole row of ``n_cols`` elements in registers."""
    block = next_power_of_2(n_cols)
    if block > max_block:
        raise ValueError(f"rows of {n_cols} elements exceed the largest supported block ({max_block})")
    return block


def num_warps_for(block: int) -> int:
    """A reasonable warp count for a row kernel with a block of ``block`` elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError unless ``tensor`` is a floating-point tensor of a supported dtype."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the argument whose device differs from the first one's."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise ValueError unless ``tensor`` is a tensor whose shape matches ``expected`` (None: any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(shape)}")


def check_labels(
    name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int, *, check_values: bool
) -> None:
    """Validate integer labels: dtype always; the range [0, vocab_size) only when ``check_values``.

    The value check reads the tensor on the host, so callers run it for CPU tensors only; on GPU
    the kernels treat an out-of-range label as an ignored row instead (no host sync, never an
    out-of-bounds read).
    """
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor (token ids), got {labels.dtype}")
    if check_values and labels.numel() > 0:
        wide = labels.long()  # compared in int64: int16/int8/uint8 would wrap vocab_size (40000 as int16 < 0)
        valid = wide != ignore_index
        bad = valid & ((wide < 0) | (wide >= vocab_size))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"{name} holds {value}, outside [0, {vocab_size}) and not ignore_index={ignore_index}"
            )
