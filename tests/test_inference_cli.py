"""The eval/generate/distill command lines: usage errors before any model loads, defaults in --help,
the report's batch size and interval, and how the interval and the by-size line print."""

from __future__ import annotations

import json

import pytest

from medusa_liger.cli import main
from medusa_liger.inference import evaluate
from medusa_liger.inference.cli import evaluate_run, interval_text
from medusa_liger.inference.evaluate import evaluate_heads
from medusa_liger.inference.prompts import load_prompts, looks_like_path

# The evaluation tests' fixtures: one intra-op thread, the PyTorch kernels, the tiny tokenizer.
from tests.test_evaluate import _one_thread, random_medusa, tokenizer, write_run  # noqa: F401


def usage_error(argv: list[str], capsys) -> str:
    """The argparse error of ``argv`` (exit status 2), as printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "0.5"], "--temperature needs --acceptance typical"),
    (["--seed", "3"], "--seed needs --acceptance typical"),
    (["--posterior-alpha", "0.5"], "--posterior-alpha needs --acceptance typical"),
    (["--posterior-threshold", "0.2"], "--posterior-threshold needs --acceptance typical"),
    (["--tree-search", "independent", "--prior-strength", "3"], "--prior-strength needs --tree-search conditional"),
    (["--num-prompts", "0"], "argument --num-prompts: must be an integer >= 1, got '0'"),
    (["--tree-size", "0"], "argument --tree-size: must be an integer >= 1"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--prior-strength", "nan"], "argument --prior-strength: must be a number >= 0"),
    (["--acceptance", "typical", "--temperature", "0"], "argument --temperature: must be a number > 0"),
    (["--acceptance", "typical", "--posterior-threshold", "1.5"], "argument --posterior-threshold: must be a number"),
    (["--prompts", "held_out/v1/prompts"], "--prompts: no such file: 'held_out/v1/prompts'"),
    (["--prompts", "my_prompts.jsonl"], "--prompts: no such file"),
    (["--prompts", "./my_prompts"], "--prompts: no such file"),
    # Flags the evaluation would ignore: refused.
    (["--tree", "t.json", "--tree-size", "7"], "--tree-size sizes the searched tree: with --tree, the given tree"),
    (["--prompts-split", "test"], "--prompts-split needs --prompts naming a hub dataset"),
])
def test_eval_usage_errors_name_the_flag_before_loading(tmp_path, capsys, flags, message):
    # The run directory does not exist: the error has to come before anything loads.
    assert message in usage_error(["eval", str(tmp_path / "nowhere"), *flags], capsys)


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "0.5"], "--temperature needs --acceptance typical"),
    (["--seed", "1"], "--seed needs --acceptance typical"),
    (["--acceptance", "typical", "--compare-greedy"], "--compare-greedy compares greedy decodings"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--acceptance", "typical", "--temperature", "-1"], "argument --temperature: must be a number >= 0"),
    (["--posterior-alpha", "0.5"], "--posterior-alpha needs --acceptance typical"),
    (["--acceptance", "typical", "--posterior-threshold", "1.5"], "argument --posterior-threshold: must be a number"),
])
def test_generate_usage_errors_name_the_flag_before_loading(tmp_path, capsys, flags, message):
    assert message in usage_error(["generate", str(tmp_path / "nowhere"), "--prompt", "x", *flags], capsys)


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--num-records", "0"], "argument --num-records: must be an integer >= 1"),
    (["--temperature", "-0.5"], "argument --temperature: must be a number >= 0"),
    (["--top-p", "0"], "argument --top-p: must be a number > 0 and <= 1"),
    (["--concurrency", "0"], "argument --concurrency: must be an integer >= 1"),
    # Greedy decoding ignores them: refused, as eval/generate refuse their sampling flags without sampling.
    (["--top-p", "0.9"], "--top-p needs --temperature > 0"),
    (["--seed", "3"], "--seed needs --temperature > 0"),
    # What only the other engine reads, and a split of a local file: refused rather than ignored.
    (["--concurrency", "4"], "--concurrency needs --server"),
    (["--api-key", "k"], "--api-key needs --server"),
    (["--server-model", "m"], "--server-model needs --server"),
    (["--split", "test"], "--split needs --data naming a hub dataset"),
])
def test_distill_usage_errors_name_the_flag_before_loading(tmp_path, capsys, flags, message):
    argv = ["distill", "--backbone", str(tmp_path / "nowhere"), "--data", "d.jsonl", "--output", "o.jsonl", *flags]
    assert message in usage_error(argv, capsys)


@pytest.mark.parametrize("flags", [["--device", "cpu"], ["--dtype", "fp32"], ["--batch-size", "8"],
                                   ["--chat-template", "builtin"], ["--text-prompt-tokens", "16"]])
def test_distill_refuses_model_flags_with_a_server(capsys, flags):
    argv = ["distill", "--server", "http://localhost:1/v1", "--data", "d.jsonl", "--output", "o.jsonl", *flags]
    assert f"{flags[0]} needs --backbone (a model in this process)" in usage_error(argv, capsys)


def test_splits_of_local_files_are_refused(tmp_path, capsys, monkeypatch):
    """--prompts-split / --split pick a hub dataset's split: with a local file they were silently unused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("hi\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat").write_text('{"prompt": "hi"}\n')  # no suffix: local because it exists
    for prompts in ("p.txt", "data/chat"):
        assert "--prompts-split needs --prompts naming a hub dataset" in usage_error(
            ["eval", "nowhere", "--prompts", prompts, "--prompts-split", "test"], capsys)
        assert "--split needs --data naming a hub dataset" in usage_error(
            ["distill", "--backbone", "nowhere", "--data", prompts, "--output", "o.jsonl", "--split", "test"], capsys)


