"""Fully sharded data parallel (FSDP2) for backbones that do not fit one GPU, kept apart from the model.

``train.fsdp: true`` under ``torchrun``: every decoder layer of the backbone (the classes the
transformers model names in ``_no_split_modules``) becomes one FSDP unit, the Medusa heads another,
and the rest of the MedusaModel (embeddings, final norm, lm_head) the root unit. A frozen teacher copy
(``lm_loss: kl`` without LoRA) is split the same way: its layers are units, the rest joins the root.
Each rank stores 1/world_size of every parameter, of its gradient and of its AdamW state; a layer's full weights exist
only while it runs (all-gathered before, freed after). The fused multi-head loss runs inside the
heads' call (``MedusaHeads.forward(loss=...)``), while the heads and the root (the lm_head) are
gathered, and hands back their full gradients, which FSDP then reduce-scatters. The heads and the
root stay whole from forward to backward (FSDP2 never reshards the root after forward; the heads are
told not to): their backward, which comes right after the loss, would otherwise gather them again.

``train.fsdp_param_dtype`` (bf16) casts every unit's parameters before the gather (FSDP2's
``MixedPrecisionPolicy``): a float32 backbone is gathered, held and computed with in bf16, and its
gradients reduced in float32 onto the float32 shards.

What stays as in the replicated mode (``distributed.py``):
- the step's math: gradients are *summed* over ranks (divide factor 1), because the loop already
  scales each micro-batch's loss by its share of the global target count;
- checkpoints hold full (unsharded) tensors in the same files, gathered on rank 0 one tensor at a
  time (``full_tensors``, ``full_optimizer_state``) and sharded again on load (``copy_full_``,
  ``shard_optimizer_state``), so a run can resume with or without FSDP, on any number of ranks;
- exports read an unsharded copy that rank 0 rebuilds on the CPU (see the loop).

Memory: rank 0 alone reads the backbone into host memory; the other ranks build it on the meta device
and receive their shards from rank 0 (``shard_model``), so the host holds one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from medusa_liger.train import distributed
from medusa_liger.train.config import ConfigError


def _dtensor_class():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state that FSDP shards)."""
    return isinstance(tensor, _dtensor_class())


def decoder_layer_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the backbone's repeated blocks: ``_no_split_modules`` of its transformers models."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def require_processes() -> None:
    """Raise unless this process is one of several under torchrun (FSDP shards over the others)."""
    if not distributed.is_distributed():
        raise ConfigError("train.fsdp needs several processes: launch with torchrun --nproc_per_node N (N > 1)")


