"""Training end to end on a shortened tiny config: outputs, loss, export, resume, accumulation, wandb."""

from __future__ import annotations

import json
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.train.build import GroupSchedule, heads_lambda, warmup_cosine
from medusa_liger.train.config import load_config
from medusa_liger.train.logging import read_metrics
from medusa_liger.train.loop import accumulate_gradients, train
from tests.train_helpers import (
    ROOT,
    TINY,
    _torch_kernels,  # noqa: F401  (autouse fixture)
    build_in_process,
    losses,
    short_config,
    train_killed_at,
)


def test_tiny_run_end_to_end(tmp_path):
    cfg = short_config(tmp_path, "train.steps=20", "checkpoint.every=10", "checkpoint.keep=1")
    result = train(cfg)
    out = Path(cfg.output_dir)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    # The final held-out evaluation is in the last step's record (and the summary), like the others.
    assert records[-1]["eval/acc/head0"] == result.summary["eval/acc/head0"]
    assert {"loss", "lm_loss", "acc/lm", "acc/head0", "acc/head2", "tokens_per_s", "lr/heads"} <= set(records[0])
    first, last = sum(losses(out)[:3]) / 3, sum(losses(out)[-3:]) / 3
    assert last < first - 1.0, (first, last)  # the loss falls
    for path in ("config.yaml", "plot.png", "final/backbone/config.json", "final/backbone/tokenizer.json",
                 "final/heads_medusa/medusa_lm_head.safetensors", "final/heads_vllm/model.safetensors",
                 "tokenizer/tokenizer.json"):
        assert (out / path).is_file(), path
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000020"]  # keep=1 pruned step 10
    assert load_config(out / "config.yaml") == cfg
    summary = result.summary
    assert summary["final_loss"] is not None and 0 < summary["most_common_token_frequency"] < 1
    assert "eval/acc/head0" in summary
    # The held-out documents' prompts, for `medusa-liger eval RUN_DIR`.
    held_out = [json.loads(line)["input_ids"] for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert held_out and all(len(ids) >= 2 for ids in held_out)
    assert result.paths["eval_prompts"] == out / "eval_prompts.jsonl"

    # Both exports load back onto the exported backbone and predict what the trained heads predict.
    from transformers import AutoModelForCausalLM

    backbone = AutoModelForCausalLM.from_pretrained(out / "final" / "backbone")
    ids = torch.randint(0, backbone.config.vocab_size, (1, 16))
    for fmt in ("medusa", "vllm"):
        loaded = MedusaModel.from_pretrained(out / "final" / f"heads_{fmt}", backbone=backbone)
        assert loaded.config.num_heads == cfg.heads.num_heads
        with torch.no_grad():
            hidden = loaded.hidden_states(ids)
            assert loaded.head_logits(hidden).shape == (3, 1, 16, backbone.config.vocab_size)
    # A training checkpoint carries its heads in the export format: `medusa-liger export` reads it.
    from medusa_liger.cli import main as medusa_liger_main
    from medusa_liger.heads.export import read_heads

    assert medusa_liger_main(["export", "--checkpoint", str(out / "checkpoints" / "step-000020"),
                              "--output", str(tmp_path / "exported"), "--format", "vllm"]) == 0
    final_heads = read_heads(out / "final" / "heads_medusa").tensors
    for name, tensor in read_heads(tmp_path / "exported").tensors.items():
        assert torch.equal(tensor, final_heads[name]), name
    config = json.loads((out / "final" / "heads_medusa" / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["base_model_name_or_path"].endswith("backbone")


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    extra = ["train.steps=8", "checkpoint.every=3", "train.grad_accum=2", "train.micro_batch_size=2",
             "train.heads_only_steps=2", "train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps=4",
             "train.heads_lambda.value=0.5", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    train(short_config(tmp_path / "straight", *extra))
    expected = losses(tmp_path / "straight")
    records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["stage"] for r in records[:3]] == ["heads_only", "heads_only", "joint"]
    assert records[0]["lr/backbone"] == 0.0 and records[3]["lr/backbone"] > 0

    # "Kill" the second run while it logs step 5 (after the step-3 checkpoint), then resume.
    train_killed_at(5, short_config(tmp_path / "killed", *extra), monkeypatch)
    assert len(losses(tmp_path / "killed")) == 5
    train(short_config(tmp_path / "killed", *extra, "train.resume=auto"))
    assert losses(tmp_path / "killed") == expected  # bit-exact, steps 1..8, no duplicates


def test_resume_takes_this_runs_schedule_and_rates(tmp_path, capsys):
    """Extending a run (more steps) or changing its rate on resume: the checkpoint's optimizer and
    scheduler state bring back the old schedule, which must not win over the config (it did)."""
    extra = ["checkpoint.every=4", "export.formats=[medusa]", "data.eval_fraction=0.0", "train.warmup_steps=2"]
    train(short_config(tmp_path / "run", "train.steps=4", *extra))
    capsys.readouterr()
    train(short_config(tmp_path / "run", "train.steps=8", "train.heads_lr=0.01", "train.resume=auto", *extra))
    assert "resuming at step 4 with train.steps 4 -> 8, train.heads_lr" in capsys.readouterr().err
    train(short_config(tmp_path / "straight", "train.steps=8", "train.heads_lr=0.01", *extra))
    resumed, straight = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("run", "straight"))
    assert [r["lr/heads"] for r in resumed[4:]] == [r["lr/heads"] for r in straight[4:]]


def test_resume_says_which_loss_settings_it_changes(tmp_path, capsys):
    """Another loss on resume (a curriculum) is allowed, but said, as other rates are: it used to pass
    silently, so a typo'd override changed the objective of a long run unnoticed."""
    extra = ["checkpoint.every=2", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    train(short_config(tmp_path / "run", "train.steps=2", *extra))
    capsys.readouterr()
    train(short_config(tmp_path / "run", "train.steps=4", "train.resume=auto", "heads.decay=0.5",
                       "heads.targets=backbone", "train.heads_lambda.value=0.7", *extra))
    err = capsys.readouterr().err
    assert ("resuming at step 2 with train.steps 2 -> 4, heads.decay 0.8 -> 0.5, heads.targets labels -> backbone, "
            "train.heads_lambda.value 0.2 -> 0.7 (from here on)") in err
    # The same settings again (from step 4): nothing to say.
    train(short_config(tmp_path / "run", "train.steps=6", "train.resume=auto", "heads.decay=0.5",
                       "heads.targets=backbone", "train.heads_lambda.value=0.7", *extra))
    err = capsys.readouterr().err
    assert "resuming at step 4 with train.steps 4 -> 6 (from here on)" in err
    # logging.progress=false (short_config) turns transformers' bars off for the run, and back on after it.
    from transformers.utils import logging as hf_logging

    assert "Writing model shards" not in err and "it/s" not in err
    assert hf_logging.is_progress_bar_enabled()


def test_resume_from_an_older_checkpoint_abandons_the_later_ones_at_once(tmp_path, monkeypatch, capsys):
    """A resume from step 2 of 6 abandons steps 4 and 6; killed before its first save, the run must
    not leave them for train.resume=auto to pick (they used to go only at that save)."""
    extra = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "export.formats=[medusa]",
             "data.eval_fraction=0.0"]
    out = tmp_path / "run"
    train(short_config(out, *extra))
    capsys.readouterr()
    train_killed_at(3, short_config(out, *extra, f"train.resume={out / 'checkpoints' / 'step-000002'}"), monkeypatch)
    assert "abandons the later checkpoints step-000004, step-000006" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_a_resume_removes_what_a_save_killed_after_its_rename_left(tmp_path):
    """A kill after a save's rename, before its pruning, left a checkpoint past checkpoint.keep and the
    pruning's .tmp-* directory (a whole checkpoint): only the next save removed them, and a run resumed
    from its last checkpoint saves none."""
    import shutil

    extra = ["checkpoint.every=2", "checkpoint.keep=2", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    train(short_config(tmp_path, "train.steps=4", *extra))
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "step-000002", ckpts / "step-000001")  # an unpruned older checkpoint
    shutil.copytree(ckpts / "step-000002", ckpts / ".tmp-deleted-step-000000-1234")  # a pruning's leftover
    train(short_config(tmp_path, "train.steps=4", "train.resume=auto", *extra))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]


def test_removing_killed_saves_never_deletes_the_checkpoint_resumed_from(tmp_path):
    # train.resume may name a save's moved-aside .tmp-old-step-* (a kill between its renames left that step
    # only there): the cleanup at the resume deleted its own source.
    from medusa_liger.train.checkpoint import remove_killed_saves

    root = tmp_path / "checkpoints"
    aside, stale = root / ".tmp-old-step-000200-77", root / ".tmp-step-000300-77"
    for path in (aside, stale):
        path.mkdir(parents=True)
    (aside / "trainer_state.json").write_text(json.dumps({"step": 200}))
    remove_killed_saves(root, 2, resumed=aside)
    assert aside.is_dir() and not stale.exists()


def test_a_resume_past_train_steps_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    # It was accepted: nothing trained, yet config.yaml and the summary said steps: 4 for a 6-step model.
    from medusa_liger.train.checkpoint import ResumeError

    extra = ["checkpoint.every=3", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    out = tmp_path / "run"
    train(short_config(out, "train.steps=6", *extra))
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"is at step 6, past train.steps=4"):
        train(short_config(out, "train.steps=4", "train.resume=auto", *extra))
    assert (out / "config.yaml").read_text() == config_before


def test_a_resume_from_another_runs_checkpoint_drops_this_directorys_old_run(tmp_path, monkeypatch, capsys):
    # The directory's own (third-run) checkpoints survived, for train.resume=auto to pick next time,
    # and its metrics.jsonl kept that run's first records before the resumed ones.
    extra = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "export.formats=[medusa]",
             "data.eval_fraction=0.0"]
    source, target = tmp_path / "source", tmp_path / "target"
    train(short_config(source, *extra))
    train(short_config(target, *extra, "train.seed=7"))
    capsys.readouterr()
    train_killed_at(3, short_config(target, *extra, f"train.resume={source / 'checkpoints' / 'step-000002'}"),
                    monkeypatch)
    assert "resuming from another run's checkpoint" in capsys.readouterr().err
    assert not (target / "checkpoints").exists() or not any((target / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(target / "metrics.jsonl")] == [3]


def test_lora_targets_the_backbone_lacks_are_a_config_error(tmp_path, capsys):
    from medusa_liger.cli import main as medusa_liger_main
    from medusa_liger.train.config import save_config

    config_file = tmp_path / "run.yaml"
    save_config(short_config(tmp_path / "run", "train.steps=1"), config_file)
    assert medusa_liger_main(["train", str(config_file), "train.mode=joint", "lora.enabled=true",
                              "lora.target_modules=[nope_proj]"]) == 2  # not peft's traceback
    assert "config error: lora.target_modules=['nope_proj']" in capsys.readouterr().err


@pytest.mark.parametrize(("targets", "unmatched"), [("[q_proj,v_proj,gate_poj]", "['gate_poj']"), ("q_proj", None),
                                                  (".*proj", "['.*proj']"),
                                                  ("[q_proj,proj]", "['proj']")])  # a name's end, not a dotted part
def test_every_lora_target_must_name_a_module(tmp_path, targets, unmatched):
    """peft raises only when no target matches: a typo in a list left those layers without adapters,
    silently. A lone name was read by peft as a regular expression over full module paths (no match)."""
    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.config import ConfigError
    from medusa_liger.train.data import load_examples

    cfg = short_config(tmp_path, "train.mode=joint", "lora.enabled=true", f"lora.target_modules={targets}")
    if unmatched:
        said = r".*\(module names, not regular expressions\)" if "*" in targets else ""
        with pytest.raises(ConfigError, match=rf"lora.target_modules=.*: {re.escape(unmatched)} match no module of "
                                              rf"the backbone, whose linear layers are named \[.*'gate_proj'{said}"):
            build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    else:
        _, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
        adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1]
                   for name, _ in backbone.named_parameters() if "lora_A" in name}
        assert adapted == {"q_proj"}


