"""Export/import of Medusa heads: exact key names and config fields of both formats, exact round
trips, dtype casting, the merged backbone after joint training, foreign checkpoints, the CLI, and
clear errors on bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.heads import cli as export_cli
from medusa_liger.heads.export import detect_format, read_heads
from tests.test_heads import H, V, randomize_heads, tiny_llama

K, L = 3, 2


def make_model(shared: bool, mode: str = "heads", backbone=None) -> MedusaModel:
    cfg = MedusaConfig(num_heads=K, num_layers=L, shared_lm_head=shared, mode=mode, decay=0.6)
    model = MedusaModel.from_backbone(tiny_llama() if backbone is None else backbone, cfg)
    randomize_heads(model)
    return model


def expected_keys(format: str, shared: bool) -> set[str]:
    keys = set()
    for h in range(K):
        for l in range(L):
            if format == "medusa":
                keys |= {f"{h}.{l}.linear.weight", f"{h}.{l}.linear.bias"}
            else:
                keys |= {f"blocks.{h}.layers.{l}.weight", f"blocks.{h}.layers.{l}.bias"}
        if not shared:
            keys.add(f"{h}.{L}.weight" if format == "medusa" else f"lm_heads.{h}.weight")
    if shared and format == "vllm":
        keys.add("lm_heads.0.weight")  # vLLM's original_lm_head reads the one projection from here
    return keys


def assert_same_heads(a: MedusaModel, b: MedusaModel) -> None:
    sa, sb = a.heads.state_dict(), b.heads.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("shared", [False, True])
def test_medusa_format_keys_and_config(tmp_path, shared):
    model = make_model(shared)
    model.save_heads(tmp_path, format="medusa", base_model_name_or_path="org/base")
    tensors = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    assert set(tensors) == expected_keys("medusa", shared)
    assert tensors["1.1.linear.weight"].shape == (H, H) and tensors["1.1.linear.bias"].shape == (H,)
    assert torch.equal(tensors["2.0.linear.bias"], model.heads.blocks[2][0].linear.bias.detach())
    if not shared:
        assert torch.equal(tensors[f"1.{L}.weight"], model.heads.lm_heads[1].weight.detach())
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in ("medusa_num_heads", "medusa_num_layers", "base_model_name_or_path", "hidden_size", "vocab_size")} == {
        "medusa_num_heads": K, "medusa_num_layers": L, "base_model_name_or_path": "org/base", "hidden_size": H, "vocab_size": V}
    ours = config["medusa_liger"]
    assert ours["format_version"] == 1 and ours["shared_lm_head"] is shared and ours["decay"] == 0.6
    assert not (tmp_path / "backbone").exists()  # heads mode: the backbone is unchanged, not saved


@pytest.mark.parametrize("shared", [False, True])
def test_vllm_format_keys_and_config(tmp_path, shared):
    model = make_model(shared)
    model.save_heads(tmp_path, format="vllm")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == expected_keys("vllm", shared)
    assert torch.equal(tensors["blocks.1.layers.1.weight"], model.heads.blocks[1][1].linear.weight.detach())
    lm0 = model.lm_head.weight if shared else model.heads.lm_heads[0].weight
    assert torch.equal(tensors["lm_heads.0.weight"], lm0.detach())
    config = json.loads((tmp_path / "config.json").read_text())
    expected = {"model_type": "medusa", "architectures": ["MedusaModel"], "num_heads": K, "num_hidden_layers": L,
                "hidden_size": H, "vocab_size": V, "truncated_vocab_size": V, "medusa_fc_bias": True,
                "original_lm_head": shared}
    assert {k: config[k] for k in expected} == expected
    assert config["medusa_liger"]["shared_lm_head"] is shared


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("format", ["medusa", "vllm"])
@pytest.mark.parametrize("shared", [False, True])
def test_round_trip_is_exact(tmp_path, format, shared):
    model = make_model(shared)
    model.heads_loss_weight = 0.35
    model.save_heads(tmp_path, format=format)
    assert detect_format(tmp_path) == format
    loaded = MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)
    assert loaded.config == model.config
    assert_same_heads(model, loaded)
    ids = torch.randint(0, V, (1, 6))
    hidden = model.hidden_states(ids)
    assert torch.equal(model.head_logits(hidden), loaded.head_logits(hidden))


def test_dtype_option_casts_the_written_weights(tmp_path):
    model = make_model(shared=False)
    model.save_heads(tmp_path, format="vllm", dtype="bf16")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["medusa_liger"]["dtype"] == "bfloat16"
    loaded = MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)
    expected = model.heads.blocks[0][1].linear.weight.detach().to(torch.bfloat16).float()
    assert torch.equal(loaded.heads.blocks[0][1].linear.weight.detach(), expected)
    with pytest.raises(ValueError, match="dtype"):
        model.save_heads(tmp_path / "x", dtype="int8")


def test_joint_training_saves_the_lora_merged_backbone(tmp_path):
    from peft import LoraConfig, get_peft_model

    backbone = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model = make_model(shared=False, mode="joint", backbone=backbone)
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        expected = backbone(input_ids=ids).logits
    model.save_heads(tmp_path, format="medusa")
    saved = tmp_path / "backbone"
    assert (saved / "config.json").is_file()
    weights = load_file(str(next(saved.glob("*.safetensors"))))
    assert not any("lora" in k for k in weights)
    assert any("lora_B" in n for n, _ in model.backbone.named_parameters())  # training model untouched
    loaded = MedusaModel.from_pretrained(tmp_path)  # backbone from the backbone/ subdirectory
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert loaded.config.mode == "joint"
    assert_same_heads(model, loaded)


# ------------------------------------------------------------------------------------ foreign files
def test_reads_a_medusa_checkpoint_written_by_another_tool(tmp_path):
    model = make_model(shared=False)
    tensors = {f"{h}.0.linear.weight": model.heads.blocks[h][0].linear.weight.detach().clone() for h in range(K)}
    tensors |= {f"{h}.0.linear.bias": model.heads.blocks[h][0].linear.bias.detach().clone() for h in range(K)}
    tensors |= {f"{h}.1.weight": model.heads.lm_heads[h].weight.detach().clone() for h in range(K)}
    save_file(tensors, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": K, "medusa_num_layers": 1, "base_model_name_or_path": "x"}))
    ckpt = read_heads(tmp_path)
    assert (ckpt.hidden_size, ckpt.vocab_size, ckpt.config.num_layers, ckpt.config.shared_lm_head) == (H, V, 1, False)
    loaded = MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)
    assert torch.equal(loaded.heads.lm_heads[2].weight, model.heads.lm_heads[2].weight)
    assert loaded.config.decay == MedusaConfig().decay


# ------------------------------------------------------------------------------------ CLI
def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    return export_cli.run(parser.parse_args(list(argv)))


def test_cli_converts_between_formats(tmp_path, capsys):
    model = make_model(shared=False)
    model.save_heads(tmp_path / "ckpt" / "heads", format="medusa")  # a training checkpoint's layout
    assert run_cli("--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--format", "both") == 0
    for format in ("medusa", "vllm"):
        loaded = MedusaModel.from_pretrained(tmp_path / "out" / format, backbone=model.backbone)
        assert_same_heads(model, loaded)
    assert run_cli("--checkpoint", str(tmp_path / "out" / "vllm"), "--output", str(tmp_path / "b"), "--format", "medusa",
                   "--dtype", "fp16") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "b" / "medusa_lm_head.safetensors")).values()} == {torch.float16}


def test_heads_record_a_local_backbone_by_its_absolute_path(tmp_path, monkeypatch):
    """A backbone loaded from a relative directory: the heads record its absolute path (recorded as
    typed, eval, generate and serving engines run from another directory found no backbone)."""
    model = make_model(shared=True)
    monkeypatch.chdir(tmp_path)
    model.backbone.save_pretrained("runs/base")
    model.backbone.config._name_or_path = "runs/base"  # as from_pretrained("runs/base") sets it
    model.save_heads(tmp_path / "heads", format="medusa")
    recorded = read_heads(tmp_path / "heads").base_model_name_or_path
    assert recorded == str((tmp_path / "runs" / "base").resolve())
    monkeypatch.chdir(tmp_path / "runs")  # elsewhere: the recorded backbone still loads
    assert_same_heads(model, MedusaModel.from_pretrained(tmp_path / "heads", backbone=recorded))


def test_a_training_checkpoint_given_as_heads_names_its_heads_directory(tmp_path):
    make_model(shared=False).save_heads(tmp_path / "step-000010" / "heads", format="medusa")
    with pytest.raises(FileNotFoundError, match="is a training checkpoint, its heads are in .*step-000010/heads "
                                                "\\(`medusa-liger export --checkpoint"):
        read_heads(tmp_path / "step-000010")


def test_cli_exports_master_heads_in_the_recorded_serving_dtype(tmp_path):
    """A training checkpoint holds fp32 master heads on a bf16 backbone: the export defaults to bf16
    (recorded at save time), --dtype overrides it, and files without the record keep their dtype."""
    model = make_model(shared=False, backbone=tiny_llama().to(torch.bfloat16))
    model.heads.float()  # fp32 master weights, as the training loop keeps them
    model.save_heads(tmp_path / "ckpt" / "heads", format="medusa")
    config = json.loads((tmp_path / "ckpt" / "heads" / "config.json").read_text())["medusa_liger"]
    assert (config["dtype"], config["serving_dtype"]) == ("float32", "bfloat16")
    weights = "medusa_lm_head.safetensors"
    assert run_cli("--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "auto"), "--format", "medusa") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "auto" / weights)).values()} == {torch.bfloat16}
    assert run_cli("--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "fp32"), "--format", "medusa",
                   "--dtype", "fp32") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "fp32" / weights)).values()} == {torch.float32}
    # Without the record (another tool's files): as saved.
    del config["serving_dtype"]
    path = tmp_path / "fp32" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "medusa_liger": config}))
    assert run_cli("--checkpoint", str(tmp_path / "fp32"), "--output", str(tmp_path / "kept"), "--format", "medusa") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "kept" / weights)).values()} == {torch.float32}


def test_cli_reads_the_training_loops_final_layout(tmp_path, capsys):
    """final/heads_medusa/ with the (jointly trained) backbone beside it in final/backbone/."""
    from medusa_liger.heads.export import write_backbone

    model = make_model(shared=True, mode="joint")
    model.save_heads(tmp_path / "final" / "heads_medusa", format="medusa", save_backbone=False)
    write_backbone(model.backbone, tmp_path / "final" / "backbone")
    assert run_cli("--checkpoint", str(tmp_path / "final"), "--output", str(tmp_path / "out"), "--format", "vllm",
                   "--dtype", "bf16") == 0
    assert (tmp_path / "out" / "backbone" / "config.json").is_file()
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(tensors["lm_heads.0.weight"], model.lm_head.weight.detach().to(torch.bfloat16))
    loaded = MedusaModel.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and loaded.config.mode == "joint"
    # The run's directory itself (as eval and generate take it) finds final/ inside.
    assert run_cli("--checkpoint", str(tmp_path), "--output", str(tmp_path / "run"), "--format", "medusa") == 0
    assert "heads in the medusa format and the backbone" in capsys.readouterr().out
    assert (tmp_path / "run" / "backbone" / "config.json").is_file()
    assert_same_heads(model, MedusaModel.from_pretrained(tmp_path / "run"))
    assert run_cli("--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")) == 2


def test_cli_shared_vllm_needs_the_backbone(tmp_path, capsys):
    model = make_model(shared=True)
    model.backbone.save_pretrained(str(tmp_path / "base"))
    model.save_heads(tmp_path / "heads", format="medusa")
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o1"), "--format", "vllm") == 2
    assert "backbone" in capsys.readouterr().err
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o2"), "--format", "vllm",
                   "--backbone", str(tmp_path / "base")) == 0
    tensors = load_file(str(tmp_path / "o2" / "model.safetensors"))
    assert torch.equal(tensors["lm_heads.0.weight"], model.lm_head.weight.detach())
    assert_same_heads(model, MedusaModel.from_pretrained(tmp_path / "o2", backbone=model.backbone))


# ------------------------------------------------------------------------------------ errors
def test_size_mismatch_names_found_and_expected(tmp_path):
    make_model(shared=False).save_heads(tmp_path, format="vllm")
    with pytest.raises(ValueError, match=r"hidden_size=64 but the backbone expects hidden_size=32"):
        MedusaModel.from_pretrained(tmp_path, backbone=tiny_llama(hidden=32))
    with pytest.raises(ValueError, match=r"vocab_size=128 but the backbone expects vocab_size=96"):
        MedusaModel.from_pretrained(tmp_path, backbone=tiny_llama(vocab=96))


def test_missing_files_and_bad_arguments(tmp_path):
    model = make_model(shared=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MedusaModel.from_pretrained(tmp_path / "nope", backbone=model.backbone)
    model.save_heads(tmp_path, format="medusa")
    with pytest.raises(ValueError, match="backbone is required"):
        MedusaModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot be overridden"):
        MedusaModel.from_pretrained(tmp_path, backbone=model.backbone, num_heads=2)
    (tmp_path / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="medusa_lm_head.safetensors"):
        MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)
    with pytest.raises(ValueError, match="format must be one of"):
        model.save_heads(tmp_path / "x", format="gguf")
    with pytest.raises(FileNotFoundError, match=r"--checkpoint .*config.json is a file; pass the directory holding"):
        export_cli.find_heads_dir(tmp_path / "config.json")  # (it was "does not exist")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Medusa heads config"):
        read_heads(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 0, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1, found 0"):
        read_heads(tmp_path)


def test_missing_or_unexpected_tensors(tmp_path):
    make_model(shared=False).save_heads(tmp_path, format="vllm")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    extra = dict(tensors, **{"blocks.9.layers.0.weight": torch.zeros(1)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensors"):
        read_heads(tmp_path)
    del tensors["blocks.1.layers.1.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.layers.1.bias"):
        read_heads(tmp_path)


def test_every_heads_tensor_shape_is_checked(tmp_path):
    """Not only the first head's: a serving engine builds every head at hidden and vocab size."""
    make_model(shared=False).save_heads(tmp_path, format="medusa")
    tensors = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    save_file(dict(tensors, **{f"2.{L}.weight": torch.zeros(V - 3, H)}), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(ValueError, match=rf"lm_heads.2.weight has shape \[{V - 3}, {H}\], expected \[{V}, {H}\]"):
        read_heads(tmp_path)
    save_file(dict(tensors, **{"1.0.linear.weight": torch.zeros(H, H // 2)}), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(ValueError, match=r"blocks.1.0.linear.weight has shape"):
        read_heads(tmp_path)


def test_float64_heads_round_trip(tmp_path):
    model = make_model(shared=False, backbone=tiny_llama().double())
    model.save_heads(tmp_path / "h", format="medusa")
    assert read_heads(tmp_path / "h").serving_dtype == torch.float64
    assert_same_heads(model, MedusaModel.from_pretrained(tmp_path / "h", backbone=model.backbone))
    assert run_cli("--checkpoint", str(tmp_path / "h"), "--output", str(tmp_path / "o"), "--format", "vllm") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "o" / "model.safetensors")).values()} == {torch.float64}


def test_heads_whose_layers_share_memory_export(tmp_path):
    """FasterDecoding builds a head as Sequential(*[ResBlock] * L, Linear): its L blocks are one
    module, so its medusa_lm_head.pt holds layers sharing storage, which safetensors refuses."""
    block = torch.nn.Linear(H, H)
    state = {}
    for h in range(K):
        for l in range(L):
            state[f"{h}.{l}.linear.weight"], state[f"{h}.{l}.linear.bias"] = block.weight.data, block.bias.data
        state[f"{h}.{L}.weight"] = torch.randn(V, H)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": K, "medusa_num_layers": L}))
    assert run_cli("--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--format", "both") == 0
    out = load_file(str(tmp_path / "o" / "vllm" / "model.safetensors"))
    assert torch.equal(out[f"blocks.2.layers.{L - 1}.weight"], block.weight.data)


def test_shared_vllm_export_refuses_an_lm_head_bias(tmp_path):
    """vLLM's Medusa lm_heads have no bias: it would serve every head without the backbone's."""
    backbone = tiny_llama()
    backbone.lm_head.bias = torch.nn.Parameter(torch.randn(V))
    model = make_model(shared=True, backbone=backbone)
    with pytest.raises(ValueError, match="lm_head has a bias"):
        model.save_heads(tmp_path / "v", format="vllm")
    model.save_heads(tmp_path / "m", format="medusa")  # the medusa format keeps using the backbone's lm_head


def test_bf16_stored_lm_head_is_no_false_alarm(tmp_path, recwarn):
    model = make_model(shared=True)
    model.save_heads(tmp_path, format="vllm", dtype="bf16")
    MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)
    assert not [w for w in recwarn if "differs" in str(w.message)]
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.warns(UserWarning, match="differs from the backbone's"):
        MedusaModel.from_pretrained(tmp_path, backbone=model.backbone)


@pytest.mark.parametrize("key, value", [
    ("final_logit_softcapping", 30.0),  # Gemma 2's default
    ("logits_scaling", 16.0),  # Granite 3.0 8B's (the config class defaults to 1.0)
    ("logit_scale", 0.0625),  # Cohere's default
])
def test_backbone_logit_transforms_are_refused(key, value):
    """Our losses and decoding's logits are hidden @ lm_head.T: a backbone that transforms its logits is
    refused (Cohere's logit_scale made typical acceptance sample at 16x the temperature)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=V)
    setattr(config, key, value)
    with pytest.raises(ValueError, match=f"{key}={value}"):
        MedusaModel.from_backbone(LlamaForCausalLM(config), MedusaConfig(num_heads=1))


def test_cli_export_is_all_or_nothing_and_overwrites_only_when_asked(tmp_path, capsys):
    model = make_model(shared=True)
    model.save_heads(tmp_path / "heads", format="medusa")
    # Shared vllm needs a backbone: --format both fails in vllm after medusa, and leaves nothing.
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "both") == 2
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["heads"]
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "medusa") == 0
    capsys.readouterr()
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "medusa") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "o" / "backbone").mkdir()  # a stale earlier export's backbone goes with --overwrite
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "medusa",
                   "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "medusa_lm_head.safetensors"]
    assert "and the backbone" not in capsys.readouterr().out
    (tmp_path / "o" / "notes.txt").write_text("mine")  # not an export's file: never replaced
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--overwrite") == 2
    assert "files no export writes" in capsys.readouterr().err
    for output in (tmp_path / "heads", tmp_path):  # the source itself, or a directory holding it
        assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(output), "--overwrite") == 2
        assert "which this export reads" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "file")) == 2
    assert "is a file" in capsys.readouterr().err
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "p"), "--format", "vllm",
                   "--backbone", str(tmp_path / "no_such_dir")) == 2
    assert "backbone directory" in capsys.readouterr().err  # a mistyped path, not the hub's "Repo id must be ..."
    (tmp_path / "heads" / "medusa_lm_head.safetensors").write_bytes(b"\x00" * 7)  # truncated
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "q")) == 2


def test_cli_dtype_keeps_the_backbones_tokenizer_and_names_the_copy(tmp_path):
    """--dtype rewrites the saved backbone; its tokenizer files come along, and the heads'
    base_model_name_or_path names the exported copy (the trained backbone), not the base model."""
    from medusa_liger.heads.export import write_backbone

    model = make_model(shared=False, mode="joint")
    model.save_heads(tmp_path / "final" / "heads_medusa", format="medusa", save_backbone=False,
                     base_model_name_or_path="org/base")
    write_backbone(model.backbone, tmp_path / "final" / "backbone")
    (tmp_path / "final" / "backbone" / "tokenizer.json").write_text("{}")
    (tmp_path / "final" / "backbone" / "chat_template.jinja").write_text("{{ messages }}")
    # The heads directory itself: its backbone/ sits beside it.
    assert run_cli("--checkpoint", str(tmp_path / "final" / "heads_medusa"), "--output", str(tmp_path / "o"),
                   "--format", "medusa", "--dtype", "bf16") == 0
    names = {p.name for p in (tmp_path / "o" / "backbone").iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "config.json"} <= names
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "o" / "backbone").resolve())


def test_exported_weights_are_readable_by_a_serving_user(tmp_path):
    """safetensors 0.8 writes 0600; an export is for a serving engine, often another user."""
    import os
    import stat

    from medusa_liger.heads.export import write_backbone

    umask = os.umask(0o022)
    try:
        model = make_model(shared=False)
        model.save_heads(tmp_path / "h", format="vllm")
        write_backbone(model.backbone, tmp_path / "b")
    finally:
        os.umask(umask)
    for path in [tmp_path / "h" / "model.safetensors", *(tmp_path / "b").glob("*.safetensors")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_cli_never_writes_over_the_heads_it_reads_nor_the_current_directory(tmp_path, capsys, monkeypatch):
    model = make_model(shared=False)
    model.save_heads(tmp_path / "ckpt" / "heads", format="medusa")  # found inside --checkpoint
    assert run_cli("--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "ckpt" / "heads"),
                   "--overwrite", "--dtype", "bf16") == 2
    assert "which this export reads" in capsys.readouterr().err
    assert {t.dtype for t in load_file(str(tmp_path / "ckpt" / "heads" / "medusa_lm_head.safetensors")).values()} \
        == {torch.float32}
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run_cli("--checkpoint", str(tmp_path / "ckpt"), "--output", ".") == 2
    assert "current directory" in capsys.readouterr().err
    (tmp_path / "ckpt" / "heads" / "medusa_lm_head.safetensors").write_bytes(b"\x00" * 7)  # truncated
    assert run_cli("--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o")) == 2
    assert "medusa_lm_head.safetensors is not a readable safetensors file" in capsys.readouterr().err


def test_cli_output_filled_by_another_process_meanwhile_is_not_replaced(tmp_path, monkeypatch, capsys):
    model = make_model(shared=False)
    model.save_heads(tmp_path / "heads", format="medusa")
    real_write_heads = export_cli.write_heads

    def write_heads_while_someone_writes_the_output(*args, **kwargs):
        (tmp_path / "o").mkdir(exist_ok=True)
        (tmp_path / "o" / "notes.txt").write_text("theirs")
        return real_write_heads(*args, **kwargs)

    monkeypatch.setattr(export_cli, "write_heads", write_heads_while_someone_writes_the_output)
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o")) == 2
    assert (tmp_path / "o" / "notes.txt").read_text() == "theirs" and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads", "o"]  # no scratch left behind


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_vllm_heads_written_by_other_tools_read_back(tmp_path, layout):
    """vLLM loads any checkpoint layout; heads on the hub come as pytorch_model.bin or sharded
    safetensors, which only a single model.safetensors was read from before."""
    model = make_model(shared=False)
    model.save_heads(tmp_path / "h", format="vllm")
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    (tmp_path / "h" / "model.safetensors").unlink()
    if layout == "bin":
        torch.save(tensors, tmp_path / "h" / "pytorch_model.bin")
    else:
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: tensors[k].contiguous() for k in keys}, str(tmp_path / "h" / file))
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        index = tmp_path / "h" / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_heads(model, MedusaModel.from_pretrained(tmp_path / "h", backbone=model.backbone))
    if layout == "sharded":  # a shard gone, or a tensor the index names that no shard holds: named
        weight_map["blocks.0.missing"] = "model-00001-of-00002.safetensors"
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=r"lists tensors its shards do not hold: \['blocks.0.missing'\]"):
            read_heads(tmp_path / "h")
        (tmp_path / "h" / "model-00002-of-00002.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match="names the shard model-00002-of-00002.safetensors"):
            read_heads(tmp_path / "h")


def test_python_api_joint_save_names_its_written_backbone(tmp_path):
    # save_heads wrote DIR/backbone but config.json still named the untrained base model.
    model = make_model(shared=False, mode="joint")
    for format in ("medusa", "vllm"):
        model.save_heads(tmp_path / format, format=format)
        config = json.loads((tmp_path / format / "config.json").read_text())
        assert config["base_model_name_or_path"] == str((tmp_path / format / "backbone").resolve())


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"medusa_num_heads": 2, "medusa_num_layers": 1, "medusa_liger": 3}'])
def test_a_broken_heads_config_is_a_named_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        read_heads(tmp_path)


# ------------------------------------------------------------------------------------ FasterDecoding
class FasterDecodingResBlock(torch.nn.Module):
    """FasterDecoding Medusa's head block: x + SiLU(Linear(x))."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def fasterdecoding_heads(directory, num_heads: int, num_layers: int) -> torch.nn.ModuleList:
    """What FasterDecoding's MedusaModel.from_pretrained builds and loads: per head ONE block object
    repeated num_layers times, then a projection, filled from medusa_lm_head.pt with strict=False."""
    heads = torch.nn.ModuleList(
        torch.nn.Sequential(*([FasterDecodingResBlock(H)] * num_layers), torch.nn.Linear(H, V, bias=False))
        for _ in range(num_heads))
    heads.load_state_dict(torch.load(directory / "medusa_lm_head.pt", weights_only=True), strict=False)
    return heads


@pytest.mark.parametrize("num_layers", [1, 2])
def test_pt_file_serves_in_fasterdecodings_loader(tmp_path, num_layers):
    """FasterDecoding's loader opens only medusa_lm_head.pt (we wrote only .safetensors), and repeats one
    block per head: distinct layers loaded as the last layer everywhere (logits off by 64)."""
    cfg = MedusaConfig(num_heads=K, num_layers=num_layers, shared_lm_head=False)
    model = MedusaModel.from_backbone(tiny_llama(), cfg)
    randomize_heads(model)
    hidden = torch.randn(2, 5, H)
    if num_layers > 1:
        with pytest.raises(ValueError, match="repeats one ResBlock medusa_num_layers=2 times per head"):
            model.save_heads(tmp_path / "distinct", format="medusa", pt_file=True)
        with torch.no_grad():  # equal layers (e.g. trained tied, as FasterDecoding trains them) are served
            for blocks in model.heads.blocks:
                blocks[1].linear.load_state_dict(blocks[0].linear.state_dict())
    model.save_heads(tmp_path / "heads", format="medusa", pt_file=True)
    served = fasterdecoding_heads(tmp_path / "heads", K, num_layers)
    with torch.no_grad():
        for k in range(K):
            x = hidden
            for block in model.heads.blocks[k]:
                x = block(x)
            want = model.heads.lm_heads[k](x)
            torch.testing.assert_close(served[k](hidden), want)
    with pytest.raises(ValueError, match="pt_file: medusa_lm_head.pt is a file of the medusa format"):
        model.save_heads(tmp_path / "v", format="vllm", pt_file=True)
    shared = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=K, shared_lm_head=True))
    with pytest.raises(ValueError, match="FasterDecoding builds a projection for every head"):
        shared.save_heads(tmp_path / "s", format="medusa", pt_file=True)


