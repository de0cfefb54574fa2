"""The data pipeline: formats, chat templates, assistant-only masks, packing, bad input, cache, loader."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from medusa_liger.kernels.reference import shifted_targets
from medusa_liger.records import (
    BUILTIN_CHAT_TEMPLATE,
    Example,
    chat_template_for,
    normalize,
)
from medusa_liger.train.config import DataConfig
from medusa_liger.train.data import (
    IGNORE_INDEX,
    load_examples,
    render_conversation,
    tokenize_example,
    tokenize_examples,
)
from medusa_liger.train.packing import (
    PackedLoader,
    build_packed_data,
    most_common_target_frequency,
    pack,
    split_eval,
)
from medusa_liger.train.tiny import train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "medusa_liger" / "data"
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does pass do?"},
    {"role": "assistant", "content": "It does nothing."},
    {"role": "user", "content": "And break?"},
    {"role": "assistant", "content": "It leaves the loop."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [json.loads(line)["text"] for line in (DATA / "pydoc_text.jsonl").read_text().splitlines()]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def data_cfg(paths, **kw) -> DataConfig:
    return DataConfig(paths=[str(p) for p in paths], **kw)


# ------------------------------------------------------------------ formats


def test_shipped_files_parse_in_every_format():
    shipped = (("pydoc_chat.jsonl", "messages"), ("pydoc_sharegpt.jsonl", "messages"), ("pydoc_text.jsonl", "text"))
    for name, kind in shipped:
        examples = load_examples(data_cfg([DATA / name]))
        assert len(examples) >= 40
        assert all(getattr(e, kind) for e in examples)
    assert (DATA / "pydoc_chat.jsonl").stat().st_size < 2 * 2**20


def test_sharegpt_and_openai_normalize_the_same():
    openai = normalize("x:1", {"messages": CHAT}, "auto", "assistant")
    share = normalize("x:1", {"conversations": [
        {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]} for m in CHAT
    ]}, "auto", "assistant")
    assert openai.messages == share.messages == CHAT
    assert normalize("x:1", {"text": "abc"}, "auto", "assistant").text == "abc"


@pytest.mark.parametrize(
    "record, fmt, match",
    [
        ({"foo": 1}, "auto", "none of the keys"),
        ([1, 2], "auto", "JSON object"),
        ({"messages": []}, "auto", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "auto", "role='robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "auto", "must be a string"),
        ({"messages": [{"role": "user"}]}, "auto", "'role' and 'content'"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "auto", "no assistant turn"),
        ({"text": ""}, "auto", "non-empty string"),
        ({"text": "abc"}, "openai", "expects the key 'messages'"),
    ],
)
def test_invalid_records_are_named(record, fmt, match):
    with pytest.raises(ValueError, match=match) as info:
        normalize("file.jsonl:7", record, fmt, "assistant")
    assert "file.jsonl:7" in str(info.value)


def test_no_assistant_turn_is_fine_when_training_on_everything():
    example = normalize("x:1", {"messages": CHAT[:2]}, "auto", "all")
    assert len(example.messages) == 2


# ------------------------------------------------------------------ templates and masks


def test_assistant_only_mask(tokenizer):
    template = chat_template_for(tokenizer, "auto")
    ids, labels = tokenize_example(Example("x", messages=CHAT), tokenizer, template, "assistant")
    assert len(ids) == len(labels)
    target_text = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    other_text = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert "It does nothing." in target_text and "It leaves the loop." in target_text
    assert target_text.count(tokenizer.eos_token) == 2  # each assistant turn learns to end
    assert "pass" not in target_text and "break" not in target_text and "briefly" not in target_text
    assert "What does pass do?" in other_text and "<|assistant|>" in other_text
    assert all(l == t for t, l in zip(ids, labels) if l != IGNORE_INDEX)

    ids_all, labels_all = tokenize_example(Example("x", messages=CHAT), tokenizer, template, "all")
    assert ids_all == ids and labels_all == ids


def test_builtin_template_when_tokenizer_has_none(tokenizer):
    assert chat_template_for(tokenizer, "builtin") == BUILTIN_CHAT_TEMPLATE
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|end|>")
    assert not bare.chat_template
    assert chat_template_for(bare, "auto") == BUILTIN_CHAT_TEMPLATE
    text, spans = render_conversation(bare, CHAT, BUILTIN_CHAT_TEMPLATE)
    assert text.startswith("<|system|>\nAnswer briefly.<|end|>\n")  # no BOS token defined
    assert [text[a:b] for a, b in spans] == ["It does nothing.<|end|>\n", "It leaves the loop.<|end|>\n"]


def test_template_that_rewrites_prefixes_is_rejected(tokenizer):
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="chat_template=builtin or data.loss_on=all"):
        render_conversation(tokenizer, CHAT, template, "conv.jsonl:3")


# A last assistant turn rendered unlike the same turn inside a longer conversation. Qwen3-style: the
# turns after the last user message get an empty think block, but only when they end the conversation.
# Phi-3-style: EOS after the last message unless a generation prompt follows.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_query and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content | trim + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"  # earlier turns lose their reasoning
    "{{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] | trim + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content | trim + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PHI3_STYLE = ("{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


@pytest.mark.parametrize(("template", "expected"), [
    (QWEN3_STYLE, ["It does nothing.<|im_end|>\n",
                   "<think>\n\n</think>\n\nIt leaves the loop.<|im_end|>\n"]),
    (PHI3_STYLE, ["It does nothing.<|end|>\n", " It leaves the loop.\n<|end|>\n<|end|>"]),  # EOS "<|end|>"
], ids=["qwen3", "phi3"])
def test_templates_that_render_a_last_turn_differently_locate_every_turn(tokenizer, template, expected):
    # Such a template refused every conversation with two assistant turns (the prefix check), so a
    # Qwen3 or Phi-3 run could only train on single-turn data.
    messages = [*CHAT[:4], {"role": "assistant", "content": " It leaves the loop.\n"}]  # trimmed by Qwen3's
    text, spans = render_conversation(tokenizer, messages, template, "conv.jsonl:1")
    assert [text[a:b] for a, b in spans] == expected
    ids, labels = tokenize_example(Example("x", messages=messages), tokenizer, template, "assistant")
    targets = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert "It does nothing." in targets and "It leaves the loop." in targets
    assert "pass" not in targets and "break" not in targets and "user" not in targets


@pytest.mark.parametrize(("first", "expected"), [
    ("<think>\nWhy? Because.\n</think>\n\nIt does nothing.", "It does nothing.<|im_end|>\n"),  # reasoning dropped
    ("", "<|im_end|>\n"),  # an empty turn still ends
    ("  \n", "<|im_end|>\n"),
    ("think", "think<|im_end|>\n"),  # also a word of the last turn's think block
])
def test_qwen3_earlier_turns_keep_their_end_marker(tokenizer, first, expected):
    # Reasoning kept in an earlier turn's content (self-distilled data) was not found in the rendering,
    # so the conversation was refused; an empty earlier turn was found inside the last-turn think block
    # and lost its end-of-turn marker.
    messages = [CHAT[1], {"role": "assistant", "content": first}, CHAT[3], {"role": "assistant", "content": "Ends."}]
    text, spans = render_conversation(tokenizer, messages, QWEN3_STYLE, "conv.jsonl:1")
    assert [text[a:b] for a, b in spans] == [expected, "<think>\n\n</think>\n\nEnds.<|im_end|>\n"]
    ids, labels = tokenize_example(Example("x", messages=messages), tokenizer, QWEN3_STYLE, "assistant")
    targets = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert "user" not in targets and "pass" not in targets and "assistant" not in targets


def test_an_earlier_turn_that_ends_unlike_the_last_is_its_content(tokenizer):
    # EOS after the last message only, a newline between turns: nothing after an earlier turn agrees with
    # the last-turn rendering's tail. Its content is still the turn (refused for a while: no end agreed).
    template = ("{% for m in messages %}{{ m.role + ': ' + m.content }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ '\\nassistant: ' }}{% else %}{{ eos_token }}{% endif %}")
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"},
                {"role": "user", "content": "why"}, {"role": "assistant", "content": "because"}]
    text, spans = render_conversation(tokenizer, messages, template)
    assert [text[a:b] for a, b in spans] == ["hello you", "because<|end|>"]


def test_long_reasoning_before_an_empty_answer_is_located_in_linear_time(tokenizer):
    # Every place in the last-turn rendering matches an empty answer: each was tokenized (19 s for 8k chars).
    import time

    reasoning = "<think>\n" + "Let us see, step by step. " * 320 + "\n</think>\n\n"  # ~8k characters
    messages = [CHAT[1], {"role": "assistant", "content": reasoning}, CHAT[3], {"role": "assistant", "content": "a"}]
    started = time.perf_counter()
    text, spans = render_conversation(tokenizer, messages, QWEN3_STYLE)
    assert time.perf_counter() - started < 2.0
    assert [text[a:b] for a, b in spans][0] == "<|im_end|>\n"


def test_a_turn_is_not_located_in_another_turns_text(tokenizer):
    # The last-turn rendering differs and this turn's content is not where the turn is (the template
    # drops earlier replies): found only inside a later turn, it is refused rather than misplaced.
    template = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role + ': ' + m.content + "
                "'\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    messages = [CHAT[1], {"role": "assistant", "content": "break"}, CHAT[3], {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match="conv.jsonl:2: the chat template does not render prefixes"):
        render_conversation(tokenizer, messages, template, "conv.jsonl:2")


def test_conversations_a_template_refuses_are_skipped_with_on_error_skip(tokenizer, tmp_path):
    # Only reading and normalizing honoured data.on_error: one conversation the template refused (a
    # system turn for Gemma's, roles that do not alternate for Mistral's) stopped a skip run.
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    named = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|end|>")
    named.chat_template = template
    good = [Example(f"c.jsonl:{i}", messages=CHAT[1:3]) for i in (1, 2)]
    examples = [good[0], Example("c.jsonl:3", messages=CHAT), good[1]]
    with pytest.warns(UserWarning, match="skipped 1 conversations .* first: c.jsonl:3: the chat template rejected"):
        kept = tokenize_examples(examples, named, DataConfig(on_error="skip"))
    assert kept == tokenize_examples(good, named, DataConfig())
    with pytest.raises(ValueError, match="c.jsonl:3: the chat template rejected .* data.on_error=skip"):
        tokenize_examples(examples, named, DataConfig(on_error="fail"))
    if importlib.util.find_spec("datasets") is not None:  # the same in worker processes
        parallel = DataConfig(on_error="skip", num_proc=2, num_proc_min_examples=1)
        with pytest.warns(UserWarning, match="skipped 1 conversations .* first: c.jsonl:3"):
            assert tokenize_examples(examples, named, parallel) == kept


def test_a_tokenizer_without_offsets_is_refused_for_assistant_masks_and_keys_the_cache(tmp_path):
    # A Python tokenizer (no `tokenizers` backend) crashed the cache key (no backend_tokenizer) and,
    # without the cache, the mask (no offset_mapping) with tracebacks.
    from transformers import ByT5Tokenizer

    from medusa_liger.train.packing import data_fingerprint

    slow = ByT5Tokenizer()
    slow.chat_template = BUILTIN_CHAT_TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"text": "The pass statement."}])
    with pytest.raises(ValueError, match="data.loss_on=assistant needs a fast tokenizer .*ByT5Tokenizer"):
        tokenize_examples(load_examples(data_cfg([path])), slow, data_cfg([path]))
    cfg = data_cfg([path], loss_on="all", seq_len=16)
    data = build_packed_data(cfg, slow, tmp_path / "cache")
    slow.save_pretrained(tmp_path / "a")
    same, other = ByT5Tokenizer.from_pretrained(tmp_path / "a"), ByT5Tokenizer(extra_ids=10)  # read from elsewhere
    other.chat_template = BUILTIN_CHAT_TEMPLATE
    assert len(data) and data_fingerprint(cfg, slow) == data_fingerprint(cfg, same)
    assert data_fingerprint(cfg, slow) != data_fingerprint(cfg, other)
    assert torch.equal(build_packed_data(cfg, slow, tmp_path / "cache").input_ids, data.input_ids)  # the cached rows


def test_text_documents_get_bos_and_eos(tokenizer):
    ids, labels = tokenize_example(Example("x", text="The pass statement."), tokenizer, "", "assistant")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and labels == ids


# ------------------------------------------------------------------ packing


def test_packing_segments_padding_and_no_crossing_targets():
    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [IGNORE_INDEX, 5]), ([6, 7, 8, 9], [6, 7, 8, 9]),
                ([10, 11, 12], [10, 11, 12])]
    data = pack(examples, seq_len=6, long_examples="split", pad_id=0)
    assert data.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0], [10, 11, 12, 0, 0, 0]]
    # A piece that exactly fills what is left of a row goes in it.
    exact = pack(examples[2:], seq_len=7, long_examples="split", pad_id=0)
    assert exact.input_ids.tolist() == [[6, 7, 8, 9, 10, 11, 12]]
    assert data.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert data.labels[0].tolist() == [1, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]
    # Shift-2 targets never cross from one segment into the next.
    targets = shifted_targets(data.labels, 2, IGNORE_INDEX, data.segment_ids)
    assert targets[0].tolist() == [3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_truncate_versus_split():
    long = (list(range(1, 15)), list(range(1, 15)))
    split = pack([long], seq_len=5, long_examples="split", pad_id=0)
    assert split.input_ids.flatten().tolist()[:14] == list(range(1, 15)) and len(split) == 3
    # Truncation says what it cuts (it cut 98% of the shipped chat data's targets at seq_len 48, unsaid).
    with pytest.warns(UserWarning, match=r"truncate: 1 of 2 examples are longer than data.seq_len=5, and 9 of their "
                                         r"targets \(56.2% of all\) are cut off"):
        truncated = pack([long, ([1, 2], [1, 2])], seq_len=5, long_examples="truncate", pad_id=0)
    assert truncated.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 0, 0, 0]]
    # A piece whose only target is its first token teaches nothing and is dropped.
    masked = ([1, 2, 3, 4, 5, 6], [IGNORE_INDEX] * 5 + [6])
    assert len(pack([masked], seq_len=5, long_examples="split", pad_id=0)) == 0
    with pytest.raises(ValueError, match="long_examples"):
        pack([long], seq_len=5, long_examples="drop", pad_id=0)


def test_most_common_target_frequency():
    data = pack([([1, 2, 2, 2, 3], [1, 2, 2, 2, 3])], seq_len=5, long_examples="split", pad_id=0)
    assert most_common_target_frequency(data, 2) == (2, pytest.approx(2 / 3))


# ------------------------------------------------------------------ bad input


def test_malformed_line_fails_with_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"text": "fine"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_examples(data_cfg([path]))
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        examples = load_examples(data_cfg([path], on_error="skip"))
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["1", "3"]


def test_invalid_record_skip_or_fail(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    with pytest.raises(ValueError, match=r"conv\.jsonl:2: conversation has no assistant turn"):
        load_examples(data_cfg([path]))
    with pytest.warns(UserWarning):
        assert len(load_examples(data_cfg([path], on_error="skip"))) == 1


def test_missing_file_and_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(data_cfg([tmp_path / "missing.jsonl"]))
    # Names no hub dataset can have are missing files too, not hub lookups (records.looks_like_local_path).
    for name in ("runs/data/chats", "notes.txt", "data\\chats"):
        with pytest.raises(ValueError, match="does not exist"):
            load_examples(data_cfg([name]))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty dataset"):
        load_examples(data_cfg([empty]))
    listing = tmp_path / "data.json"
    listing.write_text('[{"text": "a"},\n {"text": ]')
    with pytest.raises(ValueError, match=r"data\.json:2: malformed JSON"):
        load_examples(data_cfg([listing]))


def test_a_directory_source_is_named_as_one(tmp_path):
    (tmp_path / "chats").mkdir()
    (tmp_path / "chats" / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"^data.paths: '.*chats' is a directory; pass its files one by one \(it "
                                         r"holds \['a.jsonl'\]\)"):
        load_examples(data_cfg([tmp_path / "chats"]))


def test_an_unlistable_directory_source_is_named_without_its_entries(tmp_path, monkeypatch):
    (tmp_path / "chats").mkdir()

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(ValueError, match=r"'.*chats' is a directory; pass its files one by one or a hub dataset"):
        load_examples(data_cfg([tmp_path / "chats"]))


def test_a_byte_order_mark_is_no_malformed_first_record(tmp_path):
    """Editors on Windows write UTF-8 with a byte-order mark: the first line was 'malformed JSON'."""
    lines = tmp_path / "conv.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"messages": CHAT}) + "\n").encode() * 2)
    listing = tmp_path / "conv.json"
    listing.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"messages": CHAT}]).encode())
    assert len(load_examples(data_cfg([lines]))) == 2
    assert len(load_examples(data_cfg([listing]))) == 1


# ------------------------------------------------------------------ cache, processes, loader


def test_packed_data_is_cached(tmp_path, tokenizer):
    cfg = data_cfg([DATA / "pydoc_sharegpt.jsonl"], seq_len=64)
    first = build_packed_data(cfg, tokenizer, tmp_path)
    cached = list(tmp_path.glob("packed-*.pt"))
    assert len(cached) == 1
    second = build_packed_data(cfg, tokenizer, tmp_path)
    assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.segment_ids, second.segment_ids)
    build_packed_data(data_cfg([DATA / "pydoc_sharegpt.jsonl"], seq_len=32), tokenizer, tmp_path)
    assert len(list(tmp_path.glob("packed-*.pt"))) == 2  # another seq_len, another cache entry


def test_a_cached_run_says_the_data_warnings_again(tmp_path, tokenizer):
    from medusa_liger.records import DataWarning

    long = {"messages": [{"role": "user", "content": "Tell me. " * 40}, {"role": "assistant", "content": "Yes. " * 40}]}
    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}, long])
    cfg = data_cfg([path], seq_len=64, on_error="skip", long_examples="truncate")

    def said(**kw) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = build_packed_data(cfg, tokenizer, tmp_path / "cache", **kw)
        assert len(data) > 0
        return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]

    first = said()
    assert [m.split(";")[0].split(":")[0] for m in first] == ["skipped 1 bad records", "data.long_examples=truncate"]
    again = said()  # read from the cache: nothing was read or packed, the same is said
    assert len(again) == 2 and all("(said when the packed-data cache" in m for m in again)
    assert [m.split(" (said when")[0] for m in again] == first
    with pytest.warns(DataWarning, match="skipped 1 bad records"):
        loaded = load_examples(cfg)  # (the caller read the records and said what reading them says)
    assert [m.split(" (said when")[0] for m in said(examples=loaded)] == first[1:]
    assert said(quiet=True) == []


def test_multiprocess_tokenization_matches(tokenizer):
    pytest.importorskip("datasets")
    cfg = data_cfg([DATA / "pydoc_sharegpt.jsonl"], max_examples=12, num_proc=2, num_proc_min_examples=1)
    examples = load_examples(cfg)
    serial = tokenize_examples(examples, tokenizer, data_cfg([DATA / "pydoc_sharegpt.jsonl"]))
    assert tokenize_examples(examples, tokenizer, cfg) == serial


def test_a_loader_resumed_in_the_middle_of_a_step_ends_the_epoch_where_it_would_have():
    # 27 rows, steps of 2 micro-batches of 3: 4 steps an epoch and a 3-row tail, dropped. A loader
    # resumed after the first micro-batch of a step must not take the tail for a step's second half.
    data = pack([([i, i + 1], [i, i + 1]) for i in range(1, 55, 2)], seq_len=2, long_examples="split", pad_id=0)
    halfway = PackedLoader(data, 3, seed=5, grad_accum=2)
    for _ in range(3):
        halfway.next_batch()
    assert halfway.state_dict()["micro_step"] == 1
    again = PackedLoader(data, 3, seed=5, grad_accum=2)
    again.load_state_dict(halfway.state_dict())
    rows = [[loader.next_batch()["input_ids"][:, 0].tolist() for _ in range(8)] for loader in (halfway, again)]
    assert rows[0] == rows[1] and halfway.state_dict() == again.state_dict()
    assert halfway.state_dict()["epoch"] == 1
    again.load_state_dict({"epoch": 0, "position": 6})  # an older checkpoint (between steps, no micro_step)
    assert again.state_dict()["micro_step"] == 0


def test_loader_order_is_seeded_and_resumable():
    n = 10
    data = pack([([i, i + 1], [i, i + 1]) for i in range(1, 2 * n, 2)], seq_len=2, long_examples="split", pad_id=0)
    assert len(data) == n
    a = PackedLoader(data, 3, seed=5)
    seen = [a.next_batch()["input_ids"][:, 0].tolist() for _ in range(7)]
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # no repeats within an epoch
    assert seen[3:6] != seen[:3]  # each epoch its own order (a seed without the epoch repeated epoch 0)
    for seed in (10**14, 2**64 - 1, -(2**63)):  # seed * 1_000_003 overflowed torch's seed range
        assert len(PackedLoader(data, 3, seed=seed).next_batch()["input_ids"]) == 3
    assert sorted(sum(seen[3:6], [])) == sorted(sum(seen[:3], []))
    b = PackedLoader(data, 3, seed=5)
    for _ in range(4):
        b.next_batch()
    c = PackedLoader(data, 3, seed=5)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch()["input_ids"][:, 0].tolist() for _ in range(3)] == seen[4:]
    with pytest.raises(ValueError, match="micro_batch_size"):
        PackedLoader(data, 11, seed=0)


def test_torch_seed_reads_any_integer_as_torch_does():
    from medusa_liger.seeds import torch_seed

    for seed in (0, 5, -1, -(2**63), 2**64 - 1, 2**64, 2**70 + 3):
        reduced = torch_seed(seed)
        assert 0 <= reduced < 2**64 and (reduced - seed) % 2**64 == 0
        torch.manual_seed(reduced)  # in torch's range
    same = torch.Generator().manual_seed(-1).initial_seed()
    assert torch.Generator().manual_seed(torch_seed(-1)).initial_seed() == same
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(2**64)  # what the reduction is for


def test_split_eval_holds_out_rows():
    data = pack([([i, i], [i, i]) for i in range(1, 21)], seq_len=2, long_examples="split", pad_id=0)
    train, held = split_eval(data, 0.1, seed=0)
    assert len(train) == 18 and len(held) == 2
    assert not set(held.input_ids[:, 0].tolist()) & set(train.input_ids[:, 0].tolist())
    assert split_eval(data, 0.0, seed=0)[1] is None
    # Rows of whole documents: the rows torch.randperm draws first, as before documents were grouped.
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    assert held.input_ids[:, 0].tolist() == sorted(order[:2].add(1).tolist())


@pytest.mark.parametrize("seed", range(6))
def test_split_eval_keeps_a_split_document_on_one_side(seed):
    """A document split over rows had pieces held out and pieces trained on (its held-out prompt's
    answer among the training rows)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for doc in range(12):  # documents of 1-4 rows of 4 tokens; ids tell documents apart
        n = 4 * int(torch.randint(1, 5, (1,), generator=g))
        examples.append(([100 * doc + i for i in range(n)], [100 * doc + i for i in range(n)]))
    data = pack(examples, seq_len=4, long_examples="split", pad_id=0)
    train, held = split_eval(data, 0.25, seed=seed)
    docs = [{int(x) // 100 for x in part.input_ids.flatten()} for part in (train, held)]
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    assert len(train) + len(held) == len(data) and 0 < len(held) <= max(round(0.25 * len(data)), 4)
    with pytest.raises(ValueError, match="one document"):
        split_eval(pack([(list(range(12)), list(range(12)))], 4, "split", 0), 0.3, seed=0)


def test_split_eval_does_not_chain_documents_whose_first_pieces_were_dropped():
    """A later piece whose earlier pieces had no target (a long prompt) counted as continuing the row
    before, another document: 40 one-row conversations grouped as one ("one document fills them all")."""
    examples = []
    for doc in range(40):  # a prompt of 6 tokens without targets, then 3 answer tokens: row pieces of 4
        ids = [100 * doc + i for i in range(9)]
        examples.append((ids, [-100] * 6 + ids[6:]))
    data = pack(examples, seq_len=4, long_examples="split", pad_id=0)
    assert len(data) == 40 and data.continued[:, 0].all() and not data.follows.any()
    train, held = split_eval(data, 0.1, seed=0)
    assert (len(train), len(held)) == (36, 4)
    # A piece right after its kept predecessor still keeps the two on one side.
    chained = pack([(list(range(8)), list(range(8)))], 4, "split", 0)
    assert chained.follows[:, 0].tolist() == [False, True]


@pytest.mark.parametrize("seed", range(8))
def test_split_eval_keeps_a_document_whole_around_a_dropped_middle_piece(seed):
    """Its third piece follows its first (the second, without a target, is dropped): it was grouped
    alone, and held out while the rest of its document trained."""
    examples = []
    for doc in range(10):  # 3 pieces of 4 tokens, the middle one without targets (a long user turn)
        ids = [100 * doc + i for i in range(12)]
        examples.append((ids, ids[:4] + [-100] * 4 + ids[8:]))
    data = pack(examples, seq_len=4, long_examples="split", pad_id=0)
    assert data.follows[:, 0].tolist() == [False, True] * 10
    train, held = split_eval(data, 0.1, seed=seed)
    docs = [{int(x) // 100 for x in part.input_ids.flatten()} for part in (train, held)]
    assert docs[1] and not docs[0] & docs[1]


def test_loss_on_all_needs_no_prefix_renders(tokenizer):
    # The prefix check ran with loss_on=all too, so its own advice ("or data.loss_on=all") failed.
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    example = Example("conv.jsonl:3", messages=CHAT)
    ids, labels = tokenize_example(example, tokenizer, template, "all")
    assert ids and labels == ids
    with pytest.raises(ValueError, match="data.loss_on=all"):
        tokenize_example(example, tokenizer, template, "assistant")


def test_a_leading_assistant_turn_is_context_not_a_target(tokenizer):
    # transformers 5 refuses to render the empty conversation before it: the whole build stopped.
    messages = [{"role": "assistant", "content": "Hello!"}, *CHAT[1:]]
    text, spans = render_conversation(tokenizer, messages, BUILTIN_CHAT_TEMPLATE)
    assert "Hello!" in text and [text[a:b] for a, b in spans] == ["It does nothing.<|end|>\n",
                                                                  "It leaves the loop.<|end|>\n"]


def test_a_template_that_raises_names_the_record(tokenizer, tmp_path):
    template = "{% for m in messages %}{% if loop.index0 % 2 == 1 and m['role'] == 'user' %}" \
               "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    with pytest.raises(ValueError, match="conv.jsonl:7: the chat template rejected this conversation: "
                                         "roles must alternate"):
        tokenize_example(Example("conv.jsonl:7", messages=messages), tokenizer, template, "assistant")


def test_max_examples_caps_over_all_files(tmp_path):
    # The cap only left the inner loop: each later file still added one record.
    paths = []
    for f in range(3):
        paths.append(tmp_path / f"{f}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": f"doc {f}.{i}"}) + "\n" for i in range(5)))
    assert [e.text for e in load_examples(data_cfg(paths, max_examples=2))] == ["doc 0.0", "doc 0.1"]
    assert [e.text for e in load_examples(data_cfg(paths, max_examples=6))][-1] == "doc 1.0"


