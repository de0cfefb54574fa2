"""``MedusaModel``: a Hugging Face causal LM (the backbone) plus K Medusa heads, and their loss.

For a batch ``input_ids`` [B, T] with ``labels`` [B, T] (default: ``input_ids`` itself, the
self-distillation setting of Medusa: the heads learn the tokens that follow in the sequence), the
backbone's decoder gives the last hidden state h [B, T, H] (never the full [B, T, V] logits), the
heads give z_k = blocks_k(h), and ONE call of the fused multi-head loss computes

    loss = [joint] lm_loss_weight * CE(h @ W_lm^T,  labels shifted by 1)
         + sum_k heads_loss_weight * decay**k * CE(z_k @ P_k^T, labels shifted by k + 2)

without materializing any logits. Labels equal to ``ignore_index`` (-100) and targets that cross
a ``segment_ids`` boundary (packed sequences) are ignored.

Modes: ``heads`` (Medusa-1) runs the backbone frozen under ``torch.no_grad`` and in eval mode;
``joint`` (Medusa-2) lets the backbone train (all of it, or only its LoRA adapters when it is
peft-wrapped) and adds its own next-token loss as one more "head" with shift 1. With
``lm_loss="kl"`` (self-distillation) that term is KL(teacher || backbone) instead of the
cross-entropy, where the teacher is the original backbone run once more under ``torch.no_grad``: a
peft backbone with its adapters disabled (no second copy of the weights), or, for a backbone that
trains whole, the frozen copy ``add_frozen_teacher`` keeps (one more copy of its weights). Its logits
are computed chunk by chunk inside the fused loss, beside the student's, never materialized whole.
With ``head_targets="backbone"`` head k (shift s = k + 2) learns KL(backbone || head k) instead: the
teacher is the backbone's own next-token distribution at position t + s - 1 of this very forward
(detached, so it follows the backbone as it trains), which predicts the same token as the head does
from position t.

Packed sequences: with ``segment_ids`` and no ``position_ids``, positions restart at 0 in every
segment. Attention is kept inside each segment: without an ``attention_mask``, transformers detects
the restarting position ids and builds a block-diagonal causal mask itself (every attention
implementation); with an ``attention_mask`` as well, we build a 4-D block-diagonal causal mask,
which the ``eager`` and ``sdpa`` implementations accept; other implementations (flash-attention,
flex) get no mask and rely on the restarting position ids (give padding its own segment id).
Explicit ``position_ids`` that do not restart let attention span segments (the loss still never
targets across a boundary). Requires transformers >= 4.53 (packed-sequence detection).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medusa_liger.heads.config import MedusaConfig, check_loss_weight
from medusa_liger.heads.modules import MedusaHeads
from medusa_liger.kernels import MultiHeadLossOutput, Teacher, multi_head_linear_cross_entropy
from medusa_liger.kernels.head_by_head import head_by_head_linear_cross_entropy


@dataclass
class MedusaOutput:
    """Result of ``MedusaModel.forward``.

    loss:          scalar, differentiable: the weighted sum of every loss term (see module docstring)
    head_losses:   [K] float32, detached: cross-entropy of each Medusa head
    head_accuracy: [K] float32, detached: top-1 accuracy of each Medusa head
    head_tokens:   [K] int64: number of valid targets of each Medusa head
    lm_loss:       detached scalar, the backbone's next-token loss; None unless mode == "joint"
    lm_accuracy:   detached scalar, the backbone's top-1 accuracy; None unless mode == "joint"
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    head_accuracy: torch.Tensor
    head_tokens: torch.Tensor
    lm_loss: torch.Tensor | None = None
    lm_accuracy: torch.Tensor | None = None


def segment_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, T] -> position ids [B, T] that restart at 0 where the segment id changes."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
        got = list(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise ValueError(f"segment_ids must be a [B, T] tensor, got {got}")
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # The index of the latest segment start at or before t is a running max of start indices.
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def segment_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, T] -> [B, T] int64 numbering each row's runs of equal ids 0, 1, 2, ...: a
    document is a run, so an id that comes back after another (``[1, 1, 2, 1]``) starts a new one in
    the attention mask and the loss alike, as it does in ``segment_position_ids``."""
    starts = torch.zeros(segment_ids.shape, dtype=torch.long, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts.cumsum(dim=1)


def _check_batch_shapes(input_ids: torch.Tensor, **others: torch.Tensor | None) -> None:
    """input_ids must be [B, T] integer token ids and every other given tensor of its shape (a ValueError
    naming it)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.is_complex():
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [B, T] tensor of integer token ids, got {got}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:  # (an empty batch failed deep in HF's attention)
        raise ValueError(f"input_ids must have shape [B, T] with B, T >= 1, got {list(input_ids.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {list(input_ids.shape)}, got {list(t.shape)}")