def test_cli_pt_file_and_backbone_recorded_as_the_base_model(tmp_path, capsys):
    """--backbone was only checked against: heads without a recorded base (other tools' files, models
    without a name) exported with base_model_name_or_path null, which TGI and FasterDecoding load."""
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=K, num_layers=1))
    model.backbone.save_pretrained(str(tmp_path / "base"))
    model.save_heads(tmp_path / "heads", format="vllm", base_model_name_or_path=None)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    (tmp_path / "heads" / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "both",
                   "--backbone", str(tmp_path / "base"), "--pt-file") == 0
    for format in ("medusa", "vllm"):
        written = json.loads((tmp_path / "o" / format / "config.json").read_text())
        assert written["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert (tmp_path / "o" / "medusa" / "medusa_lm_head.pt").is_file()
    assert not (tmp_path / "o" / "vllm" / "medusa_lm_head.pt").exists()
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o2"), "--format", "vllm",
                   "--pt-file") == 2
    assert "--pt-file writes the medusa format's medusa_lm_head.pt" in capsys.readouterr().err


def test_a_save_without_pt_file_deletes_an_earlier_pt_file(tmp_path):
    """FasterDecoding reads only medusa_lm_head.pt: one left by an earlier save served the old heads."""
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=K, num_layers=1))
    model.save_heads(tmp_path, format="medusa", pt_file=True)
    with pytest.warns(UserWarning, match="deleting .*medusa_lm_head.pt of an earlier save"):
        model.save_heads(tmp_path, format="medusa")
    assert not (tmp_path / "medusa_lm_head.pt").exists()


