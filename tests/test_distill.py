"""Self-distillation (``medusa-liger distill``): regenerated turns, batching, resume, shards, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from medusa_liger.inference import distill
from medusa_liger.inference.distill import DistillSettings, parse_shard, self_distill
from medusa_liger.inference import distill_backends
from medusa_liger.inference.distill_backends import LocalBackend
from medusa_liger.records import BUILTIN_CHAT_TEMPLATE, normalize
from tests.test_generate import tiny_backbone

SOURCE_RECORDS = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is assert?"},
                       {"from": "gpt", "value": "A check."}, {"from": "human", "value": "And pass?"},
                       {"from": "gpt", "value": "Nothing."}]},
    {"messages": [{"role": "user", "content": "Define a function."}]},  # prompt-only: gets an answer
    {"prompt": "for i in range(3):"},
    {"text": "def f(x):\n    return x + 1\n" * 8},
    {"neither": 1},  # skipped: no known format
    {"messages": [{"role": "assistant", "content": "Hello."}]},  # skipped: nothing to answer
    {"messages": [{"role": "user", "content": "The assert statement."}, {"role": "assistant", "content": "x"}]},
]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # identical float sums for batched and single generation
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from medusa_liger.train.tiny import train_tokenizer

    texts = ["def f(x):\n    return x + 1", "The assert statement checks a condition.", "for i in range(10): pass"]
    return train_tokenizer(texts * 4, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_backbone(vocab=len(tokenizer), seed=3)


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "source.jsonl"
    lines = [json.dumps(r) for r in SOURCE_RECORDS]
    lines.insert(4, "{not json")  # a malformed line: skipped with its line number
    path.write_text("\n".join(lines) + "\n")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def single_generation(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Unbatched, unpadded greedy tokens after ``prompt``, up to the first end-of-sequence token."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    new = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def test_greedy_distill_regenerates_every_turn_from_its_own_history(model, tokenizer, source, tmp_path):
    settings = DistillSettings(max_new_tokens=10, batch_size=3, block_records=2, text_prompt_tokens=12)
    summary = self_distill(source, tmp_path / "out.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    out = read_lines(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [0, 1, 2, 3, 6]  # input order; records 4 and 5 skipped
    assert len(summary.skipped) == 3 and summary.records == 5 and summary.resumed == 0
    assert "source.jsonl:5: malformed JSON" in " ".join(summary.skipped)
    assert any("starts with an assistant turn" in s for s in summary.skipped)
    assert any("none of the keys 'messages', 'conversations', 'text', 'prompt'" in s for s in summary.skipped)
    assert summary.generations == 2 + 1 + 1 + 1 + 1

    def chat_ids(messages):
        text = tokenizer.apply_chat_template(messages, chat_template=BUILTIN_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for record in out:
        if "text" in record:
            # The document as training reads it: BOS, then the text.
            text_ids = tokenizer(SOURCE_RECORDS[3]["text"], add_special_tokens=False)["input_ids"]
            prompt = [tokenizer.bos_token_id, *text_ids][:12]
            new = single_generation(model, tokenizer, prompt, 10)
            assert record["text"] == tokenizer.decode(prompt + new, skip_special_tokens=True)
            continue
        messages = record["messages"]
        normalize("out", record, "auto", "assistant")  # what training reads
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # Each answer continues the conversation as regenerated so far, batched or not.
            new = single_generation(model, tokenizer, chat_ids(messages[:j]), 10)
            assert message["content"] == tokenizer.decode(new, skip_special_tokens=True).strip(), (record["id"], j)
    first = out[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert [first[i]["content"] for i in (0, 1, 3)] == ["Be brief.", "What is assert?", "And pass?"]
    assert first[2]["content"] != "A check." and out[4]["messages"][1]["content"] != "x"
    assert [m["role"] for m in out[1]["messages"]] == ["user", "assistant"]
    assert out[2]["messages"][0] == {"role": "user", "content": "for i in range(3):"}


def test_turns_first_keeps_conversations_up_to_their_first_answer(model, tokenizer, source, tmp_path):
    settings = DistillSettings(max_new_tokens=4, turns="first")
    self_distill(source, tmp_path / "out.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    first = read_lines(tmp_path / "out.jsonl")[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]


def test_stop_tokens_end_an_answer_and_padding_is_dropped(tokenizer):
    eos = tokenizer.eos_token_id

    class Scripted(torch.nn.Module):
        """generate() returns the prompt batch followed by fixed new tokens."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"max_position_embeddings": 64})()
            self.generation_config = type("G", (), {"eos_token_id": [eos, 7]})()

        def generate(self, input_ids, attention_mask, generation_config):
            assert attention_mask[:, -1].all() and generation_config.eos_token_id == sorted({eos, 7})
            new = torch.tensor([[5, 6, eos, 9], [5, 7, 0, 0], [5, 6, 8, 9]])
            return torch.cat([input_ids, new[: len(input_ids)]], dim=1)

    generate = LocalBackend(Scripted(), tokenizer, DistillSettings(max_new_tokens=4))
    assert generate.generate([[4, 4, 4], [4], [4, 4]]) == [([5, 6], True), ([5], True), ([5, 6, 8, 9], False)]
    assert generate.fits([1] * 60) and not generate.fits([1] * 61)


