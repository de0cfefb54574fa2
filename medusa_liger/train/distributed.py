"""Data-parallel training across processes launched by ``torchrun``, kept apart from the model.

Launch (one process per GPU; on a machine without CUDA the processes train on the CPU over gloo)::

    torchrun --nproc_per_node 8 -m medusa_liger train configs/llama3-8b-medusa1.yaml
    torchrun --nproc_per_node 8 $(which medusa-liger) train configs/llama3-8b-medusa1.yaml

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``setup`` reads them and joins the process group (NCCL on CUDA, each process on
``cuda:LOCAL_RANK``; gloo on CPU). Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is
initialized and every helper here is the identity, so a single-process run is unchanged.

How the step stays exact (no ``DistributedDataParallel`` wrapper, so the model is untouched and
frozen backbone parameters never enter a collective): every rank reads its own rows of each
global micro-batch (``PackedLoader(rank=, world_size=)``), the per-term target counts ``N_j`` are
summed over ranks so every rank scales its micro-batch losses by ``n_j / N_j`` of the *global*
count, and after the backward passes the gradients of the trainable parameters are summed
(``all_reduce_grads``). The summed gradient is then that of one forward over all ranks' rows, so
clipping, AdamW and the schedule see what a single process with ``grad_accum x world_size``
micro-batches would see, and the replicas stay identical without broadcasting weights.

Optimizer memory (``train.shard_optimizer``, ZeRO stage 1): AdamW's two moments are twice the
trainable parameters (for five 128k-vocabulary heads on an 8B model, 2.7 B fp32 parameters: 22 GB
of state). Sharded, each rank updates only the tensors it owns and broadcasts them after the step
(``sharded_optimizer``), so each rank holds about 1/world_size of that state, for one broadcast of
the trainable parameters per step. The updates are the same as unsharded.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 alone exports (an 8B backbone takes minutes) while the others wait in a barrier.
TIMEOUT = timedelta(minutes=60)
# Gradients are summed in flat buckets of at most this many elements (one collective per bucket).
BUCKET_NUMEL = 32 * 1024 * 1024
# torch.distributed modules this package uses once the group exists (ZeRO-1, FSDP2, DTensor, DCP).
# Some define functions with ``group=dist.group.WORLD`` as a default argument: imported after
# ``init_process_group`` they keep the live group forever, so ``destroy_process_group`` cannot free
# it and gloo's worker threads outlive the interpreter (a worker that drops its last tensor during
# shutdown then aborts the process: SIGABRT, "terminate called without an active exception", after a
# run that finished). Imported before the group exists, those defaults are ``None``.
DISTRIBUTED_MODULES = ("torch.distributed.optim", "torch.distributed.fsdp", "torch.distributed.tensor",
                       "torch.distributed.device_mesh", "torch.distributed.checkpoint.state_dict")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it; 1 when unset (a plain single-process run)."""
    return _env_int("WORLD_SIZE", 1)


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes training together (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process logs, writes checkpoints and exports (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (CPU tensors travel via the process group's device) and return it."""
    if not is_distributed():
        return tensor
    # NCCL reduces only CUDA tensors: move there and back when the group runs on the GPU.
    device = _collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved)
    return tensor


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (e.g. randomly initialized LoRA adapters)."""
    if not is_distributed():
        return
    device = _collective_device()
    with torch.no_grad():
        for tensor in tensors:
            moved = tensor.detach().to(device)
            dist.broadcast(moved, src=0)
            if moved is not tensor:
                tensor.copy_(moved)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_grads(params: Iterable[torch.nn.Parameter], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Sum the ``.grad`` of ``params`` over ranks, in flat buckets per (device, dtype).

    Parameters without a gradient are skipped: every rank runs the same code on the same model
    stage, so the set of parameters holding a gradient is the same on every rank.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in grads + [None]:  # None flushes the last bucket
            if grad is not None and (size + grad.numel() <= bucket_numel or not bucket):
                bucket.append(grad)
                size += grad.numel()
                continue
            if bucket:
                # One collective for many small tensors: flatten, reduce, copy back.
                flat = torch.cat([g.reshape(-1) for g in bucket])
                all_reduce_sum(flat)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            bucket, size = ([grad], grad.numel()) if grad is not None else ([], 0)


def sharded_optimizer(param_groups: list[dict[str, Any]], optimizer_class: type[torch.optim.Optimizer],
                      **defaults: Any) -> torch.optim.Optimizer:
    """``optimizer_class`` whose state is split over the ranks (ZeRO stage 1).

    Each rank owns whole tensors, about 1/world_size of the parameters by size; ``step()`` updates
    the owned tensors from the (already summed) gradients and broadcasts them, so every replica
    ends the step with the same parameters as with an unsharded optimizer, bit for bit (AdamW's
    update is elementwise). The param groups and their extra keys (name, kind) are kept, so LR
    schedules work unchanged. Checkpoints: call ``consolidate_optimizer`` on every rank, then rank 0's
    ``state_dict()`` is the unsharded optimizer's, and ``load_state_dict`` of such a dict works on
    every rank, sharded or not (checkpoints move between the two settings).
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, **defaults)


def consolidate_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Gather a sharded optimizer's state on rank 0 (every rank must call it); no-op otherwise."""
    consolidate = getattr(optimizer, "consolidate_state_dict", None)
    if consolidate is not None and is_distributed():
        consolidate(to=0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def training_device(device: torch.device) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA run of several processes."""
    if env_world_size() <= 1 or device.type != "cuda":
        return device
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.index is not None and device.index != local_rank:
        raise ValueError(f"train.device must be 'auto' or 'cuda' under torchrun (each rank uses cuda:LOCAL_RANK), "
                         f"got {str(device)!r}")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def setup(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun process group for the duration of the block; yield this rank's device.

    Without ``WORLD_SIZE`` > 1 this yields ``device`` unchanged and initializes nothing. A group
    that already exists (made by the caller) is used as is and left open; one made here is
    destroyed on exit.
    """
    if env_world_size() <= 1 and not is_distributed():
        yield device
        return
    device = training_device(device)
    created = False
    if not dist.is_initialized():
        for module in DISTRIBUTED_MODULES:  # before the group exists (see DISTRIBUTED_MODULES)
            with contextlib.suppress(ImportError):  # one a torch lacks fails later only where used
                importlib.import_module(module)
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {name} is not: launch with torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        created = True
    try:
        yield device
    finally:
        if created:
            _release_group_references()
            dist.destroy_process_group()


def _release_group_references() -> None:
    """Drop what would keep the process group alive after ``destroy_process_group`` (see
    ``DISTRIBUTED_MODULES`` for why gloo's threads must not outlive the interpreter).

    Two kinds of holders are left once the run's objects are gone. The finished run's reference
    cycles (FSDP2's modules, states and parameter groups hold the group directly): collected here.
    And device meshes that outlive the run: torch.distributed's caches key on them (DTensor's
    sharding propagation in Python and C++, its redistribution planners, mesh topology), and torch
    2.11's C++ OpSchema post-init leaks a reference to the strategies of every schema built during
    sharding propagation (FSDP2's first ``detach`` of a sharded parameter builds one), whose specs hold
    a mesh that nothing can release. A mesh holds its groups in ``_pg_registry`` (torch 2.11-2.13);
    emptying it lets the group go, whatever still holds the mesh. Nothing runs on a mesh after this."""
    gc.collect()
    mesh_type = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    for obj in gc.get_objects() if mesh_type is not None else ():
        if issubclass(type(obj), mesh_type) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling caches: tokenizer, packed data), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