def test_cli_pt_file_refuses_before_loading_a_backbone(tmp_path, capsys, monkeypatch):
    """Refused only after the backbone loaded (minutes for an 8B model, and a joint checkpoint's rebuild)."""
    model = make_model(shared=False)  # two distinct layers per head
    model.backbone.save_pretrained(str(tmp_path / "base"))
    model.save_heads(tmp_path / "heads", format="medusa")
    monkeypatch.setattr(export_cli, "load_backbone", lambda *a, **k: pytest.fail("loaded the backbone"))
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "medusa",
                   "--backbone", str(tmp_path / "base"), "--pt-file") == 2
    assert "repeats one ResBlock" in capsys.readouterr().err


@pytest.mark.parametrize("recorded, kept", [
    ("meta-llama/Meta-Llama-3-8B", True),   # a hub name stays portable, though checked against a local copy
    (None, False), ("", False), ("tiny", False),
    ("/nowhere/on/this/machine/backbone", False),  # a path of another machine
])
def test_backbone_is_recorded_unless_it_is_a_local_copy_of_the_named_hub_model(tmp_path, recorded, kept):
    from medusa_liger.heads.cli import recorded_base_model

    (tmp_path / "base").mkdir()
    want = recorded if kept else str((tmp_path / "base").resolve())
    assert recorded_base_model(recorded, tmp_path / "base") == want
    assert recorded_base_model(recorded, "org/name") == "org/name"  # a hub name given: recorded
    # Joint heads belong to the backbone that trained with them, whatever base they started from.
    assert recorded_base_model(recorded, tmp_path / "base", "joint") == str((tmp_path / "base").resolve())
    (tmp_path / "existing").mkdir()  # an existing local path recorded: --backbone replaces it
    assert recorded_base_model(str(tmp_path / "existing"), tmp_path / "base") == str((tmp_path / "base").resolve())


