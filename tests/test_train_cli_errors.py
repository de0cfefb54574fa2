"""`medusa-liger train` on the user's mistakes: one line naming the key, exit 2, no traceback, and as
early as it can be said (before the data and the model load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa_liger.cli import main
from medusa_liger.train import loop
from medusa_liger.train.config import ConfigError, load_config
from tests.train_helpers import SHORT

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the run gets as far as loading the data or the model."""

    def loading(*args, **kwargs):
        raise AssertionError("the error should have stopped the run before loading the data and the model")

    monkeypatch.setattr(loop, "build_tokenizer_and_backbone", loading)
    monkeypatch.setattr(loop, "load_examples", loading)


def config_error(capsys, *argv: str) -> str:
    """The one stderr line of `medusa-liger train ARGV`, which must exit 2 with a config error."""
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medusa-liger train: config error: ") and err.count("\n") == 1, err
    return err


def test_flags_and_overrides_mix_in_any_order(capsys):
    # An override after --print-config was "unrecognized arguments".
    for argv in ([TINY, "--print-config", "train.steps=5", "heads.num_heads=2"],
                 ["--print-config", TINY, "train.steps=5", "heads.num_heads=2"],
                 [TINY, "train.steps=5", "--print-config", "heads.num_heads=2"]):
        assert main(["train", *argv]) == 0
        out = capsys.readouterr().out
        assert "steps: 5" in out and "num_heads: 2" in out