@pytest.mark.parametrize("role", [["human"], {"a": 1}])
def test_an_unhashable_role_is_a_located_error(role):
    for fmt, key, turn in (("sharegpt", "conversations", {"from": role, "value": "a"}),
                           ("openai", "messages", {"role": role, "content": "a"})):
        with pytest.raises(ValueError, match="f.jsonl:2: turn 0"):
            normalize("f.jsonl:2", {key: [turn]}, fmt, "assistant")


def test_the_cache_key_covers_the_special_tokens(tokenizer):
    # Same tokenizer.json, another EOS (a base model vs its instruct version) read stale cached rows.
    from medusa_liger.train.packing import data_fingerprint

    cfg = data_cfg([])
    other = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.bos_token,
                                bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token,
                                chat_template=tokenizer.chat_template)
    assert data_fingerprint(cfg, tokenizer) != data_fingerprint(cfg, other)
    same = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token,
                               bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token,
                               chat_template=tokenizer.chat_template)
    assert data_fingerprint(cfg, tokenizer) == data_fingerprint(cfg, same)


def test_the_cache_key_covers_split_special_tokens(tmp_path, tokenizer):
    # split_special_tokens=True (e.g. from a tokenizer_config.json) encodes "<|end|>" as text: other rows,
    # which a cache keyed without it served stale.
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    cfg = data_cfg([path], seq_len=128)
    build_packed_data(cfg, tokenizer, tmp_path / "cache")
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    split = AutoTokenizer.from_pretrained(tmp_path / "tok", split_special_tokens=True)
    fresh = build_packed_data(cfg, split, None)
    cached = build_packed_data(cfg, split, tmp_path / "cache")
    assert torch.equal(fresh.input_ids, cached.input_ids) and torch.equal(fresh.labels, cached.labels)


