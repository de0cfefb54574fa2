"""The embedded default's backbone: a small Llama-architecture model and a locally trained tokenizer.

Nothing is downloaded. The tokenizer is a byte-level BPE (every byte is in the base alphabet, so any
text encodes) trained with the ``tokenizers`` library on the training texts themselves, then wrapped
as a ``transformers.PreTrainedTokenizerFast`` with special tokens and a chat template, so the rest
of the pipeline treats it exactly like a hub tokenizer. The backbone is ``LlamaForCausalLM`` built
from a ``LlamaConfig`` (random init from the seed), the same code path a real Llama checkpoint takes.

Training the tokenizer takes about a second on the shipped data; it is saved in
``{output_dir}/tokenizer`` with a fingerprint of its inputs and reused when they have not changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from medusa_liger.records import BUILTIN_CHAT_TEMPLATE
from medusa_liger.run_layout import replace_text
from medusa_liger.train.config import ConfigError, TinyModelConfig

# Role markers and the end-of-turn token are single special tokens, so the chat template renders
# to the same ids whatever text surrounds them.
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]


def _fingerprint(texts: list[str], vocab_size: int) -> str:
    digest = hashlib.sha256(f"bpe-v1:{vocab_size}:".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:16]


def _stamped_fingerprint(stamp: Path) -> str | None:
    """The fingerprint a tokenizer cache's stamp records, or None when there is none to trust (no stamp,
    or one a killed run left empty or torn: the tokenizer is then trained again)."""
    try:
        value = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return value.get("fingerprint") if isinstance(value, dict) else None


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | Path | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``vocab_size`` entries trained on ``texts``.

    When ``cache_dir`` holds a tokenizer trained on the same texts and size, it is loaded instead.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one string to train the tokenizer on")
    fingerprint = _fingerprint(texts, vocab_size)
    stamp = Path(cache_dir) / "fingerprint.json" if cache_dir is not None else None
    if stamp is not None and _stamped_fingerprint(stamp) == fingerprint:
        return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))

    # Byte-level pre-tokenization: text -> bytes mapped to printable characters, split GPT-2 style.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    if cache_dir is not None:
        # The stamp goes first and comes back last, written aside and renamed into place: a run killed
        # meanwhile leaves no stamp (retrained next time), never an empty one nor one that vouches for
        # half-rewritten tokenizer files.
        stamp.unlink(missing_ok=True)
        tokenizer.save_pretrained(str(cache_dir))
        replace_text(stamp, json.dumps({"fingerprint": fingerprint, "vocab_size": vocab_size}))
    return tokenizer


def build_tiny_backbone(shape: TinyModelConfig, tokenizer, dtype: torch.dtype = torch.float32,
                        attn_implementation: str | None = None):
    """A randomly initialized ``LlamaForCausalLM`` of ``shape`` sized to ``tokenizer``'s vocabulary,
    with ``attn_implementation`` (``model.attn_implementation``; None: transformers' default, sdpa).

    Initialization draws from torch's global RNG: seed it first for a reproducible model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=attn_implementation,
    )
    try:
        return LlamaForCausalLM(config).to(dtype)
    except (ImportError, ValueError) as error:  # e.g. flash_attention_2 without its package, or on the CPU
        if attn_implementation is None:
            raise
        raise ConfigError(f"model.attn_implementation={attn_implementation}: {' '.join(str(error).split())}") from error