def test_empty_answers_are_counted_and_warned_about(tokenizer, source, tmp_path, capsys, monkeypatch):
    """A model that ends its turn at once wrote a file of empty answers, and the summary said all was well."""
    from medusa_liger.cli import main
    from medusa_liger.inference import cli as inference_cli

    class Mute(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"max_position_embeddings": None})()

        def generate(self, input_ids, attention_mask, generation_config):
            return torch.cat([input_ids, torch.full_like(input_ids[:, :1], tokenizer.eos_token_id)], dim=1)

    monkeypatch.setattr(inference_cli, "load_causal_lm", lambda *args, **kwargs: (Mute(), tokenizer))
    assert main(["distill", "--backbone", "x", "--data", str(source), "--output", str(tmp_path / "o.jsonl")]) == 0
    answers = [m["content"] for r in read_lines(tmp_path / "o.jsonl") for m in r.get("messages", ()) if m["role"] == "assistant"]
    assert answers and not any(answers)
    texts = [r for r in read_lines(tmp_path / "o.jsonl") if "text" in r]
    assert texts  # continued by nothing: empty too (their answer holds the prefix, never empty)
    generations = len(answers) + len(texts)
    assert f"warning: {generations} of {generations} answers are empty" in capsys.readouterr().err
    # Training on such a file says so too.
    from medusa_liger.train.config import DataConfig
    from medusa_liger.train.data import load_examples

    with pytest.warns(UserWarning, match=f"{len(answers)} of {len(answers)} assistant turns in data.paths are empty"):
        load_examples(DataConfig(paths=[str(tmp_path / "o.jsonl")]))


def test_a_batch_out_of_gpu_memory_is_retried_in_halves(tokenizer):
    class Tight(torch.nn.Module):
        """generate() fails for more than ``fits`` prompts, else echoes each prompt's first token."""

        def __init__(self, fits: int):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"max_position_embeddings": None})()
            self.fits, self.sizes = fits, []

        def generate(self, input_ids, attention_mask, generation_config):
            self.sizes.append(len(input_ids))
            if len(input_ids) > self.fits:
                raise torch.OutOfMemoryError("CUDA out of memory")
            first = input_ids.gather(1, attention_mask.argmax(1, keepdim=True))
            return torch.cat([input_ids, first, torch.full_like(first, tokenizer.eos_token_id)], dim=1)

    model = Tight(fits=2)
    backend = LocalBackend(model, tokenizer, DistillSettings(batch_size=5))
    prompts = [[10 + i] * (i + 1) for i in range(5)]
    assert backend._generate_or_split(prompts) == [([10 + i], True) for i in range(5)]
    assert model.sizes == [5, 2, 3, 1, 2]
    with pytest.raises(torch.OutOfMemoryError):
        LocalBackend(Tight(fits=0), tokenizer, DistillSettings())._generate_or_split([[1, 2]])


