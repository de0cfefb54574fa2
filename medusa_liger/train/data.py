"""Training data: read records, normalize conversation formats, render and tokenize with loss masks.

Sources (``data.paths``): local ``.jsonl`` files (one JSON object a line), local ``.json`` files (a
list of objects) and Hugging Face hub dataset names (loaded through ``datasets``, imported only
then, so local training works where ``datasets`` is not installed).

Record formats (``data.format: auto`` decides per record by its key):

* OpenAI:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
* text:     ``{"text": str}`` (a plain document; every token is a target)

A conversation is rendered by the tokenizer's chat template (or ``BUILTIN_CHAT_TEMPLATE`` when it
has none or ``data.chat_template: builtin``). With ``data.loss_on: assistant`` only the tokens of
assistant turns (their content and the end-of-turn marker) are targets. The assistant spans are
found by rendering prefixes: for assistant message i,

    start_i = len(render(messages[:i], add_generation_prompt=True))
    end_i   = len(render(messages[:i + 1]))

which holds for any template whose rendering of a prefix is a prefix of the full rendering (checked);
a token is a target when its character span overlaps an assistant span.

Some templates render a conversation's *last* assistant turn differently from the same turn inside a
longer one: Qwen3's adds an empty ``<think>`` block to the turns after the last user message only when
it ends the conversation, Phi-3's appends EOS after the last message. For those, when the full
rendering still starts with ``render(messages[:i], add_generation_prompt=True)``, the turn is found by
its content (stripped, as templates often trim it, or without its ``<think>...</think>`` reasoning, which
Qwen3's drops from turns before the last user message) right after that generation prompt, with at most
what the last-turn rendering puts before the content in between (the think block), and it ends where
the full rendering stops agreeing with what the last-turn rendering puts after the content (the
end-of-turn marker, not the EOS that only a last message gets).

Reading and normalizing records and choosing the chat template live in ``medusa_liger/records.py``
(evaluation reads prompts with them too). Bad input never reaches torch: a missing file, a malformed line (reported as ``file:line``), an
unknown record shape or role, a conversation without an assistant turn and an empty dataset all
raise ``ValueError``; with ``data.on_error: skip`` malformed lines, invalid records and
conversations the chat template refuses or cannot locate turns in are skipped with a warning that
counts them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from medusa_liger.records import (
    Example,
    chat_template_for,
    data_warning,
    document_ids,
    iter_raw_records,
    normalize,
    render_chat,
    skip_or_fail,
)

IGNORE_INDEX = -100


class DataError(ValueError):
    """Unusable training data (a missing file, a malformed record, nothing left to train on): the
    user's input, not a bug, so ``medusa-liger train`` reports it in one line without a traceback."""


@contextmanager
def data_errors() -> Iterator[None]:
    """Re-raise a ValueError of the data preparation inside as a ``DataError`` (same message)."""
    try:
        yield
    except DataError:
        raise
    except ValueError as error:
        raise DataError(str(error)) from error

def load_examples(data_cfg) -> list[Example]:
    """Every valid Example of ``data_cfg.paths`` in order (capped at ``max_examples``)."""
    examples: list[Example] = []
    skipped: list[str] = []
    for path in data_cfg.paths:
        if data_cfg.max_examples is not None and len(examples) >= data_cfg.max_examples:
            break  # (the cap counts over all files, not per file)
        for where, record in iter_raw_records(path, data_cfg.split, data_cfg.on_error, skipped):
            try:
                examples.append(normalize(where, record, data_cfg.format, data_cfg.loss_on))
            except ValueError as error:
                skip_or_fail(str(error), data_cfg.on_error, skipped)
            if data_cfg.max_examples is not None and len(examples) >= data_cfg.max_examples:
                break
    if skipped:
        data_warning(f"skipped {len(skipped)} bad records; first: {skipped[0]}")
    answers = [m["content"] for e in examples for m in (e.messages or ()) if m["role"] == "assistant"]
    empty = sum(not text.strip() for text in answers)
    if empty > len(answers) // 2:  # a few are normal; most, a broken source (e.g. a failed distillation)
        data_warning(f"{empty} of {len(answers)} assistant turns in data.paths are empty: the heads learn "
                     "little but end-of-turn tokens from them")
    if not examples:
        raise ValueError(f"data.paths {data_cfg.paths} yielded no usable examples (empty dataset)")
    return examples


# ----------------------------------------------------------------------------------------------
# Rendering and tokenization
# ----------------------------------------------------------------------------------------------