def test_a_hub_dataset_is_keyed_by_the_version_loaded_not_its_name(tmp_path, tokenizer, monkeypatch):
    # A hub dataset was keyed by its name and split only: after its owner pushed new rows, a rerun read
    # the rows packed from the old revision. (datasets' loader stands in for the hub here.)
    datasets = pytest.importorskip("datasets")
    from medusa_liger.train.packing import data_fingerprint

    versions = {"v1": [{"text": "The pass statement does nothing."}, {"text": "A tuple is immutable."}],
                "v2": [{"text": "The pass statement does nothing."}, {"text": "A list is mutable."}]}
    pushed, asked = ["v1"], []

    def load_dataset(path, split):
        asked.append((path, split))
        return datasets.Dataset.from_list(versions[pushed[0]])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = data_cfg(["someone/docs"], split="validation", seq_len=16)
    first = build_packed_data(cfg, tokenizer, tmp_path)
    assert data_fingerprint(cfg, tokenizer) == data_fingerprint(cfg, tokenizer)
    assert asked and set(asked) == {("someone/docs", "validation")}
    pushed[0] = "v2"
    second = build_packed_data(cfg, tokenizer, tmp_path)
    assert len(list(tmp_path.glob("packed-*.pt"))) == 2  # a new entry, not the old rows
    assert not torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(second.input_ids, build_packed_data(cfg, tokenizer, None).input_ids)


