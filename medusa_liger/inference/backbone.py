"""The backbone of a Medusa model, called one decoding step at a time over a KV cache.

``BackboneRunner`` hides the differences decoding code must not care about: a ``MedusaModel`` or a
bare causal LM (peft-wrapped or not); the cache argument's name (``cache`` in transformers 5.2x,
``past_key_values`` in earlier 5.x releases); the final logit soft-capping some families apply;
the sliding window a backbone may use. The cache is a ``DynamicCache`` built without the config,
so every layer keeps every token as ``[B, n_kv, S, D]`` tensors in ``cache.layers[i].keys/values``
(the same in 5.17 and 5.2x), which Medusa decoding gathers and crops by index.

Its forwards run under ``decode_attention()``: PyTorch's scaled-dot-product attention without its
cuDNN backend, which builds an execution plan for every new key length (milliseconds of host time
per layer) when decoding brings a new length at every step.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from medusa_liger.heads.model import sliding_window_of


def decode_attention() -> contextlib.AbstractContextManager:
    """Context for decoding forwards: SDPA may use the flash, memory-efficient or math kernels, not
    cuDNN's. On an H100 (torch 2.11) cuDNN's attention took ~5 ms of host time per call for each key
    length it had not seen, and a decoding step always has a new one: a Llama-3-8B-shaped step went
    from 40 to 25 ms without it (benchmarks/NOTES.md, run 129). Training keeps the default choice."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the backend selector
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def stop_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """The token ids decoding stops at (sorted; empty when none is named): the tokenizer's EOS and every
    one the model's generation config names (an instruct model's end-of-turn token, e.g. Llama-3's
    <|eot_id|>, which its tokenizer's EOS may not be). ``model``: a causal LM, a MedusaModel (its
    ``.backbone``'s generation config) or a peft-wrapped model."""
    eos = {getattr(tokenizer, "eos_token_id", None)}
    # The model's own first: some causal LMs have a .backbone too (Mamba's, without a generation config).
    generation_config = getattr(model, "generation_config", None) or getattr(
        getattr(model, "backbone", None), "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    eos.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(int(e) for e in eos if e is not None)


class BackboneRunner:
    """Runs the backbone decoder over a DynamicCache and projects hidden states to logits."""

    def __init__(self, model: nn.Module) -> None:
        # A MedusaModel carries the causal LM in .backbone; a bare causal LM is its own backbone.
        self.medusa = model if hasattr(model, "head_logits") and hasattr(model, "backbone") else None
        self.causal_lm = model.backbone if self.medusa is not None else model
        if hasattr(self.causal_lm, "get_base_model"):  # peft: LoRA layers live inside the base model
            self.causal_lm = self.causal_lm.get_base_model()
        self.config = self.causal_lm.config
        self.decoder = self.causal_lm.get_decoder()
        self.lm_head = self.causal_lm.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(
                f"model must be a causal LM with an output projection, got {type(self.causal_lm).__name__}"
            )
        # transformers 5.2x names the cache argument `cache`; earlier 5.x releases `past_key_values`.
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.dtype = self.decoder.get_input_embeddings().weight.dtype
        self.device = self.lm_head.weight.device
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    @property
    def num_heads(self) -> int:
        return 0 if self.medusa is None else int(self.medusa.heads.num_heads)

    def new_cache(self):  # -> transformers.DynamicCache
        from transformers import DynamicCache

        # No config: every layer is a plain DynamicLayer that keeps all tokens, so tree nodes can be
        # gathered and cropped by index (sliding windows are applied through the mask instead).
        return DynamicCache()

    def hidden(self, input_ids: torch.Tensor, cache, position_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [1, T] at position_ids [1, T] -> last hidden state [1, T, H]; appends T entries to
        ``cache``. attention_mask: None (the model's causal mask) or a 4-D additive [1, 1, T, S + T]."""
        with decode_attention():
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                return_dict=True,
                **{self.cache_kwarg: cache},
            )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> next-token logits [..., V] in float32 (float64 for a float64 model)."""
        logits = _at_least_fp32(self.lm_head(hidden))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [..., K, V] float32 (float64) logits of every Medusa head ([H] -> [K, V])."""
        flat = hidden.reshape(1, -1, hidden.shape[-1])
        logits = _at_least_fp32(self.medusa.head_logits(flat)[:, 0])  # [K, n, V]
        return logits.movedim(0, 1).reshape(*hidden.shape[:-1], *logits.shape[::2])

    def sliding_window(self) -> int | None:
        """The uniform sliding window of every layer, or None for full attention."""
        window, _ = sliding_window_of(self.config)
        kinds = set(getattr(self.config, "layer_types", None) or ())
        # Only full or sliding attention layers: another uniform kind (linear/recurrent, chunked,
        # indexed, hybrid) is neither, and the tree mask and the cropped cache would not be lossless.
        if kinds <= {"full_attention"} or kinds == {"sliding_attention"}:
            return window
        raise ValueError(
            f"medusa_generate supports backbones whose layers all use the same attention; this "
            f"{self.config.model_type} model mixes {sorted(kinds)}"
        )


def check_generation_inputs(runner: BackboneRunner, input_ids: torch.Tensor, max_new_tokens: int) -> int:
    """Validate the prompt [1, T] and the token budget against the model; returns T."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("input_ids must be an integer tensor of shape [1, T]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [1, T], got {list(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"input_ids must have batch size 1 (Medusa decoding accepts a different number of tokens per "
            f"sequence, so batches are not supported); got batch size {input_ids.shape[0]}: call it per prompt"
        )
    T = input_ids.shape[1]
    if T == 0:
        raise ValueError("input_ids is empty: the prompt must hold at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = getattr(runner.config, "max_position_embeddings", None)
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds the model's "
            f"context (max_position_embeddings={limit}); shorten the prompt or lower max_new_tokens"
        )
    vocab = runner.lm_head.weight.shape[0]
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids must hold token ids in [0, {vocab}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    return T


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits decide in fp32; a float64 model's keep their digits (rounding them to fp32 can
    # tie two candidates that differ by 1e-8, and a tie breaks differently in a padded batch).
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
