"""Self-distillation data: the backbone writes the answers its Medusa heads will learn to guess.

Medusa heads learn to predict the backbone's *own* next tokens. Trained on a dataset the backbone
would not have written (another model's chat logs, a different system prompt), they learn a
distribution they will never see at decoding time, and their acceptance drops. The Medusa paper's
remedy is self-distillation: keep the dataset's prompts and let the backbone regenerate every answer.

    medusa-liger distill --backbone meta-llama/Meta-Llama-3-8B-Instruct \\
        --data sharegpt.jsonl --output distilled.jsonl --max-new-tokens 1024
    medusa-liger train configs/llama3-8b-medusa1.yaml data.paths=[distilled.jsonl]

The answers come from the model in this process (Hugging Face ``generate``, batched) or, much
faster for large datasets, from an OpenAI-compatible server with the same weights
(``--server http://localhost:8000/v1`` after ``vllm serve ...``); see ``distill_backends``.

Records in (the formats of ``medusa_liger.records``, plus ``{"prompt": str}``):

* a conversation: every assistant turn is regenerated in order, each from the conversation so far
  with the earlier answers already replaced by the backbone's own (``turns="all"``; ``"first"`` keeps
  the conversation only up to its first answer). A conversation that ends with a user turn (a
  prompt-only dataset) also gets an answer to that turn.
* ``{"prompt": str}``: one user turn, answered.
* ``{"text": str}`` (a document, for base models): its first ``text_prompt_tokens`` tokens are kept
  and the backbone writes the rest.

Records out: one JSON line per input record, in input order, ``{"id": i, "source": ..., "messages":
[...]}`` (or ``"text"``), which ``medusa-liger train`` reads as OpenAI-format conversations.

Work is never lost: records are generated in blocks of ``block_records`` and each finished block is
appended to the output and synced to disk (the records it drops for length, with why, to
``<output stem>.dropped.jsonl``). Run the same command again after an interruption and it continues
after the last complete block (a settings file beside the output refuses a resume with other
settings); blocks are cut from the whole source and seeded by their first record, so the resumed file
is the one an uninterrupted run writes. (With sampling, that holds for the same ``num_records``,
``block_records`` and ``batch_size``, which may change between runs: they change how records are
batched, and so what is drawn. A run extended with a larger ``num_records`` matches when the shorter
one ended on a block boundary.) ``shard=(i, n)`` keeps the records whose index is ``i`` modulo
``n``, so ``n`` processes (one per GPU) can split a dataset and their outputs be trained on together.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medusa_liger.inference.distill_backends import Answer, LocalBackend, Refused, ServerBackend
from medusa_liger.numeric import is_int, is_real
from medusa_liger.records import (RECORD_KEYS, TEXT_PROMPT_TOKENS, iter_raw_records, looks_like_local_path, normalize,
                                  resolve_path)
from medusa_liger.run_layout import user_path

TURNS = ("all", "first")


def _real(value: object) -> float | None:
    """``value`` as a plain float if it is a real number (numpy's too; not a bool), else None."""
    if not is_real(value):
        return None
    try:
        return float(value)
    except OverflowError:  # (an int past float's range)
        return None


@dataclass(frozen=True)
class DistillSettings:
    """How to generate. Those that decide the text are kept beside the output to guard resumes."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0
    seed: int = 0
    turns: str = "all"
    chat_template: str = "auto"  # "auto": the tokenizer's own template, else the built-in one
    text_prompt_tokens: int = TEXT_PROMPT_TOKENS
    batch_size: int = 32  # local generation: prompts per generate() call
    block_records: int = 256
    shard: tuple[int, int] = (0, 1)  # (index, count)
    num_records: int | None = None  # the first N records of the source (before sharding)

    def __post_init__(self) -> None:
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("max_new_tokens", "text_prompt_tokens", "batch_size", "block_records"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        temperature, top_p = _real(self.temperature), _real(self.top_p)
        if not (temperature is not None and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (top_p is not None and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "temperature", temperature)  # plain floats (kept beside the output as JSON)
        object.__setattr__(self, "top_p", top_p)
        if self.turns not in TURNS:
            raise ValueError(f"turns must be one of {list(TURNS)}, got {self.turns!r}")
        if self.chat_template not in ("auto", "builtin"):
            raise ValueError(f"chat_template must be 'auto' or 'builtin', got {self.chat_template!r}")
        index, count = self.shard
        if not (is_int(index) and is_int(count) and count >= 1 and 0 <= index < count):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {self.shard!r}")
        if self.num_records is not None and (not is_int(self.num_records) or self.num_records < 1):
            raise ValueError(f"num_records must be an integer >= 1 or None, got {self.num_records!r}")


@dataclass
class DistillSummary:
    """What a call wrote (this call only; records found already done are counted in ``resumed``)."""

    records: int = 0  # records written
    resumed: int = 0  # records already in the output before this call
    skipped: list[str] = field(default_factory=list)  # one reason per record left out
    generations: int = 0  # answers or continuations generated
    truncated: int = 0  # generations that hit max_new_tokens before an end-of-sequence token
    empty: int = 0  # generations with no text (the model ended its turn at once, or wrote only whitespace)
    new_tokens: int = 0
    seconds: float = 0.0
    past_num_records: int = 0  # records already in the output past num_records (kept: the output is not cut)
    shortened: int = 0  # records kept up to their last answered turn: a later one did not fit the context


@dataclass
class _Pending:
    """One record being regenerated: its conversation so far and the turns still to write."""

    id: int
    where: str
    messages: list[dict[str, str]] | None  # None for a text record
    todo: list[int]  # indices into messages of the assistant turns still to generate
    text: str | None = None  # a text record: its document, then prefix + continuation
    dropped: str | None = None  # why the record is left out


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/8), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def check_source(source: str | Path) -> None:
    """Fail fast (before any model loads or output is written) on a local-looking source that is no file."""
    if resolve_path(str(source)) is not None:
        return
    if user_path(source).is_dir():
        raise ValueError(f"--data: {str(source)!r} is a directory; pass a JSONL/JSON file or a hub dataset name")
    if looks_like_local_path(source):
        raise ValueError(f"--data: no such file: {str(source)!r}")


def _source_records(source: str, split: str, settings: DistillSettings, skipped: list[str],
                    texts: bool) -> Iterator[_Pending]:
    """This shard's records, normalized into conversations to regenerate or documents to continue."""
    for i, (where, record) in enumerate(iter_raw_records(source, split, "skip", skipped, key="--data")):
        if settings.num_records is not None and i >= settings.num_records:
            return
        if i % settings.shard[1] != settings.shard[0]:
            continue
        # A record that also holds a conversation or a document keeps it: the prompt is then only a summary.
        if (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and not any(record.get(key) is not None for key in RECORD_KEYS.values())):
            record = {"messages": [{"role": "user", "content": record["prompt"]}]}
        try:
            example = normalize(where, record, "auto", "all", other_keys=("prompt",))
        except ValueError as error:
            skipped.append(str(error))
            continue
        if example.text is not None:
            if texts:
                yield _Pending(i, where, None, [], text=example.text)
            else:
                skipped.append(f"{where}: text records need the model in this process (--backbone), not a server")
            continue
        messages = list(example.messages)
        if messages[-1]["role"] != "assistant":  # answer a trailing user turn too
            messages.append({"role": "assistant", "content": ""})
        todo = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if todo[0] == 0:
            skipped.append(f"{where}: the conversation starts with an assistant turn, which has no prompt")
            continue
        if settings.turns == "first":
            messages, todo = messages[: todo[0] + 1], todo[:1]
        yield _Pending(i, where, messages, todo)


def _run_block(backend, block: list[_Pending], summary: DistillSummary) -> None:
    """Fill in every pending turn of ``block``: one round of generations per turn depth."""
    texts = [r for r in block if r.text is not None]
    for record, answer in zip(texts, backend.complete([r.text for r in texts]) if texts else []):
        if answer is None:
            record.dropped = f"{record.where}: prompt + max_new_tokens exceed the model's context"
        else:
            _count(summary, answer, text=True)
            record.text = answer.text
    while True:
        chats = [r for r in block if r.dropped is None and r.messages is not None and r.todo]
        if not chats:
            return
        for record, answer in zip(chats, backend.chat([r.messages[: r.todo[0]] for r in chats])):
            if isinstance(answer, Refused):  # the chat template rejects the conversation: the record goes
                record.dropped = f"{record.where}: {answer.reason}"
                continue
            if answer is not None:
                _count(summary, answer)
                record.messages[record.todo.pop(0)] = {"role": "assistant", "content": answer.text}
                continue
            answered = [j for j, m in enumerate(record.messages[: record.todo[0]]) if m["role"] == "assistant"]
            if answered:  # keep the answers written so far; the next turn does not fit
                record.messages, record.todo = record.messages[: answered[-1] + 1], []
                summary.shortened += 1
            else:
                record.dropped = f"{record.where}: prompt + max_new_tokens exceed the model's context"


def _count(summary: DistillSummary, answer: Answer, text: bool = False) -> None:
    summary.generations += 1
    summary.new_tokens += answer.new_tokens
    summary.truncated += not answer.stopped
    # A text record's answer holds its prefix: empty when no token was generated (only local
    # generation continues texts, and counts its tokens).
    summary.empty += answer.new_tokens == 0 if text else not answer.text


def _output_line(record: _Pending) -> str:
    body: dict[str, Any] = {"id": record.id, "source": record.where}
    if record.text is not None:
        body["text"] = record.text
    else:
        body["messages"] = record.messages
    return json.dumps(body, ensure_ascii=False) + "\n"


def _settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


def _dropped_path(output: Path) -> Path:
    return output.with_name(output.stem + ".dropped.jsonl")


def _written_ids(path: Path) -> set[int]:
    """The ids of ``path``'s JSON lines (none if it is missing), after cutting a half-written last line."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # a line without its newline was cut by an interruption
    if len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    # "\n" only: str.splitlines() would also split inside a line at a raw U+2028 or U+0085, which
    # json.dumps(ensure_ascii=False) writes as they are.
    return {json.loads(line)["id"] for line in complete.decode("utf-8").split("\n") if line.strip()}


def _append_synced(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def _prepare_output(output: Path, identity: dict[str, Any], overwrite: bool) -> tuple[set[int], set[int]] | None:
    """The ids already written to ``output`` and to its dropped file (a resume); None when the output
    starts afresh (``_start_output`` creates it with the first record)."""
    settings_file = _settings_path(output)
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a directory; pass a JSONL file path")
    if overwrite or not output.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        return None
    if not settings_file.is_file():
        raise ValueError(f"output {str(output)!r} exists and was not written by this command (no "
                         f"{settings_file.name} beside it); pass another --output, or --overwrite to replace it")
    try:
        written = json.loads(settings_file.read_text())
    except (ValueError, OSError) as error:
        written = error
    if not isinstance(written, dict):
        raise ValueError(f"{settings_file} is no settings file this command wrote ({written}); pass another "
                         "--output, or --overwrite to replace the output")
    # A setting the file lacks (written before it was kept) matches its default; one it has that does
    # not decide the text now (e.g. the split of a local file, batching when greedy) is not compared.
    defaults = {key: value for key, value in asdict(DistillSettings()).items() if key in RESUME_FREE}
    changed = []
    for key in sorted({*written, *identity} - (RESUME_FREE - set(identity)), key=str):
        if key in KEPT_LATER and key not in written:  # (a settings file written before it was kept)
            continue
        old, new = written.get(key, defaults.get(key, "unset")), identity.get(key, "unset")
        if old != new:
            changed.append(f"{key} {'(default) ' if key not in written and key in defaults else ''}{old!r} -> {new!r}")
    if changed:
        raise ValueError(f"output {str(output)!r} exists and was written with other settings ({settings_file.name}: "
                         f"{', '.join(changed)}); a resume needs the same ones: pass another --output, or "
                         f"--overwrite to start it afresh")
    return _written_ids(output), _written_ids(_dropped_path(output))


def _start_output(output: Path, identity: dict[str, Any]) -> None:
    """An empty ``output`` and dropped file and, beside them, the settings a resume must match."""
    # The output last: a kill before it leaves no output, so the next run starts afresh (not refused by
    # a settings file it does not match, nor resuming an old output under new settings).
    output.unlink(missing_ok=True)
    _dropped_path(output).unlink(missing_ok=True)
    _settings_path(output).write_text(json.dumps(identity, indent=2) + "\n")
    _dropped_path(output).write_text("")
    output.write_text("")


def self_distill(
    source: str | Path,
    output: str | Path,
    settings: DistillSettings | None = None,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    server: str | None = None,
    server_model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 64,
    split: str = "train",
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> DistillSummary:
    """Regenerate the answers of ``source`` (file or hub dataset) into ``output`` (JSONL).

    The answers come from ``model`` and ``tokenizer`` (a causal LM in eval mode on its device,
    ``LocalBackend``) or from ``server``, the URL of an OpenAI-compatible server (``ServerBackend``:
    ``server_model`` defaults to the first model it lists; ``concurrency`` requests in flight). A call
    with an existing output resumes it (same source, settings and ``metadata``), unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    settings = settings or DistillSettings()
    output = Path(output)
    check_source(source)
    local_source = resolve_path(str(source))
    for path in (output, _dropped_path(output), _settings_path(output)):
        if local_source is not None and path.exists() and path.resolve() == local_source.resolve():
            raise ValueError(f"--output {str(output)!r} would write over the source {str(source)!r} "
                             f"({path.name}); pass another output path")
    metadata = dict(metadata or {})
    settings_keys = {"source", "split", *asdict(settings)}
    if clashing := sorted(set(metadata) & settings_keys, key=str):  # (before a server is asked anything)
        raise ValueError(f"metadata may not name the settings themselves ({clashing}): they are kept already")
    if (model is None) == (server is None):
        raise ValueError("pass either model and tokenizer (generation in this process) or server (the URL of "
                         "an OpenAI-compatible server)")
    if server is not None:
        backend = ServerBackend(server, settings, model=server_model, api_key=api_key, concurrency=concurrency)
        metadata.setdefault("server_model", backend.model)
    elif tokenizer is None:
        raise ValueError("tokenizer is required with model")
    else:
        backend = LocalBackend(model, tokenizer, settings)
        # The weights' dtype decides greedy text too (bf16 and fp32 argmaxes part ways), and so do the
        # weights: a hub model's commit (transformers' _commit_hash; none for a local directory).
        metadata.setdefault("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
        if commit := getattr(getattr(model, "config", None), "_commit_hash", None):
            metadata.setdefault("backbone_revision", commit)
    # What decides the text: a resume must match it. How many records may change; how they are batched
    # too, unless sampling in this process (blocks are seeded by their first record, and a batch draws
    # its tokens together; a server gets the seed with each request). A local file has no split; a
    # server applies its own chat template and takes no text records.
    identity = {"source": str(source), "split": split, **asdict(settings), "shard": list(settings.shard), **metadata}
    free = ["num_records"]
    if settings.temperature == 0 or server is not None:
        free += ["batch_size", "block_records"]
    if server is not None:
        free += ["chat_template", "text_prompt_tokens"]
    if local_source is not None:
        free.append("split")
    for key in free:
        del identity[key]
    previous = _prepare_output(output, identity, overwrite)
    # A fresh output (and its settings) appears with the first record written: a run that writes
    # none (a bad source, an error, no usable record) leaves no file that would refuse the next run.
    fresh = previous is None
    done, dropped = previous or (set(), set())  # ids written, ids dropped (for length) by earlier calls
    summary = DistillSummary(resumed=len(done))
    if settings.num_records is not None:  # a resume asking for fewer records does not cut the output
        summary.past_num_records = sum(i >= settings.num_records for i in done)
    started = time.perf_counter()
    bar = tqdm(desc="distill", unit="record", disable=not progress, dynamic_ncols=True)
    block: list[_Pending] = []
    unlisted: list[_Pending] = []  # dropped before the output (and its dropped file) existed
    records = _source_records(str(source), split, settings, summary.skipped, backend.supports_text)

    def flush() -> None:
        nonlocal block, fresh, unlisted
        if all(record.id in done or record.id in dropped for record in block):
            bar.update(len(block))  # written (or dropped) by an earlier call
            block = []
            return
        # Blocks are cut from the whole source, not from what is left of it, and seeded by their first
        # record: a resumed run forms and samples the blocks an uninterrupted run would. A block only
        # partly written (killed between its lines) is generated again whole, for the same reason.
        torch.manual_seed((settings.seed * 1_000_003 + block[0].id) % 2**63)  # (any int seed: in torch's range)
        _run_block(backend, block, summary)
        kept = [record for record in block if record.dropped is None and record.id not in done]
        lost = [record for record in block if record.dropped is not None and record.id not in dropped]
        summary.skipped.extend(record.dropped for record in lost)
        if kept and fresh:
            _start_output(output, identity)
            fresh = False
        # A dropped record is listed once the output exists (until then, held back), before the block's
        # records are written: a resume that finds them all finds the block complete.
        unlisted += lost
        if unlisted and not fresh:
            _append_synced(_dropped_path(output), [json.dumps({"id": r.id, "source": r.where, "reason": r.dropped},
                                                              ensure_ascii=False) + "\n" for r in unlisted])
            unlisted = []
        if kept:
            _append_synced(output, [_output_line(record) for record in kept])
            summary.records += len(kept)
        bar.update(len(block))
        elapsed = time.perf_counter() - started
        bar.set_postfix(tokens_per_s=f"{summary.new_tokens / max(elapsed, 1e-9):.0f}", skipped=len(summary.skipped))
        block = []

    for record in records:
        block.append(record)
        if len(block) == settings.block_records:
            flush()
    if block:
        flush()
    bar.close()
    summary.seconds = time.perf_counter() - started
    if summary.records == 0 and summary.resumed == 0:
        reason = f" (first reason: {summary.skipped[0]})" if summary.skipped else ""
        raise ValueError(f"source {str(source)!r} gave no record to distill{reason}")
    return summary


def add_arguments(parser) -> None:
    from medusa_liger.heads.export import DTYPES
    from medusa_liger.inference.cli_args import POSITIVE_INT, Given, add_revision_argument, device, number, setup

    setup(parser)
    defaults = DistillSettings()
    engine = parser.add_mutually_exclusive_group(required=True)
    engine.add_argument("--backbone", help="causal LM to answer with, in this process (HF directory or hub name)")
    engine.add_argument("--server", help="or an OpenAI-compatible server with the same weights (vllm serve ...), "
                                         "e.g. http://localhost:8000/v1")
    add_revision_argument(parser, "its default branch")
    parser.add_argument("--data", required=True, help="JSONL/JSON file or hub dataset of conversations, prompts or texts")
    parser.add_argument("--split", default="train", action=Given, help="split of a hub dataset given as --data")
    parser.add_argument("--output", required=True, help="JSONL file to write (resumed when it exists); records "
                        "dropped for length are listed in <stem>.dropped.jsonl beside it")
    parser.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming it")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=defaults.max_new_tokens,
                        help="tokens per answer at most")
    parser.add_argument("--temperature", type=number(float, minimum=0), default=defaults.temperature,
                        help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=number(float, above=0, maximum=1), default=defaults.top_p, action=Given,
                        help="nucleus sampling when temperature > 0")
    parser.add_argument("--seed", type=int, default=defaults.seed, action=Given,
                        help="sampling seed when temperature > 0")
    parser.add_argument("--turns", choices=TURNS, default=defaults.turns,
                        help="regenerate every assistant turn (all) or keep conversations up to their first (first)")
    parser.add_argument("--chat-template", choices=["auto", "builtin"], default=defaults.chat_template, action=Given,
                        help="the tokenizer's own chat template (auto) or medusa-liger's built-in one")
    parser.add_argument("--text-prompt-tokens", type=POSITIVE_INT, default=defaults.text_prompt_tokens, action=Given,
                        help="leading tokens of a text record kept as its prompt")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=defaults.batch_size, action=Given,
                        help="prompts per generate call (--backbone; a server takes --concurrency)")
    parser.add_argument("--block-records", type=POSITIVE_INT, default=defaults.block_records,
                        help="records generated between writes to the output (the unit of a resume)")
    parser.add_argument("--num-records", type=POSITIVE_INT, default=None, help="use only the first N records")
    parser.add_argument("--shard", default="0/1", help="I/N: this process takes records I, I+N, I+2N, ...")
    parser.add_argument("--device", type=device, default=None, action=Given,
                        help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], action=Given, help="model dtype")
    parser.add_argument("--server-model", default=None, action=Given,
                        help="served model name (default: the first the server lists)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), action=Given,
                        help="bearer token for the server (default: $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=POSITIVE_INT, default=64, action=Given,
                        help="requests in flight to the server")


