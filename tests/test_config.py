"""The training config: YAML + dotted overrides, typed schema, validation errors naming the key."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from medusa_liger.train.config import Config, apply_overrides, config_from_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny.yaml"


def test_shipped_configs_load_and_validate():
    names = {p.stem for p in SHIPPED}
    assert {"tiny", "llama3-8b-medusa1", "llama3-8b-medusa2-lora"} <= names
    assert any("qwen" in n for n in names)
    for path in SHIPPED:
        cfg = load_config(path)
        assert cfg.name == path.stem
        assert cfg.output_dir == str(Path("runs") / path.stem)


def test_medusa2_lora_config_matches_the_recipe():
    cfg = load_config(ROOT / "configs" / "llama3-8b-medusa2-lora.yaml")
    assert cfg.train.mode == "joint" and cfg.lora.enabled
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (32, 16.0, "all-linear")
    assert cfg.train.heads_lr == pytest.approx(4 * cfg.train.lr)
    assert cfg.train.heads_only_steps > 0
    assert cfg.train.heads_lambda.value == pytest.approx(0.2)
    medusa1 = load_config(ROOT / "configs" / "llama3-8b-medusa1.yaml")
    assert medusa1.train.mode == "heads" and medusa1.heads.num_heads == 5 and not medusa1.lora.enabled


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["train.lr=1e-3", "heads.num_heads=4", "heads.shared_lm_head=true",
                       "data.paths=[a.jsonl,b.jsonl]", "model.tiny.hidden_size=96", "output_dir=/tmp/x",
                       "train.max_grad_norm=null"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.heads.num_heads == 4 and cfg.heads.shared_lm_head is True
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"]
    assert cfg.model.tiny.hidden_size == 96
    assert cfg.output_dir == "/tmp/x"
    assert cfg.train.max_grad_norm is None


def test_override_spellings_users_type():
    cfg = load_config(TINY, ["model.dtype=bf16", "export.dtype=fp16", "train.master_dtype=fp32",
                             "data.paths=medusa_liger/data/pydoc_text.jsonl"])
    assert (cfg.model.dtype, cfg.export.dtype, cfg.train.master_dtype) == ("bfloat16", "float16", "float32")
    assert cfg.data.paths == ["medusa_liger/data/pydoc_text.jsonl"]  # one path, no [...] needed
    with pytest.raises(ValueError, match=r"logging.wandb must be one of .* got False \(YAML reads yes/no/on/off"):
        load_config(TINY, ["logging.wandb=off"])
    with pytest.raises(ValueError, match=r"train.resume must be a string, got True \(YAML reads"):
        load_config(TINY, ["train.resume=yes"])
    with pytest.raises(ValueError, match=r"model.dtype must be one of .* got 'bf8'$"):
        load_config(TINY, ["model.dtype=bf8"])


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, Config) and cfg.output_dir == str(Path("runs") / "run")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr"),                       # unknown key
        ("model.tiny.depth=3", "model.tiny.depth"),         # unknown nested key
        ("bogus.x=1", "bogus"),                             # unknown section
        ("heads.num_heads=abc", "heads.num_heads"),         # wrong type
        ("heads.num_heads=2.5", "heads.num_heads"),         # float for int
        ("heads.shared_lm_head=maybe", "heads.shared_lm_head"),
        ("train.mode=medusa3", "train.mode"),               # not one of the choices
        ("export.formats=onnx", "export.formats[0]"),       # one item, not one of the choices
        ("model.name_or_path=runs/tiny/final/backbon", "model.name_or_path"),  # a local path, not there
        ("model.name_or_path=./no-such-model", "model.name_or_path"),
        ("train.betas=[0.9]", "train.betas"),
        ("heads.num_heads=0", "heads.num_heads"),           # impossible values
        ("train.steps=0", "train.steps"),
        ("heads.decay=1.5", "heads.decay"),
        ("data.seq_len=3", "data.seq_len"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("model.tiny.num_attention_heads=5", "model.tiny.num_attention_heads"),
        ("train.heads_only_steps=5000", "train.heads_only_steps"),
        ("data.eval_fraction=1.0", "data.eval_fraction"),
        ("export.formats=[onnx]", "export.formats[0]"),
        ("train.device=tpu", "train.device"),
        ("train.kl_temperature=2", "train.kl_temperature"),  # no KL term to apply it to
        ("train.kl_direction=reverse", "train.kl_direction"),
        ("train.kl_direction=sideways", "train.kl_direction"),
        ("train.jsd_beta=0.5", "train.jsd_beta"),            # no divergence term to apply it to
        ("train.fsdp_param_dtype=bfloat16", "train.fsdp_param_dtype"),  # no FSDP to cast for
        ("train.fsdp_param_dtype=float32", "train.fsdp_param_dtype"),   # not a cast
        ("train.heads_lambda.ramp_steps=10", "train.heads_lambda.ramp_steps"),  # a ramp of a constant
        ("train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps"),  # a ramp of 0 steps
        ("train.seed=18446744073709551616", "train.seed"),  # torch's seed overflowed after the data loaded
        ("export.backbone=never", "export.backbone"),  # tiny, built here, without checkpoints: saved nowhere
        ("train.lm_loss_weight=0", "train.lm_loss_weight"),  # with heads_lambda.value=0 (below): nothing trains
        ("train.heads_lambda.value=0", "train.heads_lambda.value"),  # joint, no heads-only stage: no head trains
        ("train.fsdp_param_dtype=float16", "train.fsdp_param_dtype"),  # the whole backbone's gradients in fp16
        ("train.mode=heads", "export.backbone"),  # never: a tiny backbone only the heads trained on is in no checkpoint
    ],
)
def test_bad_values_name_the_key(override, key):
    extra = {"export.backbone=never": ["checkpoint.every=0"], "train.lm_loss_weight=0": ["train.heads_lambda.value=0",
             "train.heads_only_steps=10"], "train.fsdp_param_dtype=float16": ["train.fsdp=true"],
             "train.mode=heads": ["export.backbone=never", "train.heads_only_steps=0"]}.get(override, [])
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config(ROOT / "configs" / "tiny.yaml", [override, *extra])


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_kl_temperature_must_be_positive(value):
    with pytest.raises(ValueError, match="train.kl_temperature must be a finite number"):
        load_config(ROOT / "configs" / "tiny.yaml", ["heads.targets=backbone", f"train.kl_temperature={value}"])
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["heads.targets=backbone", "train.kl_temperature=2"])
    assert cfg.train.kl_temperature == 2.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.jsd_beta=0"], "train.jsd_beta must be null or a number in (0, 1)"),
    (["train.jsd_beta=1.0"], "train.jsd_beta must be null or a number in (0, 1)"),
    (["train.jsd_beta=true"], "train.jsd_beta must be"),
    (["train.jsd_beta=0.5", "train.kl_direction=reverse"], "train.kl_direction must be 'forward' with train.jsd_beta"),
])
def test_jsd_beta_is_checked(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(ROOT / "configs" / "tiny.yaml", ["heads.targets=backbone", *overrides])
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["heads.targets=backbone", "train.jsd_beta=0.5"])
    assert cfg.train.jsd_beta == 0.5


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.label_smoothing=1.0"], "train.label_smoothing must be a number in [0, 1)"),
    (["train.label_smoothing=-0.1"], "train.label_smoothing must be a number in [0, 1)"),
    (["train.label_smoothing=nan"], "train.label_smoothing must be a finite number, got 'nan'"),
    (["train.label_smoothing=0.1", "heads.targets=backbone"], "train.label_smoothing must be 0 unless"),
    (["train.label_smoothing=0.1", "train.mode=joint", "train.lm_loss=kl"], "train.label_smoothing must be 0 unless"),
    (["train.z_loss=-1e-4"], "train.z_loss must be a number >= 0"),
    (["train.z_loss=inf"], "train.z_loss must be a finite number, got 'inf'"),
    (["train.z_loss=1e-4", "heads.targets=backbone", "train.kl_temperature=2"], "train.z_loss must be 0 unless"),
])
def test_label_smoothing_and_z_loss_are_checked(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.label_smoothing=0.1", "train.z_loss=1e-4"])
    assert (cfg.train.label_smoothing, cfg.train.z_loss) == (0.1, 1e-4)
    # z-loss with a divergence at temperature 1 is allowed (the kernels take it there).
    load_config(ROOT / "configs" / "tiny.yaml", ["heads.targets=backbone", "train.z_loss=1e-4"])


@pytest.mark.parametrize("key", ["train.heads_lr", "train.lr", "lora.alpha", "train.lm_loss_weight",
                                 "train.heads_lambda.value", "heads.decay", "train.max_grad_norm"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    # An infinite rate or weight used to pass (> 0) and train NaNs to the end, or fail deep in training.
    with pytest.raises(ValueError, match=re.escape(f"{key} must be a finite number")):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.mode=joint", "lora.enabled=true", f"{key}={value}"])


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output_dir must be a directory or a path that can become one"):
        load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path / 'file' / 'run'}"])
    assert load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path / 'new' / 'run'}"])


def test_lora_needs_joint_mode():
    with pytest.raises(ValueError, match="lora.enabled"):
        config_from_dict({"lora": {"enabled": True}, "train": {"mode": "heads"}})


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ValueError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "llama3-8b-medusa2-lora.yaml", ["train.lr=2e-5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_cli_reports_config_errors(capsys):
    from medusa_liger.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([str(ROOT / "configs" / "tiny.yaml"), "train.stepz=3"])) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert cli.run(parser.parse_args([str(ROOT / "configs" / "tiny.yaml"), "train.steps=7", "--print-config"])) == 0
    assert "steps: 7" in capsys.readouterr().out


def test_cli_version_is_the_packages(capsys):
    import importlib.metadata

    import medusa_liger
    from medusa_liger.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"medusa-liger {medusa_liger.__version__}"
    try:  # installed (pip install -e .): pyproject reads the version from the package, one source
        assert importlib.metadata.version("medusa-liger") == medusa_liger.__version__
    except importlib.metadata.PackageNotFoundError:  # run from a checkout on PYTHONPATH, not installed
        pass


def test_resume_must_be_none_auto_or_a_checkpoint_directory(tmp_path):
    tiny = ROOT / "configs" / "tiny.yaml"
    for value in ("none", "auto"):
        assert load_config(tiny, [f"train.resume={value}"]).train.resume == value
    for bad in (tmp_path / "missing", tmp_path):  # no such directory; a directory with no trainer_state.json
        with pytest.raises(ValueError, match="train.resume"):
            load_config(tiny, [f"train.resume={bad}"])
    (tmp_path / "trainer_state.json").write_text("{}")
    assert load_config(tiny, [f"train.resume={tmp_path}"]).train.resume == str(tmp_path)


def test_cli_reports_data_errors_but_lets_bugs_raise(tmp_path, capsys, monkeypatch):
    from medusa_liger.train import cli, loop

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(ROOT / "configs" / "tiny.yaml"), f"output_dir={tmp_path}", "logging.wandb=disabled",
                              f"data.paths=[{tmp_path / 'missing.jsonl'}]"])
    assert cli.run(args) == 2
    assert "data.paths" in capsys.readouterr().err

    def buggy_train(cfg):
        raise ValueError("a bug in the middle of training")

    monkeypatch.setattr(loop, "train", buggy_train)
    with pytest.raises(ValueError, match="a bug in the middle"):
        cli.run(parser.parse_args([str(ROOT / "configs" / "tiny.yaml"), f"output_dir={tmp_path}"]))


@pytest.mark.parametrize("override", ["data.paths=[a.jsonl", "name=@foo", "train.lr={"])
def test_malformed_yaml_override_is_a_config_error_naming_it(override):
    # Used to escape as a yaml.parser.ParserError / ScannerError traceback.
    with pytest.raises(ValueError, match=re.escape(f"override {override!r}: the value of {override.split('=')[0]} "
                                                   "is not valid YAML")):
        load_config(TINY, [override])


def test_malformed_yaml_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  lr: [1\n  steps: 3\n")
    with pytest.raises(ValueError, match=re.escape(f"config file {str(bad)!r} is not valid YAML") + ".* at line 4"):
        load_config(bad)


def test_a_config_directory_is_said_to_be_one(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\n")
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path)!r} is a directory: give a YAML file (e.g. ")
                       + ".*a.yaml"):
        load_config(tmp_path)


@pytest.mark.parametrize("device", ["cudafoo", "cuda:x", "cuda:-1", "cuda:1:2", "gpu", "CPU"])
def test_device_is_validated_fully(device):
    # Only startswith("cuda") was checked: cudafoo and cuda:x passed, then torch.device raised.
    with pytest.raises(ValueError, match=re.escape(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                                                   f"{device!r}")):
        load_config(TINY, [f"train.device={device}"])
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):  # availability is resolve_device's check, at startup
        assert load_config(TINY, [f"train.device={good}"]).train.device == good


def test_tilde_is_expanded_once_in_every_path_key(tmp_path, monkeypatch):
    # Validation expanded ~ but the run used it literally (output_dir=~/run made ./~/run).
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "bb").mkdir()
    (tmp_path / "bb" / "config.json").write_text('{"model_type": "llama"}')  # a model directory
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "trainer_state.json").write_text("{}")
    cfg = load_config(TINY, ["output_dir=~/run", "data.paths=[~/a.jsonl, org/dataset]", "data.cache_dir=~/cache",
                             "model.name_or_path=~/bb", "train.resume=~/ck"])
    assert cfg.output_dir == str(tmp_path / "run")
    assert cfg.data.paths == [str(tmp_path / "a.jsonl"), "org/dataset"]
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.model.name_or_path == str(tmp_path / "bb")
    assert cfg.train.resume == str(tmp_path / "ck")
    defaults = load_config(TINY)
    assert (defaults.model.name_or_path, defaults.train.resume, defaults.data.cache_dir) == ("tiny", "none", None)


@pytest.mark.parametrize("value", ["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                                   "null", "kernels-community/flash-attn2"])
def test_attn_implementation_takes_what_transformers_takes(value):
    expected = None if value == "null" else value
    assert load_config(TINY, [f"model.attn_implementation={value}"]).model.attn_implementation == expected


@pytest.mark.parametrize("value", ["foo", "flash_attention", "SDPA", "a/b/c"])
def test_attn_implementation_typos_stop_at_config_time(value):
    # Was ignored by the tiny backbone (exit 0) and a ValueError traceback after loading a real one.
    with pytest.raises(ValueError, match=r"model\.attn_implementation must be null, one of eager, sdpa.* got "
                       + re.escape(repr(value))):
        load_config(TINY, [f"model.attn_implementation={value}"])


def test_model_revision_is_for_hub_models_only(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')
    assert load_config(TINY, ["model.name_or_path=someone/base", "model.revision=v1.1"]).model.revision == "v1.1"
    assert load_config(TINY).model.revision is None
    for name, said in (("tiny", "null for the tiny model"),
                       (str(tmp_path / "base"), "null for a local model directory")):
        with pytest.raises(ValueError, match=f"model.revision must be {said}"):
            load_config(TINY, [f"model.name_or_path={name}", "model.revision=main"])
    with pytest.raises(ValueError, match="model.revision must be a branch, tag or commit hash"):
        load_config(TINY, ["model.name_or_path=someone/base", "model.revision=' '"])
    # A tag like 2024 or 1.0 (or a short hash of digits) is a number to YAML: the message says to quote it.
    with pytest.raises(ValueError, match=r"got 1.0 \(YAML reads it as a number: quote the string as written"):
        load_config(TINY, ["model.name_or_path=someone/base", "model.revision=1.0"])
    # The hint suggests no value of its own: YAML's number is not what was written (tag 1.10 is 1.1 to it).
    with pytest.raises(ValueError) as error:
        load_config(TINY, ["model.name_or_path=someone/base", "model.revision=1.10"])
    assert "key='1.1'" not in str(error.value)
    assert load_config(TINY, ["model.name_or_path=someone/base", "model.revision='1.0'"]).model.revision == "1.0"


def test_a_run_must_save_its_heads_somewhere():
    """export.formats=[] with checkpoint.every=0 trained heads that were then written nowhere."""
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ValueError, match=r"export.formats must be at least one of .* when checkpoint.every=0"):
        load_config(tiny, ["export.formats=[]", "checkpoint.every=0"])
    assert load_config(tiny, ["export.formats=[]", "checkpoint.every=5"]).export.formats == []


def test_a_backbone_that_trains_whole_in_bf16_weights_is_warned_about_and_the_shipped_config_avoids_it():
    """In bf16 weights an AdamW update below 1/512 of its weight is lost (1.0 + 2e-5 == 1.0): the shipped
    full Medusa-2 config trained its 8B backbone that way (norm weights never moved)."""
    import torch

    from medusa_liger.train.build import precision_warning

    full = ROOT / "configs" / "llama3-8b-medusa2-full.yaml"
    assert torch.tensor(1.0, dtype=torch.bfloat16) + 2e-5 == 1.0  # what the warning says
    assert load_config(full).model.dtype == "float32" and precision_warning(load_config(full)) is None
    warning = precision_warning(load_config(full, ["model.dtype=bfloat16"]))
    assert warning.startswith("warning: the whole backbone trains in bfloat16 weights without an fp32 master copy")
    assert "train.lr=2e-05" in warning and "model.dtype=float32" in warning
    for others in (["model.dtype=bfloat16", "lora.enabled=true"], ["model.dtype=bfloat16", "train.mode=heads", "train.heads_only_steps=0"]):
        assert precision_warning(load_config(full, others)) is None  # LoRA adapters and heads have fp32 masters


# ------------------------------------------------------------------ third audit
def test_a_section_with_every_key_commented_out_is_an_empty_section(tmp_path):
    path = tmp_path / "myrun.yaml"
    path.write_text("lora:\n#  enabled: true\ntrain:\n  steps: 10\n")
    cfg = load_config(path)
    assert cfg.lora.r == Config().lora.r and cfg.train.steps == 10
    assert cfg.output_dir == str(Path("runs") / "myrun")  # no name: the file's
    assert load_config(path, ["lora.r=8"]).lora.r == 8


@pytest.mark.parametrize("override, refused_key", [
    ("heads.decay=0", "heads.decay"), ("heads.decay=1.0", None), ("model.tiny.vocab_size=300", None),
    ("data.seq_len=4", "data.seq_len"), ("data.seq_len=5", None), ("data.max_examples=0", "data.max_examples"),
    ("train.lr=0", None), ("train.heads_lr=0", "train.heads_lr"), ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.betas=[0.9,1.0]", "train.betas"), ("train.betas=[0.9,0.95,0.99]", "train.betas"),
    ("train.warmup_steps=0", None), ("train.min_lr_ratio=1.0", None), ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.seed=9223372036854775808", None), ("checkpoint.keep=0", "checkpoint.keep"),
    ("logging.every=0", "logging.every"), ("train.threads=0", "train.threads"),
    ("model.tiny.num_key_value_heads=4", "model.tiny.num_key_value_heads"),
    ("model.tiny.hidden_size=6", "model.tiny.hidden_size"), ("train.steps=true", "train.steps"),
    ("train.steps=10 train.heads_only_steps=10", "train.heads_only_steps"),
    ("train.mode=heads train.lm_loss=kl train.heads_only_steps=0", "train.lm_loss"),
    ("train.mode=heads train.heads_only_steps=10", "train.heads_only_steps"),
])
def test_the_edges_of_each_range(override, refused_key):
    """tiny.yaml (3 heads, joint) with the override: the value at each range's edge, taken, or refused by name."""
    if refused_key is None:
        load_config(TINY, override.split())
    else:
        with pytest.raises(ValueError, match="^" + re.escape(refused_key) + " must"):
            load_config(TINY, override.split())


