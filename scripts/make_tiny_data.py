"""Build the small real-text dataset shipped in ``medusa_liger/data/`` (how the files were made).

Source: the language reference topics that ship with CPython itself, ``pydoc_data.topics.topics``
(topic name -> reStructuredText-like plain text; what ``help("assert")`` prints). No text is
invented: every assistant turn is a verbatim run of paragraphs from one topic, and the user turns
are fixed question templates that name the section title taken from the same text.

How a topic becomes conversations:

1. split the topic into sections at underlined titles (a title line followed by a line of one
   repeated character ``*``, ``=``, ``-``, ``~`` or ``^`` of the same length);
2. split each section body into paragraphs (blank-line separated) and greedily group consecutive
   paragraphs into chunks of at most ``--chunk-chars`` characters (a longer paragraph stays whole);
3. one conversation per section: the user asks ``Explain <section title> in Python.``, the
   assistant answers with the first chunk, and each further chunk is one more exchange
   (``Please continue.`` -> next chunk), at most ``--max-turns`` exchanges per conversation (a
   longer section continues in a new conversation asking for ``<title> (continued)``).

Files written (JSON Lines, one record per line):

* ``pydoc_chat.jsonl``: every conversation, OpenAI format ``{"messages": [{"role", "content"}]}``;
  the tiny default config trains on it;
* ``pydoc_sharegpt.jsonl``: the first ``--sample`` conversations in ShareGPT format
  ``{"conversations": [{"from": "human"|"gpt", "value"}]}`` (format tests, examples);
* ``pydoc_text.jsonl``: the first ``--sample`` chunks as plain ``{"text": ...}`` documents.

Run: ``python scripts/make_tiny_data.py`` (the shipped files were made with CPython 3.11; other
versions ship slightly different topic text).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

UNDERLINE = re.compile(r"^([*=\-~^])\1+$")


def split_sections(text: str) -> list[tuple[str, str]]:
    """(title, body) pairs of one topic, split at underlined titles."""
    lines = text.splitlines()
    sections: list[tuple[str, list[str]]] = []
    title, body = "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        # A title is a non-empty line underlined by a run of one character of the same length.
        if line.strip() and UNDERLINE.match(nxt) and len(nxt) == len(line):
            if title or any(b.strip() for b in body):
                sections.append((title, body))
            title, body = line.strip(), []
            i += 2
            continue
        body.append(line)
        i += 1
    sections.append((title, body))
    return [(t, "\n".join(b).strip("\n")) for t, b in sections if "\n".join(b).strip()]


def chunk_paragraphs(body: str, max_chars: int) -> list[str]:
    """Consecutive paragraphs grouped into chunks of at most ``max_chars`` characters."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", body) if p.strip()]
    chunks: list[str] = []
    current: list[str] = []
    for paragraph in paragraphs:
        candidate = "\n\n".join(current + [paragraph])
        if current and len(candidate) > max_chars:
            chunks.append("\n\n".join(current))
            current = [paragraph]
        else:
            current.append(paragraph)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def build_conversations(topics: dict[str, str], chunk_chars: int, max_turns: int) -> list[list[dict]]:
    """OpenAI-style message lists, one per (part of a) section, in topic order."""
    conversations = []
    for name in sorted(topics):
        for title, body in split_sections(topics[name]):
            title = title or name
            chunks = chunk_paragraphs(body, chunk_chars)
            for start in range(0, len(chunks), max_turns):
                part = chunks[start : start + max_turns]
                subject = title if start == 0 else f"{title} (continued)"
                messages = [{"role": "user", "content": f"Explain {subject} in Python."}]
                for j, chunk in enumerate(part):
                    if j > 0:
                        messages.append({"role": "user", "content": "Please continue."})
                    messages.append({"role": "assistant", "content": chunk})
                conversations.append(messages)
    return conversations


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "medusa_liger" / "data")
    parser.add_argument("--chunk-chars", type=int, default=1200, help="max characters per assistant turn")
    parser.add_argument("--max-turns", type=int, default=3, help="max assistant turns per conversation")
    parser.add_argument("--sample", type=int, default=40, help="records in the ShareGPT and text samples")
    args = parser.parse_args(argv)

    from pydoc_data.topics import topics

    conversations = build_conversations(topics, args.chunk_chars, args.max_turns)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "pydoc_chat.jsonl", [{"messages": m} for m in conversations])
    sharegpt_role = {"user": "human", "assistant": "gpt"}
    write_jsonl(
        args.out / "pydoc_sharegpt.jsonl",
        [
            {"conversations": [{"from": sharegpt_role[m["role"]], "value": m["content"]} for m in conv]}
            for conv in conversations[: args.sample]
        ],
    )
    texts = [m["content"] for conv in conversations for m in conv if m["role"] == "assistant"]
    write_jsonl(args.out / "pydoc_text.jsonl", [{"text": t} for t in texts[: args.sample]])
    print(
        f"{len(conversations)} conversations from {len(topics)} topics (Python {sys.version.split()[0]}) "
        f"-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