def test_resume_with_other_heads_is_refused_clearly_and_keeps_the_runs_config(tmp_path, capsys):
    from medusa_liger.cli import main as medusa_liger_main
    from medusa_liger.train.config import save_config

    extra = ["train.steps=3", "checkpoint.every=3", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    cfg = short_config(tmp_path / "run", *extra)
    train(cfg)
    config_file = tmp_path / "run.yaml"
    save_config(cfg, config_file)
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert medusa_liger_main(["train", str(config_file), "heads.num_heads=4", "train.steps=6",
                              "train.resume=auto"]) == 2
    error = capsys.readouterr().err
    assert "resume error" in error and "heads.num_heads=3 there, 4 now" in error, error
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # still the checkpoints' config
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000003"]


def test_too_little_data_for_a_micro_batch_is_a_data_error(tmp_path, capsys):
    from medusa_liger.cli import main as medusa_liger_main
    from medusa_liger.train.config import save_config

    config_file = tmp_path / "run.yaml"
    save_config(short_config(tmp_path / "run", "train.micro_batch_size=100000"), config_file)
    assert medusa_liger_main(["train", str(config_file)]) == 2
    error = capsys.readouterr().err
    assert "data error" in error and "micro_batch_size" in error, error


def test_a_rerun_on_cached_data_says_the_data_warnings_again(tmp_path):
    from medusa_liger.records import DataWarning

    data = tmp_path / "chat.jsonl"
    shipped = (ROOT / "medusa_liger" / "data" / "pydoc_chat.jsonl").read_text()
    data.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n' + shipped)
    cfg = short_config(tmp_path / "run", "train.steps=1", f"data.paths=[{data}]", "data.on_error=skip",
                       "data.long_examples=truncate", "checkpoint.every=1000")

    def said() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cfg)
        return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]

    first = said()
    assert [m[:29] for m in first] == ["skipped 1 bad records; first:", "data.long_examples=truncate: "]
    # A fresh start in the same directory: the tiny model reads the records again (its tokenizer is
    # keyed on them) and says so; the rows come from the cache, which says what packing them said.
    again = said()
    assert again[0] == first[0] and again[1] == f"{first[1]} (said when the packed-data cache " + again[1].split(
        "(said when the packed-data cache ")[1]
    assert len(again) == 2 and str(tmp_path / "run" / "cache") in again[1]


@pytest.mark.parametrize("out_of_vocab", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_accumulation_is_normalized_by_target_tokens(tmp_path, out_of_vocab):
    """Two micro-batches with very different target counts give the gradient of one joint batch
    (also when some labels lie outside [0, V), which the kernels ignore on GPU (on CPU they raise)
    and the loop's counts must ignore too)."""
    cfg = short_config(tmp_path, "train.steps=1", "logging.wandb=disabled")
    from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    device = torch.device("cuda" if out_of_vocab else "cpu")
    model = build_medusa(cfg, backbone).to(device)
    with torch.no_grad():  # move the zero-initialized heads off the identity
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    T = 24
    ids = torch.randint(0, len(tokenizer), (3, T))
    labels = ids.clone()
    labels[0, 4:] = -100  # row 0 has few targets, rows 1-2 many
    segments = torch.ones_like(ids)
    segments[2, T // 2:] = 2
    if out_of_vocab:
        labels[1, 3:15] = model.heads.vocab_size + 3
    whole = {"input_ids": ids, "labels": labels, "segment_ids": segments}
    parts = [{k: v[:1] for k, v in whole.items()}, {k: v[1:] for k, v in whole.items()}]

    def grads(batches):
        model.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(model, batches, device)
        return metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    m_whole, g_whole = grads([whole])
    m_parts, g_parts = grads(parts)
    assert m_parts["loss"] == pytest.approx(m_whole["loss"], rel=1e-5)
    assert m_parts["acc/head0"] == pytest.approx(m_whole["acc/head0"], rel=1e-6)
    assert m_parts["lm_loss"] == pytest.approx(m_whole["lm_loss"], rel=1e-5)  # (the tiny config is joint)
    assert m_parts["acc/lm"] == pytest.approx(m_whole["acc/lm"], rel=1e-6)
    for a, b in zip(g_parts, g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_medusa1_on_a_saved_backbone_leaves_it_untouched(tmp_path):
    first = short_config(tmp_path / "base", "train.steps=1", "export.formats=[medusa]")
    train(first)
    backbone_dir = tmp_path / "base" / "final" / "backbone"
    cfg = short_config(tmp_path / "m1", f"model.name_or_path={backbone_dir}", "train.mode=heads", "train.steps=3",
                       "checkpoint.every=0", "export.formats=[vllm]")
    result = train(cfg)
    assert not (tmp_path / "m1" / "final" / "backbone").exists()  # not trained, not re-exported
    assert (tmp_path / "m1" / "final" / "heads_vllm" / "model.safetensors").is_file()
    assert "lm_loss" not in read_metrics(tmp_path / "m1" / "metrics.jsonl")[0]
    from transformers import AutoModelForCausalLM

    backbone = AutoModelForCausalLM.from_pretrained(backbone_dir)
    loaded = MedusaModel.from_pretrained(result.final_dir / "heads_vllm", backbone=backbone)
    assert loaded.config.num_heads == 3


def test_lora_joint_run_exports_a_merged_backbone(tmp_path):
    pytest.importorskip("peft")
    cfg = short_config(tmp_path, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.steps=3",
                       "checkpoint.every=0", "export.formats=[medusa]", "data.eval_fraction=0.0")
    train(cfg)
    merged = json.loads((tmp_path / "final" / "backbone" / "config.json").read_text())
    assert merged["model_type"] == "llama"
    assert not (tmp_path / "final" / "backbone" / "adapter_config.json").exists()


def test_wandb_offline_writes_its_files(tmp_path):
    pytest.importorskip("wandb")
    cfg = short_config(tmp_path, "logging.wandb=offline", "train.steps=2", "checkpoint.every=0",
                       "export.formats=[medusa]", "data.eval_fraction=0.0")
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_schedules():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    cfg = load_config(TINY, ["train.mode=joint", "train.steps=20", "train.heads_only_steps=5", "train.warmup_steps=2",
                             "train.heads_lambda.schedule=sine", "train.heads_lambda.ramp_steps=10",
                             "train.heads_lambda.value=0.2"])
    backbone, heads = GroupSchedule("backbone", cfg), GroupSchedule("heads", cfg)
    assert backbone(4) == 0.0 and backbone(5) == pytest.approx(0.5) and heads(0) == pytest.approx(0.5)
    # Both groups end at min_lr_ratio: the backbone's cosine spans the steps after the heads-only stage.
    assert backbone(20) == pytest.approx(0.1) and heads(20) == pytest.approx(0.1)
    assert heads_lambda(cfg, 0) == 0.0 and heads_lambda(cfg, 10) == pytest.approx(0.2)
    assert heads_lambda(cfg, 5) == pytest.approx(0.2 * 2**-0.5)
    linear = load_config(TINY, ["train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps=10",
                                "train.heads_lambda.value=0.2"])
    assert heads_lambda(linear, 5) == pytest.approx(0.1)


# --- checkpoint pruning / atomic replace, metrics truncation -------------------------------------


def _save_tiny_checkpoint(root: Path, step: int, keep: int = 2) -> Path:
    from medusa_liger.train.checkpoint import save_checkpoint

    weight = torch.nn.Parameter(torch.full((3,), float(step)))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(root, step, {"w": weight}, optimizer, scheduler, {"data": {}}, keep)


def _steps(root: Path) -> list[int]:
    from medusa_liger.train.checkpoint import list_checkpoints

    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(root)]


def test_saving_an_older_step_drops_the_abandoned_branch_and_keeps_the_new_one(tmp_path):
    from medusa_liger.train.checkpoint import find_resume_checkpoint

    for step in (2, 4, 6, 8):
        _save_tiny_checkpoint(tmp_path, step, keep=3)
    assert _steps(tmp_path) == [4, 6, 8]
    # Resumed from step 4: step 5 must survive pruning and 6, 8 (the old branch) must go.
    written = _save_tiny_checkpoint(tmp_path, 5, keep=3)
    assert written.is_dir() and _steps(tmp_path) == [4, 5]
    assert find_resume_checkpoint("auto", tmp_path) == written
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        _save_tiny_checkpoint(tmp_path, 6, keep=0)
    assert _steps(tmp_path) == [4, 5]


def test_replacing_a_step_and_stale_temporaries(tmp_path):
    from safetensors.torch import load_file

    _save_tiny_checkpoint(tmp_path, 3)
    stale = tmp_path / ".tmp-step-000004-999999"  # a save killed before its rename
    stale.mkdir()
    (stale / "trainable.safetensors").write_text("partial")
    final = _save_tiny_checkpoint(tmp_path, 3)  # a rerun of the same step replaces it
    assert load_file(str(final / "trainable.safetensors"))["w"].tolist() == [3.0] * 3
    assert _steps(tmp_path) == [3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_truncate_metrics_skips_a_torn_last_line(tmp_path):
    from medusa_liger.train.logging import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match="unreadable"):
        truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_fresh_start_warns_which_old_checkpoints_it_deletes(tmp_path, capsys):
    from medusa_liger.train.checkpoint import delete_old_checkpoints

    for step in (2, 4):
        _save_tiny_checkpoint(tmp_path / "checkpoints", step)
    delete_old_checkpoints(tmp_path / "checkpoints")
    err = capsys.readouterr().err
    assert "step-000002, step-000004" in err and "train.resume=auto" in err
    assert not (tmp_path / "checkpoints").exists()


def test_a_fresh_start_deletes_the_earlier_runs_evaluation_and_held_out_prompts(tmp_path, capsys):
    """Both outlived the run they described: eval/ reported on replaced heads, and eval_prompts.jsonl (the
    earlier run's held-out documents) was read by `medusa-liger eval RUN_DIR` though this run, holding
    nothing out, trained on those documents."""
    train(short_config(tmp_path, "train.steps=2", "checkpoint.every=0"))
    assert (tmp_path / "eval_prompts.jsonl").is_file()
    (tmp_path / "eval").mkdir()
    for name in ("report.json", "tree.json", "head_accuracy.png"):
        (tmp_path / "eval" / name).write_text("{}")
    capsys.readouterr()
    fresh = ["train.steps=2", "checkpoint.every=0", "train.resume=none", "data.eval_fraction=0"]
    train(short_config(tmp_path, *fresh))
    assert f"warning: deleting the evaluation of an earlier run in {tmp_path / 'eval'}" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "eval_prompts.jsonl").exists()
    # Only an evaluation's own files go: eval/ may be the user's, or a link to elsewhere.
    elsewhere = tmp_path.parent / f"{tmp_path.name}-reports"
    elsewhere.mkdir()
    for name in ("report.json", "notes.md"):
        (elsewhere / name).write_text("{}")
    (tmp_path / "eval").symlink_to(elsewhere)
    train(short_config(tmp_path, *fresh))
    assert (tmp_path / "eval").is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == ["notes.md"]
    (tmp_path / "eval").unlink()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "harness.py").write_text("")
    train(short_config(tmp_path, *fresh))  # no evaluation's file: untouched
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["harness.py"]
    (tmp_path / "eval" / "tree.json").write_text("[]")  # an evaluation killed before its report.json
    train(short_config(tmp_path, *fresh))
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["harness.py"]