def test_an_override_value_may_hold_an_equals_sign():
    from medusa_liger.train.config import parse_override

    assert parse_override("logging.run_name=a=b") == (["logging", "run_name"], "a=b")


@pytest.mark.parametrize("text, key", [
    ("train:\n  mode: joint\n  lr: 5.0e-4\nheads:\n  num_heads: 2\ntrain:\n  steps: 3\n", "train"),  # a 2nd section
    ("train:\n  lr: 5.0e-4\n  lr: 1.0e-3\n", "lr"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key):
    """PyYAML keeps the last of two equal keys: a second ``train:`` section silently dropped the first
    one's keys (mode and lr back at their defaults)."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"found duplicate key '{key}'")):
        load_config(path, [f"output_dir={tmp_path / 'run'}"])


def test_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train: &t {lr: 1.0e-3, steps: 3}\nheads:\n  num_heads: 2\n")
    assert load_config(path, [f"output_dir={tmp_path / 'run'}"]).train.lr == pytest.approx(1e-3)
    path.write_text("train:\n  <<: {lr: 1.0e-3, steps: 3}\n  steps: 5\n")
    cfg = load_config(path, [f"output_dir={tmp_path / 'run'}"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.steps == 5


def test_lambda_ramp_is_refused_in_heads_mode():
    """heads mode trains the heads at weight 1 (no lambda): a ramp there did nothing, silently."""
    ramp = ["train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps=10"]
    with pytest.raises(ValueError, match=re.escape("train.heads_lambda.schedule must be 'constant' unless")):
        load_config(TINY, ["train.mode=heads", *ramp])
    assert load_config(TINY, ramp).train.heads_lambda.schedule == "linear"  # joint: the ramp applies


def test_a_duplicate_key_in_an_override_is_not_told_to_close_its_brackets():
    """The brackets of `train={lr: 1, lr: 2}` are closed: the hint must name the duplicate, not them."""
    from medusa_liger.train.config import parse_override

    with pytest.raises(ValueError, match="found duplicate key 'lr'") as error:
        parse_override("train={lr: 1, lr: 2}")
    assert "close its brackets" not in str(error.value) and "give each key once" in str(error.value)
    with pytest.raises(ValueError, match="close its brackets"):  # (a real unclosed bracket keeps its hint)
        parse_override("train={lr: 1")