# Settings a resume may change where they do not decide the text (see self_distill's identity);
# missing from an older settings file, they match their defaults.
RESUME_FREE = {"num_records", "batch_size", "block_records", "chat_template", "text_prompt_tokens", "split"}
# Settings files gained these later: one without them resumes (as it did), one with them must match.
KEPT_LATER = {"dtype", "backbone_revision"}

# Flags that only sampling reads (greedy decoding would ignore them), as eval/generate refuse theirs.
SAMPLING_FLAGS = ("--top-p", "--seed")
# Flags that only one engine reads: the model in this process, or the server (which applies its own
# chat template and answers conversations only).
BACKBONE_FLAGS = ("--device", "--dtype", "--batch-size", "--chat-template", "--text-prompt-tokens", "--revision")
SERVER_FLAGS = ("--server-model", "--api-key", "--concurrency")


def run(args) -> int:
    import sys

    from medusa_liger.inference.cli import error_text, load_causal_lm
    from medusa_liger.inference.cli_args import check_needs

    check_needs(args, SAMPLING_FLAGS, "--temperature > 0", args.temperature > 0)
    check_needs(args, BACKBONE_FLAGS, "--backbone (a model in this process)", args.backbone is not None)
    check_needs(args, SERVER_FLAGS, "--server", args.server is not None)
    hub_data = resolve_path(str(args.data)) is None and not looks_like_local_path(args.data)
    check_needs(args, ["--split"], "--data naming a hub dataset", hub_data)
    try:
        settings = DistillSettings(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            turns=args.turns, chat_template=args.chat_template, text_prompt_tokens=args.text_prompt_tokens,
            batch_size=args.batch_size, block_records=args.block_records, shard=parse_shard(args.shard),
            num_records=args.num_records,
        )
        check_source(args.data)  # before the model loads (self_distill checks it again, for its own callers)
        if Path(args.output).is_dir():
            raise ValueError(f"--output {args.output!r} is a directory; pass a JSONL file path")
        common = {"split": args.split, "overwrite": args.overwrite}
        if args.server is not None:  # (an empty --server is refused by name, not taken for --backbone)
            summary = self_distill(args.data, args.output, settings, server=args.server, server_model=args.server_model,
                                   api_key=args.api_key, concurrency=args.concurrency, **common)
        else:
            model, tokenizer = load_causal_lm(args.backbone, device=args.device, dtype=args.dtype,
                                              revision=args.revision)
            summary = self_distill(args.data, args.output, settings, model=model, tokenizer=tokenizer,
                                   metadata={"backbone": str(args.backbone)}, **common)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"medusa-liger distill: error: {error_text(error, args.backbone)}", file=sys.stderr)
        return 2
    print(f"wrote {summary.records} records to {args.output} ({summary.resumed} were already there): "
          f"{summary.generations} generations, {summary.new_tokens} new tokens in {summary.seconds:.1f} s "
          f"({summary.new_tokens / max(summary.seconds, 1e-9):.0f} tokens/s), "
          f"{summary.truncated} cut at --max-new-tokens, {len(summary.skipped)} records skipped")
    for reason in summary.skipped[:5]:
        print(f"  skipped: {reason}")
    if summary.shortened:
        print(f"note: {summary.shortened} records end at an earlier answer: their next turn did not fit the model's "
              "context with --max-new-tokens", file=sys.stderr)
    if summary.empty:
        print(f"warning: {summary.empty} of {summary.generations} answers are empty (the model ended its turn at "
              "once, or wrote only whitespace): they teach the heads nothing; check the model and its chat template "
              "(--chat-template)", file=sys.stderr)
    if summary.past_num_records:
        print(f"note: {summary.past_num_records} records already in {args.output} lie past --num-records "
              f"{args.num_records} (an earlier run asked for more); they stay in the output")
    return 0