def packed_causal_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       sliding_window: int | None = None) -> torch.Tensor:
    """Boolean 4-D mask [B, 1, T, T]: True where query t may attend key s.

    Allowed: s <= t, same segment, and key s not padding; with ``sliding_window`` w also
    s > t - w (HF's sliding-window rule). A query always sees itself, so no row is
    fully masked (which would turn the softmax into NaN for padding queries).
    """
    B, T = segment_ids.shape
    device = segment_ids.device
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed &= torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if sliding_window is not None:
        allowed &= torch.ones(T, T, dtype=torch.bool, device=device).triu(-(sliding_window - 1))
    if attention_mask is not None:
        allowed &= attention_mask[:, None, :].bool()
    allowed |= torch.eye(T, dtype=torch.bool, device=device)
    return allowed[:, None]


def _attention_mask_for(backbone: nn.Module, allowed: torch.Tensor) -> torch.Tensor | None:
    """The 4-D mask in the form the backbone's attention takes: boolean for sdpa (which rejects a
    float mask of another dtype than the queries, e.g. under autocast), additive for eager, and None
    for the others (flash-attention, flex), which then separate segments by the restarting position
    ids alone (give padding a segment id of its own)."""
    implementation = getattr(backbone.config, "_attn_implementation", "sdpa")
    if implementation == "sdpa":
        return allowed
    if implementation != "eager":
        return None
    dtype = backbone.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def sliding_window_of(config) -> tuple[int | None, bool]:
    """(the window w of the backbone's sliding-window layers or None, whether other layers attend fully).
    Reads ``sliding_window`` with ``layer_types`` (transformers 5.x) or ``use_sliding_window`` (older
    Qwen2-style configs); HF's rule keeps keys s > t - w."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None, False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window if getattr(config, "use_sliding_window", True) else None), False
    kinds = set(layer_types)
    if "sliding_attention" not in kinds:
        return None, False
    return window, kinds != {"sliding_attention"}


# Layer kinds whose HF mask (create_recurrent_attention_mask) is None for a custom 4-D mask.
_RECURRENT_LAYER_KINDS = frozenset({"linear_attention", "conv"})


def _packed_attention_mask(backbone: nn.Module, segment_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The packed 4-D mask for the backbone, keeping its sliding window: a custom 4-D mask is used by
    HF's attention as given, so a window it does not apply is silently dropped. Layers that mix full
    and sliding attention get HF's per-layer-type mapping."""
    window, mixed = sliding_window_of(getattr(backbone, "config", None))
    if window is None:
        return _attention_mask_for(backbone, packed_causal_mask(segment_ids, attention_mask))
    sliding = _attention_mask_for(backbone, packed_causal_mask(segment_ids, attention_mask, window))
    if not mixed or sliding is None:  # (None: an attention that takes no 4-D mask, full or sliding)
        return sliding
    # HF indexes the mapping by every layer kind of the backbone: a hybrid's other kinds (indexed
    # attention, conv, linear attention) get what HF itself makes of a custom 4-D mask.
    full = _attention_mask_for(backbone, packed_causal_mask(segment_ids, attention_mask))
    mapping = {"full_attention": full, "sliding_attention": sliding}
    for kind in set(backbone.config.layer_types) - mapping.keys():
        mapping[kind] = None if kind in _RECURRENT_LAYER_KINDS else full
    return mapping


def carries_peft_adapter(module: nn.Module | None) -> bool:
    """Whether ``module`` is a peft tuner layer (LoRA, ...), whose ``.weight`` is the base weight alone."""
    return hasattr(module, "base_layer")


def _lm_head_of(backbone: nn.Module) -> nn.Linear:
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"backbone must be a causal LM with an output projection (get_output_embeddings()), "
            f"got {type(backbone).__name__} without one"
        )
    if carries_peft_adapter(head):
        raise ValueError(
            "the backbone's output projection (lm_head) carries a peft adapter, which Medusa's fused losses "
            "would never apply nor train (they read lm_head.weight); leave lm_head out of the adapter's "
            "target_modules (lora.target_modules)"
        )
    return head