def test_a_missing_file_or_a_directory_is_said_as_such_with_a_cache_dir_too(tmp_path, tokenizer, monkeypatch):
    # The cache key looked up every non-file path as a hub dataset before the files were read: a typo'd
    # path became "could not load dataset" (a hub lookup), and a directory was loaded whole by `datasets`.
    datasets = pytest.importorskip("datasets")
    asked = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: asked.append(args) or datasets.Dataset.from_list([{"text": "x"}]))
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "a.jsonl", [{"text": "A tuple is immutable."}])
    for path, said in ((tmp_path / "missing.jsonl", "does not exist"), ("dat/typo.jsonl", "does not exist"),
                       (tmp_path / "shards", "is a directory")):
        with pytest.raises(ValueError, match=f"data.paths: .*{said}"):
            build_packed_data(data_cfg([path]), tokenizer, tmp_path / "cache")
    assert asked == []


def test_a_lone_surrogate_escape_is_an_error_of_its_line(tmp_path, tokenizer):
    # Valid JSON, but no text a tokenizer can encode: it was a TypeError from deep inside tokenization.
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n'
                    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udc00"}]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: 'text' is not valid Unicode text: a lone surrogate '\\ud800' at "
                                         r"character 1"):
        load_examples(data_cfg([path]))
    with pytest.warns(UserWarning, match="skipped 2 bad records"):
        examples = load_examples(data_cfg([path], on_error="skip"))
    assert [e.text for e in examples] == ["ok"]
    assert tokenize_examples(examples, tokenizer, data_cfg([path]))  # what is left tokenizes