def test_an_interrupted_run_resumes_to_the_straight_runs_file(model, tokenizer, source, tmp_path, monkeypatch):
    settings = DistillSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5, batch_size=2, block_records=2)
    straight = tmp_path / "straight.jsonl"
    self_distill(source, straight, settings, model=model, tokenizer=tokenizer, progress=False)

    resumed = tmp_path / "resumed.jsonl"
    real_run_block, calls = distill._run_block, []

    def dying_run_block(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while generating the second block
        return real_run_block(*args)

    monkeypatch.setattr(distill, "_run_block", dying_run_block)
    with pytest.raises(KeyboardInterrupt):
        self_distill(source, resumed, settings, model=model, tokenizer=tokenizer, progress=False)
    monkeypatch.setattr(distill, "_run_block", real_run_block)
    assert len(read_lines(resumed)) == 2
    with resumed.open("a") as f:
        f.write('{"id": 2, "source": "half a li')  # a write cut short by the kill
    summary = self_distill(source, resumed, settings, model=model, tokenizer=tokenizer, progress=False)
    assert summary.resumed == 2 and summary.records == 3
    assert resumed.read_text() == straight.read_text()

    with pytest.raises(ValueError, match=r"exists and was written with other settings \(resumed.jsonl.settings.json: "
                                         r"max_new_tokens 6 -> 7, seed 5 -> 0, temperature 1.0 -> 0.0, top_p 0.9 -> "
                                         r"1.0\); a resume needs the same ones"):
        self_distill(source, resumed, DistillSettings(max_new_tokens=7), model=model, tokenizer=tokenizer, progress=False)
    # With sampling, the batches and blocks shape the text too: another batch size is refused, named.
    with pytest.raises(ValueError, match=r"settings.json: batch_size 2 -> 3\)"):
        self_distill(source, resumed, dataclasses.replace(settings, batch_size=3), model=model, tokenizer=tokenizer,
                     progress=False)
    # A settings file written before batch_size and block_records were kept resumes with their defaults;
    # one naming a split for this local file (taken, unused, before) still resumes.
    settings_file = tmp_path / "resumed.jsonl.settings.json"
    written = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**{k: v for k, v in written.items() if k not in ("batch_size", "block_records")},
                                         "split": "test"}))
    with pytest.raises(ValueError, match=r"batch_size \(default\) 32 -> 2, block_records \(default\) 256 -> 2\)"):
        self_distill(source, resumed, settings, model=model, tokenizer=tokenizer, progress=False)
    # What the file records beyond the settings (the model) must match from either side.
    with pytest.raises(ValueError, match=r"settings.json: backbone 'b' -> 'unset', "):
        settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "backbone": "b"}))
        self_distill(source, resumed, settings, model=model, tokenizer=tokenizer, progress=False)
    settings_file.write_text("[1]")
    with pytest.raises(ValueError, match=r"is no settings file this command wrote \(\[1\]\)"):
        self_distill(source, resumed, settings, model=model, tokenizer=tokenizer, progress=False)
    settings_file.write_text(json.dumps({k: v for k, v in written.items() if k not in ("batch_size", "block_records")}))
    defaults = dataclasses.replace(settings, batch_size=DistillSettings().batch_size,
                                   block_records=DistillSettings().block_records)
    assert self_distill(source, resumed, defaults, model=model, tokenizer=tokenizer, progress=False).resumed == 5
    summary = self_distill(source, resumed, DistillSettings(max_new_tokens=2), model=model, tokenizer=tokenizer,
                           overwrite=True, progress=False)
    assert summary.resumed == 0 and len(read_lines(resumed)) == 5


def test_shards_partition_the_records(model, tokenizer, source, tmp_path):
    whole = tmp_path / "whole.jsonl"
    self_distill(source, whole, DistillSettings(max_new_tokens=5), model=model, tokenizer=tokenizer, progress=False)
    parts = []
    for index in range(3):
        path = tmp_path / f"part{index}.jsonl"
        self_distill(source, path, DistillSettings(max_new_tokens=5, shard=(index, 3)), model=model,
                     tokenizer=tokenizer, progress=False)
        parts += read_lines(path)
        assert all(r["id"] % 3 == index for r in read_lines(path))
    assert sorted(parts, key=lambda r: r["id"]) == read_lines(whole)


def test_prompts_beyond_the_context_keep_what_fits(tokenizer, tmp_path):
    model = tiny_backbone(vocab=len(tokenizer), seed=1, max_position_embeddings=40)
    long_turn = "The assert statement checks a condition. " * 4
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": long_turn}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": long_turn * 2}]},
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = self_distill(path, tmp_path / "out.jsonl", DistillSettings(max_new_tokens=8), model=model,
                           tokenizer=tokenizer, progress=False)
    out = read_lines(tmp_path / "out.jsonl")
    assert len(out) == 1 and [m["role"] for m in out[0]["messages"]] == ["user", "assistant"]
    assert len(summary.skipped) == 1 and "exceed the model's context" in summary.skipped[0]
    assert summary.shortened == 1  # the kept record lost its second turn: counted (and said by the CLI)