# ------------------------------------------------------------------------------------ review fixes
def test_heads_only_heads_ignore_an_unrelated_backbone_folder_beside_them(tmp_path, capsys):
    # /models/my_heads beside /models/backbone (the base model): the export copied the whole backbone and
    # named the copy as the heads' base model, though heads-only heads never changed it.
    model = make_model(shared=False)
    model.backbone.save_pretrained(str(tmp_path / "models" / "backbone"))
    model.save_heads(tmp_path / "models" / "my_heads", format="medusa", base_model_name_or_path="org/base")
    assert run_cli("--checkpoint", str(tmp_path / "models" / "my_heads"), "--output", str(tmp_path / "out"),
                   "--format", "medusa") == 0
    assert not (tmp_path / "out" / "backbone").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["base_model_name_or_path"] == "org/base"
    # Recorded as their base model, the backbone beside them is theirs (and so is a joint run's).
    model.save_heads(tmp_path / "models" / "mine", format="medusa",
                     base_model_name_or_path=str(tmp_path / "models" / "backbone"))
    assert export_cli.paired_backbone(tmp_path / "models" / "mine", read_heads(tmp_path / "models" / "mine")) == \
        tmp_path / "models" / "backbone"


def test_shared_heads_in_the_medusa_format_are_said_to_be_ours_only(tmp_path, capsys):
    # TGI and TensorRT-LLM load a projection per head, which shared heads in this layout do not hold: said
    # where a user asks for that format (save_heads, export), not for the trainer's checkpoint copy.
    with pytest.warns(UserWarning, match="hold no per-head projection.*serve them through the vllm format"):
        make_model(shared=True).save_heads(tmp_path / "s", format="medusa")
    assert run_cli("--checkpoint", str(tmp_path / "s"), "--output", str(tmp_path / "o"), "--format", "medusa") == 0
    assert "warning: shared-lm_head heads in the medusa format hold no per-head projection" in capsys.readouterr().err
    make_model(shared=True).save_heads(tmp_path / "v", format="vllm")  # (holds the lm_head the vllm copy needs)
    assert run_cli("--checkpoint", str(tmp_path / "v"), "--output", str(tmp_path / "both")) == 0  # vllm beside it
    assert "warning" not in capsys.readouterr().err
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_model(shared=False).save_heads(tmp_path / "p", format="medusa")
        make_model(shared=True).save_heads(tmp_path / "v", format="vllm")


