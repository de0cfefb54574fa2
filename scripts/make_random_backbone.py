"""Write a randomly initialized backbone with a real model's shape, for runs without its weights.

The training pipeline at full scale (memory, throughput, patching, export) depends on the
architecture's shapes, not on its trained weights. This script writes a Hugging Face checkpoint
directory that ``model.name_or_path`` can point at:

* ``config.json`` + ``model.safetensors``: a Llama-3-8B-shaped ``LlamaForCausalLM`` (or smaller
  with ``--layers``), randomly initialized on the GPU in bf16;
* a tokenizer: a byte-level BPE trained on the shipped conversations (its ids fit any vocabulary),
  because the real tokenizer also needs a download.

Its losses and acceptance rates are meaningless; its memory use and speed are those of the real
model. Example (the Medusa-1 config on an 8B-shaped backbone, 20 steps):

    python scripts/make_random_backbone.py /tmp/llama8b
    medusa-liger train configs/llama3-8b-medusa1.yaml model.name_or_path=/tmp/llama8b \\
        data.paths=[medusa_liger/data/pydoc_chat.jsonl] train.steps=20 checkpoint.every=0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's medusa_liger, installed or not

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="directory to write")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_liger.train.tiny import train_tokenizer

    out = Path(args.output)
    data = Path(__file__).resolve().parents[1] / "medusa_liger" / "data" / "pydoc_chat.jsonl"
    texts = ["\n".join(m["content"] for m in json.loads(line)["messages"]) for line in data.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, 4096)
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.layers} layers")


if __name__ == "__main__":
    main()