def test_a_resume_past_a_dropped_record_writes_the_straight_runs_file(tokenizer, tmp_path):
    """A record dropped for length is never in the output: the resume must still cut the blocks (and
    seed them) as the uninterrupted run did, not start a block at the dropped record."""
    model = tiny_backbone(vocab=len(tokenizer), seed=1, max_position_embeddings=48)
    prompts = ["What is assert?", "The assert statement checks a condition. " * 8, "for i in", "x", "pass", "range"]
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    settings = dict(max_new_tokens=12, batch_size=2, block_records=2, temperature=1.0, seed=7)
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    whole = self_distill(source, straight, DistillSettings(**settings), model=model, tokenizer=tokenizer,
                         progress=False)
    assert whole.records == 5 and len(whole.skipped) == 1 and "source.jsonl:2" in whole.skipped[0]
    dropped = read_lines(tmp_path / "straight.dropped.jsonl")
    assert [(r["id"], r["source"]) for r in dropped] == [(1, f"{source}:2")]
    assert "exceed the model's context" in dropped[0]["reason"]

    self_distill(source, resumed, DistillSettings(**settings, num_records=4), model=model, tokenizer=tokenizer,
                 progress=False)  # "interrupted" after two blocks
    again = self_distill(source, resumed, DistillSettings(**settings), model=model, tokenizer=tokenizer, progress=False)
    assert again.resumed == 3 and again.records == 2 and again.skipped == [] and again.generations == 2
    assert resumed.read_text() == straight.read_text()

    # Killed between two lines of the last block: the block is generated again whole (same batch, same
    # draws) and only its missing record written.
    lines = straight.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:-1]))
    again = self_distill(source, resumed, DistillSettings(**settings), model=model, tokenizer=tokenizer, progress=False)
    assert again.records == 1 and again.generations == 2
    assert resumed.read_text() == straight.read_text()


def test_resume_edge_cases(tokenizer, tmp_path):
    """Records dropped before the output existed are listed once it does (a no-op rerun listed them
    again); a raw U+2028 inside a written line is no line break for the resume (str.splitlines split
    there); any integer seed is taken (a large one overflowed torch.manual_seed)."""
    model = tiny_backbone(vocab=len(tokenizer), seed=1, max_position_embeddings=48)
    source = tmp_path / "source.jsonl"
    records = [{"prompt": "The assert statement checks a condition. " * 8}, {"prompt": "one\u2028two"}, {"prompt": "x"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    settings = DistillSettings(max_new_tokens=8, block_records=1, temperature=1.0, seed=2**62)
    first = self_distill(source, out, settings, model=model, tokenizer=tokenizer, progress=False)
    assert first.records == 2 and len(first.skipped) == 1
    assert "\u2028" in out.read_text(encoding="utf-8")  # written raw (ensure_ascii=False)
    listed = (tmp_path / "out.dropped.jsonl").read_text()
    assert [r["id"] for r in read_lines(tmp_path / "out.dropped.jsonl")] == [0]
    again = self_distill(source, out, settings, model=model, tokenizer=tokenizer, progress=False)
    assert (again.resumed, again.records, again.generations, again.skipped) == (2, 0, 0, [])
    assert (tmp_path / "out.dropped.jsonl").read_text() == listed


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_kill_while_the_output_starts_leaves_a_run_that_starts_afresh(model, tokenizer, source, tmp_path,
                                                                        monkeypatch, kill_at):
    """Killed between the files _start_output writes: the output (empty, without settings) refused
    every later run; under --overwrite, an old output could be resumed under the new settings."""
    settings = DistillSettings(max_new_tokens=4)
    straight = tmp_path / "straight.jsonl"
    self_distill(source, straight, settings, model=model, tokenizer=tokenizer, progress=False)
    out = tmp_path / "out.jsonl"
    self_distill(source, out, DistillSettings(max_new_tokens=2), model=model, tokenizer=tokenizer, progress=False)
    real_write_text, calls = Path.write_text, []

    def dying_write_text(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dying_write_text)
    with pytest.raises(KeyboardInterrupt):
        self_distill(source, out, settings, model=model, tokenizer=tokenizer, overwrite=True, progress=False)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    summary = self_distill(source, out, settings, model=model, tokenizer=tokenizer, progress=False)
    assert summary.resumed == 0 and out.read_text() == straight.read_text()


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0),
    ("turns", "last"), ("chat_template", "mine"), ("batch_size", 1.5), ("shard", (2, 2)), ("num_records", 0),
    ("seed", 1.5), ("seed", True), ("temperature", "0.5"), ("top_p", None), ("shard", (True, 2)),
    ("num_records", True), ("batch_size", True), ("temperature", 10**400),
])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistillSettings(**{field: value})