def test_gradient_checkpointing_is_enabled_without_deprecation_warnings(tmp_path):
    import warnings

    cfg = short_config(tmp_path, "model.gradient_checkpointing=true")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*")
        warnings.simplefilter("error", FutureWarning)
        model, *_ = build_in_process(cfg, torch.device("cpu"))
    backbone = model.backbone
    # transformers >= 5.2x renamed the flag (the old name warns); older versions have only the old one.
    on = (backbone.is_activation_checkpointing if hasattr(type(backbone), "is_activation_checkpointing")
          else backbone.is_gradient_checkpointing)
    # Training forwards pass use_cache=False; the config keeps the model's own, which the export writes
    # (it wrote use_cache false, so a plain forward of the exported backbone returned no cache).
    assert on and backbone.config.use_cache is True


def test_target_counts_follow_the_kernel_rule():
    """Past the row's end, across segments, IGNORE_INDEX or outside [0, V): not a target."""
    from medusa_liger.kernels.reference import shifted_targets
    from medusa_liger.train.loop import count_targets

    V, B, T = 50, 3, 17
    labels = torch.randint(-5, V + 5, (B, T))
    labels[0, :4] = -100
    segments = torch.ones(B, T, dtype=torch.long)
    segments[1, 9:] = 2
    for shift in (1, 2, 5):
        target = shifted_targets(labels, shift, -100, segments)
        expected = int(((target >= 0) & (target < V)).sum())
        assert int(count_targets(labels, segments, shift, V)) == expected


def test_step_metrics_accumulated_on_device_equal_the_forward_exactly(tmp_path):
    """The per-step sums stay on the device until one transfer: the numbers are the forward's own."""
    cfg = short_config(tmp_path)
    model, loader, *_ = build_in_process(cfg, torch.device("cpu"))
    model.eval()  # no dropout: the reference forward below sees the same computation
    batch = loader.next_batch()
    metrics = accumulate_gradients(model, [batch], torch.device("cpu"))
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["labels"], segment_ids=batch["segment_ids"])
    assert metrics["loss"] == float(out.loss) and metrics["tokens"] == int((batch["segment_ids"] != 0).sum())
    for k in range(model.config.num_heads):
        assert metrics[f"loss/head{k}"] == pytest.approx(float(out.head_losses[k]), rel=1e-6)
        assert metrics[f"acc/head{k}"] == pytest.approx(float(out.head_accuracy[k]), rel=1e-6)
    assert metrics["lm_loss"] == pytest.approx(float(out.lm_loss), rel=1e-6)  # (the tiny config is joint)
    assert metrics["acc/lm"] == pytest.approx(float(out.lm_accuracy), rel=1e-6)
    # A head without any target in the step (targets only in the first 3 positions: head 2 reads 4 on)
    # logs 0, not 0 / 0.
    batch["labels"][:, 3:] = -100
    metrics = accumulate_gradients(model, [batch], torch.device("cpu"))
    assert metrics["loss/head2"] == 0.0 and metrics["acc/head2"] == 0.0 and metrics["loss/head0"] > 0


