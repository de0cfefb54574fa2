"""Head evaluation: rank hits vs brute force, prompt loading, the report/tree/heatmap, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.inference.evaluate import (
    evaluate_heads,
    head_rank_hits,
    head_ranks,
    ratio_interval,
    student_t_975,
)
from medusa_liger.inference.generate import greedy_generate, medusa_generate
from medusa_liger.inference.prompts import load_prompts
from medusa_liger.inference.tree import (
    DEFAULT_PRIOR_STRENGTH,
    conditional_expected_acceleration,
    conditional_tree_search,
    expected_acceleration,
    normalize_tree,
)
from medusa_liger.kernels.utils import force_backend
from tests.test_generate import chain_batch, randomize_heads_, tiny_backbone, train_chain_medusa

TOKENIZER_VOCAB = 300


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with force_backend("torch"):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from medusa_liger.train.tiny import train_tokenizer

    texts = ["def f(x):\n    return x + 1", "The assert statement checks a condition.", "for i in range(10): pass"]
    return train_tokenizer(texts * 4, TOKENIZER_VOCAB, tmp_path_factory.mktemp("tok"))


def random_medusa(vocab: int, num_heads: int = 3, seed: int = 0) -> MedusaModel:
    model = MedusaModel.from_backbone(tiny_backbone(vocab=vocab, seed=seed), MedusaConfig(num_heads=num_heads))
    return randomize_heads_(model, 3.0, seed).eval()


def test_head_rank_hits_brute_force():
    model = random_medusa(64, num_heads=3)
    ids = torch.randint(0, 64, (1, 5))
    seq = greedy_generate(model, ids, 20).sequences
    top_k = 7
    hits, counts = head_rank_hits(model, seq, 5, top_k)
    ranks = head_ranks(model, seq, 5, top_k)
    with torch.no_grad():
        logits = model.head_logits(model.hidden_states(seq))[:, 0]  # [K, S, V]
    want_hits = torch.zeros(3, top_k, dtype=torch.long)
    want_counts = torch.zeros(3, dtype=torch.long)
    for k in range(3):
        for t in range(4, seq.shape[1]):
            if t + k + 2 >= seq.shape[1]:
                continue
            want_counts[k] += 1
            ranked = logits[k, t].topk(top_k).indices.tolist()
            target = int(seq[0, t + k + 2])
            if target in ranked:
                want_hits[k, ranked.index(target)] += 1
            assert int(ranks[t - 4, k]) == (ranked.index(target) if target in ranked else top_k)
    assert torch.equal(counts, want_counts) and counts.tolist() == [20 - 1 - k for k in range(3)]
    assert torch.equal(hits, want_hits)
    # Positions whose deeper heads' targets lie past the end: -1 there.
    assert ranks.shape == (20 - 1, 3) and ranks[-1].tolist()[1:] == [-1, -1] and int(ranks[-2, 2]) == -1


@pytest.mark.parametrize("args, match", [
    ((torch.randint(0, 64, (12,)), 4, 5), "sequence must be a \\[1, S\\]"),
    ((torch.randint(0, 64, (1, 12)), 0, 5), "prompt_length must be an integer in \\[1, 12\\]"),
    ((torch.randint(0, 64, (1, 12)), 13, 5), "prompt_length"),
    ((torch.randint(0, 64, (1, 12)), 4, 0), "top_k must be an integer in \\[1, 64\\]"),
    ((torch.randint(0, 64, (1, 12)), 4, 65), "top_k must be an integer in \\[1, 64\\]"),
])
def test_head_ranks_names_a_bad_argument(args, match):
    # prompt_length 0, top_k 0 or above the vocabulary crashed deep inside (shape mismatch, argmax, topk).
    model = random_medusa(64, num_heads=3)
    for fn in (head_ranks, head_rank_hits):
        with pytest.raises(ValueError, match=match):
            fn(model, *args)


def test_evaluate_writes_report_tree_heatmap(tmp_path):
    model = random_medusa(64, num_heads=3, seed=1)
    prompts = [[1, 2, 3], [7], [5, 9, 11, 13, 2]]
    report = evaluate_heads(model, prompts, tmp_path / "out", max_new_tokens=12, tree_size=9, top_k=4,
                            metadata={"backbone": "tiny"})
    files = {name: tmp_path / "out" / f for name, f in
             (("report", "report.json"), ("tree", "tree.json"), ("heatmap", "head_accuracy.png"))}
    assert all(p.is_file() for p in files.values())
    assert files["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(files["report"].read_text())
    assert on_disk == json.loads(json.dumps(report)) and on_disk["backbone"] == "tiny"
    tree = json.loads(files["tree"].read_text())
    normalize_tree(tree, 3)
    assert tree == report["tree"]["paths"] and len(tree) == report["tree"]["size"] <= 9
    table = torch.tensor(report["head_accuracy"]["cumulative_top_k"])
    assert table.shape == (3, 4) and (table.diff(dim=1) >= 0).all() and (table <= 1 + 1e-9).all()
    per_rank = torch.tensor(report["head_accuracy"]["per_rank"])
    independent = expected_acceleration(tree, per_rank)
    assert report["tree"]["estimated_acceleration_independent"] == pytest.approx(independent)
    assert report["tree"]["estimate"] == "conditional" and report["tree"]["prior_strength"] == DEFAULT_PRIOR_STRENGTH
    # The conditional estimate from the same ranks head_ranks gives.
    ranks = torch.cat([head_ranks(model, greedy_generate(model, torch.tensor([p]), 12).sequences, len(p), 4)
                       for p in prompts])
    assert report["tree"]["estimated_acceleration"] == pytest.approx(conditional_expected_acceleration(tree, ranks, 4))
    # The searched tree at other sizes; the requested one is this tree.
    by_size = report["tree"]["estimated_acceleration_by_size"]
    assert list(by_size) == ["4", "8", "9", "16", "32", "63", "128"]
    assert by_size["9"] == pytest.approx(report["tree"]["estimated_acceleration"])
    assert by_size["4"] == pytest.approx(conditional_tree_search(ranks, 4, 4)[1])
    measured = report["measured"]
    assert measured["greedy_match_rate"] == 1.0
    assert measured["medusa"]["new_tokens"] == measured["greedy"]["new_tokens"] == 36
    assert measured["acceleration_rate"] == pytest.approx(36 / measured["medusa"]["steps"])
    low, high = measured["acceleration_rate_ci95"]  # clamped to the 1 to depth + 1 tokens a step can emit
    assert 1.0 <= low <= measured["acceleration_rate"] <= high <= report["tree"]["max_depth"] + 1


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (15, 2.1314), (30, 2.0423), (39, 2.0227), (1000, 1.9623)])
def test_student_t_quantile_matches_the_tables(df, quantile):
    assert student_t_975(df) == pytest.approx(quantile, rel=0.008 if df == 3 else 0.003)


def test_ratio_interval_by_hand():
    # R = 60 / 20 = 3; residuals t - R s = -5, 5, 0; variance 50 / (3 * 2) / (20 / 3)^2 = 0.1875;
    # t quantile for 2 degrees of freedom 4.3027.
    low, high = ratio_interval([10, 20, 30], [5, 5, 10])
    assert (low + high) / 2 == pytest.approx(3.0) and (high - low) / 2 == pytest.approx(4.3027 * 0.1875**0.5, rel=1e-4)
    assert ratio_interval([4, 8, 12], [2, 4, 6]) == (2.0, 2.0)  # every prompt at the same rate
    assert ratio_interval([3], [1]) is None  # one prompt: no spread to measure
    with pytest.raises(ValueError, match="same length"):
        ratio_interval([1, 2], [1])
    with pytest.raises(ValueError, match="denominators must sum to more than 0"):
        ratio_interval([0, 0], [0, 0])
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        student_t_975(0)


@pytest.mark.parametrize("prompts", [10, 40])
def test_ratio_interval_covers_the_true_rate_95_percent_of_the_time(prompts):
    # 4000 evaluations of `prompts` prompts each: every prompt decodes 20-60 steps at its own rate
    # around 2.2 tokens/step, so the rate over infinitely many prompts is 2.2. The interval must hold
    # it in about 95% of the evaluations (standard error of that share: 0.0034); with the normal
    # quantile instead of Student's t, 10 prompts would be covered about 92% of the time.
    g = torch.Generator().manual_seed(0)
    trials = 4000
    steps = torch.randint(20, 61, (trials, prompts), generator=g).double()
    tokens = steps * (2.2 + 0.3 * torch.randn(trials, prompts, generator=g, dtype=torch.float64))
    covered = 0
    for t, s in zip(tokens.tolist(), steps.tolist()):
        low, high = ratio_interval(t, s)
        covered += low <= 2.2 <= high
    assert 0.935 <= covered / trials <= 0.965


def test_evaluate_trained_heads_accelerate(tmp_path):
    model, perm = train_chain_medusa(num_heads=3, steps=80)
    g = torch.Generator().manual_seed(0)
    prompts = [chain_batch(perm, g, 1, 4, 0.0)[0].tolist() for _ in range(3)]
    report = evaluate_heads(model, prompts, tmp_path, max_new_tokens=30, tree_size=12, top_k=3)
    assert report["head_accuracy"]["top1"][0] > 0.8
    assert report["tree"]["estimated_acceleration"] > 2.0
    assert report["measured"]["acceleration_rate"] > 2.0
    assert report["measured"]["greedy_match_rate"] == 1.0
    # The histogram counts every step once, by the tokens it emitted.
    histogram = {int(n): c for n, c in report["measured"]["tokens_per_step_histogram"].items()}
    assert sum(histogram.values()) == report["measured"]["medusa"]["steps"]
    assert sum(n * c for n, c in histogram.items()) == report["measured"]["medusa"]["new_tokens"]
    assert max(histogram) <= report["tree"]["max_depth"] + 1 and max(histogram) > 1


def test_evaluate_batched_measurement_matches_one_prompt_at_a_time(tmp_path):
    """Batched decoding accepts what single-stream decoding accepts: the same tokens and steps."""
    model, perm = train_chain_medusa(num_heads=3, steps=80)
    g = torch.Generator().manual_seed(1)
    prompts = [chain_batch(perm, g, 1, n, 0.3)[0].tolist() for n in (4, 2, 7, 3, 5)]
    report = evaluate_heads(model, prompts, tmp_path, max_new_tokens=24, tree_size=12, top_k=3, batch_size=2)
    single, batched = report["measured"], report["measured_batched"]
    assert batched["batch_size"] == 2
    assert batched["medusa"]["new_tokens"] == single["medusa"]["new_tokens"] == batched["greedy"]["new_tokens"]
    assert batched["medusa"]["steps"] == single["medusa"]["steps"]
    assert batched["greedy"]["steps"] == batched["greedy"]["new_tokens"]  # greedy: one token a step
    assert batched["acceleration_rate"] == pytest.approx(single["acceleration_rate"])
    assert batched["acceleration_rate"] > 1.5
    assert batched["greedy_match_rate"] == 1.0 and batched["speedup"] > 0
    assert "measured_batched" not in evaluate_heads(model, prompts[:2], tmp_path, max_new_tokens=4, tree_size=4)
    # A tree of depth 2 accepting more than 2 tokens a step: the interval's top may reach depth + 1; batches
    # of at most as many prompts as there are (the size used is reported beside the one asked for).
    shallow = evaluate_heads(model, prompts[:3], tmp_path / "shallow", max_new_tokens=24, tree=[[0], [0, 0]],
                             batch_size=8)
    rate, (low, high) = shallow["measured"]["acceleration_rate"], shallow["measured"]["acceleration_rate_ci95"]
    assert 2 < rate and low <= rate <= high <= 3
    assert shallow["measured_batched"]["batch_size"] == 3 and shallow["measured_batched"]["requested_batch_size"] == 8
    # A batch's wall time is shared by its prompts (each result carries it): counted once per batch. Here every
    # batch takes 1 s, so 5 prompts in batches of 2 take 3 s, not 5.
    import medusa_liger.inference.evaluate as evaluate_module

    def one_second_batches(*args, **kwargs):
        results = real_batch(*args, **kwargs)
        for result in results:
            result.stats.wall_time_s = 1.0
        return results

    real_batch = evaluate_module.medusa_generate_batch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "medusa_generate_batch", one_second_batches)
        timed = evaluate_heads(model, prompts, tmp_path, max_new_tokens=4, tree_size=4, batch_size=2, warmup=False)
    assert timed["measured_batched"]["medusa"]["wall_time_s"] == timed["measured_batched"]["greedy"]["wall_time_s"] == 3
    # A top_k past the vocabulary ranks every token (torch.topk refused it).
    vocab = model.lm_head.weight.shape[0]
    wide = evaluate_heads(model, prompts[:2], tmp_path, max_new_tokens=4, tree_size=4, top_k=vocab + 5)
    assert wide["measured"]["greedy_match_rate"] == 1.0


def test_evaluate_typical_acceptance_against_plain_sampling(tmp_path):
    """Typical acceptance samples: the baseline is plain sampling (one token a step), prompt i draws
    from seed + i in every decoding, so batched decoding accepts what single-stream decoding does
    and a second evaluation repeats the first."""
    model, perm = train_chain_medusa(num_heads=3, steps=80)
    g = torch.Generator().manual_seed(1)
    prompts = [chain_batch(perm, g, 1, n, 0.3)[0].tolist() for n in (4, 2, 7, 3, 5)]
    options = dict(max_new_tokens=24, tree_size=12, top_k=3, batch_size=2, acceptance="typical", temperature=1.0)
    report = evaluate_heads(model, prompts, tmp_path, seed=4, **options)
    assert report["decoding"] == {"acceptance": "typical", "temperature": 1.0, "posterior_threshold": 0.09,
                                  "posterior_alpha": 0.3, "seed": 4}
    single, batched = report["measured"], report["measured_batched"]
    for section in (single, batched):
        assert "greedy" not in section and "greedy_match_rate" not in section
        assert section["sampling"]["steps"] == section["sampling"]["new_tokens"] == 5 * 24  # no EOS given
        assert section["medusa"]["new_tokens"] == 5 * 24 and section["speedup"] > 0
    assert batched["medusa"]["steps"] == single["medusa"]["steps"]
    assert single["acceleration_rate"] > 1.5
    again = evaluate_heads(model, prompts, tmp_path, seed=4, **options)
    assert again["measured"]["per_prompt_acceleration"] == single["per_prompt_acceleration"]
    # The single-stream decodings are medusa_generate's with seed + i.
    tree = report["tree"]["paths"]
    for i in (0, 3):
        want = medusa_generate(model, torch.tensor([prompts[i]]), 24, tree, acceptance="typical", temperature=1.0,
                               seed=4 + i)
        assert single["per_prompt_acceleration"][i] == want.stats.acceleration_rate


def test_evaluate_a_given_tree(tmp_path):
    """A given tree (the serving engine's medusa_choices) is measured as it is, scored by the table;
    ranks beyond top_k widen the table so the estimate covers every node."""
    model, perm = train_chain_medusa(num_heads=3, steps=80)
    g = torch.Generator().manual_seed(0)
    prompts = [chain_batch(perm, g, 1, 4, 0.0)[0].tolist() for _ in range(3)]
    given = [[1], [0], [0, 0], [0, 0, 0], [5]]
    report = evaluate_heads(model, prompts, tmp_path, max_new_tokens=30, top_k=3, tree=given)
    tree = report["tree"]
    assert tree["source"] == "given" and tree["requested_size"] is None
    assert tree["paths"] == [[0], [1], [5], [0, 0], [0, 0, 0]]  # node order
    assert report["top_k"] == 6
    per_rank = torch.tensor(report["head_accuracy"]["per_rank"])
    assert tree["estimated_acceleration_independent"] == pytest.approx(expected_acceleration(given, per_rank))
    assert report["measured"]["acceleration_rate"] > 2.0 and report["measured"]["greedy_match_rate"] == 1.0
    independent = evaluate_heads(model, prompts, tmp_path / "independent", max_new_tokens=30, top_k=3, tree=given,
                                 tree_search="independent")["tree"]
    assert independent["estimate"] == "independent" and independent["prior_strength"] is None
    assert independent["estimated_acceleration"] == pytest.approx(expected_acceleration(given, per_rank))
    assert json.loads((tmp_path / "tree.json").read_text()) == tree["paths"]
    searched = evaluate_heads(model, prompts, tmp_path, max_new_tokens=30, top_k=3, tree_size=5)
    assert searched["tree"]["source"] == "search" and searched["tree"]["requested_size"] == 5
    with pytest.raises(ValueError, match="needs head 3"):
        evaluate_heads(model, prompts, tmp_path, tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="parent"):
        evaluate_heads(model, prompts, tmp_path, tree=[[0, 1]])


def test_evaluate_bad_input(tmp_path):
    model = random_medusa(64)
    with pytest.raises(ValueError, match="prompts"):
        evaluate_heads(model, [], tmp_path)
    with pytest.raises(ValueError, match="top_k"):
        evaluate_heads(model, [[1]], tmp_path, top_k=0)
    with pytest.raises(ValueError, match="tree_size"):
        evaluate_heads(model, [[1]], tmp_path, tree_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_heads(model, [[1]], tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="acceptance must be"):
        evaluate_heads(model, [[1]], tmp_path, acceptance="beam")
    with pytest.raises(ValueError, match="temperature 0 is greedy"):
        evaluate_heads(model, [[1]], tmp_path, acceptance="typical", temperature=0.0)
    with pytest.raises(ValueError, match="posterior_alpha"):
        evaluate_heads(model, [[1]], tmp_path, acceptance="typical", posterior_alpha=float("inf"))
    with pytest.raises(ValueError, match="seed must be an integer"):
        evaluate_heads(model, [[1]], tmp_path, acceptance="typical", seed=1.5)
    with pytest.raises(ValueError, match="empty"):
        evaluate_heads(model, [[]], tmp_path, max_new_tokens=4)
    with pytest.raises(ValueError, match="tree_search must be one of"):
        evaluate_heads(model, [[1]], tmp_path, tree_search="beam")
    for strength in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="prior_strength must be a finite number >= 0"):
            evaluate_heads(model, [[1]], tmp_path, prior_strength=strength)
    # numpy numbers are options too, written to the report as plain numbers
    import numpy as np

    report = evaluate_heads(model, [[1, 2, 3]], tmp_path, max_new_tokens=4, tree_size=4, acceptance="typical",
                            temperature=np.float32(0.5), posterior_alpha=np.float64(0.3),
                            posterior_threshold=np.int64(1))
    assert report["decoding"]["temperature"] == 0.5
    assert json.loads((tmp_path / "report.json").read_text())["decoding"]["posterior_threshold"] == 1.0


def test_load_prompts_formats(tmp_path, tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "What is assert?"}, {"role": "assistant", "content": "A check."}]},
        {"conversations": [{"from": "human", "value": "Explain for."}, {"from": "gpt", "value": "A loop."}]},
        {"text": "def f(x):\n    return x + 1"},
        {"prompt": "for i in"},
        {"input_ids": [5, 6, 7]},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    prompts = load_prompts(jsonl, tokenizer)
    assert len(prompts) == 5 and prompts[4] == [5, 6, 7]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is assert?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert prompts[0] == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompts[1]).endswith("<|assistant|>\n")
    assert "A loop" not in tokenizer.decode(prompts[1])
    assert load_prompts(jsonl, tokenizer, num_prompts=2) == prompts[:2]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(records))
    assert load_prompts(as_json, tokenizer) == prompts
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n second prompt \n")
    assert [tokenizer.decode(p, skip_special_tokens=True) for p in load_prompts(txt, tokenizer)] == [
        "first prompt", "second prompt"]


def test_load_prompts_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(bad, tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no usable prompt"):
        load_prompts(empty, tokenizer)
    with pytest.raises(ValueError, match="num_prompts"):
        load_prompts(bad, tokenizer, num_prompts=0)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [1, -2]}\n')
    with pytest.raises(ValueError, match="ids.jsonl:1: input_ids"):
        load_prompts(ids, tokenizer)
    with pytest.raises(ValueError, match="no-such-dataset"):  # a hub name, offline in tests
        load_prompts("nobody-xyz/no-such-dataset", tokenizer)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "ok"}\n{"prompt": "a\\ud800b"}\n')  # (a TypeError from the tokenizer)
    with pytest.raises(ValueError, match=r"surrogate.jsonl:2: 'prompt' is not valid Unicode text: a lone surrogate"):
        load_prompts(surrogate, tokenizer)


def write_run(tmp_path, tokenizer, prompt_lines: str):
    """A run directory's final/ (backbone, tokenizer, medusa heads of a random 2-head model) under
    tmp_path/run, and a prompts file with ``prompt_lines``: (model, prompts path)."""
    model = random_medusa(TOKENIZER_VOCAB, num_heads=2, seed=2)
    final = tmp_path / "run" / "final"
    model.backbone.save_pretrained(final / "backbone")
    tokenizer.save_pretrained(final / "backbone")
    model.save_heads(final / "heads_medusa", format="medusa")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt_lines)
    return model, prompts


def test_cli_eval_run_dir(tmp_path, tokenizer, capsys, monkeypatch):
    from medusa_liger.cli import main
    from medusa_liger.inference.cli import evaluate_run, resolve_paths, run_of_final_heads

    model, prompts = write_run(tmp_path, tokenizer, "def f(x):\nThe assert statement\n")
    final = tmp_path / "run" / "final"
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--num-prompts", "2",
                 "--max-new-tokens", "8", "--tree-size", "5", "--top-k", "3", "--device", "cpu", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    out_dir = tmp_path / "run" / "eval"
    report = json.loads((out_dir / "report.json").read_text())
    assert report["num_prompts"] == 2 and report["tree"]["requested_size"] == 5 and report["num_heads"] == 2
    assert report["measured_batched"]["batch_size"] == 2
    assert report["heads"].endswith("heads_medusa") and report["backbone"].endswith("backbone")
    assert (out_dir / "tree.json").is_file() and (out_dir / "head_accuracy.png").is_file()
    out = capsys.readouterr().out
    assert "measured: acceleration" in out and "(95% interval over 2 prompts, rough with fewer than 5: " in out
    assert "measured at batch 2: acceleration" in out and "tokens/s of plain greedy), identical to greedy" in out
    assert "tokens per step: 1: " in out
    assert "(conditional; independent heads: " in out
    assert "estimated acceleration of the searched tree by size: 4: " in out
    # The Medusa paper's independent estimate instead.
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens",
                 "6", "--tree-size", "4", "--device", "cpu", "--tree-search", "independent"])
    assert code == 0, capsys.readouterr().err
    tree = json.loads((out_dir / "report.json").read_text())["tree"]
    assert tree["estimate"] == "independent"
    assert tree["estimated_acceleration"] == tree["estimated_acceleration_independent"]
    captured = capsys.readouterr()
    assert "(independent; independent heads: " in captured.out
    # It replaced the first evaluation's report, and said so (it did silently).
    assert f"note: {str(out_dir)!r} holds an earlier evaluation (report.json), which this one replaces" in captured.err
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens",
                 "6", "--tree-size", "4", "--device", "cpu", "--prior-strength", "0"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out_dir / "report.json").read_text())["tree"]["prior_strength"] == 0.0
    capsys.readouterr()
    # Typical acceptance: sampling against plain sampling.
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens",
                 "6", "--tree-size", "4", "--device", "cpu", "--acceptance", "typical", "--temperature", "0.9",
                 "--seed", "3", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["decoding"]["temperature"] == 0.9 and report["decoding"]["seed"] == 3
    out = capsys.readouterr().out
    assert "measured (typical acceptance at temperature 0.9): acceleration" in out
    assert "tokens/s of plain sampling)" in out and "identical to greedy" not in out
    # A given tree: the one this evaluation wrote, measured again.
    given = json.loads((out_dir / "tree.json").read_text())
    code = main(["eval", str(tmp_path / "run"), "--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens",
                 "6", "--device", "cpu", "--tree", str(out_dir / "tree.json")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tree (given): " in out and "of searched trees by size (for comparison with the given tree): " in out
    assert json.loads((out_dir / "report.json").read_text())["tree"]["paths"] == given
    for bad, message in (("nowhere.json", "does not exist"), ("bad.json", "malformed JSON"), ("dict.json", "list of paths")):
        if bad != "nowhere.json":
            (tmp_path / bad).write_text("{" if bad == "bad.json" else '{"a": 1}')
        assert main(["eval", str(tmp_path / "run"), "--tree", str(tmp_path / bad), "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
    # Without --prompts, a run directory's held-out prompts (eval_prompts.jsonl) are the default.
    (tmp_path / "run" / "eval_prompts.jsonl").write_text('{"input_ids": [3, 4, 5]}\n{"input_ids": [6, 7]}\n')
    code = main(["eval", str(tmp_path / "run"), "--max-new-tokens", "4", "--tree-size", "3", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["prompts"].endswith("eval_prompts.jsonl") and report["num_prompts"] == 2
    # A run's final heads given alone: that run's held-out prompts and eval/ (not the shipped prompts,
    # the tiny run's training data, and ./eval).
    (tmp_path / "run" / "config.yaml").write_text("name: run\n")
    model.save_heads(final / "heads_vllm", format="vllm")
    # Heads in a run's final/ (recording no base model here) go with the backbone beside them, also
    # given from inside final/ or through a link.
    assert resolve_paths(None, None, final / "heads_vllm") == (str(final / "backbone"), final / "heads_vllm")
    (tmp_path / "link").symlink_to(final / "heads_vllm")
    assert resolve_paths(None, None, tmp_path / "link")[0] == str(final / "backbone")
    monkeypatch.chdir(final)
    assert resolve_paths(None, None, "heads_vllm")[0] == str(final / "backbone")
    assert run_of_final_heads("heads_vllm") == run_of_final_heads(tmp_path / "link") == tmp_path / "run"
    for run_dir, heads in ((None, final / "heads_medusa"), (final / "heads_vllm", None), (final, None)):
        report = evaluate_run(run_dir, heads=heads, max_new_tokens=4, tree_size=3)
        assert report["prompts"] == str(tmp_path / "run" / "eval_prompts.jsonl")
        assert report["files"]["report"] == str(out_dir / "report.json")
        assert Path(report["heads"]).name == ("heads_vllm" if run_dir == final / "heads_vllm" else "heads_medusa")
    # Explicit paths, from Python.
    again = evaluate_run(backbone=final / "backbone", heads=final / "heads_medusa", prompts=prompts,
                         output_dir=tmp_path / "explicit", num_prompts=1, max_new_tokens=6, tree_size=4, top_k=2)
    assert again["num_prompts"] == 1 and (tmp_path / "explicit" / "report.json").is_file()


def test_cli_eval_errors(tmp_path, capsys):
    from medusa_liger.cli import main

    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "--heads" in capsys.readouterr().err
    (tmp_path / "run" / "final").mkdir(parents=True)
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "heads_" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("acceptance", ["greedy", "typical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_evaluate_speedup(tmp_path, dtype, acceptance):
    model, perm = train_chain_medusa(num_heads=3, steps=80)
    model = model.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [chain_batch(perm, g, 1, 4, 0.0)[0].tolist() for _ in range(4)]
    report = evaluate_heads(model, prompts, tmp_path, max_new_tokens=64, tree_size=16, top_k=3, batch_size=2,
                            acceptance=acceptance)
    baseline = "greedy" if acceptance == "greedy" else "sampling"
    assert report["measured_batched"][baseline]["steps"] == report["measured_batched"][baseline]["new_tokens"]
    assert report["device"].startswith("cuda")
    assert report["measured"]["acceleration_rate"] > 2.0
    # Wall-clock speedup on a tiny model is launch- and host-bound (a Medusa step does more host work
    # than a greedy step), so it only has to be sane here; real gains need a real-sized backbone.
    assert report["measured"]["speedup"] > 0.5


def test_speedup_compares_throughputs_when_the_decodings_emit_different_token_counts():
    """Sampled Medusa and plain decodings stop at different lengths: 60 tokens in 1 s against 100 tokens
    in 2 s is 60 against 50 tokens/s, a 1.2x speedup (the wall-time ratio would say 2x)."""
    from types import SimpleNamespace

    from medusa_liger.inference.evaluate import _comparison

    def decoding(tokens: int, steps: int):
        return SimpleNamespace(stats=SimpleNamespace(new_tokens=tokens, steps=steps))

    section = _comparison([decoding(60, 20)], [decoding(100, 100)], 1.0, 2.0, "typical")
    assert section["speedup"] == pytest.approx(1.2)
    assert section["medusa"]["tokens_per_s"] == 60 and section["sampling"]["tokens_per_s"] == 50