class MedusaModel(nn.Module):
    """A backbone causal LM plus ``MedusaHeads``; build it with ``MedusaModel.from_backbone``."""

    def __init__(self, backbone: nn.Module, heads: MedusaHeads, config: MedusaConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.config = config
        lm_head = _lm_head_of(backbone)
        vocab, hidden = lm_head.weight.shape
        if (heads.hidden_size, heads.vocab_size) != (hidden, vocab):
            raise ValueError(
                f"heads have hidden_size={heads.hidden_size}, vocab_size={heads.vocab_size} but the backbone's "
                f"lm_head expects hidden_size={hidden}, vocab_size={vocab}"
            )
        backbone_config = getattr(backbone, "config", None)
        # Gemma 2 soft-caps its logits, Granite divides them by logits_scaling, Cohere multiplies by logit_scale.
        for key, plain in (("final_logit_softcapping", None), ("logits_scaling", 1.0), ("logit_scale", 1.0)):
            value = getattr(backbone_config, key, plain)
            if value not in (plain, None):  # the heads' and lm losses are hidden @ lm_head.T, without it
                raise ValueError(f"the backbone's config has {key}={value}, a transform of its logits that "
                                 f"medusa-liger's losses do not apply; supported backbones have {key}={plain}")
        if not config.shared_lm_head and getattr(lm_head, "bias", None) is not None:
            raise ValueError(
                "the backbone's lm_head has a bias, which per-head projections (bias=False, the format serving "
                "engines read) cannot copy; use shared_lm_head=True"
            )
        if config.mode == "heads":
            # Medusa-1: the backbone is a fixed feature extractor (no grads, no dropout).
            backbone.requires_grad_(False)
            backbone.eval()
        # lm_loss="kl" of a backbone without adapters: a frozen copy of the original (add_frozen_teacher).
        self.teacher: nn.Module | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(cls, backbone: nn.Module, config: MedusaConfig | None = None) -> MedusaModel:
        """Wrap any HF causal LM (patched or not, peft-wrapped or not) with fresh Medusa heads.

        The heads live on the device and in the dtype of the backbone's lm_head; per-head
        projections start as copies of it, and the residual blocks as the identity. In ``heads``
        mode the backbone is frozen in place (``requires_grad_(False)``, eval mode); in ``joint``
        mode its ``requires_grad`` flags are left as they are (all, or peft's LoRA only).
        """
        config = MedusaConfig() if config is None else config
        if not isinstance(config, MedusaConfig):
            raise ValueError(f"config must be a MedusaConfig, got {type(config).__name__}")
        config.validate()
        lm_weight = _lm_head_of(backbone).weight
        vocab, hidden = lm_weight.shape
        heads = MedusaHeads(
            hidden, vocab, config.num_heads, config.num_layers, config.shared_lm_head,
            device=lm_weight.device, dtype=lm_weight.dtype,
        )
        heads.init_lm_heads_from(lm_weight.detach())
        return cls(backbone, heads, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: nn.Module | str | None = None, **overrides: Any) -> MedusaModel:
        """Load heads saved by ``save_heads`` (either format, auto-detected) onto ``backbone``.

        ``backbone``: a model, a path/name for ``AutoModelForCausalLM.from_pretrained``, or None to
        use the ``backbone/`` subdirectory written after joint training. ``overrides`` replace
        MedusaConfig fields (e.g. ``mode="joint"`` to continue training the backbone; a stored
        ``heads_loss_weight`` that is its mode's default then becomes the new mode's default).
        """
        from medusa_liger.heads.export import load_pretrained

        return load_pretrained(cls, directory, backbone, **overrides)

    def save_heads(self, directory: str | Path, format: str = "medusa", dtype: torch.dtype | str | None = None,
                   save_backbone: bool | None = None, base_model_name_or_path: str | None = None,
                   pt_file: bool = False, serving_dtype: torch.dtype | str | None = None) -> Path:
        """Write the heads in ``format`` ("medusa" or "vllm") to ``directory``; see ``heads/export.py``.

        ``save_backbone`` (default: True in joint mode) also writes the backbone, LoRA merged, as a
        normal HF checkpoint in ``directory/backbone``. ``pt_file`` (medusa format) also writes
        ``medusa_lm_head.pt``, the only file FasterDecoding's own loader reads. ``serving_dtype``: the
        dtype the heads record for serving (what ``medusa-liger export`` casts them to by default; default:
        the backbone's in memory, which for a run training a whole float32 backbone is not its export dtype).
        """
        from medusa_liger.heads.export import save_heads

        return save_heads(self, directory, format=format, dtype=dtype, save_backbone=save_backbone,
                          base_model_name_or_path=base_model_name_or_path, pt_file=pt_file,
                          serving_dtype=serving_dtype)

    def add_frozen_teacher(self) -> nn.Module:
        """Keep a frozen copy of the backbone, as it is now, as the teacher of ``lm_loss="kl"``.

        For a backbone that trains whole (full Medusa-2), whose original weights are otherwise gone
        after the first step. It costs one more copy of the backbone's weights in their dtype (a
        submodule, so ``.to()`` moves it and FSDP shards it like the backbone) and is never trained,
        checkpointed or exported; call it before training, on the weights the backbone starts from.
        A peft backbone needs none: its adapters-off self is the original.
        """
        import copy

        teacher = copy.deepcopy(self.backbone)
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        return self.teacher

    # ------------------------------------------------------------------ properties
    @property
    def lm_head(self) -> nn.Linear:
        """The backbone's own output projection (Linear(H, V))."""
        return _lm_head_of(self.backbone)

    @property
    def heads_loss_weight(self) -> float:
        """lambda: multiplies every head's weight; settable between steps (schedules)."""
        return float(self.config.heads_loss_weight)

    @heads_loss_weight.setter
    def heads_loss_weight(self, value: float) -> None:
        self.config.heads_loss_weight = check_loss_weight("heads_loss_weight", value)

    def train(self, mode: bool = True) -> MedusaModel:
        """``nn.Module.train``, but a frozen backbone (mode "heads") and the KL teacher stay in eval mode."""
        super().train(mode)
        if self.config.mode == "heads":
            self.backbone.eval()  # frozen backbone: keep dropout off whatever the wrapper's mode
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's distribution is a fixed target: no dropout
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Turn on the backbone's activation checkpointing (non-reentrant by default, which also
        works for peft backbones whose inputs do not require grad)."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        # transformers >= 5.2x renamed it activation_checkpointing_enable (the old name warns).
        if hasattr(self.backbone, "activation_checkpointing_enable"):
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        teacher: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> the backbone decoder's last hidden state [B, T, H] (final norm applied).

        In ``heads`` mode this runs under ``torch.no_grad``. ``teacher``: the original backbone's,
        always under ``torch.no_grad``: the frozen copy of ``add_frozen_teacher`` if there is one,
        else the peft backbone with its adapters disabled.
        """
        _check_batch_shapes(input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
                            position_ids=position_ids)
        runs = None if segment_ids is None else segment_runs(segment_ids)
        return self._hidden(input_ids, attention_mask, runs, position_ids, teacher)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None, teacher: bool = False) -> torch.Tensor:
        """``hidden_states`` of checked inputs, ``segment_ids`` already numbered by ``segment_runs``."""
        if segment_ids is not None:
            if position_ids is None:
                position_ids = segment_position_ids(segment_ids)
            if attention_mask is not None:
                attention_mask = _packed_attention_mask(self.backbone, segment_ids, attention_mask)
        frozen_copy = teacher and self.teacher is not None
        adapters_off = teacher and not frozen_copy
        if adapters_off and not callable(getattr(self.backbone, "disable_adapter", None)):
            raise ValueError(
                "lm_loss='kl' distills from the original backbone: wrap the backbone in LoRA adapters "
                "(peft; lora.enabled in training configs), whose adapters-off self is the teacher, or keep "
                f"a frozen copy with MedusaModel.add_frozen_teacher(); got a {type(self.backbone).__name__} "
                "without either"
            )
        decoder = (self.teacher if frozen_copy else self.backbone).get_decoder()
        grad = torch.is_grad_enabled() and self.config.mode == "joint" and not teacher
        adapters = self.backbone.disable_adapter() if adapters_off else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), adapters:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, return_dict=True)
        return out.last_hidden_state

    def head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, T, H] -> logits of every Medusa head [K, B, T, V] (head k: token t + k + 2)."""
        lm_head = self.lm_head
        return self.heads.logits(hidden_states, lm_head.weight, getattr(lm_head, "bias", None))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> MedusaOutput:
        """Medusa training loss of a batch (see the module docstring).

        input_ids, attention_mask, labels, segment_ids, position_ids: [B, T]. ``labels`` None means
        ``input_ids`` with padding (attention_mask == 0) ignored.
        """
        cfg = self.config
        _check_batch_shapes(input_ids, attention_mask=attention_mask, labels=labels, segment_ids=segment_ids,
                            position_ids=position_ids)
        if labels is None:
            labels = input_ids
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, cfg.ignore_index)
        check_loss_weight("heads_loss_weight", cfg.heads_loss_weight)

        # Documents are runs of equal ids: numbered once for the mask, the positions and the loss.
        segment_ids = None if segment_ids is None else segment_runs(segment_ids)
        hidden = self._hidden(input_ids, attention_mask, segment_ids, position_ids)
        # A padding position (attention_mask == 0) predicts nothing: its hidden state saw no text. Each
        # gets a segment of its own in the loss, so no target is read from it (left padding's positions
        # before the first token would otherwise predict the text's first tokens).
        loss_segments = segment_ids
        if attention_mask is not None:
            runs = torch.zeros_like(input_ids) if segment_ids is None else segment_ids
            index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            loss_segments = torch.where(attention_mask != 0, runs, -1 - index)
        joint = cfg.mode == "joint"
        teacher_hidden = None
        if joint and cfg.lm_loss == "kl":
            teacher_hidden = self._hidden(input_ids, attention_mask, segment_ids, position_ids, teacher=True)
        lm_head = self.lm_head
        lm_weight, lm_bias = lm_head.weight, getattr(lm_head, "bias", None)
        if not joint:
            # Heads mode freezes the backbone's lm_head even when the mode was switched at runtime
            # (a joint run's heads-only warm-up) and the parameter itself still requires grad.
            lm_weight = lm_weight.detach()
            lm_bias = None if lm_bias is None else lm_bias.detach()
        options = {"ignore_index": cfg.ignore_index, "segment_ids": loss_segments,
                   "skip_ignored": cfg.skip_ignored_targets, "label_smoothing": float(cfg.label_smoothing),
                   "z_loss": float(cfg.z_loss)}

        def loss(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:  # run inside the heads' call (FSDP)
            heads = self.heads
            head_inputs = [lambda x, k=k: heads.head_input(k, x) for k in range(heads.num_heads)]
            weights = heads.projection_weights(lm_weight)
            shifts = cfg.head_shifts()
            head_weights = cfg.head_weights()
            teacher = None
            divergence = dict(temperature=float(cfg.kl_temperature), reverse=cfg.kl_direction == "reverse",
                              jsd_beta=cfg.jsd_beta)
            if cfg.head_targets == "backbone":
                # The backbone's prediction of head k's token is its own output s_k - 1 positions on.
                teacher = [Teacher(hidden.detach(), lm_weight, lm_bias, offset=s - 1, **divergence) for s in shifts]
            if joint:
                # The backbone's own next-token loss is one more head: shift 1, weight lm_loss_weight.
                head_inputs = [lambda x: x, *head_inputs]
                weights = [lm_weight, *weights]
                shifts = [1, *shifts]
                head_weights = [float(cfg.lm_loss_weight), *head_weights]
                # Self-distillation: the backbone's term learns the original's distribution: the
                # frozen copy's lm_head, or the peft backbone's own (the lm_head carries no adapter).
                lm_teacher = None
                if teacher_hidden is not None:
                    source = lm_head if self.teacher is None else _lm_head_of(self.teacher)
                    lm_teacher = Teacher(teacher_hidden, source.weight, getattr(source, "bias", None), **divergence)
                if teacher is not None or lm_teacher is not None:
                    teacher = [lm_teacher, *(teacher or [None] * heads.num_heads)]
            # A bias exists only in shared mode (checked at construction), where every entry is the same.
            bias = None if lm_bias is None else [lm_bias] * len(weights)
            if cfg.head_by_head:
                params = [*heads.parameters(), lm_weight, *([] if lm_bias is None else [lm_bias])]
                out = head_by_head_linear_cross_entropy(hidden, head_inputs, weights, labels, shifts, head_weights,
                                                        params=params, bias=bias, teacher=teacher, **options)
            else:
                out = multi_head_linear_cross_entropy([f(hidden) for f in head_inputs], weights, labels, shifts,
                                                      head_weights, bias=bias, teacher=teacher, **options)
            # Plain tensors out of the heads' call: FSDP2 hooks its backward through the outputs it can see.
            return out.loss, out.head_losses, out.head_accuracy, out.head_tokens

        out = MultiHeadLossOutput(*self.heads(hidden, loss=loss))
        first = 1 if joint else 0
        return MedusaOutput(
            loss=out.loss,
            head_losses=out.head_losses[first:],
            head_accuracy=out.head_accuracy[first:],
            head_tokens=out.head_tokens[first:],
            lm_loss=out.head_losses[0] if joint else None,
            lm_accuracy=out.head_accuracy[0] if joint else None,
        )
