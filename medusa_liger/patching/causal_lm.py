"""Causal-LM forward whose loss never materializes the logits (fused linear cross-entropy).

HF's ``*ForCausalLM.forward`` computes ``logits = lm_head(h)`` ([B, T, V]; 2 GiB in bf16 for one
8k-token row of a 128k vocabulary, plus an fp32 copy for the loss) and then ``ForCausalLMLoss``:

    target[b, t] = labels[b, t + 1]            (labels are unshifted; the last position is ignored)
    loss = sum_{valid (b,t)} CE(h[b, t] @ W.T, target[b, t]) / N
    N    = num_items_in_batch if given (gradient accumulation: "sum" then divide), else #valid

The patched forward keeps the decoder call as is and, when ``labels`` are given in training mode,
computes the same loss through ``multi_head_linear_cross_entropy`` with one head and shift 1 (or
shift 0 on ``shift_labels``, already shifted targets, which HF reads instead of ``labels`` when both
are given), chunk by chunk, and returns ``logits=None``. Without labels, or in eval mode (unless
``FUSE_IN_EVAL``, below), it *is* the original forward, so generation and evaluation see exactly HF's
logits.
``logits_to_keep`` slices the hidden states the loss reads, as it slices the logits in HF; the
labels must then match the kept positions, as HF requires. A custom ``loss_function`` or
``loss_type``, or an lm_head that is not a plain float ``nn.Linear`` (peft-wrapped, quantized) or
carries hooks (forward hooks, accelerate's: a ``device_map`` placement, offloaded or spread over
GPUs), falls back to the original forward.

Memory, deliberately (a training step must peak no higher than with Liger's fused loss): the lm_head
gradient accumulates over chunks in the weight's own dtype (``LOSS_ACCUM_DTYPE = None``), as HF's
unfused backward (one bf16 GEMM output) and Liger's fused loss also produce it in bf16, instead of the
multi-head op's default fp32 [V, H] accumulator (2 GiB at Llama-3's 128256 x 4096); each chunk's
GEMM still sums in fp32 inside cuBLAS and rounds once when added, so a bf16 gradient sees one
rounding per chunk (N / chunk of them). fp32 weights (mixed precision under autocast) accumulate
in fp32 directly in their gradient. The logit chunk is ``LOSS_CHUNK_BYTES`` (128 MiB: 512 rows of a
128k vocabulary in bf16) instead of the op's 1 GiB: the loss runs at the end of the forward, when
every saved activation is alive, so its temporaries add to the step's peak. Both are module
attributes: set ``LOSS_ACCUM_DTYPE = torch.float32`` (or a larger budget) for fp32 accumulation.

``LOSS_SKIP_IGNORED = True`` runs the loss's GEMMs only on positions with a valid target (the op's
``skip_ignored``): supervised fine-tuning data with masked prompts then pays for the answer tokens
only. It costs one host-device sync per forward, so it is off by default and skipped during CUDA
graph capture.

The loss is fused in training mode only (``model.train()``, as Liger does): in eval mode a forward
with labels returns HF's logits beside HF's loss, so an evaluation that reads them (HF Trainer's
``compute_metrics``, a perplexity script's own accuracy) gets them. ``FUSE_IN_EVAL = True`` fuses
there too (no ``[B, T, V]`` logits; ``logits`` is None).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from medusa_liger.patching.modules import kernels

FUSED_ATTR = "_medusa_liger_fused"  # on a fused forward: the original forward it replaces
LOSS_ACCUM_DTYPE: torch.dtype | None = None  # lm_head gradient accumulation: the weight's dtype
LOSS_CHUNK_BYTES = 128 * 2**20  # logit chunk budget of the fused loss (the module docstring says why)
LOSS_SKIP_IGNORED = False  # GEMMs on valid targets only (one host sync per forward; see the docstring)
FUSE_IN_EVAL = False  # eval mode computes HF's logits and loss (see the docstring)


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """HF's ``logits_to_keep`` slicing of hidden states ``[B, T, H]``.

    int k: the last k positions (0 keeps all); 1-D tensor: those positions in every row; 2-D int
    ``[B, n]``: per-row positions; 2-D bool ``[B, T]``: the True positions, flattened to ``[N, H]``.
    """
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """HF ``ForCausalLMLoss`` of ``lm_head(hidden)`` without the logits; returns a scalar.

    hidden: ``[B, T, H]`` (or ``[N, H]`` after a boolean ``logits_to_keep``); labels: ``[B, T]``
    unshifted (``[N]`` for ``[N, H]`` hidden), or ``shift_labels`` already shifted.
    """
    targets, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
    if hidden.dim() == 2:  # flattened kept positions: one row of N tokens
        hidden, targets = hidden.unsqueeze(0), targets.reshape(1, -1)
    name = "labels" if shift_labels is None else "shift_labels"
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{name} must have shape {list(hidden.shape[:2])} (the positions kept by logits_to_keep), "
            f"got {list(targets.shape)}"
        )
    weight = lm_head.weight
    # Model-parallel placements may leave the last hidden state on another device than lm_head.
    hidden = hidden.to(weight.device)
    targets = targets.to(weight.device)
    # HF: "mean" over valid targets, or "sum" / num_items_in_batch under gradient accumulation.
    reduction = "mean" if num_items_in_batch is None else "sum"
    # Chunk rows: LOSS_CHUNK_BYTES of logits in the dtype the GEMMs will run in (plain arithmetic,
    # so a torch.compile'd forward traces it without a break).
    from medusa_liger.kernels.fused_linear_cross_entropy import default_chunk_rows  # imported with the op

    device_type = weight.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else torch.promote_types(hidden.dtype, weight.dtype))
    chunk = default_chunk_rows(weight.shape[0], compute_dtype, budget_bytes=LOSS_CHUNK_BYTES)
    capturing = device_type == "cuda" and torch.cuda.is_current_stream_capturing()
    out = kernels().multi_head_linear_cross_entropy(
        hidden, weight, targets, [shift], bias=lm_head.bias, ignore_index=ignore_index, reduction=reduction,
        accum_dtype=LOSS_ACCUM_DTYPE, chunk_size=chunk, skip_ignored=LOSS_SKIP_IGNORED and not capturing,
    )
    loss = out.loss
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _can_fuse(model: nn.Module) -> bool:
    # A custom loss (model.loss_function = ...) or loss_type, or an lm_head that is not a plain
    # float Linear (peft-wrapped, quantized) or carries hooks, is left to HF's forward, which
    # computes it correctly.
    if "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return False
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return False
    # Hooks on the head (a user's logit transform, a tensor-parallel or ZeRO-3 gather) run only around
    # the head's own forward and backward, which the fused loss skips. (FSDP2's fully_shard of the head
    # alone makes it an FSDPLinear, left to HF above.)
    if head._forward_hooks or head._forward_pre_hooks or head._backward_hooks or head._backward_pre_hooks:
        return False
    # accelerate's big-model loading (device_map with "cpu"/"disk" offload) moves the weight in only
    # inside the head's own forward, through the hook it installs; the fused loss reads the weight
    # directly, so it would find it on the meta device (or off the execution device).
    return getattr(head, "_hf_hook", None) is None and head.weight.device.type != "meta"


def make_fused_forward(original: Callable) -> Callable:
    """A ``*ForCausalLM.forward`` that computes its loss fused and otherwise calls ``original``."""
    original = getattr(original, FUSED_ATTR, original)  # never wrap a fused forward twice
    signature = inspect.signature(original)  # follows __wrapped__ to the undecorated parameters
    var_keyword = next(
        (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )

    @functools.wraps(original)  # keeps the signature HF's generate() inspects (logits_to_keep)
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
        labels = arguments.pop("labels", None)
        shift_labels = extra.pop("shift_labels", None)
        # (shift_labels alone: HF computes no loss either; eval mode: HF's logits, unless FUSE_IN_EVAL)
        if labels is None or not (self.training or FUSE_IN_EVAL) or not _can_fuse(self):
            return original(self, *args, **kwargs)

        arguments.pop("self")
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        num_items_in_batch = extra.pop("num_items_in_batch", None)
        ignore_index = extra.pop("ignore_index", -100)
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        # The decoder call of the original forward, with the same arguments (names as installed).
        decoder = getattr(self, self.base_model_prefix)
        outputs = decoder(**arguments, **extra, return_dict=True)
        hidden = keep_positions(outputs[0], logits_to_keep)
        loss = causal_lm_loss(
            hidden,
            self.get_output_embeddings(),
            labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
        )
        result = _causal_lm_output(loss, outputs)
        return result if return_dict else result.to_tuple()

    setattr(forward, FUSED_ATTR, original)
    return forward


def _causal_lm_output(loss: torch.Tensor, outputs) -> object:
    """CausalLMOutputWithPast(loss, logits=None, and the decoder's cache/hidden states/attentions)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The cache field is `cache` in recent transformers 5.x and `past_key_values` before: copy
    # whichever of the decoder's fields the output class also has.
    fields = CausalLMOutputWithPast.__dataclass_fields__
    carried = {key: value for key, value in outputs.items() if key in fields and key != "loss"}
    return CausalLMOutputWithPast(loss=loss, logits=None, **carried)


def is_fused_forward(fn: object) -> bool:
    """True for a forward made by :func:`make_fused_forward`."""
    return hasattr(fn, FUSED_ATTR)


def original_forward(fn: Callable) -> Callable:
    """The forward a fused forward replaces (``fn`` itself otherwise)."""
    return getattr(fn, FUSED_ATTR, fn)