def test_shared_heads_without_a_vocab_size_take_the_backbones(tmp_path, capsys):
    # A medusa-format config without vocab_size wrote a vllm config with "vocab_size": null.
    model = make_model(shared=True)
    model.backbone.save_pretrained(str(tmp_path / "base"))
    model.save_heads(tmp_path / "heads", format="medusa")
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    del config["vocab_size"]
    (tmp_path / "heads" / "config.json").write_text(json.dumps(config))
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "vllm",
                   "--backbone", str(tmp_path / "base")) == 0
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert written["vocab_size"] == written["truncated_vocab_size"] == V
    ckpt = read_heads(tmp_path / "heads")
    ckpt.lm_head_weight = model.lm_head.weight.detach()  # attached by hand, without its size
    with pytest.raises(ValueError, match="the vllm format needs the heads' vocab_size"):
        export_cli.write_heads(ckpt, tmp_path / "o2", format="vllm")


def test_a_tied_backbone_saved_in_another_dtype_stores_its_embedding_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_liger.heads.export import write_backbone

    config = LlamaConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V, tie_word_embeddings=True)
    backbone = LlamaForCausalLM(config)
    write_backbone(backbone, tmp_path / "bf16", "bf16")
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert torch.equal(loaded.lm_head.weight, backbone.lm_head.weight.detach().to(torch.bfloat16))


@pytest.mark.parametrize("format", ["medusa", "vllm"])
@pytest.mark.parametrize("key", ["hidden_size", "vocab_size"])
def test_a_config_whose_sizes_disagree_with_its_tensors_is_refused(tmp_path, format, key):
    make_model(shared=False).save_heads(tmp_path, format=format)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] += 8
    if key == "vocab_size" and format == "vllm":
        config["truncated_vocab_size"] += 8  # (else refused as a draft vocabulary first)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json says {key}={config[key]} but its tensors have {key}="):
        read_heads(tmp_path)


def test_a_medusa_config_without_its_layer_count_means_one_layer(tmp_path):
    # FasterDecoding's configs may leave medusa_num_layers out: its default is 1.
    cfg = MedusaConfig(num_heads=2, num_layers=1)
    model = MedusaModel.from_backbone(tiny_llama(), cfg)
    randomize_heads(model)
    model.save_heads(tmp_path, format="medusa")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["medusa_num_layers"], config["medusa_liger"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_heads(tmp_path).config.num_layers == 1
    assert_same_heads(model, MedusaModel.from_pretrained(tmp_path, backbone=model.backbone))


@pytest.mark.parametrize("version", ['"1"', "2.5", "true"])
def test_a_format_version_that_is_no_integer_is_a_named_error(tmp_path, version):
    # A string version crashed the CLI with a TypeError traceback ('>' between str and int).
    make_model(shared=False).save_heads(tmp_path, format="medusa")
    text = (tmp_path / "config.json").read_text().replace('"format_version": 1', f'"format_version": {version}')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="format_version must be an integer"):
        read_heads(tmp_path)


