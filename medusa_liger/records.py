"""Conversation records, shared by training (``train/data.py``) and evaluation (``inference/``).

Reading (``iter_raw_records``): local ``.jsonl`` files (one JSON object a line), local ``.json``
files (a list of objects) and Hugging Face hub dataset names (through ``datasets``, imported only
then). Normalizing (``normalize``) one record of any supported format into an ``Example``:

* OpenAI:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
* text:     ``{"text": str}`` (a plain document)

and the chat template to render conversations with (``chat_template_for``: the tokenizer's own or
``BUILTIN_CHAT_TEMPLATE``). Bad input raises ``ValueError`` naming the file and line or record.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_liger.run_layout import local_or_hub, user_path

# One turn per block: role marker, content, end-of-sequence token. Starts with BOS when the
# tokenizer has one. The tiny tokenizer ships exactly this template with its role markers as
# special tokens; any other tokenizer tokenizes the markers as text.
BUILTIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

class DataWarning(UserWarning):
    """A warning about the training or evaluation data (records skipped, targets cut off, the chat
    template chosen): the packed-data cache keeps these and says them again when it is read."""


# The notes lists of the enclosing ``recorded_data_warnings`` blocks, outermost first.
_DATA_NOTES: ContextVar[tuple[list[str], ...]] = ContextVar("medusa_liger_data_notes", default=())


def data_warning(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message, DataWarning)`` (``stacklevel`` as there, counted from the caller), and
    inside ``recorded_data_warnings`` blocks the message noted too (whatever the warning filters show)."""
    for notes in _DATA_NOTES.get():
        notes.append(message)
    warnings.warn(message, DataWarning, stacklevel=stacklevel + 1)


@contextmanager
def recorded_data_warnings(notes: list[str]) -> Iterator[None]:
    """Note in ``notes`` the message of every ``data_warning`` said inside the block (the packed-data
    cache keeps them to say them again), in this thread (a context variable: other threads' are not);
    the warnings themselves go through the filters as usual."""
    token = _DATA_NOTES.set((*_DATA_NOTES.get(), notes))
    try:
        yield
    finally:
        _DATA_NOTES.reset(token)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OPENAI_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One normalized record: a conversation (``messages``) or a plain document (``text``)."""

    where: str  # "file:line" or "dataset[split] row i", for error messages
    messages: list[dict[str, str]] | None = None
    text: str | None = None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def resolve_path(path: str) -> Path | None:
    """A local file for ``path`` (as given, or relative to the installed package's parent), else None."""
    candidate = user_path(path)
    if candidate.is_file():
        return candidate
    package_root = Path(__file__).resolve().parents[1]  # holds medusa_liger/data when installed
    if not candidate.is_absolute() and (package_root / candidate).is_file():
        return package_root / candidate
    return None


LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".txt")


def looks_like_local_path(name: str | Path) -> bool:
    """Whether ``name`` can only be a local path, never a hub name (``name`` or ``owner/name``): a
    .json/.jsonl/.txt suffix, a leading ``.``, ``/`` or ``~``, a backslash, or more than one ``/``.
    Data, prompts and model names all go by it, so a mistyped path fails as a missing file."""
    name = str(name)
    return (Path(name).suffix in LOCAL_FILE_SUFFIXES or name.startswith((".", "/", "~")) or "\\" in name
            or name.count("/") > 1)


def skip_or_fail(message: str, on_error: str, skipped: list[str]) -> None:
    """Raise ``message`` (``on_error`` "fail") or collect it in ``skipped`` ("skip")."""
    if on_error == "fail":
        raise ValueError(message + " (set data.on_error=skip to skip bad records)")
    skipped.append(message)


def load_json_list(path: Path, must: str) -> list:
    """The list a JSON file holds; ValueError naming the file (and line) when it is malformed, or
    ``"{path}: {must}, got <type>"`` when it holds something else."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8-sig"))  # (-sig: a byte-order mark some editors write)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: malformed JSON: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except (ValueError, RecursionError) as error:  # a number past int's digit limit, nesting too deep
        raise ValueError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(loaded, list):
        raise ValueError(f"{path}: {must}, got {type(loaded).__name__}")
    return loaded


def load_hub_dataset(path: str, split: str, key: str = "data.paths"):
    """Split ``split`` of the hub dataset ``path`` through ``datasets`` (imported only here; network unless
    it is cached); a ValueError naming ``key`` where it cannot be loaded."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{key}: {path!r} is not a local file and `datasets` is not installed") from None
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as error:  # noqa: BLE001 - surface the loader's reason with the name
        raise ValueError(f"{key}: could not load dataset {path!r} split {split!r}: {error}") from error