def test_bad_bytes_and_odd_json_are_errors_of_their_line(tmp_path):
    # A non-UTF-8 byte stopped the whole file with a buffer offset and no line; on_error=skip did not help.
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"n": ' + b"9" * 5000 + b'}\n' + b"[" * 100000
                     + b'\n{"text": "end"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8 text"):
        load_examples(data_cfg([path]))
    with pytest.warns(UserWarning, match="skipped 3 bad records"):
        assert [e.text for e in load_examples(data_cfg([path], on_error="skip"))] == ["ok", "end"]
    bad_json = tmp_path / "d.json"
    bad_json.write_bytes(b'[{"text": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"d.json: not UTF-8 text"):
        load_examples(data_cfg([bad_json]))


def test_text_prompts_start_as_training_documents_do(tokenizer):
    """Training documents start with BOS; prompts of text records (eval, distill, generate --raw) got
    the post-processor's special tokens, none for the tiny tokenizer or GPT-2's."""
    from medusa_liger.records import Example, text_prompt_ids

    ids, _ = tokenize_example(Example("x", text="alpha beta gamma"), tokenizer, BUILTIN_CHAT_TEMPLATE, "all")
    assert ids[0] == tokenizer.bos_token_id
    assert text_prompt_ids(tokenizer, "alpha beta gamma") == ids[:-1]  # the document without its EOS
    assert text_prompt_ids(tokenizer, "alpha beta gamma", limit=2) == ids[:2]


def test_a_tokenizer_with_named_chat_templates_renders_with_its_default():
    """transformers keeps several templates as a dict: it was taken for no template, and conversations
    trained in the built-in format the served model never sees."""
    from types import SimpleNamespace

    from medusa_liger.records import chat_template_for

    named = SimpleNamespace(chat_template={"default": "{{ messages }}", "tool_use": "{{ tools }}"})
    assert chat_template_for(named, "auto") == "{{ messages }}"
    assert chat_template_for(named, "builtin") == BUILTIN_CHAT_TEMPLATE
    nameless = SimpleNamespace(chat_template={"tool_use": "a", "rag": "b"})
    with pytest.raises(ValueError, match=r"several chat templates \(\['rag', 'tool_use'\]\) and none named "
                                         r"'default' to render conversations with; use data.chat_template=builtin"):
        chat_template_for(nameless, "auto", "data.chat_template")
    with pytest.warns(UserWarning, match="rendered with the built-in template"):  # eval, generate: no such option
        assert chat_template_for(nameless, "auto") == BUILTIN_CHAT_TEMPLATE


def test_text_data_needs_no_usable_chat_template(tokenizer):
    """Text records render no conversation: a tokenizer's unusable templates (several, none 'default')
    stopped training on them."""
    import copy

    named = copy.deepcopy(tokenizer)
    named.chat_template = {"tool_use": "a", "rag": "b"}
    text = [Example("x", text="The pass statement does nothing.")]
    assert tokenize_examples(text, named, DataConfig()) == tokenize_examples(text, tokenizer, DataConfig())
    with pytest.raises(ValueError, match="use data.chat_template=builtin"):
        tokenize_examples([Example("x", messages=CHAT)], named, DataConfig())


def test_a_tokenizer_without_a_chat_template_is_said_to_get_the_builtin_one(tokenizer):
    # A base model's tokenizer: conversations were rendered with markers it reads as plain text, unsaid.
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|end|>")
    with pytest.warns(UserWarning, match=r"no chat template: conversations are rendered with the built-in one.*"
                                         r"\(data.chat_template=builtin\) to silence"):
        assert chat_template_for(bare, "auto", "data.chat_template") == BUILTIN_CHAT_TEMPLATE
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat_template_for(bare, "builtin", "data.chat_template")  # chosen: nothing to say
        chat_template_for(tokenizer, "auto", "data.chat_template")


# ------------------------------------------------------------------ third audit
TURNS = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"},
         {"role": "user", "content": "why"}, {"role": "assistant", "content": "because"}]