def test_a_newer_format_is_named_before_its_tensors_are_read(tmp_path, capsys):
    heads = tmp_path / "final" / "heads_medusa"
    make_model(shared=False).save_heads(heads, format="medusa")
    text = (heads / "config.json").read_text().replace('"format_version": 1', '"format_version": 2')
    (heads / "config.json").write_text(text)
    (heads / "medusa_lm_head.safetensors").write_bytes(b"a layout this version cannot read")
    with pytest.raises(ValueError, match="written by a newer medusa-liger"):
        read_heads(heads)
    # The CLI says so too, wherever it finds them (the search for heads skipped them: "holds no Medusa heads").
    for checkpoint in (heads, tmp_path):
        assert run_cli("--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")) == 2
        assert "written by a newer medusa-liger (format_version 2" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", '[{"name": "sweep"}]', '{"medusa_liger": "notes"}', '{"hidden_size": 8}'])
def test_a_config_json_that_is_no_heads_is_skipped_in_the_search(tmp_path, text):
    # Only a version this one cannot read stops the search: a run directory's other config.json does not.
    make_model(shared=False).save_heads(tmp_path / "heads_medusa", format="medusa")
    (tmp_path / "config.json").write_text(text)
    assert export_cli.find_heads_dir(tmp_path) == tmp_path / "heads_medusa"
    # With no heads anywhere, what could not be read is said (a truncated heads config.json said nothing).
    (tmp_path / "heads_medusa" / "config.json").write_text('{"medusa_num_heads": 3, "medus')
    with pytest.raises(FileNotFoundError, match=r"holds no Medusa heads: .*heads_medusa/config.json is not valid JSON"):
        export_cli.find_heads_dir(tmp_path)


def test_export_from_inside_final_pairs_the_backbone_beside_the_heads(tmp_path, monkeypatch, capsys):
    # `cd RUN/final && medusa-liger export --checkpoint heads_medusa`: the parent of "heads_medusa" as typed
    # is ".", so a moved run's final/backbone (no longer its recorded base) went unpaired, unlike in eval.
    model = make_model(shared=True)
    final = tmp_path / "moved_run" / "final"
    model.save_heads(final / "heads_medusa", format="medusa", base_model_name_or_path="/run/was/here/final/backbone")
    model.backbone.save_pretrained(str(final / "backbone"))
    monkeypatch.chdir(final)
    assert run_cli("--checkpoint", "heads_medusa", "--output", str(tmp_path / "out"), "--format", "vllm") == 0
    assert "heads in the vllm format and the backbone" in capsys.readouterr().out


def test_vllm_heads_are_read_as_vllm_serves_them(tmp_path):
    # medusa_fc_bias false: vLLM's blocks have no bias and it skips bias tensors, which were loaded here;
    # original_lm_head with the projection stored as lm_head.weight (vLLM maps it) was refused.
    model = make_model(shared=True)
    model.save_heads(tmp_path, format="vllm")
    config = json.loads((tmp_path / "config.json").read_text())
    config["medusa_fc_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("lm_heads.0.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="medusa_fc_bias is false, so vLLM ignores the blocks' bias tensors"):
        ckpt = read_heads(tmp_path)
    assert all(not t.any() for k, t in ckpt.tensors.items() if k.endswith("bias"))
    assert torch.equal(ckpt.lm_head_weight, model.lm_head.weight.detach())


# ------------------------------------------------------------------------------------ third audit
def test_dtype_names_any_case_and_dtypes_outside_the_stored_ones_are_refused(tmp_path):
    from medusa_liger.heads.export import parse_dtype

    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("Float32") is torch.float32
    with pytest.raises(ValueError, match="dtype must be bfloat16, float16, float32 or float64, got torch.int8"):
        make_model(shared=False).save_heads(tmp_path, dtype=torch.int8)
    assert not (tmp_path / "config.json").exists()


def _rewrite_vllm(directory, *, drop=(), set_=None, add_tensors=None, bias_value=None) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key in drop:
        del config[key]
    config.update(set_ or {})
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(directory / "model.safetensors"))
    if bias_value is not None:
        tensors = {k: torch.full_like(t, bias_value) if k.endswith("bias") else t for k, t in tensors.items()}
    tensors.update(add_tensors or {})
    save_file(tensors, str(directory / "model.safetensors"))


def test_vllm_configs_of_other_tools_read_with_vllms_defaults(tmp_path):
    """vLLM's defaults: medusa_fc_bias false (bias tensors ignored), original_lm_head false (per-head
    projections); a token_map tensor beside a full vocabulary is tolerated, a truncated one refused."""
    model = make_model(shared=False)
    model.save_heads(tmp_path / "a", format="vllm")
    _rewrite_vllm(tmp_path / "a", drop=("medusa_fc_bias",), bias_value=1.0)
    with pytest.warns(UserWarning, match="medusa_fc_bias is false"):
        ckpt = read_heads(tmp_path / "a")
    assert all(not t.any() for k, t in ckpt.tensors.items() if k.endswith("bias"))

    model.save_heads(tmp_path / "b", format="vllm")
    _rewrite_vllm(tmp_path / "b", drop=("original_lm_head",), add_tensors={"token_map": torch.arange(V)})
    loaded = MedusaModel.from_pretrained(tmp_path / "b", backbone=model.backbone)
    assert loaded.config.shared_lm_head is False
    assert_same_heads(model, loaded)

    model.save_heads(tmp_path / "c", format="vllm")
    _rewrite_vllm(tmp_path / "c", set_={"truncated_vocab_size": V - 2})
    with pytest.raises(ValueError, match=f"truncated_vocab_size={V - 2} .* is not supported"):
        read_heads(tmp_path / "c")


def test_a_config_with_num_heads_of_another_model_type_is_no_heads_config(tmp_path):
    from medusa_liger.heads.export import NotHeadsConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "num_heads": 8}))
    with pytest.raises(NotHeadsConfigError, match="is not a Medusa heads config"):
        detect_format(tmp_path)


def test_a_joint_save_in_another_dtype_casts_the_backbone_too(tmp_path):
    model = make_model(shared=False, mode="joint")
    model.save_heads(tmp_path, format="vllm", dtype="bf16")
    backbone = load_file(str(next((tmp_path / "backbone").glob("*.safetensors"))))
    assert {t.dtype for t in backbone.values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}


@pytest.mark.parametrize("saved_mode, weight, new_mode, expected", [
    ("heads", None, "joint", 0.2), ("joint", None, "heads", 1.0), ("heads", 0.5, "joint", 0.5),
])
def test_loading_in_another_mode_takes_its_default_heads_weight_unless_one_was_chosen(
        tmp_path, saved_mode, weight, new_mode, expected):
    cfg = MedusaConfig(num_heads=K, num_layers=L, mode=saved_mode, heads_loss_weight=weight)
    model = MedusaModel.from_backbone(tiny_llama(), cfg)
    model.save_heads(tmp_path, save_backbone=False)
    loaded = MedusaModel.from_pretrained(tmp_path, backbone=tiny_llama(), mode=new_mode)
    assert loaded.config.mode == new_mode and loaded.config.heads_loss_weight == expected
    again = MedusaModel.from_pretrained(tmp_path, backbone=tiny_llama(), mode=new_mode, heads_loss_weight=0.3)
    assert again.config.heads_loss_weight == 0.3