def hub_dataset_version(path: str, split: str) -> str:
    """What identifies the data of a hub dataset's split as loaded now: ``datasets``' fingerprint of it
    (from its cache directory, which the files of a revision decide; for data in memory, its content), or
    its cache files' names where a dataset has no fingerprint."""
    dataset = load_hub_dataset(path, split)
    return str(getattr(dataset, "_fingerprint", None) or json.dumps(dataset.cache_files, sort_keys=True))


def local_source(path: str, key: str = "data.paths") -> Path | None:
    """The local file ``path`` names, or None for a hub dataset name; a ValueError naming ``key`` for a
    directory or a local path that does not exist (never asked of the hub)."""
    local = resolve_path(path)
    if user_path(path).is_dir():
        try:
            held = f" (it holds {sorted(p.name for p in user_path(path).iterdir())[:8]})"
        except OSError:  # not listable
            held = ""
        raise ValueError(f"{key}: {path!r} is a directory; pass its files one by one{held} or a hub dataset name")
    if local is None and (looks_like_local_path(path) or Path(path).exists()):
        raise ValueError(f"{key}: file {path!r} does not exist")
    return local


def iter_raw_records(path: str, split: str, on_error: str, skipped: list[str],
                     key: str = "data.paths") -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of one source; malformed lines are failed or skipped.
    Errors about the source itself name ``key`` (the config key or flag that gave it)."""
    local = local_source(path, key)
    if local is None:
        dataset = load_hub_dataset(path, split, key)
        for i, record in enumerate(dataset):
            yield f"{path}[{split}] row {i}", record
        return
    if local.suffix == ".json":
        loaded = load_json_list(local, "a .json data file must hold a list of records")
        for i, record in enumerate(loaded):
            yield f"{local} record {i}", record
        return
    with local.open("rb") as f:  # (decoded line by line: a bad byte is that line's error, with its number)
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark some editors write
            except UnicodeDecodeError as error:
                skip_or_fail(f"{local}:{lineno}: not UTF-8 text (column {error.start + 1}: {error.reason})",
                             on_error, skipped)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:  # also a number past int's digit limit, nesting too deep
                reason = error.msg if isinstance(error, json.JSONDecodeError) else error
                skip_or_fail(f"{local}:{lineno}: malformed JSON line: {reason}", on_error, skipped)
                continue
            yield f"{local}:{lineno}", record


def check_unicode(where: str, what: str, text: str) -> None:
    """JSON may escape half of a UTF-16 surrogate pair ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: {what} is not valid Unicode text: a lone surrogate {text[error.start]!r} at "
                         f"character {error.start} (an escape like \\ud800 without its pair)") from None


RECORD_KEYS = {"openai": "messages", "sharegpt": "conversations", "text": "text"}
"""Each record format's key, in the order ``data.format=auto`` tries them."""