def test_the_generation_prompt_is_never_a_target(tokenizer):
    """The loss starts at the content: the newline after <|assistant|> is the prompt's."""
    messages = [{"role": "user", "content": "What does pass do?"}, {"role": "assistant", "content": "It does nothing."}]
    ids, labels = tokenize_example(Example("x", messages=messages), tokenizer, BUILTIN_CHAT_TEMPLATE, "assistant")
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[first:]).startswith("It does nothing.")
    assert tokenizer.decode(ids[:first]).endswith("<|assistant|>\n")


@pytest.mark.parametrize("template, messages", [
    # DeepSeek-R1-Distill style: the generation prompt opens a think block the rendered turns lack.
    ("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant: <think>\\n' }}{% endif %}", TURNS),
    # Earlier replies rendered without their content: "why" is found only in the next user turn.
    ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ 'assistant: \\n' }}"
     "{% else %}{{ m.role + ': ' + m.content + '\\n' }}{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "why"},
      {"role": "user", "content": "why not"}, {"role": "assistant", "content": "x"}]),
], ids=["generation-prompt-the-turns-lack", "content-only-in-a-later-turn"])
def test_templates_that_hide_where_a_turn_is_are_refused(tokenizer, template, messages):
    with pytest.raises(ValueError, match="c:1: the chat template does not render prefixes"):
        render_conversation(tokenizer, messages, template, "c:1")