def test_eval_prompts_are_the_tokens_before_each_held_out_documents_first_target(tmp_path):
    from medusa_liger.train.finish import write_eval_prompts
    from medusa_liger.train.packing import PackedData

    ids = torch.tensor([[10, 11, 12, 13, 20, 21, 22, 0], [30, 31, 32, 33, 34, 35, 36, 37]])
    labels = torch.tensor([[-100, -100, 12, 13, -100, -100, -100, -100],   # doc 1: prompt 10 11; doc 2: no target
                           [30, 31, -100, -100, -100, 35, 36, 37]])      # doc 3 starts with a target; doc 4
    segments = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 2, 2]])
    path = write_eval_prompts(PackedData(ids, labels, segments), tmp_path / "eval_prompts.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # Doc 2 has no target: its whole text is the prompt; doc 3 has none before its first target.
    assert records == [{"input_ids": [10, 11]}, {"input_ids": [20, 21, 22]}, {"input_ids": [32, 33, 34]}]


def test_eval_prompts_leave_out_later_pieces_of_a_split_document(tmp_path):
    """A later piece of a split conversation starts mid-document (here mid user turn, so it has a
    prompt-like run of untrained tokens): it was written as a held-out prompt, a fragment."""
    from medusa_liger.train.finish import write_eval_prompts
    from medusa_liger.train.packing import pack

    # prompt 1 2 3, answer 4 5, then a second user turn 6 7 8 9 and its answer 10 11 (seq_len 5: pieces
    # 1..5, 6..10 and 11, which is dropped: no target after its first token)
    ids = list(range(1, 12))
    labels = [-100, -100, -100, 4, 5, -100, -100, -100, -100, 10, 11]
    data = pack([(ids, labels), ([20, 21, 22], [-100, 21, 22])], seq_len=5, long_examples="split", pad_id=0)
    assert data.continued.tolist() == [[False] * 5, [True] * 5, [False] * 5]
    path = write_eval_prompts(data, tmp_path / "eval_prompts.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"input_ids": [1, 2, 3]}]  # not 6 7 8 9; nor 20 (a one-token prompt is too short)
    # No prompt at all (text data, loss_on=all): no file, and an older one goes (eval then uses its own).
    no_prompt = pack([([5, 6, 7], [5, 6, 7])], seq_len=5, long_examples="split", pad_id=0)
    assert write_eval_prompts(no_prompt, path) is None and not path.exists()
    # select() (the eval split) keeps the marks with their rows.
    assert torch.equal(data.select(torch.tensor([2, 1])).continued, data.continued[[2, 1]])


def test_label_smoothing_and_z_loss_reach_the_model(tmp_path):
    cfg = short_config(tmp_path, "train.label_smoothing=0.15", "train.z_loss=1e-4", "logging.wandb=disabled")
    from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    _, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    config = build_medusa(cfg, backbone).config
    assert (config.label_smoothing, config.z_loss) == (0.15, 1e-4)


def test_periodic_held_out_evaluation_leaves_training_unchanged(tmp_path):
    """train.eval_every logs eval/... with the step's metrics (the last step's too, also in the summary),
    draws the held-out rows only, and changes no training step: losses equal a run without it."""
    extra = ["train.steps=5", "checkpoint.every=0", "export.formats=[medusa]"]
    plain = train(short_config(tmp_path / "plain", *extra))
    evaluated = train(short_config(tmp_path / "evaluated", *extra, "train.eval_every=2"))
    records = read_metrics(tmp_path / "evaluated" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/acc/head0" in r] == [2, 4, 5]
    assert all(0.0 <= r["eval/acc/head2"] <= 1.0 and r["eval/loss/head0"] > 0 for r in records if "eval/loss/head0" in r)
    assert losses(tmp_path / "evaluated") == losses(tmp_path / "plain")
    assert evaluated.summary["eval/acc/head0"] == plain.summary["eval/acc/head0"]
    assert (tmp_path / "evaluated" / "plot.png").is_file()


def test_eval_every_is_checked(tmp_path):
    with pytest.raises(ValueError, match=re.escape("train.eval_every must be >= 0")):
        short_config(tmp_path, "train.eval_every=-1")


def test_eval_every_without_held_out_rows_says_so(tmp_path, capsys):
    train(short_config(tmp_path, "train.steps=2", "train.eval_every=1", "data.eval_fraction=0",
                       "checkpoint.every=0", "export.formats=[medusa]"))
    assert "train.eval_every=1: no held-out rows to evaluate" in capsys.readouterr().out
    assert not any(k.startswith("eval/") for r in read_metrics(tmp_path / "metrics.jsonl") for k in r)


def test_vllm_export_of_an_lm_head_with_bias_is_refused_before_training():
    """vLLM's Medusa lm_heads have no bias: said when the model is built, not after the last step."""
    from medusa_liger.train.build import build_medusa
    from medusa_liger.train.config import ConfigError
    from tests.test_heads import V, tiny_llama

    backbone = tiny_llama()
    backbone.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
    cfg = load_config(TINY, ["heads.shared_lm_head=true"])
    with pytest.raises(ConfigError, match=r"export.formats includes vllm.*export.formats=\[medusa\]"):
        build_medusa(cfg, backbone)
    build_medusa(load_config(TINY, ["heads.shared_lm_head=true", "export.formats=[medusa]"]), backbone)


def test_checkpoint_files_all_follow_the_umask(tmp_path):
    # trainable.safetensors was 0600 (safetensors 0.8) beside 0644 .pt files: a resume or export by
    # another user could read the optimizer state but not the weights.
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = _save_tiny_checkpoint(tmp_path, 1)
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir() if p.is_file()}
    assert "trainable.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_resume_and_export_check_every_tensor_before_copying_any(tmp_path):
    # One check for load_checkpoint and export's rebuild_backbone (two copies before, neither tested).
    from medusa_liger.train.checkpoint import ResumeError, copy_into, load_checkpoint

    path = _save_tiny_checkpoint(tmp_path, 1)
    for params, match in (({"w": torch.nn.Parameter(torch.zeros(4))}, r"w has shape \[3\], the model's is \[4\]"),
                          ({"v": torch.nn.Parameter(torch.zeros(3))}, r"missing \['v'\], unexpected \['w'\]")):
        optimizer = torch.optim.SGD(params.values(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        with pytest.raises(ResumeError, match="does not match this model .*: " + match):
            load_checkpoint(path, params, optimizer, scheduler)
    a, b = torch.zeros(2), torch.zeros(3)
    with pytest.raises(ValueError, match=r"run: b has shape \[2\], the model's is \[3\]"):
        copy_into({"a": a, "b": b}, {"a": torch.ones(2), "b": torch.ones(2)}, "run")
    assert not a.any()  # nothing copied when any tensor does not fit
    with pytest.raises(ValueError, match=r"run: missing \['b'\], unexpected \[\]"):
        copy_into({"a": a, "b": b}, {"a": torch.ones(2)}, "run")
    copy_into({"a": a, "b": b}, {"a": torch.ones(2)}, "run", allow_missing=True)  # LoRA: adapters only
    assert a.eq(1).all() and not b.any()


def test_a_new_run_leaves_no_export_of_an_earlier_one_in_final(tmp_path, capsys):
    """final/ only ever grew: an earlier run's backbone (or heads of a format this run does not export)
    stayed beside this run's, and eval/generate/export paired them as one run's."""
    train(short_config(tmp_path, "train.steps=2", "checkpoint.every=0", "data.eval_fraction=0"))
    final = tmp_path / "final"
    (final / "notes.txt").write_text("mine")  # a user's file: not an export, left alone
    old_heads = (final / "heads_medusa" / "medusa_lm_head.safetensors").read_bytes()
    capsys.readouterr()
    train(short_config(tmp_path, "train.steps=2", "checkpoint.every=2", "data.eval_fraction=0", "train.seed=5",
                       "export.formats=[medusa]", "export.backbone=never"))
    err = capsys.readouterr().err
    assert sorted(p.name for p in final.iterdir()) == ["heads_medusa", "notes.txt"]
    # The backbone this run built lives in its checkpoint only: the heads name "tiny", which is said.
    assert "warning: export.backbone=never: the backbone this run built is not exported" in err
    for gone in ("heads_vllm", "backbone"):
        assert f"warning: deleting {final / gone}, an earlier run's export" in err
    assert (final / "heads_medusa" / "medusa_lm_head.safetensors").read_bytes() != old_heads


@pytest.mark.parametrize("first, change, said", [
    # The tiny tokenizer is trained on the run's data at every start: other data, other token ids.
    ([], "data.max_examples=30", "the tiny model's tokenizer differs"),
    # A frozen tiny backbone is drawn from the seed, not saved.
    (["train.mode=heads"], "train.seed=5", "train.seed 0 -> 5"),
    # ... in its shape: another shape draws other weights from the same seed.
    (["train.mode=heads"], "model.tiny.intermediate_size=256", "model.tiny.intermediate_size 128 -> 256"),
    # LoRA's alpha scales every adapter's output.
    (["lora.enabled=true", "lora.r=4"], "lora.alpha=64", "lora.alpha 16.0 -> 64.0"),
    # The frozen KL teacher of a full joint run is the tiny backbone as drawn from the seed.
    (["train.lm_loss=kl"], "train.seed=5", "train.seed 0 -> 5"),
])
def test_a_resume_under_settings_the_weights_depend_on_is_refused(tmp_path, first, change, said):
    """They were accepted without a word: the resumed model was not the one checkpointed."""
    from medusa_liger.train.checkpoint import ResumeError

    extra = ["checkpoint.every=2", "export.formats=[medusa]", "data.eval_fraction=0.0", *first]
    train(short_config(tmp_path, "train.steps=2", *extra))
    with pytest.raises(ResumeError, match=f"under other settings that its weights depend on: {said}"):
        train(short_config(tmp_path, "train.steps=3", "train.resume=auto", change, *extra))


def test_a_resume_on_a_backbone_of_another_width_names_it(tmp_path):
    """Heads that read another hidden size: a ResumeError naming it, not load_state_dict's size mismatch."""
    from medusa_liger.train.checkpoint import ResumeError

    extra = ["checkpoint.every=2", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    train(short_config(tmp_path, "train.steps=2", *extra))
    with pytest.raises(ResumeError, match="trained with other heads \\(the backbone's hidden size 64 there, 96 now"):
        train(short_config(tmp_path, "train.steps=3", "train.resume=auto", "model.tiny.hidden_size=96", *extra))


def test_a_resume_on_another_hub_revision_of_a_frozen_backbone_is_refused(tmp_path, monkeypatch):
    """The heads were trained on one revision's weights; resumed on another's under the same name (the
    tiny backbone stands in for a hub model: its config gets the commit that build_tokenizer_and_backbone
    stamps on a hub model's)."""
    from medusa_liger.train import loop
    from medusa_liger.train.checkpoint import ResumeError

    real, revision = loop.build_tokenizer_and_backbone, ["0a1b" * 10]

    def built(*args, **kwargs):
        tokenizer, backbone = real(*args, **kwargs)
        backbone.config._commit_hash = revision[0]
        return tokenizer, backbone

    monkeypatch.setattr(loop, "build_tokenizer_and_backbone", built)
    extra = ["checkpoint.every=2", "export.formats=[medusa]", "data.eval_fraction=0.0", "train.mode=heads"]
    train(short_config(tmp_path, "train.steps=2", *extra))
    revision[0] = "9f8e" * 10
    with pytest.raises(ResumeError, match=f"the backbone's hub revision {'0a1b' * 10} -> {'9f8e' * 10} "
                                          rf"\(model.revision={'0a1b' * 10} loads the checkpoint's\)"):
        train(short_config(tmp_path, "train.steps=3", "train.resume=auto", *extra))
    revision[0] = "0a1b" * 10  # the same revision resumes
    train(short_config(tmp_path, "train.steps=3", "train.resume=auto", *extra))


def test_a_resume_on_other_data_or_batches_says_so(tmp_path, capsys):
    """A new seed, held-out fraction or batch size was taken silently: the held-out split was drawn
    anew (rows trained on became held-out prompts) and nothing said it."""
    extra = ["checkpoint.every=2", "export.formats=[medusa]"]
    train(short_config(tmp_path, "train.steps=2", *extra))
    capsys.readouterr()
    train(short_config(tmp_path, "train.steps=3", "train.resume=auto", "train.seed=5", "train.micro_batch_size=2",
                       *extra))
    note = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("note: resuming"))
    assert "train.seed 0 -> 5" in note and "train.micro_batch_size 4 -> 2" in note
    assert "a held-out split drawn anew" in note
    capsys.readouterr()  # what packs the rows differently: long documents truncated instead of split
    train(short_config(tmp_path, "train.steps=4", "train.resume=auto", "train.seed=5", "train.micro_batch_size=2",
                       "data.long_examples=truncate", *extra))
    note = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("note: resuming"))
    assert "data.long_examples split -> truncate" in note and "a held-out split drawn anew" in note


def test_without_a_progress_bar_every_logging_step_prints_a_line(tmp_path, capsys):
    """logging.every counted only for the bar: a run with logging.progress=false printed no step at all."""
    train(short_config(tmp_path, "train.steps=5", "checkpoint.every=0", "logging.every=2", "data.eval_fraction=0"))
    steps = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps == ["step 2/5", "step 4/5", "step 5/5"]


def test_a_resume_maps_the_optimizer_state_instead_of_reading_it(tmp_path, monkeypatch):
    """Every rank read optimizer.pt whole (2x the trainable parameters in fp32) before keeping its shard:
    8 ranks of an 8B run held 8 copies in host memory. Mapped, they share the page cache."""
    extra = ["checkpoint.every=2", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    train(short_config(tmp_path, "train.steps=2", *extra))
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: loads.append((Path(path).name, kw.get("mmap"))) or
                        load(path, **kw))
    train(short_config(tmp_path, "train.steps=3", "train.resume=auto", *extra))
    assert ("optimizer.pt", True) in loads


def test_resume_notes_name_what_changes_the_rows():
    """data.loss_on (which pieces are kept) and files edited in place were not said to redraw the split."""
    from medusa_liger.train.build import data_changes, data_settings

    cfg = load_config(TINY, ["data.eval_fraction=0.1"])
    saved = data_settings(cfg, rows="abc")
    assert data_changes(saved, cfg, rows="abc") == []
    assert data_changes(saved, cfg, rows="def") == [
        "other packed rows (the data files' content or the tokenizer changed)",
        "a held-out split drawn anew (rows trained on may now be held out, and in eval_prompts.jsonl)"]
    batch = load_config(TINY, ["data.eval_fraction=0.1", "train.micro_batch_size=2"])  # not a cause of the new split
    assert data_changes(saved, batch, rows="def")[1].startswith("other packed rows")
    other = load_config(TINY, ["data.eval_fraction=0.1", "data.loss_on=all"])
    notes = data_changes(saved, other, rows="def")
    assert notes[0] == "data.loss_on assistant -> all" and notes[-1].startswith("a held-out split drawn anew")
    assert data_changes(data_settings(cfg), cfg, rows="def") == []  # a checkpoint written before rows were kept
    # A checkpoint that kept a fingerprint of the input files under the old key: not compared.
    assert data_changes(data_settings(cfg) | {"the packed rows": "abc"}, cfg, rows="def") == []


def test_a_resume_on_the_same_rows_notes_no_data_change(tmp_path, capsys):
    """The rows' fingerprint hashed the inputs (whole files, the cache version): a line added past
    data.max_examples noted 'other packed rows' and a redrawn split for bit-identical rows."""
    import shutil

    data = tmp_path / "data.jsonl"
    shutil.copy(Path(__file__).resolve().parents[1] / "medusa_liger" / "data" / "pydoc_chat.jsonl", data)
    extra = ["checkpoint.every=2", "export.formats=[medusa]", f"data.paths=[{data}]", "train.mode=heads"]
    train(short_config(tmp_path / "run", "train.steps=2", *extra))
    with data.open("a") as file:  # past data.max_examples=40 (SHORT): the same rows
        file.write(data.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    train(short_config(tmp_path / "run", "train.steps=3", "train.resume=auto", *extra))
    err = capsys.readouterr().err
    assert "packed rows" not in err and "drawn anew" not in err


def test_resume_notes_another_backbone():
    """A LoRA run resumed on another model of the same shape (adapters put on other weights) was silent."""
    from medusa_liger.train.build import data_changes, data_settings

    cfg = load_config(TINY)
    saved = data_settings(cfg) | {"model.name_or_path": "/models/llama-a"}
    assert data_changes(saved, cfg) == ["model.name_or_path /models/llama-a -> tiny"]


def test_lora_on_embeddings_tied_to_lm_head_is_a_config_error():
    """Training reads lm_head's plain (tied) weight; the merged export added the embeddings' LoRA update to
    it, so the exported lm_head was not the one the heads trained against (logits off by 13)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_liger.train.build import build_medusa
    from medusa_liger.train.config import ConfigError

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96)
    cfg = load_config(TINY, ["train.mode=joint", "lora.enabled=true", "lora.target_modules=[q_proj,embed_tokens]"])
    tied = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ConfigError, match="share their weight with lm_head"):
        build_medusa(cfg, tied, teacher=False)
    untied = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)),
                                 peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    build_medusa(cfg, untied, teacher=False)
    with torch.device("meta"):  # an FSDP rank > 0: every address is 0, an untied model is still untied
        meta = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    build_medusa(cfg, peft.get_peft_model(meta, peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"])),
                 teacher=False)


@pytest.mark.parametrize("interrupt_at", [1, 2, 3, 4, 5, 6])
def test_an_interrupted_export_leaves_the_earlier_one_whole(tmp_path, monkeypatch, interrupt_at):
    """The swap into final/ went one entry at a time: an interrupt between its renames left heads without
    a backbone, or this run's heads beside the earlier run's backbone. Renames 1-3 set the earlier entries
    aside, 4-6 place the new ones: an interrupt after a new entry is placed takes it back out too."""
    train(short_config(tmp_path, "train.steps=2", "checkpoint.every=0", "data.eval_fraction=0"))
    final = tmp_path / "final"
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    rename, count = Path.rename, [0]

    def interrupted_rename(self, target):
        if ".export-" in f"{self}{target}":
            count[0] += 1
            if count[0] == interrupt_at:
                raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        train(short_config(tmp_path, "train.steps=2", "checkpoint.every=0", "data.eval_fraction=0", "train.seed=5"))
    assert {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert not list(final.glob(".export-*"))


def test_a_deletion_cut_short_leaves_whole_checkpoints_and_no_later_step(tmp_path, monkeypatch):
    """Checkpoints were deleted in place: a kill mid-delete left a step whose trainer_state.json outlived
    its weights (resume=auto took it and failed), or the abandoned branch's newer step beside it."""
    import os

    from medusa_liger.train.checkpoint import STATE_FILE, drop_later_checkpoints

    for step in (2, 4, 6, 8):
        _save_tiny_checkpoint(tmp_path, step, keep=4)
    unlink = os.unlink

    def interrupted_unlink(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", interrupted_unlink)
    with pytest.raises(KeyboardInterrupt):
        drop_later_checkpoints(tmp_path, 4)
    monkeypatch.setattr(os, "unlink", unlink)
    assert _steps(tmp_path) == [2, 4]
    for step in (2, 4):
        assert sorted(p.name for p in (tmp_path / f"step-{step:06d}").iterdir()) == sorted(
            ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE])
    _save_tiny_checkpoint(tmp_path, 5, keep=4)  # the next save removes what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004", "step-000005"]


def test_a_failed_save_removes_what_it_wrote_and_says_where_and_why(tmp_path, monkeypatch):
    """A full disk gave torch's "basic_ios::clear: iostream error" naming no path, and its partial
    directory stayed, holding the disk's last free bytes."""
    from medusa_liger.train.checkpoint import CheckpointError

    _save_tiny_checkpoint(tmp_path, 2)
    save, calls = torch.save, [0]

    def full_disk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 310080 vs 309972")
        return save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"saving checkpoint '.*step-000004' failed \(.* GiB free on its disk; "
                       r"the earlier checkpoints are intact\): RuntimeError: \[enforce fail"):
        _save_tiny_checkpoint(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_a_save_whose_directory_was_deleted_meanwhile_says_so(tmp_path, monkeypatch):
    """Another process deleted the checkpoints directory mid-save: the error handler's disk-usage call
    raised FileNotFoundError over the real error, and its message said the earlier checkpoints were intact."""
    import shutil

    from medusa_liger.train.checkpoint import CheckpointError

    _save_tiny_checkpoint(tmp_path, 2)
    save = torch.save

    def deleted(*args, **kwargs):
        shutil.rmtree(tmp_path)
        raise FileNotFoundError("scheduler.pt")

    monkeypatch.setattr(torch, "save", deleted)
    with pytest.raises(CheckpointError, match=rf"\({re.escape(repr(str(tmp_path)))} no longer exists: deleted by "
                                              r"another process\?\): FileNotFoundError") as error:
        _save_tiny_checkpoint(tmp_path, 4)
    assert "intact" not in str(error.value)
    monkeypatch.setattr(torch, "save", save)


def test_a_damaged_checkpoint_names_its_file_and_the_checkpoint_to_resume_from_instead(tmp_path):
    """A truncated optimizer.pt gave torch's "mmap can only be used with files saved with
    _use_new_zipfile_serialization=True", naming neither the file nor what to do."""
    from medusa_liger.train.checkpoint import ResumeError, load_checkpoint

    _save_tiny_checkpoint(tmp_path, 2)
    path = _save_tiny_checkpoint(tmp_path, 4)
    (path / "optimizer.pt").write_bytes(b"")
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(ResumeError, match=rf"'{path / 'optimizer.pt'}' cannot be read \(.*\); if checkpoint "
                       rf"step-000004 is damaged \(a full disk, a copy cut short\), resume from an earlier checkpoint "
                       rf"\(train.resume={tmp_path / 'step-000002'}; there: step-000002\)"):
        load_checkpoint(path, {"w": weight}, optimizer, scheduler)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_checkpoint_file_that_pickles_code_is_refused_not_run(tmp_path, capsys, name):
    """Resume read optimizer.pt, scheduler.pt and rng.pt with weights_only=False: a checkpoint from
    elsewhere (a shared drive, the hub) could run any code. They hold tensors and plain containers."""
    from medusa_liger.train.checkpoint import ResumeError, load_checkpoint

    path = _save_tiny_checkpoint(tmp_path, 2)
    state = torch.load(path / name, weights_only=True)
    state["extra"] = _RunsCodeWhenUnpickled()
    torch.save(state, path / name)
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(ResumeError, match=rf"'{path / name}' cannot be read \(UnpicklingError"):
        load_checkpoint(path, {"w": weight}, optimizer, scheduler)
    assert "pickled code ran" not in capsys.readouterr().out
    # What the trainer writes loads under that rule (every file, the CUDA generators' states included).
    path = _save_tiny_checkpoint(tmp_path, 4)
    assert load_checkpoint(path, {"w": weight}, optimizer, scheduler)["step"] == 4


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Without fsync a host crash after the rename could leave a complete-looking step of empty files."""
    import os

    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return fsync(fd)

    replace = os.replace

    def recording_replace(src, dst):
        synced.append(("rename", str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    _save_tiny_checkpoint(tmp_path, 2)
    # Every file is synced BEFORE the rename that makes the directory a checkpoint, the parent after it.
    renamed = synced.index(("rename", str(tmp_path / "step-000002")))
    assert renamed >= 5 + 1 and synced[renamed + 1:] == [str(tmp_path)] * (len(synced) - renamed - 1) != []
    synced.remove(("rename", str(tmp_path / "step-000002")))
    assert len(synced) >= 5 + 2  # every file, its directory and the checkpoints' directory
    if os.path.exists("/proc/self/fd"):
        written = {p.rsplit("/", 1)[-1] for p in synced}
        assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= written
        assert str(tmp_path) in synced


def test_a_step_directory_without_its_state_file_is_no_checkpoint(tmp_path):
    """A half-written step (no trainer_state.json, written last) is never resumed from, nor counted as kept."""
    from medusa_liger.train.checkpoint import find_resume_checkpoint

    _save_tiny_checkpoint(tmp_path, 2)
    (tmp_path / "step-000009").mkdir()
    (tmp_path / "step-000009" / "trainable.safetensors").write_bytes(b"")
    assert _steps(tmp_path) == [2] and find_resume_checkpoint("auto", tmp_path) == tmp_path / "step-000002"
    _save_tiny_checkpoint(tmp_path, 3, keep=1)
    assert _steps(tmp_path) == [3]


def test_checkpoints_are_set_aside_newest_first(tmp_path, monkeypatch):
    """A kill between the renames of a deletion must leave the oldest steps, never a later one that
    train.resume=auto would take after an abandoned branch."""
    import os

    from medusa_liger.train.checkpoint import delete_checkpoints

    for step in (2, 4, 6):
        _save_tiny_checkpoint(tmp_path, step, keep=3)
    replace, calls = os.replace, []

    def killed_on_the_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        delete_checkpoints([tmp_path / "step-000004", tmp_path / "step-000006"])
    assert _steps(tmp_path) == [2, 4]


def test_resume_notes_another_number_of_ranks(monkeypatch):
    """A step's batch is micro-batch x grad_accum x ranks: a resume of an 8-GPU checkpoint on 4 GPUs halved
    it without a word, where a grad_accum change keeping it was noted."""
    from medusa_liger.train import distributed
    from medusa_liger.train.build import data_changes, data_settings

    cfg = load_config(TINY)
    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    saved = data_settings(cfg)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert data_changes(saved, cfg) == ["data-parallel ranks 8 -> 4"]


def test_a_checkpoint_from_before_the_ranks_were_compared_notes_them_too(tmp_path, capsys):
    """Checkpoints written before the ranks joined the data settings recorded them beside, as world_size."""
    from medusa_liger.train.build import RANKS_KEY

    extra = ["checkpoint.every=2", "export.formats=[medusa]", "train.mode=heads"]
    train(short_config(tmp_path, "train.steps=2", *extra))
    state_file = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["data_settings"][RANKS_KEY]
    state_file.write_text(json.dumps(state | {"world_size": 8}))
    capsys.readouterr()
    train(short_config(tmp_path, "train.steps=3", "train.resume=auto", *extra))
    assert "data-parallel ranks 8 -> 1" in capsys.readouterr().err


def _drawn(monkeypatch, path: Path, records, baseline=None):
    """[(label, xs, ys, marker)] of every Axes.plot call plot_metrics makes for ``records``, and the y of
    every horizontal line."""
    import matplotlib.axes

    from medusa_liger.train.plot import plot_metrics

    calls, hlines = [], []
    plot, axhline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline

    def recording_plot(self, *args, **kwargs):
        calls.append((kwargs.get("label"), list(args[0]), list(args[1]), kwargs.get("marker")))
        return plot(self, *args, **kwargs)

    def recording_axhline(self, y=0, *args, **kwargs):
        hlines.append(y)
        return axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", recording_axhline)
    plot_metrics(records, path, baseline=baseline)
    return calls, hlines


def _plotted(monkeypatch, path: Path, records) -> dict[str, tuple[int, str | None]]:
    """{label: (number of points, marker)} of the training curves plot_metrics draws for ``records``."""
    calls, _ = _drawn(monkeypatch, path, records)
    return {label: (len(xs), marker) for label, xs, _, marker in calls if label is not None}


def test_the_plot_draws_curves_that_start_partway_and_single_points(monkeypatch, tmp_path):
    """A joint run's LM curves start after its heads-only stage: they were left out of the plot. A one-step
    run drew lines of one point, which are invisible."""
    heads = {"loss": 2.0, "loss/head0": 2.0, "acc/head0": 0.1}
    records = [{"step": 1, **heads}, {"step": 2, **heads},
               {"step": 3, **heads, "lm_loss": 1.0, "acc/lm": 0.5}, {"step": 4, **heads, "lm_loss": 0.9, "acc/lm": 0.6}]
    drawn = _plotted(monkeypatch, tmp_path / "plot.png", records)
    assert drawn["backbone LM loss"][0] == drawn["backbone (t+1)"][0] == 2 and drawn["total loss"] == (4, None)
    assert _plotted(monkeypatch, tmp_path / "plot.png", records[:1])["head 0 (t+2)"] == (1, "o")


class _FakeWandbRun:
    def __init__(self, resume_id):
        self.id, self.resume_id, self.exit_code, self.summary = resume_id or "new", resume_id, None, {}
        self.logged: list[tuple[int, dict]] = []

    def log(self, record, step):
        self.logged.append((step, record))

    def finish(self, exit_code=None):
        self.exit_code = exit_code


def _logger(monkeypatch, tmp_path, **kwargs):
    from medusa_liger.train import logging as train_logging

    monkeypatch.setattr(train_logging, "init_wandb", lambda *args: _FakeWandbRun(args[-1]))
    return train_logging.MetricsLogger(tmp_path, 10, kwargs.pop("start_step", 0),
                                       wandb_mode=kwargs.pop("wandb_mode", "offline"), wandb_project="p", run_name="r",
                                       config={}, progress=False, every=1, **kwargs)


def test_a_run_that_raises_is_marked_failed_in_wandb(monkeypatch, tmp_path):
    """A diverged, crashed or interrupted run was recorded as finished with exit code 0."""
    with _logger(monkeypatch, tmp_path) as logger:
        pass
    assert logger.wandb.exit_code == 0
    with pytest.raises(KeyboardInterrupt), _logger(monkeypatch, tmp_path) as logger:
        raise KeyboardInterrupt
    assert logger.wandb.exit_code == 1


def test_a_resume_that_trains_logged_steps_anew_logs_to_a_new_wandb_run(monkeypatch, tmp_path, capsys):
    """wandb drops steps at or below its last: a resume under other settings (or from an older checkpoint)
    left the abandoned steps' values in the wandb history while metrics.jsonl had the new ones."""
    def write_steps():
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))

    write_steps()
    with _logger(monkeypatch, tmp_path, start_step=3, wandb_id="abc", rewound=False) as logger:
        pass
    assert logger.wandb.resume_id == "abc"  # an exact resume replays the same values: the run continues
    write_steps()
    with _logger(monkeypatch, tmp_path, start_step=3, wandb_id="abc", rewound=True) as logger:
        pass
    assert logger.wandb.resume_id is None
    assert "note: the wandb run abc logged steps up to 5, past the resumed step 3" in capsys.readouterr().err
    # That resume died before its first step (metrics.jsonl already cut back to step 3); its retry resumes
    # from the same checkpoint, which names the old wandb run: still not that one, which holds steps 4-5.
    with _logger(monkeypatch, tmp_path, start_step=3, wandb_id="abc", rewound=True) as logger:
        pass
    assert logger.wandb.resume_id is None
    with _logger(monkeypatch, tmp_path, start_step=5, wandb_id="abc", rewound=True) as logger:
        pass
    assert logger.wandb.resume_id == "abc"  # past everything it logged: it continues
    # A rewound attempt without wandb still records what the run it leaves had logged.
    (tmp_path / ".wandb_steps.json").unlink()
    write_steps()
    _logger(monkeypatch, tmp_path, start_step=3, wandb_id="xyz", rewound=True, wandb_mode="disabled").close()
    with _logger(monkeypatch, tmp_path, start_step=3, wandb_id="xyz", rewound=True) as logger:
        pass
    assert logger.wandb.resume_id is None


def test_the_logger_sends_wandb_each_step_and_the_summary(tmp_path, monkeypatch):
    with _logger(monkeypatch, tmp_path) as logger:
        logger.log(3, {"loss": 1.5, "acc/head0": 0.5})
        logger.summary({"final_loss": 1.5})
    assert logger.wandb.logged == [(3, {"step": 3, "loss": 1.5, "acc/head0": 0.5})]
    assert logger.wandb.summary == {"final_loss": 1.5}


def test_init_wandb_continues_the_run_it_is_given(tmp_path, monkeypatch):
    from medusa_liger.train.logging import init_wandb

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or "run"))
    assert init_wandb("offline", "p", "n", {}, tmp_path / "w", "abc") == "run"
    assert calls[-1]["id"] == "abc" and calls[-1]["resume"] == "allow" and calls[-1]["mode"] == "offline"
    assert calls[-1]["dir"] == str(tmp_path / "w") and (tmp_path / "w").is_dir()
    init_wandb("online", "p", "n", {}, tmp_path / "w", None)
    assert calls[-1]["id"] is None and calls[-1]["resume"] is None
    assert init_wandb("disabled", "p", "n", {}, tmp_path / "w", "abc") is None and len(calls) == 2