@pytest.mark.filterwarnings("ignore:shared-lm_head heads in the medusa format")  # (said and tested elsewhere)
def test_heads_record_the_hub_commit_of_their_backbone_and_load_it_at_that_commit(tmp_path, monkeypatch):
    # Heads named their base by hub name only: loaded later, the name's default branch may hold other
    # weights (a new revision pushed since). transformers' loader stands in for the hub, reading a local copy.
    import transformers

    from medusa_liger.inference import load_medusa

    from medusa_liger.train.tiny import train_tokenizer

    commit = "0a1b" * 10
    model = make_model(shared=True, backbone=tiny_llama(vocab=320))
    model.backbone.config._commit_hash, model.backbone.config._name_or_path = commit, "org/base"  # (as read)
    model.backbone.save_pretrained(tmp_path / "base")
    train_tokenizer(["def f(x): return x", "The pass statement."] * 4, 300, tmp_path / "tok").save_pretrained(
        tmp_path / "base")  # (load_medusa reads a tokenizer too)
    for format in ("medusa", "vllm"):
        model.save_heads(tmp_path / format, format=format, base_model_name_or_path="org/base")
        config = json.loads((tmp_path / format / "config.json").read_text())
        assert config["medusa_liger"]["base_model_revision"] == commit
        assert read_heads(tmp_path / format).base_model_revision == commit
    # Saved as the heads of another hub model: that commit is not its, so none is recorded.
    model.save_heads(tmp_path / "mirror", format="vllm", base_model_name_or_path="org/mirror")
    assert read_heads(tmp_path / "mirror").base_model_revision is None
    asked = []

    def from_hub(loader):
        def load(name, *args, **kwargs):
            if name in ("org/base", "org/other"):
                asked.append((name, kwargs.get("revision")))
                name = str(tmp_path / "base")
            return loader(name, *args, **kwargs)
        return load

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", from_hub(cls.from_pretrained))
    MedusaModel.from_pretrained(tmp_path / "medusa", backbone="org/base")
    load_medusa("org/base", tmp_path / "medusa", device="cpu")
    assert asked == [("org/base", commit)] * 3  # the heads' loader; load_medusa's weights and tokenizer
    asked.clear()  # another base than the recorded one: its default branch (the commit is not its own)
    MedusaModel.from_pretrained(tmp_path / "medusa", backbone="org/other")
    assert asked == [("org/other", None)]
    asked.clear()  # re-exported onto another hub base: the recorded commit is that base's (none here)
    assert run_cli("--checkpoint", str(tmp_path / "medusa"), "--backbone", "org/other", "--output",
                   str(tmp_path / "out"), "--format", "vllm") == 0
    assert asked == [("org/other", None)] and read_heads(tmp_path / "out").base_model_revision is None
    asked.clear()  # re-exported with the recorded base: its commit stays, and is the one loaded
    assert run_cli("--checkpoint", str(tmp_path / "medusa"), "--backbone", "org/base", "--output",
                   str(tmp_path / "again"), "--format", "vllm") == 0
    assert asked == [("org/base", commit)] and read_heads(tmp_path / "again").base_model_revision == commit


# A fake Hugging Face cache (offline) holding org/base at two commits, `old` and `new`, with refs/main
# at `new` and tag v1 at `old`; each test script below starts with it (run in a subprocess, with
# HF_HUB_CACHE pointing there: huggingface_hub reads the variable when it is imported).
FAKE_HUB = r'''
import os, sys, tempfile
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.heads.export import load_backbone, read_heads
from medusa_liger.train.config import load_config
from medusa_liger.train.tiny import train_tokenizer

root = Path(os.environ["HF_HUB_CACHE"]) / "models--org--base"
old, new = "0a1b" * 10, "9f8e" * 10
tokenizer = train_tokenizer(["def f(x): return x", "The pass statement."] * 4, 300, Path(tempfile.mkdtemp()))
for seed, commit in enumerate((old, new)):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "snapshots" / commit)
    tokenizer.save_pretrained(root / "snapshots" / commit)
(root / "refs").mkdir(parents=True)
(root / "refs" / "main").write_text(new)  # the default branch moved on
(root / "refs" / "v1").write_text(old)
'''


def run_on_a_fake_hub(tmp_path, script: str, *args: str) -> None:
    # ``FAKE_HUB`` then ``script`` in a subprocess (argv[1]: configs/tiny.yaml, then ``args``), which must
    # print "ok".
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "tmp").mkdir()  # the scripts' mkdtemp()s, inside the test's own directory
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path / "tmp"),
                        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (tmp_path / "script.py").write_text(FAKE_HUB + script)
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(root / "configs" / "tiny.yaml"), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


def test_a_backbone_read_from_the_hub_cache_records_its_commit(tmp_path):
    """Not a hand-set ``_commit_hash``: transformers 5.24 no longer sets it, so heads recorded no commit
    and resumes pinned no revision; 5.17 takes one from a local directory inside a hub cache (emulated
    here), which is no hub commit. On the fake hub (main moved on past tag v1): our
    loaders read one commit and record it, the heads keep it, loading the recorded hub name takes v1's
    weights, and a run trained on main before it moved is refused a resume on the new main."""
    run_on_a_fake_hub(tmp_path, r'''
from medusa_liger.train import train
from medusa_liger.train.build import build_tokenizer_and_backbone, fixed_settings
from medusa_liger.train.checkpoint import ResumeError
from tests.train_helpers import SHORT

import re
import transformers

# As transformers 5.17 does (5.24 does not): a commit taken from a path inside a hub cache, a local one too.
from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__
def from_pretrained_like_5_17(cls, name, *args, **kwargs):
    model = from_pretrained(cls, name, *args, **kwargs)
    if found := re.search(r"/snapshots/([0-9a-f]{40})", str(name)):
        model.config._commit_hash = found.group(1)
    return model
transformers.AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained_like_5_17)

assert getattr(load_backbone("org/base").config, "_commit_hash", None) == new
v1 = load_backbone("org/base", revision="v1")
assert v1.config._commit_hash == old
local = root / "snapshots" / old  # a local directory: no hub commit, on any transformers version
assert getattr(load_backbone(local).config, "_commit_hash", None) is None
local_cfg = load_config(sys.argv[1], [f"output_dir={tempfile.mkdtemp()}", f"model.name_or_path={local}",
                                      "train.mode=heads"])
_, backbone = build_tokenizer_and_backbone(local_cfg)
assert "the backbone's hub revision" not in fixed_settings(local_cfg, tokenizer, backbone.config)

cfg = load_config(sys.argv[1], [f"output_dir={tempfile.mkdtemp()}", "model.name_or_path=org/base", "model.revision=v1",
                                "train.mode=heads"])
for on_meta in (False, True):
    _, backbone = build_tokenizer_and_backbone(cfg, on_meta=on_meta)
    assert backbone.config._commit_hash == old, on_meta
    assert fixed_settings(cfg, tokenizer, backbone.config)["the backbone's hub revision"] == old

heads = Path(tempfile.mkdtemp()) / "heads"
MedusaModel.from_backbone(v1, MedusaConfig(num_heads=2, num_layers=1, shared_lm_head=True)).save_heads(
    heads, format="medusa", base_model_name_or_path="org/base")
assert read_heads(heads).base_model_revision == old
loaded = MedusaModel.from_pretrained(heads, backbone="org/base")  # v1's weights, not main's
assert torch.equal(loaded.backbone.lm_head.weight, v1.lm_head.weight)

# A training run on main, then main moves on: its resume is refused, naming the revision that resumes it.
run = [*SHORT, f"output_dir={tempfile.mkdtemp()}", "model.name_or_path=org/base", "train.mode=heads",
       "checkpoint.every=2", "export.formats=[medusa]", "data.eval_fraction=0.0", "heads.num_heads=2"]
(root / "refs" / "main").write_text(old)
train(load_config(sys.argv[1], [*run, "train.steps=2"]))
(root / "refs" / "main").write_text(new)
try:
    train(load_config(sys.argv[1], [*run, "train.steps=3", "train.resume=auto"]))
    raise AssertionError("resumed on another commit")
except ResumeError as error:
    assert f"the backbone's hub revision {old} -> {new} (model.revision={old} loads" in str(error), error
train(load_config(sys.argv[1], [*run, "train.steps=3", "train.resume=auto", f"model.revision={old}"]))
print("ok")
''')