def test_usage_shows_overrides_as_optional(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "config [KEY=VALUE ...]" in err
    assert err.rstrip().endswith("the following arguments are required: config")  # not ", KEY=VALUE"


@pytest.mark.parametrize("override", ["data.paths=[a.jsonl", "name=@foo", "train.lr={"])
def test_malformed_yaml_override(capsys, override):
    assert f"override {override!r}" in config_error(capsys, TINY, override, "--print-config")


def test_config_file_with_a_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: {\n")
    assert "is not valid YAML" in config_error(capsys, str(bad))


def test_a_config_directory(capsys):
    assert "is a directory" in config_error(capsys, str(ROOT / "configs"))


def test_cuda_without_cuda_is_a_config_error_at_startup(capsys, monkeypatch, no_loading):
    # Was a ValueError traceback from resolve_device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "train.device: got 'cuda', but CUDA is not available on this machine: use cpu or auto" in config_error(
        capsys, TINY, "train.device=cuda", "logging.wandb=disabled")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "train.device: got 'cuda:2', but this machine has 2 CUDA device(s): cuda:0 to cuda:1" in config_error(
        capsys, TINY, "train.device=cuda:2", "logging.wandb=disabled")


def test_unloadable_model_name_is_a_config_error(tmp_path, capsys):
    # Offline (conftest) with nothing cached, like a typo: an OSError traceback from from_pretrained before.
    err = config_error(capsys, TINY, "model.name_or_path=someorg/somemodel", f"output_dir={tmp_path}",
                       "logging.wandb=disabled")
    assert "model.name_or_path=someorg/somemodel cannot be loaded" in err


def test_model_path_mistakes_are_config_errors(tmp_path, capsys, monkeypatch):
    """Heads as the model failed in transformers; runs/nope (runs/ exists) went to the hub unannounced."""
    import huggingface_hub
    from transformers import AutoTokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    (tmp_path / "runs" / "heads").mkdir(parents=True)
    (tmp_path / "runs" / "heads" / "config.json").write_text('{"medusa_num_heads": 2}')
    err = config_error(capsys, TINY, "model.name_or_path=runs/heads", "logging.wandb=disabled")
    assert ("model.name_or_path must be 'tiny', a hub name (org/name) or a model directory, got 'runs/heads': "
            "'runs/heads' holds Medusa heads, not a backbone") in err
    assert main(["train", TINY, "model.name_or_path=runs/nope", "logging.wandb=disabled", "output_dir=out"]) == 2
    err = capsys.readouterr().err
    assert "note: 'runs/nope' is no local directory, though runs/ (holding ['heads']) is one; asking the hub" in err
    assert ("model.name_or_path=runs/nope cannot be loaded (runs/ (holding ['heads']) is a local directory: a "
            "mistyped path?): We couldn't connect") in err


def test_model_errors_name_the_key():
    cfg = load_config(TINY, ["model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="model.name_or_path=tiny cannot be loaded: no such model"):
        with loop.model_errors(cfg):
            raise OSError("no such\nmodel")
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2: FlashAttention2 has"):
        with loop.model_errors(cfg):
            raise ImportError("FlashAttention2 has been toggled on, but it cannot be used")
    with pytest.raises(ValueError, match="a bug") as error:  # not about attention: a bug, left as it is
        with loop.model_errors(cfg):
            raise ValueError("a bug")
    assert not isinstance(error.value, ConfigError)
    with pytest.raises(ConfigError, match="^lora.target_modules"):  # said already: not re-labelled as attention's
        with loop.model_errors(cfg):
            raise ConfigError("lora.target_modules=[attention]: no attention module")


def test_wandb_online_without_an_api_key_fails_before_loading(tmp_path, capsys, monkeypatch, no_loading):
    wandb = pytest.importorskip("wandb")
    calls = []
    monkeypatch.setattr(wandb, "login", lambda **kwargs: calls.append(kwargs) or False)
    err = config_error(capsys, TINY, "logging.wandb=online", f"output_dir={tmp_path}")
    assert "logging.wandb=online but wandb has no API key" in err
    assert calls == [{"prompt": False, "verify": False}]  # never a prompt, never the network


def test_tiny_backbone_takes_attn_implementation(tmp_path):
    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    cfg = load_config(TINY, [*SHORT, f"output_dir={tmp_path}", "model.attn_implementation=eager"])
    _, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    assert backbone.config._attn_implementation == "eager"  # was silently the default (sdpa)
    if torch.cuda.is_available():
        return
    cfg.model.attn_implementation = "flash_attention_2"  # valid, but not on this machine
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2: "):
        build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))


def test_print_config_into_a_closed_pipe():
    # `--print-config | head` gave a BrokenPipeError traceback.
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "medusa_liger", "train", TINY, "--print-config"], stdout=write,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=120)
    os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_model_directory_without_its_tokenizer_is_a_config_error(tmp_path, family):
    """model.save_pretrained without the tokenizer: transformers built Qwen2 an empty tokenizer (every text
    encoded to nothing, and the run trained on that, exit 0) and blamed a missing package for Llama's."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from medusa_liger.heads.export import BackboneLoadError
    from medusa_liger.inference.cli import load_causal_lm
    from medusa_liger.train.build import build_tokenizer_and_backbone
    from tests.train_helpers import TINY

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_class, model_class = classes[family]
    model_class(config_class(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=300)).save_pretrained(str(tmp_path / "model"))
    cfg = load_config(TINY, [*SHORT, f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tmp_path / 'model'}"])
    # Both families: the files are named (Llama's error blamed sentencepiece or tiktoken), before the weights load.
    with pytest.raises(ConfigError, match=rf"model.name_or_path={tmp_path / 'model'}: no usable tokenizer: .*: no "
                                          r"tokenizer there \(tokenizer.json, tokenizer_config.json ...\); are its "
                                          r"tokenizer files .* missing\?"):
        build_tokenizer_and_backbone(cfg, lambda: [])
    with pytest.raises(BackboneLoadError, match="could not be loaded: .*: no tokenizer there"):
        load_causal_lm(str(tmp_path / "model"), device="cpu")
    # A tokenizer of special tokens only (what transformers builds for Qwen2 from the config alone) is refused too.
    from transformers import AutoTokenizer

    from medusa_liger.records import check_tokenizer

    # A tokenizer_config.json alone (a partial copy): Qwen2's then holds only its added tokens, some of them
    # not special (Qwen2.5's <tool_call>), and encodes any text to nothing.
    added = {str(i): {"content": token, "special": i < 2, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, token in enumerate(["<|endoftext|>", "<|im_end|>", "<tool_call>"])}
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"}))
    if family == "qwen2":
        with pytest.raises(ValueError, match=r"encodes text to no token of a vocabulary"):
            check_tokenizer(AutoTokenizer.from_pretrained(str(tmp_path / "model")), "model")


def test_token_ids_past_the_embedding_are_a_config_error():
    """A tokenizer that is not the model's: the first forward failed with an IndexError (a device-side
    assert on a GPU) after the whole dataset was tokenized."""
    from medusa_liger.train.build import check_token_range
    from tests.train_helpers import TINY

    backbone = torch.nn.Module()
    backbone.get_input_embeddings = lambda: torch.nn.Embedding(600, 4)
    cfg = load_config(TINY)
    check_token_range(cfg, torch.tensor([[0, 599]]), backbone)  # padded vocabularies leave rows unused: fine
    with pytest.raises(ConfigError, match="gives token ids up to 773, but the model's embedding has 600 rows"):
        check_token_range(cfg, torch.tensor([[1, 773]]), backbone)
    with pytest.raises(ConfigError, match="up to 600, but the model's embedding has 600 rows"):  # one past the last
        check_token_range(cfg, torch.tensor([[600]]), backbone)


def test_tokenizers_of_other_vocabularies_are_not_taken_for_missing_ones():
    """The emptiness probe encodes English letters and digits: a Cyrillic vocabulary gives only unk tokens,
    and a lowercase one without an unk token raises; both are real tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medusa_liger.records import check_tokenizer

    letters = "абвгдежзийклмнопрстуфхцчшщъыьэюя"
    cyrillic = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", "</s>", *letters])}, unk_token="<unk>"))
    cyrillic.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=cyrillic, unk_token="<unk>", eos_token="</s>"), "cyrillic")
    lowercase = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["</s>", *"abcdefghijklmnopqrstuvwxyz"])}))
    lowercase.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=lowercase, eos_token="</s>"), "lowercase")


