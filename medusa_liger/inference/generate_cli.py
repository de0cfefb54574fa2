"""``medusa-liger generate``: answer one prompt with Medusa decoding and say what the heads bought.

    medusa-liger generate runs/tiny --prompt "What does the assert statement do?"
    medusa-liger generate --backbone PATH --heads PATH --prompt "..." --acceptance typical --temperature 0.7

The prompt is a user turn rendered with the chat template (``--raw``: the text as it is); the reply
is printed, then its decoding: tokens, steps, tokens per step and tokens/s, and with
``--compare-greedy`` (greedy acceptance) plain greedy decoding's speed and whether the two agree.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from medusa_liger.heads.export import DTYPES, check_backbone_path
from medusa_liger.inference import cli_args
from medusa_liger.inference.backbone import stop_token_ids
from medusa_liger.inference.cli import error_text, load_medusa, load_tree, resolve_paths
from medusa_liger.inference.cli_args import POSITIVE_INT, Given, number
from medusa_liger.inference.evaluate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from medusa_liger.inference.generate import MedusaGenerateOutput, medusa_generate
from medusa_liger.records import chat_prompt_ids, chat_template_for, text_prompt_ids


def prompt_ids(tokenizer, prompt: str, raw: bool) -> list[int]:
    """The prompt's token ids: a user turn with the generation prompt after it, or (raw) the text as
    training reads a document (BOS, when the tokenizer has one, then the text)."""
    if not prompt:
        raise ValueError("prompt must not be empty")
    if raw:
        return text_prompt_ids(tokenizer, prompt, limit=None)
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], chat_template_for(tokenizer, "auto"))


def generate_reply(model, tokenizer, prompt: str, *, raw: bool = False, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   tree: list[list[int]] | None = None, compare_greedy: bool = False,
                   **options: Any) -> tuple[str, MedusaGenerateOutput]:
    """(reply text, the decoding's output) of ``model`` (a MedusaModel) for one prompt; ``options``:
    ``medusa_generate``'s acceptance options. Stops at the tokenizer's EOS token and those of the model's
    generation config (``stop_token_ids``). With ``compare_greedy``
    a short warm-up of both decodings runs first, so neither timing pays the first call's costs."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt, raw)], device=model.lm_head.weight.device)
    if compare_greedy:  # first calls pay one-time costs (kernel loading, allocator growth): not in either timing
        medusa_generate(model, ids, min(8, max_new_tokens), tree, compare_greedy=True, **options)
    out = medusa_generate(model, ids, max_new_tokens, tree, eos_token_id=stop_token_ids(tokenizer, model),
                          compare_greedy=compare_greedy, **options)
    return tokenizer.decode(out.new_tokens.tolist(), skip_special_tokens=True), out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.setup(parser)
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="training output directory (uses final/backbone and final/heads_medusa)")
    parser.add_argument("--backbone", default=None, help="backbone checkpoint (HF directory or hub name)")
    cli_args.add_revision_argument(parser)
    parser.add_argument("--heads", default=None, help="heads directory written by save_heads (either format)")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--raw", action="store_true", help="tokenize the prompt as it is (no chat template)")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=DEFAULT_MAX_NEW_TOKENS,
                        help="tokens to generate at most")
    parser.add_argument("--tree", default=None,
                        help="JSON file with the medusa_choices tree (e.g. an eval's tree.json); default: a "
                             "generic tree for the number of heads")
    parser.add_argument("--acceptance", default="greedy", choices=["greedy", "typical"],
                        help="greedy (lossless) or typical acceptance, sampling at --temperature")
    parser.add_argument("--temperature", type=number(float, minimum=0), default=DEFAULT_TEMPERATURE, action=Given,
                        help="sampling temperature of --acceptance typical (0: greedy)")
    cli_args.add_posterior_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, action=Given, help="sampling seed of --acceptance typical")
    parser.add_argument("--compare-greedy", action="store_true",
                        help="also decode with plain greedy decoding: its speed, and whether the replies agree")
    parser.add_argument("--device", type=cli_args.device, default=None,
                        help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype")


def check_args(args: argparse.Namespace) -> None:
    """Usage errors the parser cannot see flag by flag, before anything loads."""
    typical = args.acceptance == "typical"
    if args.compare_greedy and typical:
        cli_args.error(args, "--compare-greedy compares greedy decodings: use it with --acceptance greedy")
    cli_args.check_needs(args, cli_args.TYPICAL_FLAGS, "--acceptance typical", typical)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        tree = None if args.tree is None else load_tree(args.tree)
        if args.backbone is not None:  # a missing directory fails before anything loads
            check_backbone_path(args.backbone)
        backbone, heads = resolve_paths(args.run_dir, args.backbone, args.heads)
        model, tokenizer = load_medusa(backbone, heads, device=args.device, dtype=args.dtype, revision=args.revision)
        options = {} if args.acceptance == "greedy" else dict(
            acceptance="typical", temperature=args.temperature, seed=args.seed,
            posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha)
        reply, out = generate_reply(model, tokenizer, args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
                                    tree=tree, compare_greedy=args.compare_greedy, **options)
    except (ValueError, FileNotFoundError) as error:
        print(f"medusa-liger generate: error: {error_text(error, args.backbone)}", file=sys.stderr)
        return 2
    print(reply)
    stats = out.stats
    print(f"\n[{stats.new_tokens} tokens in {stats.steps} steps: {stats.acceleration_rate:.2f} tokens/step, "
          f"{stats.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    if out.greedy is not None:
        print(f"[plain greedy: {out.greedy.stats.tokens_per_s:.1f} tokens/s, speedup {out.speedup:.2f}x, "
              f"{'the same reply' if out.matches_greedy else 'a different reply'}]", file=sys.stderr)
    return 0