def test_the_wandb_step_record_keeps_every_run(tmp_path, monkeypatch):
    """A second wandb run's record must not drop the first's: a later resume from a checkpoint that names the
    first run (metrics.jsonl cut back below what it logged) would continue it and lose its new steps."""
    (tmp_path / ".wandb_steps.json").write_text(json.dumps({"old": 7}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    _logger(monkeypatch, tmp_path, start_step=3, wandb_id="abc", rewound=True).close()
    assert json.loads((tmp_path / ".wandb_steps.json").read_text()) == {"old": 7, "abc": 3}
    # The first run's record still says it logged step 7: a rewound resume to step 3 starts a new wandb run.
    with _logger(monkeypatch, tmp_path, start_step=3, wandb_id="old", rewound=True) as logger:
        pass
    assert logger.wandb.id == "new"


def test_highest_step_of_an_empty_metrics_file_is_zero(tmp_path):
    from medusa_liger.train.logging import highest_step

    (tmp_path / "metrics.jsonl").write_text("")
    assert highest_step(tmp_path / "metrics.jsonl") == 0
    assert highest_step(tmp_path / "missing.jsonl") == 0


def test_smoothing_is_a_trailing_mean_over_the_points_so_far():
    from medusa_liger.train.plot import _smooth

    assert _smooth([1.0, 2.0, 3.0, 4.0, 8.0], 2) == [1.0, 1.5, 2.5, 3.5, 6.0]
    assert _smooth([4.0, 2.0], 5) == [4.0, 3.0]


def test_the_plot_draws_smoothed_curves_held_out_markers_and_the_baseline(monkeypatch, tmp_path):
    from medusa_liger.train.plot import _smooth

    records = [{"step": s, "loss": float(s % 7), "acc/head0": 0.1, "loss/head0": 1.0} for s in range(1, 101)]
    records[49]["eval/acc/head0"] = 0.42  # a held-out evaluation at step 50
    records[49]["eval/loss/head0"] = 3.5
    calls, hlines = _drawn(monkeypatch, tmp_path / "one.png", records, baseline=0.3)
    total = next(c for c in calls if c[0] == "total loss")
    assert total[1] == list(range(1, 101)) and total[2] == _smooth([float(s % 7) for s in range(1, 101)], 2)
    unlabeled = [(xs, ys) for label, xs, ys, _ in calls if label is None]
    assert ([50], [0.42]) in unlabeled and ([50], [3.5]) in unlabeled
    assert hlines == [0.3]
    # Two points are drawn with markers too; heads in their order (head10 after head9).
    heads = {f"acc/head{k}": 0.5 for k in range(11)}
    two_points = [{"step": 1, "loss": 1.0, **heads}, {"step": 2, "loss": 1.0, **heads}]
    calls, _ = _drawn(monkeypatch, tmp_path / "two.png", two_points)
    labels = [label for label, *_ in calls if label and label.startswith("head ")]
    assert labels == [f"head {k} (t+{k + 2})" for k in range(11)]
    assert all(marker == "o" for label, _, _, marker in calls if label)


def test_a_resume_from_an_older_checkpoint_under_the_same_settings_continues_its_wandb_run(tmp_path, monkeypatch):
    """It replays the abandoned steps as they were logged: one wandb run, not two."""
    from medusa_liger.train import logging as train_logging

    runs = []

    def fake_init(*args):
        runs.append(_FakeWandbRun(args[-1]))
        return runs[-1]

    monkeypatch.setattr(train_logging, "init_wandb", fake_init)
    extra = ["checkpoint.every=2", "export.formats=[medusa]", "train.mode=heads", "logging.wandb=offline"]
    train(short_config(tmp_path, "train.steps=4", *extra))
    train(short_config(tmp_path, "train.steps=4", f"train.resume={tmp_path / 'checkpoints' / 'step-000002'}", *extra))
    assert [run.resume_id for run in runs] == [None, "new"]


def test_a_resume_that_trains_on_deletes_the_report_of_the_heads_it_replaces(tmp_path, capsys):
    """eval/report.json of the heads in final/ stayed beside the new final/ a longer resume wrote, naming
    final/ while its numbers described the heads that were gone."""
    extra = ["checkpoint.every=2", "export.formats=[medusa]", "train.mode=heads"]
    train(short_config(tmp_path, "train.steps=2", *extra))
    report = tmp_path / "eval" / "report.json"
    report.parent.mkdir()
    report.write_text("{}")
    capsys.readouterr()
    train(short_config(tmp_path, "train.steps=3", "train.resume=auto", *extra))
    assert not report.exists() and (tmp_path / "eval_prompts.jsonl").is_file()
    assert "warning: deleting the evaluation of the heads this resume replaces" in capsys.readouterr().err
    # With nothing left to train too: the export is the checkpoint's heads, maybe older ones.
    report.parent.mkdir()
    report.write_text("{}")
    train(short_config(tmp_path, "train.steps=2", f"train.resume={tmp_path / 'checkpoints' / 'step-000002'}", *extra))
    assert not report.exists()


def test_a_run_warns_only_where_it_helps(tmp_path):
    """Shared heads warned at every checkpoint and export though heads_vllm was written; a base model's
    tokenizer without a chat template is said once, where the template is chosen (data.chat_template)."""
    import shutil
    import warnings

    from transformers import AutoTokenizer

    from medusa_liger.heads.export import ServingFormatWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(short_config(tmp_path / "first", "train.steps=1", "checkpoint.every=1", "heads.shared_lm_head=true",
                           "data.eval_fraction=0"))
    assert not [w for w in caught if issubclass(w.category, ServingFormatWarning)]
    base = tmp_path / "base"
    shutil.copytree(tmp_path / "first" / "final" / "backbone", base)
    for name in ("chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(str(base)).chat_template
    with pytest.warns(UserWarning, match=r"no chat template.*\(data.chat_template=builtin\) to silence"):
        train(short_config(tmp_path / "second", "train.steps=1", "checkpoint.every=0", f"model.name_or_path={base}",
                           "data.eval_fraction=0", "export.formats=[medusa]"))


def test_biases_and_norm_weights_are_not_decayed(tmp_path):
    """AdamW's groups: matrices decay at train.weight_decay, 1-D tensors (biases, norm weights) never."""
    from medusa_liger.train.build import build_medusa, build_optimizer, build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    cfg = short_config(tmp_path, "train.mode=joint", "train.weight_decay=0.1")
    _, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    optimizer = build_optimizer(cfg, build_medusa(cfg, backbone))
    decay = {(p.dim(), group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert decay == {(1, 0.0), (2, 0.1)}
    assert sorted(group["name"] for group in optimizer.param_groups) == \
        ["backbone", "backbone_no_decay", "heads", "heads_no_decay"]


# ------------------------------------------------------------------------------------ third audit
def test_a_checkpoint_missing_a_file_is_refused_before_anything_is_restored(tmp_path):
    from medusa_liger.train.checkpoint import ResumeError, find_resume_checkpoint, load_checkpoint

    for step in (2, 4, 6):
        _save_tiny_checkpoint(tmp_path, step, keep=3)
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    # Without its RNG states a resume would not repeat the run: refused, the newest earlier one named.
    (tmp_path / "step-000006" / "rng.pt").unlink()
    with pytest.raises(ResumeError, match=r"rng\.pt' cannot be read .* \(train\.resume=.*step-000004; "
                                          r"there: step-000002, step-000004\)"):
        load_checkpoint(tmp_path / "step-000006", {"w": weight}, optimizer, scheduler)
    (tmp_path / "step-000004" / "trainer_state.json").unlink()
    weight.data.zero_()
    with pytest.raises(ResumeError, match="is not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-000004", {"w": weight}, optimizer, scheduler)
    assert not weight.any()  # nothing was copied in
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        find_resume_checkpoint(str(tmp_path / "step-000004"), tmp_path)
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        find_resume_checkpoint(str(tmp_path / "typo"), tmp_path)
    # An optimizer over other parameters than the checkpoint's: torch's error, said as a resume error.
    other = torch.optim.SGD([weight, torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ResumeError, match="optimizer state .* does not fit"):
        load_checkpoint(tmp_path / "step-000002", {"w": weight}, other, scheduler)


def test_resume_names_a_change_of_projection_sharing():
    from medusa_liger.train.checkpoint import ResumeError, check_resume_heads

    with pytest.raises(ResumeError, match="heads.shared_lm_head=False there, True now"):
        check_resume_heads(MedusaConfig(shared_lm_head=False), MedusaConfig(shared_lm_head=True), "ckpt")
    check_resume_heads(MedusaConfig(decay=0.5), MedusaConfig(decay=0.9), "ckpt")  # the loss may change


def test_resume_names_a_change_of_the_backbones_widths():
    # Heads of another vocabulary or hidden size: a clear error, not load_state_dict's size mismatch.
    from medusa_liger.train.checkpoint import ResumeError, check_resume_heads

    with pytest.raises(ResumeError, match="vocabulary size 1024 there, 512 now"):
        check_resume_heads(MedusaConfig(), MedusaConfig(), "ckpt", (192, 1024), (192, 512))
    with pytest.raises(ResumeError, match="hidden size 192 there, 96 now"):
        check_resume_heads(MedusaConfig(), MedusaConfig(), "ckpt", (192, 1024), (96, 1024))
    check_resume_heads(MedusaConfig(), MedusaConfig(), "ckpt", (192, 1024), (192, 1024))


def test_a_gradient_norm_that_is_not_finite_stops_the_step_before_its_update(tmp_path, monkeypatch):
    from medusa_liger.train.loop import DivergedError, _train_step

    cfg = short_config(tmp_path)
    model, loader, optimizer, scheduler = build_in_process(cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf")))
    with pytest.raises(DivergedError, match="step 3: the loss is .* and the gradient norm inf"):
        _train_step(model, [loader.next_batch()], optimizer, scheduler, params, cfg, torch.device("cpu"), None, 3)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_a_non_finite_gradient_stops_the_step_before_its_update_without_clipping(tmp_path):
    # train.max_grad_norm: null turns clipping off, not the guard the README promises for the gradient norm.
    from medusa_liger.train.loop import DivergedError, _train_step

    cfg = short_config(tmp_path)
    cfg.train.max_grad_norm = None
    model, loader, optimizer, scheduler = build_in_process(cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    model.heads.blocks[0][0].linear.bias.register_hook(lambda g: g * float("nan"))  # the loss stays finite
    with pytest.raises(DivergedError, match="step 3: the loss is .* and the gradient norm nan"):
        _train_step(model, [loader.next_batch()], optimizer, scheduler, params, cfg, torch.device("cpu"), None, 3)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_evaluation_equals_one_forward_over_the_held_out_rows(tmp_path):
    """Token-weighted over micro-batches of any size: the numbers of one forward over every row."""
    from medusa_liger.train.loop import evaluate
    from medusa_liger.train.packing import PackedData

    cfg = short_config(tmp_path)  # joint: the backbone's own loss too
    model, loader, *_ = build_in_process(cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.lm_head.weight.mul_(30)  # rows' losses far apart (at init every row's is near log V)
    rows = [loader.next_batch() for _ in range(2)]
    data = PackedData(*(torch.cat([r[k] for r in rows])[:7] for k in ("input_ids", "labels", "segment_ids")))
    model.eval()
    with torch.no_grad():
        out = model(data.input_ids, labels=data.labels, segment_ids=data.segment_ids)
    for micro_batch_size in (1, 3, 7):
        got = evaluate(model, data, micro_batch_size, torch.device("cpu"), None)
        for k in range(model.config.num_heads):
            assert got[f"eval/loss/head{k}"] == pytest.approx(float(out.head_losses[k]), rel=1e-5)
            assert got[f"eval/acc/head{k}"] == pytest.approx(float(out.head_accuracy[k]), rel=1e-5)
        assert got["eval/lm_loss"] == pytest.approx(float(out.lm_loss), rel=1e-5)
        assert got["eval/acc/lm"] == pytest.approx(float(out.lm_accuracy), rel=1e-5)


def test_the_last_step_is_checkpointed_and_logs_the_rates_it_used(tmp_path):
    """steps not a multiple of checkpoint.every: the last step still gets its checkpoint."""
    cfg = short_config(tmp_path, "train.steps=3", "train.heads_only_steps=2", "checkpoint.every=2",
                       "checkpoint.keep=5", "export.formats=[medusa]")
    result = train(cfg)
    assert _steps(tmp_path / "checkpoints") == [2, 3]
    assert "eval/lm_loss" in result.summary and "eval/acc/lm" in result.summary
    records = read_metrics(tmp_path / "metrics.jsonl")
    # The rates each step used (read before the scheduler moves on): warmup from (0 + 1) / 2.
    assert records[0]["lr/heads"] == pytest.approx(cfg.train.heads_lr * 0.5)
    assert records[0]["lr/backbone"] == 0.0  # the heads-only stage


def test_the_random_states_a_checkpoint_keeps_restore_every_stream():
    """Dropout (LoRA's included) draws from torch's generator, the data order from its own: a resume
    must restore torch's and Python's for the steps to repeat."""
    import random

    from medusa_liger.train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    first = (torch.rand(4), random.random())
    torch.rand(3), random.random()  # the streams move on
    set_rng_state(state)
    again = (torch.rand(4), random.random())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]


def test_the_schedule_and_optimizer_helpers_follow_the_config(tmp_path):
    """Checked without training: the cosine midpoint, the backbone's warmup capped by its stage, the betas,
    the dtypes an auto setting picks, the heads' weight in heads mode and gradient checkpointing."""
    from medusa_liger.train.build import (
        GroupSchedule,
        autocast_dtype,
        export_dtype,
        master_dtype,
        warmup_cosine,
    )

    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.55)  # halfway through the cosine
    staged = short_config(tmp_path, "train.steps=20", "train.heads_only_steps=15", "train.warmup_steps=10")
    assert GroupSchedule("backbone", staged)(19) == 1.0  # a 5-step stage warms up in 5 steps, not 10
    bf16 = short_config(tmp_path, "model.dtype=bfloat16", "train.master_dtype=auto", "export.dtype=auto")
    assert master_dtype(bf16) is torch.bfloat16 and export_dtype(bf16) == "bfloat16"
    fp32 = short_config(tmp_path, "train.precision=fp32")
    assert autocast_dtype(fp32, torch.device("cuda")) is None
    cfg = short_config(tmp_path, "train.betas=[0.8,0.95]", "train.mode=heads", "train.heads_only_steps=0",
                       "model.gradient_checkpointing=true", "export.backbone=always")
    model, _, optimizer, _ = build_in_process(cfg, torch.device("cpu"))
    assert {g["betas"] for g in optimizer.param_groups} == {(0.8, 0.95)}
    assert model.config.heads_loss_weight == 1.0  # heads mode: the heads' own weight, not joint's lambda
    checkpointed = [m for m in model.backbone.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert checkpointed  # (HF marks the decoder)
    plain = build_in_process(short_config(tmp_path), torch.device("cpu"))[0]
    assert not [m for m in plain.backbone.modules() if getattr(m, "gradient_checkpointing", False) is True]


# ------------------------------------------------------------------------------ config/build gaps
def test_a_resume_gives_each_group_this_runs_decay_rate_and_betas():
    """reapply_schedule: the decayed groups take the new train.weight_decay, the undecayed ones keep 0
    (biases and norm weights are never decayed), each kind its own rate; every change is said once."""
    from medusa_liger.train.build import build_optimizer, build_scheduler, reapply_schedule

    model = torch.nn.Module()
    model.heads = torch.nn.Linear(3, 3)
    model.backbone = torch.nn.Linear(3, 3)
    old = load_config(TINY, ["train.mode=joint", "train.weight_decay=0.1", "train.lr=1e-3", "train.heads_lr=2e-3"])
    optimizer = build_optimizer(old, model)
    scheduler = build_scheduler(old, optimizer)
    new = load_config(TINY, ["train.mode=joint", "train.weight_decay=0.3", "train.lr=1e-4", "train.heads_lr=5e-4",
                             "train.betas=[0.8,0.9]"])
    changes = reapply_schedule(new, optimizer, scheduler)
    got = {g["name"]: (g["weight_decay"], g["initial_lr"], g["betas"]) for g in optimizer.param_groups}
    assert got == {"backbone": (0.3, 1e-4, (0.8, 0.9)), "backbone_no_decay": (0.0, 1e-4, (0.8, 0.9)),
                   "heads": (0.3, 5e-4, (0.8, 0.9)), "heads_no_decay": (0.0, 5e-4, (0.8, 0.9))}
    assert scheduler.base_lrs == [1e-4, 1e-4, 5e-4, 5e-4]
    assert sorted(changes) == ["train.betas [0.9, 0.999] -> [0.8, 0.9]", "train.heads_lr 0.002 -> 0.0005",
                               "train.lr 0.001 -> 0.0001", "train.weight_decay 0.1 -> 0.3"]
    assert reapply_schedule(new, optimizer, scheduler) == []  # the same config again: nothing to say


# Runs whose checkpoints do not hold the whole backbone (True), so that what it is read from is fixed:
# a frozen base in heads mode is never saved, LoRA saves only the adapters, and the frozen KL teacher is
# the backbone as read; a fully trained one (joint mode) is saved in every checkpoint.
UNSAVED_BASE = [(["train.mode=heads"], True), (["train.mode=joint"], False),
                (["train.mode=joint", "lora.enabled=true"], True), (["train.mode=joint", "train.lm_loss=kl"], True)]


class _VocabOnly:  # a tokenizer for fixed_settings: tokenizer_fingerprint reads the vocabulary only
    def get_vocab(self):
        return {"a": 0, "b": 1}


@pytest.mark.parametrize("overrides, seed_fixed", UNSAVED_BASE)
def test_the_tiny_models_seed_is_fixed_only_where_unsaved_weights_come_from_it(overrides, seed_fixed):
    from medusa_liger.train.build import fixed_settings

    fixed = fixed_settings(load_config(TINY, ["train.seed=7", *overrides]), _VocabOnly())
    assert ("train.seed" in fixed) is seed_fixed and "the tiny model's tokenizer" in fixed
    assert fixed.get("train.seed", 7) == 7 and ("lora.alpha" in fixed) is ("lora.enabled=true" in overrides)
    # The frozen tiny weights are drawn in the model's shape: another shape is other weights.
    assert ("model.tiny.intermediate_size" in fixed) is seed_fixed


@pytest.mark.parametrize("overrides, pinned", UNSAVED_BASE)
def test_the_backbones_hub_revision_is_fixed_where_checkpoints_do_not_hold_it(overrides, pinned):
    # A hub model's new revision under the same name: heads or adapters resumed on other base weights.
    from transformers import LlamaConfig

    from medusa_liger.train.build import fixed_changes, fixed_settings

    cfg = load_config(TINY, overrides)
    hub, pushed, local = (LlamaConfig() for _ in range(3))
    hub._commit_hash, pushed._commit_hash = "0a1b" * 10, "9f8e" * 10
    saved = fixed_settings(cfg, _VocabOnly(), hub)
    assert (saved.get("the backbone's hub revision") == "0a1b" * 10) is pinned
    assert fixed_changes(saved, cfg, _VocabOnly(), hub) == []
    expected = [f"the backbone's hub revision {'0a1b' * 10} -> {'9f8e' * 10} (model.revision={'0a1b' * 10} loads "
                "the checkpoint's)"] if pinned else []
    assert fixed_changes(saved, cfg, _VocabOnly(), pushed) == expected
    # A local copy has no revision to compare (a snapshot moved out of the hub cache resumes).
    assert "the backbone's hub revision" not in fixed_settings(cfg, _VocabOnly(), local)
    assert fixed_changes(saved, cfg, _VocabOnly(), local) == []


@pytest.mark.parametrize("on_meta", [False, True])
def test_model_revision_reaches_every_file_the_backbone_is_read_from(tmp_path, monkeypatch, on_meta):
    """``model.revision`` pins a hub model: its tokenizer, config and weights all come from that
    revision (transformers' loaders stand in for the hub, reading a local copy)."""
    import transformers

    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    cfg = short_config(tmp_path / "tiny")
    tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    backbone.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    asked = []

    def from_hub(loader):
        def load(name, *args, **kwargs):
            asked.append((loader.__self__.__name__, name, kwargs.get("revision")))
            return loader(str(tmp_path / "base"), *args, **kwargs)
        return load

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", from_hub(cls.from_pretrained))
    run = short_config(tmp_path / "run", "model.name_or_path=someone/base", "model.revision=v1.1")
    build_tokenizer_and_backbone(run, on_meta=on_meta)
    ours = [(loader, revision) for loader, name, revision in asked if name == "someone/base"]  # (not transformers')
    assert {loader for loader, _ in ours} == {"AutoTokenizer", "AutoConfig" if on_meta else "AutoModelForCausalLM"}
    assert all(revision == "v1.1" for _, revision in ours), asked


def test_a_hub_tokenizer_without_a_pad_token_pads_with_its_end_token(tmp_path):
    """Llama 3's tokenizer has no pad token: the run pads with EOS (the tokenizer a run exports is this one)."""
    from transformers import AutoTokenizer

    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    cfg = short_config(tmp_path / "tiny")
    tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    tokenizer.pad_token = None
    backbone.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "base")).pad_token is None
    loaded, _ = build_tokenizer_and_backbone(short_config(tmp_path / "run", f"model.name_or_path={tmp_path / 'base'}"))
    assert loaded.pad_token == loaded.eos_token == "<|end|>"


def test_seq_len_past_the_backbones_positions_is_a_config_error(tmp_path):
    """A backbone with learned positions (GPT-2's n_positions) shorter than data.seq_len failed at the
    first forward with an IndexError (a device-side assert on a GPU), after the model and data loaded;
    the tiny model's own limit (model.tiny.max_position_embeddings) is checked against data.seq_len."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.config import ConfigError
    from medusa_liger.train.data import load_examples

    cfg = short_config(tmp_path / "tiny")
    tokenizer, _ = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                        tie_word_embeddings=False)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    run = ["train.mode=heads", "train.steps=1", "checkpoint.every=0", "export.formats=[medusa]"]
    with pytest.raises(ConfigError, match=re.escape("data.seq_len=64 is longer than the 32 positions the backbone "
                                                    "reaches")):
        train(short_config(tmp_path / "run", f"model.name_or_path={tmp_path / 'gpt2'}", *run))
    assert not (tmp_path / "run" / "cache").exists()  # said before the data packed
    train(short_config(tmp_path / "fits", f"model.name_or_path={tmp_path / 'gpt2'}", "data.seq_len=32", *run))


def test_a_rope_scaled_backbone_trains_past_its_original_max_position_embeddings(tmp_path):
    """A linear RoPE scaling (vicuna-v1.5-16k: max_position_embeddings 4096, factor 4) keeps the
    original length in max_position_embeddings: the model reaches factor times it, and
    data.seq_len up to that must train (it did before check_position_range), past it is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.config import ConfigError
    from medusa_liger.train.data import load_examples

    cfg = short_config(tmp_path / "tiny")
    tokenizer, _ = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "scaled")
    tokenizer.save_pretrained(tmp_path / "scaled")
    run = ["train.mode=heads", "train.steps=1", "checkpoint.every=0", "export.formats=[medusa]"]
    train(short_config(tmp_path / "fits", f"model.name_or_path={tmp_path / 'scaled'}", "data.seq_len=64", *run))
    with pytest.raises(ConfigError, match=re.escape("data.seq_len=65 is longer than the 64 positions")):
        train(short_config(tmp_path / "past", f"model.name_or_path={tmp_path / 'scaled'}", "data.seq_len=65", *run))


def test_a_resume_from_another_runs_last_checkpoint_finishes_without_a_plot(tmp_path, capsys):
    """Nothing left to train and no step logged by this run: the plot raised ValueError after the export,
    and the run failed without its summary."""
    extra = ["train.steps=2", "checkpoint.every=2", "export.formats=[medusa]"]
    source, target = tmp_path / "source", tmp_path / "target"
    train(short_config(source, *extra))
    train(short_config(target, *extra, "train.seed=7"))  # (its plot.png is an older run's)
    result = train(short_config(target, *extra, f"train.resume={source / 'checkpoints' / 'step-000002'}"))
    assert read_metrics(target / "metrics.jsonl") == []
    assert "plot" not in result.paths and not (target / "plot.png").exists()
    assert "eval/acc/head0" in result.summary
    assert "training summary" in capsys.readouterr().out


def test_the_console_line_lists_head_accuracies_in_head_order(monkeypatch, tmp_path, capsys):
    """With 11+ heads the line sorted the keys by name: acc/head10 came before acc/head2."""
    with _logger(monkeypatch, tmp_path, wandb_mode="disabled") as logger:
        logger.log(1, {"loss": 1.0, **{f"acc/head{k}": k / 100 for k in range(12)}})
    accs = re.search(r"acc=\[([^\]]*)\]", capsys.readouterr().out).group(1).split()
    assert accs == [f"{k / 100:.2f}" for k in range(12)]


def test_the_plot_marks_the_backbones_held_out_numbers(monkeypatch, tmp_path):
    """eval/lm_loss and eval/acc/lm (a joint run's held-out backbone) were logged but never drawn."""
    heads = {"loss": 2.0, "lm_loss": 1.0, "acc/lm": 0.5, "loss/head0": 2.0, "acc/head0": 0.1}
    held_out = {"eval/lm_loss": 1.5, "eval/acc/lm": 0.25, "eval/loss/head0": 2.5, "eval/acc/head0": 0.05}
    records = [{"step": 1, **heads}, {"step": 2, **heads, **held_out}]
    calls, _ = _drawn(monkeypatch, tmp_path / "plot.png", records)
    markers = {(tuple(xs), tuple(ys)) for label, xs, ys, marker in calls if label is None and marker == "o"}
    assert ((2,), (1.5,)) in markers and ((2,), (0.25,)) in markers


def test_a_llama3_rope_scaling_reaches_max_position_embeddings_not_factor_times_the_original():
    """The llama3 rope type (Llama 3.1: factor 8; 3.2: factor 32, over an original 8192) states the extended
    length in max_position_embeddings (transformers requires original < max): Llama 3.2 was said to reach
    8192 x 32 = 262144 positions, twice its 131072."""
    from transformers import LlamaConfig

    from medusa_liger.train.build import position_limit

    for factor in (8.0, 32.0, 32):
        config = LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        assert position_limit(config) == 131072, factor
    linear = {"type": "linear", "factor": 4}
    assert position_limit(LlamaConfig(max_position_embeddings=4096, rope_scaling=linear)) == 16384