def shard_model(model: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> int:
    """Shard ``model`` (a MedusaModel) over all ranks onto ``device``; return the number of decoder
    layers made FSDP units. Call on every rank, before building the optimizer.

    ``param_dtype`` (``train.fsdp_param_dtype``): every unit's parameters are cast to it before they
    are gathered and computed with, and their gradients reduced in float32 onto the shards, which
    keep their own dtype (FSDP2's ``MixedPrecisionPolicy``); None gathers them as they are.

    Rank 0's model holds the real tensors (on the CPU); the other ranks' may be on the meta device
    (``build_tokenizer_and_backbone(on_meta=True)``: no weights read, no host memory). Every rank's
    shards and buffers are then filled from rank 0's (broadcast), so the replicas also start equal
    where initialization is random (LoRA adapters).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    require_processes()
    classes = decoder_layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError("train.fsdp: the backbone names no decoder-layer class (transformers' _no_split_modules), "
                         "so it cannot be split into FSDP units")
    # FSDP2 needs one dtype among each unit's trainable parameters, so the heads (kept in the master
    # dtype, fp32 by default) are a unit of their own rather than part of the root (bf16 embeddings
    # and lm_head when the backbone trains). They stay whole after their forward, like the root: their
    # backward follows at once, and resharded they would be gathered again for it (a second all-gather
    # of every head's projection; the gradients were computed in forward, with the loss).
    units = [*layers, model.heads]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    managed = [(unit, list(unit.parameters())) for unit in units]
    managed.append((model, [p for p in model.parameters() if id(p) not in in_units]))
    for unit, params in managed:
        dtypes = sorted({str(p.dtype) for p in params if p.requires_grad})
        if len(dtypes) > 1:
            raise ValueError(f"train.fsdp: the trainable parameters of {type(unit).__name__} mix dtypes {dtypes}; "
                             "FSDP2 needs one per unit")
    whole = model.state_dict() if distributed.is_main() else {}  # rank 0's tensors, taken before sharding
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    # Gradients reduced in float32 whatever the gather dtype: a bf16 sum over ranks would round each
    # rank's contribution. (With param_dtype None the policy is FSDP's default: no casts.)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=unit is not model.heads, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)  # memory for this rank's shards (and the buffers), filled below
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    distributed.broadcast_from_main(list(model.buffers()))  # non-persistent ones too (rotary tables)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, do not average: the loop's per-micro-batch loss scales already divide by the global
            # count. A plain SUM collective (no pre/post scaling by 1), which gloo runs too.
            setter = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
            setter(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return len(layers)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: call on every rank); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name -> whole tensor on the CPU, on rank 0 (other ranks get {}); every rank must call it,
    with the same names in the same order. One tensor is gathered at a time."""
    out = {}
    for name, tensor in named.items():
        whole = full_tensor(tensor.detach())
        if distributed.is_main():
            out[name] = whole.cpu()
        del whole
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every sharded state gathered whole on the CPU, on rank 0 (None
    elsewhere): the format an unsharded optimizer writes. Every rank must call it."""
    state_dict = optimizer.state_dict()
    gathered: dict[int, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        entry = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                whole = full_tensor(value)
                value = whole.cpu() if distributed.is_main() else None
            entry[key] = value
        gathered[index] = entry
    return {"state": gathered, "param_groups": state_dict["param_groups"]} if distributed.is_main() else None


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same on every rank) laid out as ``like``: this rank's shard when ``like`` is a
    DTensor (taken locally, no communication), else ``whole`` itself."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param <- whole, where ``param`` may be sharded (this rank keeps its shard of ``whole``)."""
    param.copy_(shard_like(whole, param))


def shard_optimizer_state(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An unsharded ``state_dict`` (full tensors) laid out for ``optimizer``, whose parameters may be
    sharded: each state tensor of a parameter's shape becomes this rank's shard of it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in state_dict["state"].items():
        param = params[int(index)]
        state[index] = {key: shard_like(value, param)
                        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape) else value
                        for key, value in entry.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def total_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float (for sharded gradients it is a DTensor)."""
    return float(full_tensor(norm))


def has_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is sharded."""
    return any(is_sharded(t) for t in tensors)


def load_module_(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(tensors, strict=True)`` for whole tensors, where the module's
    parameters may be sharded (each rank keeps its shard)."""
    if not has_sharded(module.parameters()):
        module.load_state_dict(tensors, strict=True)
        return
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"cannot load: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in own.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise ValueError(f"{name}: shape {list(tensors[name].shape)}, expected {list(target.shape)}")
        copy_full_(target, tensors[name])


def heads_checkpoint(model: torch.nn.Module, base_model_name_or_path: str | None):
    """The MedusaModel's ``HeadsCheckpoint`` with whole tensors: as ``checkpoint_of`` in a replicated
    run; gathered on rank 0 (None elsewhere) when sharded, so every rank must call it then."""
    import dataclasses

    from medusa_liger.heads.export import checkpoint_of

    ckpt = checkpoint_of(model, base_model_name_or_path)
    lm_weight = ckpt.lm_head_weight
    if not has_sharded([*ckpt.tensors.values(), lm_weight]):
        return ckpt
    tensors = full_tensors(ckpt.tensors)
    lm = full_tensors({"lm_head": lm_weight})
    if not distributed.is_main():
        return None
    return dataclasses.replace(ckpt, tensors=tensors, lm_head_weight=lm["lm_head"])


def unsharded_copy(cfg, model: torch.nn.Module, trained: dict[str, torch.Tensor], examples=None):
    """A plain CPU copy of the sharded MedusaModel ``model`` on rank 0 (None elsewhere), for exports:
    the backbone and heads built again from ``cfg`` as at the start, then the ``trained`` parameters
    (name -> possibly sharded tensor, gathered here: every rank must call this) copied in, and the
    model's current config (mode, lambda). Frozen parameters come from the same files as before."""
    import copy

    from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone

    whole = full_tensors(trained)
    if not distributed.is_main():
        return None
    # At the commit the run's backbone was read at (its default branch may have moved on since the start).
    commit = getattr(model.backbone.config, "_commit_hash", None)
    _, backbone = build_tokenizer_and_backbone(cfg, examples, commit=commit)
    plain = build_medusa(cfg, backbone, teacher=False)  # exports need no teacher
    named = dict(plain.named_parameters())
    with torch.no_grad():
        for name, tensor in whole.items():
            named[name].copy_(tensor)
    plain.config = copy.deepcopy(model.config)
    return plain.eval()