def test_parse_shard():
    assert parse_shard("3/8") == (3, 8)
    with pytest.raises(ValueError, match="--shard must look like I/N"):
        parse_shard("3")


def test_no_usable_record_is_an_error(model, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"neither": 1}\n')
    with pytest.raises(ValueError, match="gave no record to distill"):
        self_distill(path, tmp_path / "out.jsonl", model=model, tokenizer=tokenizer, progress=False)


def test_cli_writes_and_resumes(model, tokenizer, source, tmp_path, capsys):
    from medusa_liger.cli import main

    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    args = ["distill", "--backbone", str(backbone), "--data", str(source), "--output", str(tmp_path / "o.jsonl"),
            "--max-new-tokens", "4", "--num-records", "3", "--device", "cpu"]
    assert main(args) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    assert main([*args[:-4], "--device", "cpu"]) == 0  # all records now: the first three are kept
    assert "wrote 2 records" in capsys.readouterr().out and len(read_lines(tmp_path / "o.jsonl")) == 5
    # Fewer records than written: said, not silently ignored (the output is not cut); greedy decoding
    # resumes with another batch size.
    assert main([*args[:-4], "--num-records", "2", "--batch-size", "3", "--device", "cpu"]) == 0
    assert "note: 3 records already in " in capsys.readouterr().out and len(read_lines(tmp_path / "o.jsonl")) == 5
    missing = ["distill", "--backbone", str(backbone), "--data", str(source), "--output", str(source.parent / "x.jsonl")]
    (source.parent / "x.jsonl").write_text("{}\n")
    assert main(missing) == 2
    assert "(no x.jsonl.settings.json beside it); pass another --output, or --overwrite" in capsys.readouterr().err
    assert main([*args, "--shard", "1"]) == 2
    assert "--shard must look like I/N" in capsys.readouterr().err
    # The source as output: refused even with --overwrite (it replaced the dataset with the answers).
    before = source.read_bytes()
    same = ["distill", "--backbone", str(backbone), "--data", str(source), "--output", str(source), "--overwrite",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert main(same) == 2
    assert "would write over the source" in capsys.readouterr().err and source.read_bytes() == before


def test_ctrl_c_is_one_line_with_how_to_continue(model, tokenizer, source, tmp_path, capsys, monkeypatch):
    from medusa_liger.cli import main

    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "_run_block", interrupted)
    args = ["distill", "--backbone", str(backbone), "--data", str(source), "--output", str(tmp_path / "o.jsonl"),
            "--max-new-tokens", "4", "--device", "cpu"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "medusa-liger distill: interrupted; run the same command again to continue" in err
    assert "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distill_on_gpu(tokenizer, source, tmp_path, dtype):
    model = tiny_backbone(vocab=len(tokenizer), seed=3).to("cuda", dtype)
    settings = DistillSettings(max_new_tokens=12, batch_size=4, block_records=2)
    summary = self_distill(source, tmp_path / "out.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    out = read_lines(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [0, 1, 2, 3, 6] and summary.generations == 6
    for record in out:
        if "messages" in record:
            normalize("out", record, "auto", "assistant")
    # The same settings again: everything is already there.
    again = self_distill(source, tmp_path / "out.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    assert again.resumed == 5 and again.records == 0 and len(read_lines(tmp_path / "out.jsonl")) == 5


def test_the_models_shipped_generation_options_do_not_shape_greedy_answers(model, tokenizer, source, tmp_path):
    # generate() filled options our config left unset (no_repeat_ngram_size, suppress_tokens) from
    # model.generation_config: "greedy" answers were not the backbone's greedy answers.
    settings = DistillSettings(max_new_tokens=10, batch_size=3, block_records=2, text_prompt_tokens=12)
    self_distill(source, tmp_path / "plain.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    shipped = model.generation_config
    model.generation_config = copy.deepcopy(shipped)
    model.generation_config.no_repeat_ngram_size = 1
    try:
        self_distill(source, tmp_path / "shipped.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    finally:
        model.generation_config = shipped
    assert read_lines(tmp_path / "shipped.jsonl") == read_lines(tmp_path / "plain.jsonl")


def test_an_unusable_chat_template_is_refused_before_anything_is_generated(model, tokenizer):
    """Found at the first conversation, after text records were written, it left a run whose resume
    refused the --chat-template that fixes it."""
    import copy

    named = copy.deepcopy(tokenizer)
    named.chat_template = {"tool_use": "a", "rag": "b"}
    with pytest.raises(ValueError, match="none named 'default' .*use --chat-template=builtin"):
        LocalBackend(model, named, DistillSettings())
    LocalBackend(model, named, DistillSettings(chat_template="builtin"))


def test_a_continued_document_is_decoded_whole(model, tokenizer):
    """Prompt and continuation were decoded apart and joined: SentencePiece's decoder dropped the space
    where they meet ('The quickbrown fox'), and a cut inside a multi-byte character garbled both halves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medusa_liger.records import document_ids

    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    metaspace.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    metaspace.train_from_iterator(["The quick brown fox jumps over the lazy dog"] * 20, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=metaspace, bos_token="<s>", eos_token="</s>",
                                                 unk_token="<unk>")
    for tok, doc in ((sentencepiece_like, "The quick brown fox jumps over the lazy dog"), (tokenizer, "café déjà vu")):
        ids = document_ids(tok, doc)
        # Cut after "The quick" (SentencePiece), or inside a character's bytes (byte-level BPE).
        cut = 3 if tok is sentencepiece_like else next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))
        backend = LocalBackend(model, tok, DistillSettings(max_new_tokens=64, text_prompt_tokens=cut))
        backend.generate = lambda prompts, rest=ids[cut:]: [(rest, True)]  # the model continues the document
        assert backend.complete([doc])[0].text == doc


STRICT_TEMPLATE = (  # as Mistral's and Gemma's: no system turn
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'assistant: ' }}{% endif %}")


def test_a_conversation_the_chat_template_rejects_is_dropped_not_fatal(model, tokenizer, source, tmp_path):
    """jinja2's TemplateError escaped: the run stopped at that record with a traceback, and every resume
    stopped there again, so the dataset could never be distilled without editing it."""
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = STRICT_TEMPLATE
    summary = self_distill(source, tmp_path / "out.jsonl", DistillSettings(max_new_tokens=4), model=model,
                           tokenizer=strict, progress=False)
    assert [r["id"] for r in read_lines(tmp_path / "out.jsonl")] == [1, 2, 3, 6]
    assert any("source.jsonl:1: the chat template rejected this conversation: System role not supported" in s
               for s in summary.skipped)
    dropped = read_lines(tmp_path / "out.dropped.jsonl")
    assert [d["id"] for d in dropped] == [0]


def test_the_weights_dtype_is_a_setting_a_resume_keeps(model, tokenizer, tmp_path):
    """bf16 and fp32 greedy decoding write different text: a resume under the other dtype mixed them."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("one", "two")))
    out = tmp_path / "out.jsonl"
    settings = DistillSettings(max_new_tokens=4, num_records=1)
    self_distill(path, out, settings, model=model, tokenizer=tokenizer, progress=False)
    settings_file = tmp_path / "out.jsonl.settings.json"
    assert json.loads(settings_file.read_text())["dtype"] == "float32"
    with pytest.raises(ValueError, match=r"dtype 'float32' -> 'float64'"):
        self_distill(path, out, dataclasses.replace(settings, num_records=2), model=copy.deepcopy(model).double(),
                     tokenizer=tokenizer, progress=False)
    written = json.loads(settings_file.read_text())
    del written["dtype"]  # a settings file from before the dtype was kept: resumes as it did
    settings_file.write_text(json.dumps(written))
    summary = self_distill(path, out, dataclasses.replace(settings, num_records=2), model=model, tokenizer=tokenizer,
                           progress=False)
    assert summary.resumed == 1 and summary.records == 1


def test_the_backbones_hub_commit_is_a_setting_a_resume_keeps(model, tokenizer, tmp_path):
    """Another revision of a hub model under the same name writes other text: a resume mixed them."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("one", "two")))
    out, settings_file = tmp_path / "out.jsonl", tmp_path / "out.jsonl.settings.json"
    settings = DistillSettings(max_new_tokens=4, num_records=1)
    first, pushed = copy.deepcopy(model), copy.deepcopy(model)
    first.config._commit_hash, pushed.config._commit_hash = "0a1b" * 10, "9f8e" * 10
    self_distill(path, out, settings, model=first, tokenizer=tokenizer, progress=False)
    assert json.loads(settings_file.read_text())["backbone_revision"] == "0a1b" * 10
    more = dataclasses.replace(settings, num_records=2)
    with pytest.raises(ValueError, match=f"backbone_revision '{'0a1b' * 10}' -> '{'9f8e' * 10}'"):
        self_distill(path, out, more, model=pushed, tokenizer=tokenizer, progress=False)
    written = json.loads(settings_file.read_text())
    del written["backbone_revision"]  # a settings file from before the commit was kept: resumes as it did
    settings_file.write_text(json.dumps(written))
    assert self_distill(path, out, more, model=pushed, tokenizer=tokenizer, progress=False).resumed == 1
    assert "backbone_revision" not in json.loads(settings_file.read_text())  # (kept as written)


def test_distill_revision_loads_the_hub_backbone_at_it(tmp_path, monkeypatch, capsys):
    from medusa_liger.cli import main
    from medusa_liger.inference import cli as inference_cli

    asked = []

    def load_causal_lm(backbone, **kwargs):  # (the hub is not reachable here: what was asked is the point)
        asked.append((backbone, kwargs))
        raise ValueError("not loaded in this test")

    monkeypatch.setattr(inference_cli, "load_causal_lm", load_causal_lm)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "one"}) + "\n")
    assert main(["distill", "--backbone", "org/base", "--revision", "v2", "--data", str(path), "--output",
                 str(tmp_path / "out.jsonl")]) != 0
    assert asked and asked[0][0] == "org/base" and asked[0][1]["revision"] == "v2"
    monkeypatch.undo()  # the loader itself refuses a revision for a local directory, before it loads
    (tmp_path / "base").mkdir()
    assert main(["distill", "--backbone", str(tmp_path / "base"), "--revision", "v2", "--data", str(path),
                 "--output", str(tmp_path / "out.jsonl")]) != 0
    assert "--revision picks among a hub model's versions" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (a server's weights are the server's)
        main(["distill", "--server", "http://localhost:1", "--revision", "v2", "--data", str(path), "--output",
              str(tmp_path / "out.jsonl")])
    assert "--revision needs --backbone" in capsys.readouterr().err


def test_a_record_with_a_conversation_or_a_text_and_a_prompt_keeps_them(tmp_path):
    """Some datasets carry both: the conversation (any format's) or the document is the record, the prompt
    only a summary of it."""
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"prompt": "P", "messages": [{"role": "user", "content": "M"}]}) + "\n"
                    + json.dumps({"prompt": "P", "conversations": [{"from": "human", "value": "C"}]}) + "\n"
                    + json.dumps({"prompt": "P", "text": "T"}) + "\n"
                    + json.dumps({"prompt": "alone"}) + "\n")
    pending = list(distill._source_records(str(path), "train", DistillSettings(), [], texts=True))
    assert [r.messages[0]["content"] if r.messages else r.text for r in pending] == ["M", "C", "T", "alone"]


def test_a_prompt_beside_empty_conversation_or_text_columns_is_the_record(tmp_path):
    """A hub dataset's rows share one schema: a row without a conversation or a document has them as None
    (``datasets`` fills missing keys so); its prompt is then the record, as it was before such keys counted."""
    path = tmp_path / "nulls.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"P{i}", key: None}) + "\n"
                            for i, key in enumerate(("messages", "conversations", "text"))))
    skipped = []
    pending = list(distill._source_records(str(path), "train", DistillSettings(), skipped, texts=False))
    assert [r.messages[0]["content"] for r in pending] == ["P0", "P1", "P2"], skipped


def test_metadata_may_not_replace_a_setting(model, tokenizer, source, tmp_path):
    """The metadata joins the settings a resume must match: a key of theirs would overwrite one (said
    before a server is asked for its models)."""
    with pytest.raises(ValueError, match=r"metadata may not name the settings themselves \(\['seed'\]\)"):
        self_distill(source, tmp_path / "out.jsonl", DistillSettings(max_new_tokens=2), model=model,
                     tokenizer=tokenizer, metadata={"seed": 3, "backbone": "x"}, progress=False)
    with pytest.raises(ValueError, match=r"may not name the settings themselves \(\['split'\]\)"):
        self_distill(source, tmp_path / "out.jsonl", server="http://127.0.0.1:9", metadata={"split": "x"},
                     progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_numpy_numbers_are_settings_too(model, tokenizer, source, tmp_path):
    import numpy as np

    settings = DistillSettings(max_new_tokens=2, temperature=np.float32(0.5), top_p=np.float64(0.9))
    assert type(settings.temperature) is float and settings.temperature == 0.5 and settings.top_p == 0.9
    self_distill(source, tmp_path / "out.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)


def test_blocks_draw_their_own_samples(model, tokenizer, tmp_path):
    """Each block is seeded by its first record: the same prompt in two blocks gets two draws."""
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"prompt": "for i in"}) + "\n" + json.dumps({"prompt": "for i in"}) + "\n")
    settings = DistillSettings(max_new_tokens=12, temperature=1.0, block_records=1, seed=4)
    self_distill(path, tmp_path / "out.jsonl", settings, model=model, tokenizer=tokenizer, progress=False)
    first, second = (r["messages"][1]["content"] for r in read_lines(tmp_path / "out.jsonl"))
    assert first != second


def test_a_block_regenerated_after_a_kill_lists_its_dropped_record_once(tokenizer, tmp_path):
    """Killed after the dropped record was listed but before the block's lines were written."""
    model = tiny_backbone(vocab=len(tokenizer), seed=1, max_position_embeddings=48)
    source = tmp_path / "source.jsonl"
    prompts = ["What is assert?", "The assert statement checks a condition. " * 8, "for i in"]
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out, settings = tmp_path / "out.jsonl", DistillSettings(max_new_tokens=6, block_records=3)
    self_distill(source, out, settings, model=model, tokenizer=tokenizer, progress=False)
    written = out.read_text()
    out.write_text("")  # the block's lines lost, its dropped record listed
    again = self_distill(source, out, settings, model=model, tokenizer=tokenizer, progress=False)
    assert again.skipped == [] and again.records == 2 and out.read_text() == written
    assert [r["id"] for r in read_lines(tmp_path / "out.dropped.jsonl")] == [1]


def test_a_run_that_writes_no_record_leaves_no_output(tokenizer, tmp_path):
    model = tiny_backbone(vocab=len(tokenizer), seed=1, max_position_embeddings=48)
    source = tmp_path / "source.jsonl"
    source.write_text(json.dumps({"prompt": "The assert statement checks a condition. " * 8}) + "\n")
    with pytest.raises(ValueError, match="gave no record"):
        self_distill(source, tmp_path / "out.jsonl", DistillSettings(max_new_tokens=6), model=model,
                     tokenizer=tokenizer, progress=False)
    assert list(tmp_path.iterdir()) == [source]  # nothing that would refuse the next run's settings


def test_local_generation_takes_every_sampling_setting(model, tokenizer):
    sampled = LocalBackend(model, tokenizer, DistillSettings(temperature=0.3, top_p=0.8)).config
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, 0.3, 0.8, 0)
    greedy = LocalBackend(model, tokenizer, DistillSettings()).config
    assert greedy.do_sample is False


def test_local_answers_are_stripped_and_the_models_generation_config_is_put_back(model, tokenizer, monkeypatch,
                                                                                 tmp_path):
    backend = LocalBackend(model, tokenizer, DistillSettings(max_new_tokens=4))
    shipped = model.generation_config
    backend.generate([[1, 2, 3]])
    assert model.generation_config is shipped
    monkeypatch.setattr(backend, "_answer", lambda prompts, with_prompt: [distill_backends.Answer("  hi \n", True, 3)])
    assert backend.chat([[{"role": "user", "content": "q"}]])[0].text == "hi"