def test_a_last_turn_with_nothing_after_its_content_is_located(tokenizer):
    template = ("{% for m in messages %}{% if m.role == 'assistant' and loop.last %}"
                "{{ 'assistant: <think></think>' + m.content }}{% else %}{{ m.role + ': ' + m.content + '\\n' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    text, spans = render_conversation(tokenizer, TURNS, template, "c:2")
    assert [text[a:b] for a, b in spans] == ["hello you", "<think></think>because"]


def test_agreement_stops_at_the_first_differing_token(tokenizer):
    from medusa_liger.train.data import _agreed_prefix

    assert _agreed_prefix(tokenizer, "! the loop", "? the loop") == 0
    assert _agreed_prefix(tokenizer, "<|end|>\nmore", "<|end|>\nother") >= len("<|end|>")


def test_text_data_and_a_few_empty_answers_give_no_empty_turn_warning(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "a document"}])
    answers = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": a}] for a in ("", "x", "y")]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in answers])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_examples(data_cfg([text]))  # no answers: not "0 of 0 are empty"
        load_examples(data_cfg([chat]))  # 1 of 3 empty: normal
    write_jsonl(chat, [{"messages": m} for m in answers[:1] * 2 + answers[1:2]])
    with pytest.warns(UserWarning, match="2 of 3 assistant turns in data.paths are empty"):
        load_examples(data_cfg([chat]))