def normalize(where: str, record: Any, fmt: str, loss_on: str, *, other_keys: tuple[str, ...] = ()) -> Example:
    """Validate one record and convert it to an Example (roles mapped to system/user/assistant).
    ``other_keys``: keys the caller accepts besides these formats' (and converted before), named in the
    message about a record that has none of them."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = next((f for f, key in RECORD_KEYS.items() if key in record), "")
        if not fmt:
            keys = ", ".join(repr(k) for k in (*RECORD_KEYS.values(), *other_keys))
            raise ValueError(f"{where}: record has none of the keys {keys}")
    key = RECORD_KEYS[fmt]
    if key not in record:
        raise ValueError(f"{where}: data.format={fmt} expects the key {key!r}, found {sorted(record)}")
    if fmt == "text":
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        check_unicode(where, "'text'", record["text"])
        return Example(where, text=record["text"])

    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of turns")
    role_key, content_key = ("role", "content") if fmt == "openai" else ("from", "value")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ValueError(f"{where}: turn {j} must be an object with {role_key!r} and {content_key!r}")
        raw_role, content = turn[role_key], turn[content_key]
        if not isinstance(raw_role, str):  # (a list or dict role is not hashable: no table lookup)
            role = None
        else:
            role = SHAREGPT_ROLES.get(raw_role) if fmt == "sharegpt" else (raw_role if raw_role in OPENAI_ROLES else None)
        if role is None:
            allowed = sorted(SHAREGPT_ROLES) if fmt == "sharegpt" else list(OPENAI_ROLES)
            raise ValueError(f"{where}: turn {j} has {role_key}={raw_role!r}; expected one of {allowed}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: turn {j} {content_key!r} must be a string")
        check_unicode(where, f"turn {j} {content_key!r}", content)
        messages.append({"role": role, "content": content})
    if loss_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: conversation has no assistant turn (nothing to learn with data.loss_on=assistant)")
    return Example(where, messages=messages)


# A document ({"text": ...}) used as a prompt keeps at most this many leading tokens.
TEXT_PROMPT_TOKENS = 64


def render_chat(tokenizer, messages: list[dict[str, str]], template: str, add_generation_prompt: bool,
                where: str = "") -> str:
    """``messages`` rendered with ``template``; a conversation the template refuses (Mistral's and
    Gemma's raise on roles that do not alternate or on a system turn) is a ValueError naming ``where``."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:  # e.g. a template's raise_exception("roles must alternate")
        raise ValueError(f"{where + ': ' if where else ''}the chat template rejected this conversation: "
                         f"{error}") from None


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], template: str, where: str = "") -> list[int]:
    """Token ids of ``messages`` rendered with ``template``, followed by its generation prompt
    (the template holds any BOS it wants, so no special tokens are added); ValueError when the
    template refuses the conversation (``render_chat``)."""
    text = render_chat(tokenizer, messages, template, True, where)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def document_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain document as training reads it: BOS (when the tokenizer has one), then the
    text (any other special tokens of the tokenizer's post-processor left out)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *ids]


def text_prompt_ids(tokenizer, text: str, limit: int | None = TEXT_PROMPT_TOKENS) -> list[int]:
    """The first ``limit`` token ids of a document, as training reads it (``document_ids``: a
    tokenizer without a BOS post-processor gave prompts no BOS, while its training documents had one)."""
    return document_ids(tokenizer, text)[:limit]


def chat_template_for(tokenizer, choice: str, setting: str | None = None) -> str:
    """The template to render with: the tokenizer's own (``auto``, when it has one: of several named
    ones, ``default``, as ``apply_chat_template`` picks) or the built-in. Several without a ``default``:
    a ValueError naming ``setting`` (the option that picks the built-in one), or without a setting to
    name, the built-in one with a warning."""
    own = getattr(tokenizer, "chat_template", None)
    if choice == "auto" and isinstance(own, dict) and own:
        if isinstance(own.get("default"), str):
            return own["default"]
        message = f"the tokenizer has several chat templates ({sorted(own)}) and none named 'default'"
        if setting is not None:
            raise ValueError(f"{message} to render conversations with; use {setting}=builtin")
        data_warning(f"{message}: conversations are rendered with the built-in template")
    if choice == "auto" and isinstance(own, str) and own:
        return own
    if choice == "auto" and not own:  # (a base model's tokenizer): its markers are plain text to it
        choose = f", or choose the built-in one ({setting}=builtin) to silence this" if setting else ""
        data_warning("the tokenizer has no chat template: conversations are rendered with the built-in one "
                     f"(<|user|>, <|assistant|> and the EOS token); give the tokenizer its model's template{choose}")
    return BUILTIN_CHAT_TEMPLATE


TOKENIZER_FILES_HINT = ("are its tokenizer files (tokenizer.json, tokenizer_config.json) missing? Save the tokenizer "
                        "beside the model (tokenizer.save_pretrained)")
# A tokenizer is read from one of these (tokenizers' JSON, SentencePiece, BPE/WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "tekken.json")


def load_tokenizer(name_or_path: str, **from_pretrained_kwargs):
    """``AutoTokenizer.from_pretrained(name_or_path)`` (``~`` expanded), checked before (a local model
    directory has tokenizer files: ``check_tokenizer_files``) and after (it encodes text to tokens:
    ``check_tokenizer``). ValueError naming ``name_or_path`` for either; transformers' own errors pass."""
    from transformers import AutoTokenizer

    check_tokenizer_files(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(local_or_hub(name_or_path), **from_pretrained_kwargs)
    check_tokenizer(tokenizer, name_or_path)
    return tokenizer


def check_tokenizer_files(path: str) -> None:
    """ValueError when ``path`` is a local model directory without any tokenizer file: transformers then
    builds an empty tokenizer (Qwen2) or blames a missing package (Llama)."""
    directory = user_path(path)
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer there ({', '.join(TOKENIZER_FILES[:2])} ...); {TOKENIZER_FILES_HINT}")


def check_tokenizer(tokenizer, source: str) -> None:
    """ValueError unless ``tokenizer`` (read from ``source``) encodes letters or digits to tokens beyond its
    special ones: for a model directory without its vocabulary files transformers may build an empty one
    (Qwen2's, with only its added tokens, encodes any text to nothing), and a run trained on nothing."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # (unknown characters of another script)
    try:
        probe = tokenizer("The pass statement. 0123456789", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 (a vocabulary without these characters and without an unk token)
        probe = None  # cannot tell: not refused
    if len(tokenizer) <= len(special) or (probe is not None and not [i for i in probe if i not in special]):
        raise ValueError(f"{source}: its tokenizer ({len(tokenizer)} tokens) encodes text to no token of a vocabulary; "
                         f"{TOKENIZER_FILES_HINT}")
