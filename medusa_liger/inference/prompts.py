"""Prompts for evaluation and decoding: files, hub datasets, or a run's held-out token ids.

``load_prompts`` turns JSON/JSONL records (``prompt``, ``input_ids``, OpenAI ``messages``, ShareGPT
``conversations``, ``text``), plain text files (one prompt a line) or hub datasets into token id
lists: conversations are rendered with the tokenizer's chat template up to their first assistant
turn, the reply the model is then asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medusa_liger.records import (
    chat_prompt_ids,
    chat_template_for,
    check_unicode,
    iter_raw_records,
    looks_like_local_path,
    normalize,
    text_prompt_ids,
)
from medusa_liger.run_layout import user_path


def default_prompts_file() -> Path:
    """The shipped conversation data (pass your own held-out file for an unbiased number)."""
    return Path(__file__).resolve().parent.parent / "data" / "pydoc_chat.jsonl"


def _render_messages(tokenizer, messages: list[dict[str, str]], where: str = "") -> list[int]:
    """The conversation up to (not including) its first assistant turn, ready for the reply (errors
    name ``where``, the record)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    if first == 0:
        raise ValueError(f"{where + ': ' if where else ''}a conversation starting with an assistant turn has no prompt")
    return chat_prompt_ids(tokenizer, messages[:first], chat_template_for(tokenizer, "auto"), where)


# The shared record reader's prefix (the training config key), replaced by what a prompts source is.
_READER_PREFIX = "data.paths: "


def looks_like_path(source: str | Path) -> bool:
    """Whether ``source`` means a local file rather than a hub dataset: ``records.looks_like_local_path``,
    or ``dir/name`` where ``dir`` is a local directory."""
    parts = str(source).split("/")
    return looks_like_local_path(source) or (len(parts) == 2 and user_path(parts[0]).is_dir())


def check_num_prompts(num_prompts: int) -> None:
    """Raise unless ``num_prompts`` is an integer >= 1 (a bool is not one)."""
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")


def is_missing_file(source: str | Path) -> bool:
    """A local-looking prompts path (``looks_like_path``) that does not exist."""
    return looks_like_path(source) and not user_path(str(source)).exists()


# Files that are not text a line per prompt (read as such, a CSV's header and columns became prompts).
UNREAD_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".xlsx", ".gz", ".zip")


def check_prompts_source(source: str | Path) -> None:
    """Fail fast (before any model or hub access) on a local-looking prompts path that does not exist,
    a directory, or a table or archive (which would be read a line per prompt)."""
    path = user_path(str(source))
    if is_missing_file(source):
        raise ValueError(f"no such file: {str(source)!r}")
    if path.is_dir():
        raise ValueError(f"{str(source)!r} is a directory; pass a prompts file in it or a hub dataset name")
    if path.is_file() and path.suffix.lower() in UNREAD_SUFFIXES:
        raise ValueError(f"{str(source)!r}: a {path.suffix} file is not read; convert it to JSONL (a "
                         '{"prompt": ...} record a line) or to a text file with one prompt a line')


def _records(source: str, split: str):
    """(where, record) of a JSON/JSONL file or hub dataset, through the shared record reader."""
    skipped: list[str] = []  # "skip" mode collects the reader's messages; any is fatal here
    try:
        for where, record in iter_raw_records(source, split, "skip", skipped):
            if skipped:
                break
            yield where, record
    except ValueError as error:
        message = str(error).removeprefix(_READER_PREFIX)
        if message.startswith("could not load dataset"):
            message = f"not a local file, and {message.replace('could not load', 'could not load hub', 1)}"
        raise ValueError(message) from error
    if skipped:
        raise ValueError(skipped[0])


def _record_prompt(tokenizer, where: str, record: Any) -> list[int]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        check_unicode(where, "'prompt'", record["prompt"])
        return text_prompt_ids(tokenizer, record["prompt"], limit=None)  # BOS and the text, as generate --raw
    if isinstance(record, dict) and "input_ids" in record:  # already tokenized (a run's eval_prompts.jsonl)
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{where}: input_ids must be a list of token ids (integers >= 0)")
        return ids
    example = normalize(where, record, "auto", "all")
    if example.text is not None:
        return text_prompt_ids(tokenizer, example.text)
    return _render_messages(tokenizer, example.messages, where)


def load_prompts(source: str | Path, tokenizer, num_prompts: int | None = None, split: str = "train") -> list[list[int]]:
    """Token ids of up to ``num_prompts`` prompts (the first ones) from a file or a hub dataset.

    ``.jsonl``/``.json`` files and hub datasets (``split``; needs ``datasets``): records
    ``{"prompt": str}`` (tokenized as is), ``{"input_ids": [int, ...]}`` (token ids, used as they are:
    a training run's held-out ``eval_prompts.jsonl``), OpenAI ``messages`` or ShareGPT ``conversations``
    (rendered with the chat template up to the first assistant turn) or ``{"text": str}`` (its
    first ``records.TEXT_PROMPT_TOKENS`` tokens). Any other local file: one prompt per non-empty line.
    """
    if num_prompts is not None:
        check_num_prompts(num_prompts)
    source = str(source)
    path = user_path(source)
    if is_missing_file(source):  # anything else is taken for a hub dataset name
        raise ValueError(f"no such file: prompts file {source!r} does not exist")
    check_prompts_source(source)
    if path.is_file() and path.suffix not in (".json", ".jsonl"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        numbered = ((f"{source}:{i}", {"prompt": line}) for i, line in enumerate(lines, 1))
    else:
        numbered = _records(source, split)
    prompts: list[list[int]] = []
    for where, record in numbered:
        ids = _record_prompt(tokenizer, where, record)
        if ids:
            prompts.append(ids)
        if num_prompts is not None and len(prompts) >= num_prompts:
            break
    if not prompts:
        raise ValueError(f"prompts {source!r} hold no usable prompt")
    return prompts
