"""``medusa-liger generate``: one prompt through Medusa decoding from a saved run."""

from __future__ import annotations

import pytest
import torch

from medusa_liger.cli import main
from medusa_liger.inference import generate_cli
from medusa_liger.inference.generate import greedy_generate, medusa_generate
from medusa_liger.inference.generate_cli import generate_reply, prompt_ids
# The evaluation tests' fixtures: one intra-op thread, the PyTorch kernels, the tiny tokenizer.
from tests.test_evaluate import TOKENIZER_VOCAB, _one_thread, random_medusa, tokenizer  # noqa: F401


@pytest.fixture
def run_dir(tmp_path, tokenizer):  # noqa: F811 - the fixture imported above
    """A training run's final layout: the backbone (with the tokenizer) and the heads."""
    model = random_medusa(TOKENIZER_VOCAB, num_heads=2, seed=2)
    final = tmp_path / "run" / "final"
    model.backbone.save_pretrained(final / "backbone")
    tokenizer.save_pretrained(final / "backbone")
    model.save_heads(final / "heads_medusa", format="medusa")
    return tmp_path / "run"


def test_reply_is_the_greedy_continuation_of_the_chat_prompt(tokenizer):  # noqa: F811
    model = random_medusa(TOKENIZER_VOCAB, num_heads=2, seed=2)
    reply, out = generate_reply(model, tokenizer, "def f(x):", max_new_tokens=12, compare_greedy=True)
    ids = prompt_ids(tokenizer, "def f(x):", raw=False)
    assert out.sequences[0, : len(ids)].tolist() == ids  # the chat-rendered prompt, then the reply
    want = greedy_generate(model, torch.tensor([ids]), 12, tokenizer.eos_token_id)
    assert out.sequences.tolist() == want.sequences.tolist() and out.matches_greedy
    assert reply == tokenizer.decode(want.new_tokens.tolist(), skip_special_tokens=True)
    raw = prompt_ids(tokenizer, "def f(x):", raw=True)
    # As training reads a document: BOS, then the text (the tiny tokenizer's post-processor adds no BOS).
    assert raw == [tokenizer.bos_token_id, *tokenizer("def f(x):")["input_ids"]] and raw != ids
    with pytest.raises(ValueError, match="prompt must not be empty"):
        prompt_ids(tokenizer, "", raw=False)


def test_cli(run_dir, capsys, monkeypatch):
    args = ["generate", str(run_dir), "--prompt", "The assert statement", "--max-new-tokens", "10", "--device", "cpu"]
    assert main([*args, "--compare-greedy"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert out.strip() and "tokens/step" in err and "the same reply" in err
    # Typical acceptance samples from --seed: the same seed gives the same reply.
    typical = [*args, "--acceptance", "typical", "--temperature", "1.5", "--seed", "4"]
    replies = []
    for _ in range(2):
        assert main(typical) == 0, capsys.readouterr().err
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1]
    # The posterior flags (the README promised them in generate too) reach the decoding.
    options = []
    monkeypatch.setattr(generate_cli, "medusa_generate",
                        lambda *a, **kw: options.append(kw) or medusa_generate(*a, **kw))
    assert main([*typical, "--posterior-threshold", "0.2", "--posterior-alpha", "0.4"]) == 0
    assert options[-1]["posterior_threshold"] == 0.2 and options[-1]["posterior_alpha"] == 0.4
    capsys.readouterr()
    # Errors name what is wrong and exit with 2 (flags that do not go together: a usage error).
    with pytest.raises(SystemExit) as exit_info:
        main([*typical, "--compare-greedy"])
    assert exit_info.value.code == 2 and "--compare-greedy compares greedy" in capsys.readouterr().err
    for bad, message in ((["generate", str(run_dir / "nowhere"), "--prompt", "x"], "not a directory"),
                         ([*args, "--tree", str(run_dir / "none.json")], "does not exist")):
        assert main(bad) == 2
        assert message in capsys.readouterr().err


def test_compare_greedy_times_both_decodings_warm(tokenizer, monkeypatch):  # noqa: F811
    """Medusa ran first and cold, greedy second and warm: short replies showed speedups of 0.04x."""
    model = random_medusa(TOKENIZER_VOCAB, num_heads=2, seed=2)
    calls = []
    monkeypatch.setattr(generate_cli, "medusa_generate",
                        lambda model, ids, n, *a, **kw: calls.append((n, kw["compare_greedy"])) or
                        medusa_generate(model, ids, n, *a, **kw))
    generate_reply(model, tokenizer, "def f(x):", max_new_tokens=12, compare_greedy=True)
    assert calls == [(8, True), (12, True)]  # a warm-up of both, then the timed run
    calls.clear()
    generate_reply(model, tokenizer, "def f(x):", max_new_tokens=12)
    assert calls == [(12, False)]


def first_new_token_index(tokens: list[int]) -> int:
    """The first index >= 1 whose token does not occur before it (a stop token cut there, not earlier)."""
    return next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])


def test_reply_stops_at_the_end_of_turn_token_of_the_generation_config(tokenizer):  # noqa: F811
    """An instruct model may end its turn with a token only its generation config names (Llama-3's
    <|eot_id|>): the reply ends there, as distill's answers do."""
    model = random_medusa(TOKENIZER_VOCAB, num_heads=2, seed=2)
    ids = prompt_ids(tokenizer, "def f(x):", raw=False)
    greedy = greedy_generate(model, torch.tensor([ids]), 12).new_tokens.tolist()
    i = first_new_token_index(greedy)
    model.backbone.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[i]]
    _, out = generate_reply(model, tokenizer, "def f(x):", max_new_tokens=12)
    assert out.new_tokens.tolist() == greedy[: i + 1]


def test_stop_tokens_are_the_models_own_before_a_backbone_attributes():
    """A MedusaModel's come from its backbone; a causal LM with a .backbone of its own (Mamba's, which has
    no generation config) keeps its own."""
    from types import SimpleNamespace

    from medusa_liger.inference.backbone import stop_token_ids

    eos_zero = SimpleNamespace(eos_token_id=0)
    medusa = SimpleNamespace(backbone=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[0, 7])))
    mamba = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[9, 0]), backbone=SimpleNamespace())
    assert stop_token_ids(eos_zero, medusa) == [0, 7]
    assert stop_token_ids(eos_zero, mamba) == [0, 9]
    assert stop_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace()) == []