def test_a_home_relative_data_path_is_local(tmp_path):
    from medusa_liger.records import looks_like_local_path

    assert looks_like_local_path("~/mydata") and not looks_like_local_path("owner/name")
    with pytest.raises(ValueError, match="'~/mydata' does not exist"):
        load_examples(data_cfg(["~/mydata"]))


def test_a_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": {"text": "x"}}))
    with pytest.raises(ValueError, match="must hold a list of records, got dict"):
        load_examples(data_cfg([path]))


@pytest.mark.parametrize("own", ["", {"default": None, "x": "a"}])
def test_an_empty_or_missing_default_template_is_not_rendered_with(own):
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(chat_template=own)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chat_template_for(tokenizer, "auto") == BUILTIN_CHAT_TEMPLATE
    assert caught  # said: the built-in one is used


def test_the_callers_warning_filters_hold_while_data_warnings_are_noted(tmp_path, tokenizer):
    from medusa_liger.records import DataWarning

    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    cfg = data_cfg([path], seq_len=64, on_error="skip")
    with warnings.catch_warnings():  # a filter by module: the warning is said from where it was
        warnings.filterwarnings("error", category=DataWarning, module=r"medusa_liger\.train\.packing")
        with pytest.raises(DataWarning, match="skipped 1 bad records"):
            build_packed_data(cfg, tokenizer, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", DataWarning)  # not shown, still kept by the cache
        build_packed_data(cfg, tokenizer, tmp_path / "cache")
        assert not caught
    with pytest.warns(DataWarning, match=r"skipped 1 bad records.*\(said when the packed-data cache"):
        build_packed_data(cfg, tokenizer, tmp_path / "cache", examples=[])  # (an empty list: none loaded)


def test_nested_blocks_each_note_a_data_warning():
    from medusa_liger.records import DataWarning, data_warning, recorded_data_warnings

    outer, inner = [], []
    with pytest.warns(DataWarning, match="x"), recorded_data_warnings(outer):
        with recorded_data_warnings(inner):
            data_warning("x")
        data_warning("y")
    assert (outer, inner) == (["x", "y"], ["x"])


def test_tokenizer_cache_with_a_torn_stamp_is_trained_again(tmp_path):
    # A run killed as it wrote the cache's fingerprint.json left it empty: every later run (a resume
    # too) died on a JSONDecodeError until the file was deleted by hand.
    texts = [json.loads(line)["text"] for line in (DATA / "pydoc_text.jsonl").read_text().splitlines()][:50]
    first = train_tokenizer(texts, 300, tmp_path)
    for torn in ["", '{"fingerprint": "ab', "[]"]:
        (tmp_path / "fingerprint.json").write_text(torn)
        again = train_tokenizer(texts, 300, tmp_path)
        assert again.get_vocab() == first.get_vocab()
        assert json.loads((tmp_path / "fingerprint.json").read_text())["vocab_size"] == 300
    assert not list(tmp_path.glob(".*.tmp"))