def test_distill_temperature_samples_without_other_flags_and_shard_ranges_are_checked(tmp_path, capsys):
    # distill's --temperature is its own sampling: no --acceptance needed. A shard out of range names --shard.
    argv = ["distill", "--backbone", str(tmp_path / "nowhere"), "--data", "d.jsonl", "--output", "o.jsonl",
            "--temperature", "0.7", "--top-p", "0.9", "--shard", "2/2"]
    assert main(argv) == 2
    assert "--shard I/N needs 0 <= I < N, got '2/2'" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "default"), [
    ("eval", "prompts to use (first N) (default: 16)"), ("generate", "(default: 0.7)"),
    ("distill", "prompts per generate call (--backbone; a server takes --concurrency) (default: 32)"),
])
def test_help_shows_defaults(capsys, command, default):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    assert default in out and "(default: None)" not in out
    if command == "eval":
        assert "--prompts-split PROMPTS_SPLIT split of a hub dataset given as --prompts: train by default" in out


def test_prompt_paths_and_hub_names(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for local in ("p.jsonl", "p.txt", "p.json", "./p", "/abs/p", "~/p", "a/b/c", "data/prompts"):
        assert looks_like_path(local), local
    for hub in ("squad", "owner/dataset"):
        assert not looks_like_path(hub), hub
    with pytest.raises(ValueError, match="no such file: prompts file 'data/prompts' does not exist"):
        load_prompts("data/prompts", tokenizer)
    # A hub failure names neither the training config key nor hides that no local file matched.
    # (Where `datasets` is not installed, as on the GPU image, the reader says that instead.)
    with pytest.raises(ValueError, match="not a local file(, and could not load hub dataset| and `datasets` is not "
                                         "installed)") as error:
        load_prompts("nobody-xyz/no-such-dataset", tokenizer)
    assert "data.paths" not in str(error.value)
    # From Python too, a missing prompts file fails before the run is even looked at.
    with pytest.raises(ValueError, match="--prompts: no such file: 'missing.jsonl'"):
        evaluate_run(tmp_path / "nowhere", prompts="missing.jsonl")


def test_prompts_that_are_no_prompts_file_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    """A directory was 'does not exist' after the model loaded; a CSV was read a line per prompt, header too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held_out").mkdir()
    (tmp_path / "prompts.csv").write_text("prompt,answer\nhi,there\n")
    assert "--prompts: 'held_out' is a directory; pass a prompts file in it" in usage_error(
        ["eval", "nowhere", "--prompts", "held_out"], capsys)
    assert "--prompts: 'prompts.csv': a .csv file is not read; convert it to JSONL" in usage_error(
        ["eval", "nowhere", "--prompts", "prompts.csv"], capsys)
    with pytest.raises(ValueError, match="a .csv file is not read"):
        load_prompts("prompts.csv", None)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, tokenizer):  # noqa: F811
    (tmp_path / "p.txt").write_bytes("\ufeffdef f(x):\nclass A:\n".encode())
    (tmp_path / "p.jsonl").write_bytes("\ufeff".encode() + b'{"prompt": "def f(x):"}\n')
    (tmp_path / "plain.txt").write_text("def f(x):\n")
    expected = load_prompts(str(tmp_path / "plain.txt"), tokenizer)
    assert load_prompts(str(tmp_path / "p.txt"), tokenizer, 1) == expected
    assert load_prompts(str(tmp_path / "p.jsonl"), tokenizer) == expected


def test_interval_text():
    assert interval_text(None, 1) == ""
    assert interval_text((1.0, 7.55), 3) == " (95% interval over 3 prompts, rough with fewer than 5: 1.00 to 7.55)"
    assert interval_text((2.24, 2.39), 10) == " (95% interval over 10 prompts: 2.24 to 2.39)"


def test_report_clamps_the_interval_and_states_the_batch_size_used(tmp_path, monkeypatch):
    # With few prompts the normal approximation reaches below 1 token per step (and above depth + 1).
    monkeypatch.setattr(evaluate, "ratio_interval", lambda tokens, steps: (-3.29, 7.55))
    model = random_medusa(64, num_heads=2, seed=1)
    report = evaluate_heads(model, [[1, 2, 3], [7, 8]], tmp_path, max_new_tokens=6, tree_size=5, top_k=3,
                            batch_size=16, warmup=False)
    depth = report["tree"]["max_depth"]
    assert json.loads((tmp_path / "report.json").read_text())["measured"]["acceleration_rate_ci95"] == [1.0, depth + 1]
    batched = json.loads((tmp_path / "report.json").read_text())["measured_batched"]
    assert batched["batch_size"] == 2 and batched["requested_batch_size"] == 16


def test_cli_prints_the_batch_used_and_labels_the_by_size_line_of_a_given_tree(tmp_path, tokenizer, capsys):  # noqa: F811
    model, prompts = write_run(tmp_path, tokenizer, "def f(x):\nThe assert statement\nfor i in\n")
    (tmp_path / "tree.json").write_text("[[0], [1], [0, 0]]")
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--max-new-tokens", "6", "--device", "cpu",
                 "--batch-size", "16", "--tree", str(tmp_path / "tree.json")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "measured at batch 3 (--batch-size 16, but only 3 prompts): acceleration" in out
    assert "(95% interval over 3 prompts, rough with fewer than 5: " in out and " to " in out
    assert "estimated acceleration of searched trees by size (for comparison with the given tree): 4: " in out
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["measured_batched"]["batch_size"] == 3
    low, high = report["measured"]["acceleration_rate_ci95"]
    assert 1.0 <= low <= report["measured"]["acceleration_rate"] <= high <= 3.0  # depth 2: at most 3 tokens a step


def test_eval_stops_at_the_generation_configs_end_of_turn_token_and_says_which_prompts_it_shortened(
        tmp_path, tokenizer, capsys):  # noqa: F811
    """Replies end where the model's generation config says a turn ends (measured on the text the heads
    train on, not past it); prompts longer than the context minus --max-new-tokens keep their last tokens,
    and the CLI and the report say how many."""
    import torch

    from medusa_liger.heads import MedusaConfig, MedusaModel
    from medusa_liger.inference.generate import greedy_generate
    from tests.test_evaluate import TOKENIZER_VOCAB
    from tests.test_generate import randomize_heads_, tiny_backbone
    from tests.test_generate_cli import first_new_token_index

    backbone = tiny_backbone(vocab=TOKENIZER_VOCAB, seed=2, max_position_embeddings=24)
    model = randomize_heads_(MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2)), 3.0, 2).eval()
    final = tmp_path / "run" / "final"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n" + "The assert statement checks a condition. " * 3 + "\n")
    ids = load_prompts(str(prompts), tokenizer)
    room = 24 - 8
    assert len(ids[0]) <= room < len(ids[1])
    greedy = greedy_generate(model, torch.tensor([ids[0]]), 8).new_tokens.tolist()
    i = first_new_token_index(greedy)
    model.backbone.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[i]]
    model.backbone.save_pretrained(final / "backbone")
    tokenizer.save_pretrained(final / "backbone")
    model.save_heads(final / "heads_medusa", format="medusa")
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--max-new-tokens", "8",
                 "--tree-size", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "note: 1 of 2 prompts are longer than the model's context (24) minus --max-new-tokens (8) " \
           "and keep their last 16 tokens" in err
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["truncated_prompts"] == 1
    assert greedy[i] in report["stop_token_ids"] and tokenizer.eos_token_id in report["stop_token_ids"]
    stops = model.backbone.generation_config.eos_token_id
    decoded = [greedy_generate(model, torch.tensor([p]), 8, stops).new_tokens.numel() for p in (ids[0], ids[1][-room:])]
    assert decoded[0] == i + 1  # the first reply ends at the end-of-turn token
    assert report["measured"]["greedy"]["new_tokens"] == report["measured"]["medusa"]["new_tokens"] == sum(decoded)


def test_an_interrupted_evaluation_leaves_the_earlier_files_as_a_set(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    """The files of one evaluation replace another's together: a failure while they are written (here the
    heatmap) leaves the earlier report beside its own tree, and no file written aside."""
    model, prompts = write_run(tmp_path, tokenizer, "def f(x):\nThe assert statement\n")
    ids = load_prompts(str(prompts), tokenizer)
    out = tmp_path / "eval"
    evaluate_heads(model, ids, out, max_new_tokens=6, tree=[[0], [1], [0, 0]])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["head_accuracy.png", "report.json", "tree.json"]

    def failing_heatmap(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(evaluate, "accuracy_heatmap", failing_heatmap)
    with pytest.raises(OSError, match="disk full"):
        evaluate_heads(model, ids, out, max_new_tokens=6, tree=[[1]])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    report = evaluate_heads(model, ids, out, max_new_tokens=6, tree=[[1]])
    assert json.loads((out / "tree.json").read_text()) == report["tree"]["paths"] == [[1]]
    assert json.loads((out / "report.json").read_text())["tree"]["paths"] == report["tree"]["paths"]


def test_a_prompt_the_chat_template_rejects_is_named(tmp_path, tokenizer):  # noqa: F811
    import copy

    from tests.test_distill import STRICT_TEMPLATE

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = STRICT_TEMPLATE
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: the chat template rejected this conversation: "
                                         r"System role not supported"):
        load_prompts(str(path), strict)