@pytest.mark.parametrize("setting", ["lora.enabled=true", "train.mode=joint"])
def test_a_checkpoint_exports_on_the_hub_commit_it_trained_on(tmp_path, setting):
    """A run on an unpinned hub model whose default branch moved on. With LoRA the checkpoint's export
    merged the adapters into the new revision's weights (a resume refuses that revision); a full joint
    checkpoint holds every backbone parameter, but not the config.json (nor the buffers built from it)
    nor the tokenizer that the export writes beside them: all of them are the trained-on commit's."""
    run_on_a_fake_hub(tmp_path, r'''
from medusa_liger.train.config import save_config
from medusa_liger.train.export_cli import rebuild_backbone

lora = sys.argv[2] == "lora.enabled=true"
(root / "refs" / "main").write_text(old)  # the run trains on main = old
run = Path(tempfile.mkdtemp())
cfg = load_config(sys.argv[1], [f"output_dir={run}", "model.name_or_path=org/base", sys.argv[2]])
save_config(cfg, run / "config.yaml")
step = run / "checkpoints" / "step-000002"
base = load_backbone("org/base")
MedusaModel.from_backbone(base, MedusaConfig(num_heads=2, num_layers=1, shared_lm_head=True)).save_heads(
    step / "heads", format="medusa", base_model_name_or_path="org/base")
(root / "refs" / "main").write_text(new)  # then main moves on
# (LoRA: the adapters would be loaded here, fitting old's weights; joint: every trained parameter)
backbone, _, _ = rebuild_backbone(step, {} if lora else {k: v.detach().clone() for k, v in base.named_parameters()})
assert backbone.config._commit_hash == old, backbone.config._commit_hash
assert torch.equal(backbone.get_input_embeddings().weight, base.get_input_embeddings().weight), "main's weights"
print("ok")
''', setting)


def test_eval_and_generate_take_a_revision_of_a_hub_backbone(tmp_path):
    """eval and generate load a hub backbone at --revision when given (the heads' recorded commit
    otherwise), warn when it is not the commit the heads trained on, record the loaded commit in the
    eval report, and refuse --revision for a local directory (distill's check, now load_causal_lm's)."""
    run_on_a_fake_hub(tmp_path, r'''
import json
import warnings

from medusa_liger.cli import main
from medusa_liger.inference.cli import evaluate_run, load_medusa

heads = Path(tempfile.mkdtemp()) / "heads"
v1 = load_backbone("org/base", revision="v1")
MedusaModel.from_backbone(v1, MedusaConfig(num_heads=2, num_layers=1, shared_lm_head=True)).save_heads(
    heads, format="medusa", base_model_name_or_path="org/base")
main_weights = load_backbone("org/base").lm_head.weight
assert not torch.equal(main_weights, v1.lm_head.weight)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    recorded, _ = load_medusa("org/base", heads, device="cpu")  # the trained-on commit, no word
    same, _ = load_medusa("org/base", heads, device="cpu", revision="v1")  # the same commit by its tag
for model in (recorded, same):
    assert model.backbone.config._commit_hash == old and torch.equal(model.backbone.lm_head.weight, v1.lm_head.weight)
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    moved, _ = load_medusa("org/base", heads, device="cpu", revision="main")
assert any(f"trained on commit {old} of 'org/base'; --revision main loads {new}" in str(w.message) for w in said)
assert moved.backbone.config._commit_hash == new and torch.equal(moved.backbone.lm_head.weight, main_weights)

out = Path(tempfile.mkdtemp())
assert main(["eval", "--heads", str(heads), "--backbone", "org/base", "--revision", "v1", "--num-prompts", "2",
             "--max-new-tokens", "4", "--tree-size", "3", "--device", "cpu", "--output", str(out)]) == 0
assert json.loads((out / "report.json").read_text())["backbone_revision"] == old
assert main(["generate", "--heads", str(heads), "--backbone", "org/base", "--revision", "v1", "--prompt", "def",
             "--max-new-tokens", "3", "--device", "cpu"]) == 0
assert main(["generate", "--heads", str(heads), "--backbone", str(root / "snapshots" / old), "--revision", "v1",
             "--prompt", "def", "--device", "cpu"]) == 2
print("ok")
''')


def test_cli_export_rerun_after_a_kill_removes_its_leftovers(tmp_path):
    # An export killed (kill -9, OOM) mid-write, or between moving the earlier export aside and the new
    # one into place, left its scratch copies beside --output; reruns succeeded but never removed them
    # (each may hold a whole backbone).
    import subprocess
    import sys

    model = make_model(shared=False)
    model.save_heads(tmp_path / "heads", format="medusa")
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "medusa") == 0
    killed = (
        "import os, signal, sys, argparse\n"
        "from pathlib import Path\n"
        "from medusa_liger.heads import cli\n"
        "real = Path.rename\n"
        "def rename(self, target):\n"
        "    if Path(target).name == 'o' and self.name.startswith('.o-export-'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # the earlier export is aside, the new one not yet in place\n"
        "    return real(self, target)\n"
        "Path.rename = rename\n"
        "parser = argparse.ArgumentParser(); cli.add_arguments(parser)\n"
        "cli.run(parser.parse_args(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", killed, "--checkpoint", str(tmp_path / "heads"), "--output",
                           str(tmp_path / "o"), "--format", "medusa", "--overwrite"])
    assert done.returncode == -9
    assert not (tmp_path / "o").exists() and len(list(tmp_path.glob(".o-*"))) == 2  # the old export, the new scratch
    assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "o"), "--format", "medusa") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads", "o"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "medusa_lm_head.safetensors"]


def test_remove_killed_exports_leaves_other_hosts_and_other_outputs(tmp_path, monkeypatch):
    # Host "gpu" must not read another host "gpu-99999"'s scratch (pid 4242) as its own pid 99999, nor output
    # "o-export-gpu-123"'s scratch as output "o"'s of pid 123.
    from medusa_liger.heads import cli

    monkeypatch.setattr(cli.socket, "gethostname", lambda: "gpu")
    other_host = tmp_path / ".o-export-gpu-99999-4242-abcd1234"
    other_output = tmp_path / ".o-export-gpu-123-export-gpu-4242-abcd1234"
    dead = tmp_path / ".o-old-gpu-99999-abcd1234"
    for path in (other_host, other_output, dead):
        path.mkdir()
    monkeypatch.setattr(cli, "_process_alive", lambda pid: pid == 4242)
    cli.remove_killed_exports(tmp_path / "o")
    assert other_host.exists() and other_output.exists() and not dead.exists()
