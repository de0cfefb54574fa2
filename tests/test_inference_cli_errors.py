"""eval/generate/distill errors a user meets first: a bad --device, a backbone that is not there, heads
with no backbone beside them, a malformed --tree, a missing --data, a file as eval's --output. Each is
one ``medusa-liger <cmd>: error:`` line naming the flag, exit status 2, found before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medusa_liger.cli import main
from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.inference import distill
from medusa_liger.inference.cli import load_causal_lm, resolve_paths
from medusa_liger.inference.cli_args import parse_device
from medusa_liger.inference.distill import DistillSettings, self_distill
from medusa_liger.inference.generate import medusa_generate

# The evaluation tests' fixtures: one intra-op thread, the PyTorch kernels, the tiny tokenizer.
from tests.test_evaluate import TOKENIZER_VOCAB, _one_thread, random_medusa, tokenizer, write_run  # noqa: F401
from tests.test_generate import tiny_backbone


def error_of(argv: list[str], capsys) -> str:
    """The error ``argv`` exits with (status 2, returned or raised by argparse), without a traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


COMMANDS = {  # each command with arguments that would load a model (a missing one: nothing may load)
    "eval": ["eval", "nowhere"],
    "generate": ["generate", "nowhere", "--prompt", "hi"],
    "distill": ["distill", "--backbone", "nowhere/backbone", "--data", "d.jsonl", "--output", "o.jsonl"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_device_is_checked_before_anything_loads(command, capsys, monkeypatch):
    argv = COMMANDS[command]
    assert "argument --device: must be cpu, cuda or cuda:N, got 'foo'" in error_of([*argv, "--device", "foo"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "got 'cuda', but CUDA is not available on this machine: use cpu" in \
        error_of([*argv, "--device", "cuda"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "got 'cuda:1', but this machine has 1 CUDA device(s): cuda:0 to cuda:0" in \
        error_of([*argv, "--device", "cuda:1"], capsys)


def test_parse_device_and_load_causal_lm_refuse_unknown_devices(tmp_path):
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: must be cpu, cuda or cuda:N, got 'tpu'"):
        load_causal_lm(tmp_path, device="tpu")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_backbone_directory_names_the_flag(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\n')
    argv = {"eval": ["eval", "--heads", "h"], "generate": ["generate", "--heads", "h", "--prompt", "hi"],
            "distill": ["distill", "--data", "d.jsonl", "--output", "o.jsonl"]}[command]
    err = error_of([*argv, "--backbone", str(tmp_path / "nope")], capsys)
    assert f"--backbone: backbone directory '{tmp_path / 'nope'}' does not exist" in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_hub_backbone_that_does_not_load_names_the_flag(command, tmp_path, tokenizer, capsys, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_run(tmp_path, tokenizer, "def f(x):\n")
    heads = str(tmp_path / "run" / "final" / "heads_medusa")
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\n')
    argv = {"eval": ["eval", "--heads", heads, "--output", str(tmp_path / "eval")],
            "generate": ["generate", "--heads", heads, "--prompt", "hi"],
            "distill": ["distill", "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o.jsonl")]}[command]
    err = error_of([*argv, "--backbone", "org/typo", "--device", "cpu"], capsys)
    assert ("--backbone: backbone 'org/typo' is not a local directory, and no hub model of that name could be "
            "loaded (HF_HUB_OFFLINE is set: only models in the local cache load): We couldn't connect") in err
    assert "Check your connection" not in err  # one line


def _no_model_may_load(monkeypatch):
    """Fail the test if transformers or the hub is asked for a model (a path mistake must be said first)."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    def called(*args, **kwargs):
        raise AssertionError("a model was loaded, or the hub asked, for a path mistake")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", called)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)


BACKBONE_MISTAKES = {  # a --backbone given -> what the error says
    "heads": ("runs/run/final/heads_medusa", "--backbone: 'runs/run/final/heads_medusa' holds Medusa heads, not a "
                                             "backbone: pass the base model they were trained on"),
    "no_model_type": ("runs/run/final/odd", "--backbone: 'runs/run/final/odd' is not a transformers model: its "
                                            "config.json names no model_type"),
}


def _argv_of(command: str) -> list[str]:
    """``command`` over the heads of ``runs/run`` (written by ``_write_runs``), without --backbone."""
    heads = "runs/run/final/heads_medusa"
    return {"eval": ["eval", "--heads", heads, "--output", "eval"],
            "generate": ["generate", "--heads", heads, "--prompt", "hi"],
            "distill": ["distill", "--data", "d.jsonl", "--output", "o.jsonl"],
            "export": ["export", "--checkpoint", heads, "--output", "exported"]}[command]


def _write_runs(tmp_path, tokenizer, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "runs", tokenizer, "def f(x):\n")
    (tmp_path / "runs" / "run" / "final" / "odd").mkdir()
    (tmp_path / "runs" / "run" / "final" / "odd" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\n')
    capsys.readouterr()  # the progress bars of writing the run


@pytest.mark.parametrize("mistake", BACKBONE_MISTAKES)
@pytest.mark.parametrize("command", [*COMMANDS, "export"])
def test_backbone_path_mistakes_are_said_before_anything_loads(command, mistake, tmp_path, tokenizer,  # noqa: F811
                                                               capsys, monkeypatch):
    """Heads or a non-model directory as --backbone: transformers' paragraphs of upgrade advice."""
    _write_runs(tmp_path, tokenizer, capsys, monkeypatch)
    _no_model_may_load(monkeypatch)
    backbone, message = BACKBONE_MISTAKES[mistake]
    err = error_of([*_argv_of(command), "--backbone", backbone], capsys)
    assert message in err and err.count("\n") == 1, err
    assert not any(Path(name).exists() for name in ("o.jsonl", "exported", "eval"))


@pytest.mark.parametrize("command", [*COMMANDS, "export"])
def test_a_mistyped_path_that_reads_as_a_hub_name_is_noted_and_hinted(command, tmp_path, tokenizer,  # noqa: F811
                                                                      capsys, monkeypatch):
    """runs/nope (runs/ local) is a valid hub name: asked of the hub (a model may have that name), but said
    first (offline the lookup takes a minute of retries) and hinted at in the hub's error."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _write_runs(tmp_path, tokenizer, capsys, monkeypatch)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    err = error_of([*_argv_of(command), "--backbone", "runs/nope", "--device", "cpu"][:None if command != "export"
                                                                                     else -2], capsys)
    owner = "runs/ (holding ['prompts.txt', 'run'])"
    assert f"note: 'runs/nope' is no local directory, though {owner} is one; asking the hub" in err
    assert (f"--backbone: backbone 'runs/nope' is not a local directory ({owner} is a local directory: a mistyped "
            "path?), and no hub model of that name could be loaded") in err and "We couldn't connect" in err


def test_hub_names_beside_a_same_named_local_directory_pass(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from medusa_liger.heads.export import check_backbone_path, note_hub_lookup

    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen2-0.5B").mkdir(parents=True)
    check_backbone_path("Qwen/Qwen3-0.6B")  # a hub model, though ./Qwen holds another one
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/cache/config.json")
    note_hub_lookup("Qwen/Qwen3-0.6B")  # in the cache: loads at once, nothing to say
    note_hub_lookup("org/model")  # no local org/
    assert capsys.readouterr().err == ""


def test_a_full_medusa2_model_is_a_backbone_and_tilde_paths_load(tmp_path, monkeypatch):
    """A Medusa-2 full model records medusa_num_heads beside its model_type: it was refused as heads.
    A ~ path passed the check (expanded) but reached from_pretrained unexpanded."""
    from medusa_liger.heads.export import check_backbone_path, load_backbone

    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_backbone(vocab=TOKENIZER_VOCAB, seed=2).save_pretrained(tmp_path / "bb")
    config = json.loads((tmp_path / "bb" / "config.json").read_text())
    (tmp_path / "bb" / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 3}))
    check_backbone_path(tmp_path / "bb")
    assert load_backbone("~/bb").config.vocab_size == TOKENIZER_VOCAB


UNKNOWN_USER = "~medusa_liger_no_such_user"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--heads", f"{UNKNOWN_USER}/heads"], f"heads '{UNKNOWN_USER}/heads' is not a directory"),
    (["eval", f"{UNKNOWN_USER}/run"], f"run_dir '{UNKNOWN_USER}/run' is not a directory"),
    (["generate", "--heads", f"{UNKNOWN_USER}/heads", "--prompt", "hi"], "is not a directory"),
    (["export", "--checkpoint", f"{UNKNOWN_USER}/ckpt", "--output", "out"], f"{UNKNOWN_USER}/ckpt does not exist"),
])
def test_a_path_under_an_unknown_users_home_is_a_missing_path(argv, message, tmp_path, capsys, monkeypatch):
    """``Path.expanduser`` raises RuntimeError on ``~name`` of no user: it was the command's traceback."""
    monkeypatch.chdir(tmp_path)
    assert message in error_of(argv, capsys)


def _checkpoint_heads(tmp_path, base_model: str, mode: str = "heads"):
    """A run's RUN/checkpoints/step-000010/heads recording ``base_model``, and its final/backbone."""
    model = MedusaModel.from_backbone(tiny_backbone(vocab=TOKENIZER_VOCAB, seed=2), MedusaConfig(num_heads=2, mode=mode))
    run = tmp_path / "run"
    model.backbone.save_pretrained(run / "final" / "backbone")
    heads = run / "checkpoints" / "step-000010" / "heads"
    model.save_heads(heads, save_backbone=False, base_model_name_or_path=base_model)
    return run, heads


def test_checkpoint_heads_of_the_tiny_model_ask_for_a_backbone(tmp_path, capsys):
    run, heads = _checkpoint_heads(tmp_path, "tiny", mode="joint")
    err = error_of(["generate", "--heads", str(heads), "--prompt", "hi"], capsys)
    assert (f"no backbone found for heads '{heads}': they record base model 'tiny' (the tiny model a training run "
            f"builds, not a hub name); pass --backbone PATH, e.g. {run / 'final' / 'backbone'}") in err
    # A joint run's checkpoint heads trained with that step's backbone, which export rebuilds.
    assert f"medusa-liger export --checkpoint {heads.parent} --output DIR" in err
    assert "no backbone found" in error_of(["eval", "--heads", str(heads)], capsys)


def test_heads_recording_a_directory_that_is_gone_ask_for_a_backbone(tmp_path):
    _, heads = _checkpoint_heads(tmp_path, str(tmp_path / "moved" / "backbone"))
    with pytest.raises(ValueError, match="a directory that does not exist; pass --backbone PATH, e.g. ") as info:
        resolve_paths(None, None, heads)
    assert "medusa-liger export" not in str(info.value)  # heads-only training: the final backbone is theirs


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_flat_tree_is_refused_before_anything_loads(command, tmp_path, capsys):
    flat = tmp_path / "flat.json"
    flat.write_text("[0, 1]")
    err = error_of([*COMMANDS[command], "--tree", str(flat)], capsys)
    assert f"--tree: {flat}: tree paths must be non-empty lists of ranks, got 0" in err


def test_medusa_generate_refuses_a_flat_tree():
    model = random_medusa(64, num_heads=2)
    with pytest.raises(ValueError, match="tree paths must be non-empty lists of ranks, got 0"):
        medusa_generate(model, torch.tensor([[1, 2, 3]]), 4, [0, 1])


def test_distill_missing_data_names_the_flag_before_loading_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_of(["distill", "--backbone", "nowhere/backbone", "--data", "missing.jsonl", "--output", "o.jsonl"],
                   capsys)
    assert "--data: no such file: 'missing.jsonl'" in err and "data.paths" not in err
    assert list(tmp_path.iterdir()) == []


def test_distill_names_data_in_the_record_readers_errors(monkeypatch):
    """The shared record reader names the key or flag that gave the source: --data for distill."""
    from medusa_liger.records import iter_raw_records

    with pytest.raises(ValueError, match="^data.paths: file '/no/such.jsonl' does not exist"):
        list(iter_raw_records("/no/such.jsonl", "train", "fail", []))
    seen = {}

    def reader(*args, **kwargs):
        seen.update(kwargs)
        return iter(())

    monkeypatch.setattr(distill, "iter_raw_records", reader)
    list(distill._source_records("org/ds", "train", DistillSettings(), [], texts=False))
    assert seen == {"key": "--data"}


def test_distill_that_writes_no_record_leaves_no_output(tokenizer, tmp_path):  # noqa: F811
    model = tiny_backbone(vocab=len(tokenizer), seed=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"neither": 1}\n')
    output = tmp_path / "o.jsonl"
    with pytest.raises(ValueError, match="gave no record to distill"):
        self_distill(bad, output, model=model, tokenizer=tokenizer, progress=False)
    assert not output.exists() and not (tmp_path / "o.jsonl.settings.json").exists()
    # So the right data is taken without --overwrite; an existing output is replaced only by a new record.
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    assert self_distill(good, output, DistillSettings(max_new_tokens=3), model=model, tokenizer=tokenizer,
                        progress=False).records == 1
    with pytest.raises(ValueError, match="gave no record to distill"):
        self_distill(bad, output, model=model, tokenizer=tokenizer, overwrite=True, progress=False)
    assert len(output.read_text().splitlines()) == 1


@pytest.mark.parametrize(("output", "message"), [
    ("taken", "--output: '{tmp}/taken' is a file; pass a directory"),
    ("taken/eval", "--output: '{tmp}/taken/eval' cannot be a directory: '{tmp}/taken' is a file"),
])
def test_eval_output_that_is_a_file_is_refused_before_anything_loads(tmp_path, capsys, output, message):
    (tmp_path / "taken").write_text("")
    err = error_of([*COMMANDS["eval"], "--output", str(tmp_path / output)], capsys)
    assert message.format(tmp=tmp_path) in err


def test_run_directory_mistakes_say_what_to_pass(tmp_path, capsys):
    """A run without final/ (stopped early), and a backbone directory that is no model."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has no final/ .*medusa-liger export --checkpoint"):
        resolve_paths(tmp_path / "run", None, None)
    assert main(["generate", "--heads", str(tmp_path), "--backbone", str(tmp_path / "run"), "--prompt", "hi"]) == 2
    assert "not a Hugging Face model directory (no config.json)" in capsys.readouterr().err


def test_distill_output_that_is_a_directory_is_refused_before_loading(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["distill", "--backbone", str(tmp_path / "nope"), "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_train_and_the_inference_commands_share_one_device_check(monkeypatch):
    # train.device and --device were parsed by two copies (a regex + resolve_device, and parse_device).
    from medusa_liger.devices import is_device_name
    from medusa_liger.devices import parse_device as shared
    from medusa_liger.train.build import resolve_device
    from medusa_liger.train.config import ConfigError, load_config

    assert parse_device is shared
    assert parse_device("auto", allow_auto=True).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="must be cpu, cuda or cuda:N, got 'auto'"):
        parse_device("auto")
    assert not is_device_name(None) and not is_device_name("cuda:") and is_device_name("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", ["train.device=cuda:3"])
    with pytest.raises(ConfigError, match=r"train.device: got 'cuda:3', but this machine has 1 CUDA device\(s\)"):
        resolve_device(cfg)