def render_conversation(tokenizer, messages, template: str, where: str = "",
                        spans: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant character spans) of one conversation (see module docstring); no spans
    (and no prefix renders) with ``spans=False``."""
    full = render_chat(tokenizer, messages, template, False, where)
    found = []
    for i, message in enumerate(messages if spans else []):
        # A leading assistant turn answers no prompt (FastChat drops it): context, never a target.
        # (transformers 5 also refuses to render the empty conversation before it.)
        if message["role"] != "assistant" or i == 0:
            continue
        prefix = render_chat(tokenizer, messages[:i], template, True, where)
        upto = render_chat(tokenizer, messages[: i + 1], template, False, where)
        if full.startswith(upto) and upto.startswith(prefix):
            found.append((len(prefix), len(upto)))
            continue
        span = _turn_by_content(tokenizer, full, prefix, upto, message["content"])
        if span is None:
            raise ValueError(
                f"{where}: the chat template does not render prefixes of a conversation as prefixes of it, "
                "so assistant tokens cannot be located; use data.chat_template=builtin or data.loss_on=all"
            )
        found.append(span)
    return full, found


def _turn_by_content(tokenizer, full: str, prefix: str, upto: str, content: str) -> tuple[int, int] | None:
    """Character span in ``full`` of the assistant turn that ``upto`` renders last, for templates that
    render a last turn differently (module docstring); None where it cannot be located safely."""
    start = len(prefix)
    if not (full.startswith(prefix) and upto.startswith(prefix)):
        return None
    # The content as templates show it: trimmed, and without the reasoning that some (Qwen3's) drop from
    # the turns before the last user message.
    for body in dict.fromkeys([content.strip(), content.rpartition("</think>")[2].strip()]):
        in_full = full.find(body, start)
        if in_full < 0:
            continue
        after = in_full + len(body)
        gap = full[start:in_full]
        # Where the last-turn rendering shows the content, with at most (the end of) what it puts before
        # the content in between in ``full`` (never another turn's text): the place whose tail agrees with
        # ``full``'s longest, in characters (an empty content is found everywhere: each place counts), then
        # in tokens (the end-of-turn marker).
        places = [pos for pos in range(start, len(upto) - len(body) + 1)
                  if upto.startswith(body, pos) and upto.endswith(gap, start, pos)]
        if not places:
            continue
        best = max(places, key=lambda pos: len(os.path.commonprefix([upto[pos + len(body):pos + len(body) + 64],
                                                                     full[after:after + 64]])))
        agreed = _agreed_prefix(tokenizer, upto[best + len(body):], full[after:])
        if agreed or body:  # (a turn that ends differently is still its content; an empty one needs its end)
            return start, after + agreed
    return None


def _agreed_prefix(tokenizer, ours: str, theirs: str) -> int:
    """Characters of ``theirs`` covered by the leading tokens it shares with ``ours``. Compared as tokens,
    not characters: an EOS "<|end|>" and the next turn's "<|user|>" share "<|"."""
    pieces = [tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
              for text in (ours, theirs[:len(ours)])]
    agreed = 0
    for a, b, (_, end) in zip(pieces[0]["input_ids"], pieces[1]["input_ids"], pieces[1]["offset_mapping"]):
        if a != b:
            break
        agreed = end
    return agreed


def tokenize_example(example: Example, tokenizer, template: str, loss_on: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; labels are input_ids with non-targets set to -100."""
    if example.text is not None:
        ids = document_ids(tokenizer, example.text)
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, list(ids)
    text, spans = render_conversation(tokenizer, example.messages, template, example.where, spans=loss_on != "all")
    # The template already holds any BOS/EOS it wants, so no special tokens are added here.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if loss_on == "all":
        return ids, list(ids)
    spans = [(a, b) for a, b in spans if b > a]  # (an empty one would take a token straddling its place)
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoding["offset_mapping"])
    ]
    return ids, labels


def _tokenize_or_error(example: Example, tokenizer, template: str, loss_on: str) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, "") of one example, or ([], [], the error) for a conversation the template
    refuses or cannot locate turns in (a bad record, which ``data.on_error`` decides about)."""
    try:
        return (*tokenize_example(example, tokenizer, template, loss_on), "")
    except ValueError as error:
        return [], [], str(error)


def _tokenize_batch(batch: dict[str, list], tokenizer, template: str, loss_on: str) -> dict[str, list]:
    """``datasets.map`` worker: examples serialized as JSON strings -> input_ids, labels and errors."""
    out = {"input_ids": [], "labels": [], "error": []}
    for payload in batch["payload"]:
        ids, labels, error = _tokenize_or_error(Example(**json.loads(payload)), tokenizer, template, loss_on)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["error"].append(error)
    return out


def tokenize_examples(examples: list[Example], tokenizer, data_cfg) -> list[tuple[list[int], list[int]]]:
    """Tokenize every example; with many examples and ``datasets`` installed, in ``num_proc`` processes.
    A conversation the chat template refuses or cannot locate turns in stops the run, or with
    ``data.on_error: skip`` is left out with a warning that counts them."""
    # Only conversations are rendered: text data needs no template (nor a tokenizer's usable one).
    needs_template = any(e.messages is not None for e in examples)
    template = chat_template_for(tokenizer, data_cfg.chat_template, "data.chat_template") if needs_template else ""
    if needs_template and data_cfg.loss_on != "all" and not getattr(tokenizer, "is_fast", True):
        raise ValueError(f"data.loss_on={data_cfg.loss_on} needs a fast tokenizer (character offsets locate "
                         f"the assistant tokens); {type(tokenizer).__name__} has none: use data.loss_on=all or a "
                         "tokenizer with a tokenizer.json")
    parallel = data_cfg.num_proc > 1 and len(examples) >= data_cfg.num_proc_min_examples
    if parallel:
        try:
            import datasets
        except ImportError:
            warnings.warn("`datasets` is not installed: tokenizing in one process", stacklevel=2)
            parallel = False
    if not parallel:
        results = [_tokenize_or_error(e, tokenizer, template, data_cfg.loss_on) for e in examples]
    else:
        payloads = [json.dumps(e.__dict__) for e in examples]
        table = datasets.Dataset.from_dict({"payload": payloads})
        mapped = table.map(
            _tokenize_batch,
            batched=True,
            num_proc=data_cfg.num_proc,
            remove_columns=["payload"],
            fn_kwargs={"tokenizer": tokenizer, "template": template, "loss_on": data_cfg.loss_on},
            desc="tokenizing",
        )
        results = list(zip(mapped["input_ids"], mapped["labels"], mapped["error"]))
    skipped: list[str] = []
    for _, _, error in results:
        if error:
            skip_or_fail(error, data_cfg.on_error, skipped)
    if skipped:
        data_warning(f"skipped {len(skipped)} conversations the chat template could not render with assistant "
                     f"turns located; first: {skipped[0]}")
    return [(ids, labels) for ids, labels, error in results if not error]