def test_a_run_directory_in_use_by_another_run_is_refused_before_anything_changes(tmp_path, capsys, monkeypatch,
                                                                                   no_loading):
    """A second launch into a run directory that a run is training in deleted that run's checkpoints (and
    its save in progress) and replaced its metrics; the first run then crashed. The lock's holder stands
    in for the other run; said once under torchrun (every rank raises it), and released after a run."""
    import fcntl

    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with open(out / ".lock", "w") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        holder.write("12345\n")
        holder.flush()
        err = config_error(capsys, TINY, f"output_dir={out}", *SHORT)
        assert f"output_dir {str(out)!r} is in use by another training run (pid 12345): wait for it to end" in err
        monkeypatch.setenv("RANK", "1")  # another rank of the same launch: the same refusal, not said again
        assert main(["train", TINY, f"output_dir={out}", *SHORT]) == 2 and capsys.readouterr().err == ""
    assert (out / "checkpoints" / "step-000002").is_dir() and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(AssertionError, match="before loading"):  # released: the next run gets as far as loading
        loop.train(load_config(TINY, [*SHORT, f"output_dir={out}"]))


def test_an_interrupt_is_said_by_the_first_rank_only(capsys, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", TINY, *SHORT]) == 130
        assert ("medusa-liger train: interrupted; rerun with train.resume=auto" in capsys.readouterr().err) is said


@pytest.mark.parametrize("errno_name", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_run_directory_on_a_filesystem_without_locks_is_not_taken_for_one_in_use(tmp_path, capsys, monkeypatch,
                                                                                     errno_name):
    """flock fails with ENOLCK on NFS without lockd, ENOSYS on Lustre mounted noflock: no other run holds the
    directory, and the run was refused as though one did (naming the pid an earlier run left in .lock)."""
    import errno
    import fcntl

    from medusa_liger.train.checkpoint import run_dir_lock

    def no_locks(fd, operation):
        raise OSError(getattr(errno, errno_name), "no locks on this filesystem")

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("4242\n")  # an earlier run's, ended
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with run_dir_lock(out):
        pass
    assert "takes no lock" in capsys.readouterr().err
