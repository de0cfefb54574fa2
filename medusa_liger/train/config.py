"""The training configuration: a typed dataclass schema, YAML loading, dotted overrides, validation.

A config file is YAML with the sections below (every key optional; defaults shown in the
dataclasses). On the command line, ``section.key=value`` overrides the file; the value is parsed as
YAML, so ``train.lr=1e-3``, ``heads.shared_lm_head=true`` and ``data.paths=[a.jsonl,b.jsonl]`` work.

Everything is checked before any work starts: an unknown key, a value of the wrong type or an
impossible value raises ``ValueError`` naming the dotted key, the value found and what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medusa_liger.devices import is_device_name
from medusa_liger.dtype_names import DTYPE_NAMES
from medusa_liger.run_layout import user_path


# What transformers takes as attn_implementation (besides a hub kernel, "org/name[@rev][:fn]"), checked
# here so a typo stops before the model loads (the tiny backbone would otherwise fail only once built).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                        "flash_attention_4", "paged|eager")
HUB_KERNEL = re.compile(r"[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?")  # transformers' is_kernel pattern


class ConfigError(ValueError):
    """A setting that passed validation but does not fit what the run finds (e.g. LoRA target modules
    the backbone does not have): ``medusa-liger train`` reports it as a config error, exit 2."""


@dataclass
class TinyModelConfig:
    """Shape of the tiny Llama-architecture backbone built from scratch (``model.name_or_path: tiny``)."""

    hidden_size: int = 192
    num_layers: int = 3
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 1024  # size the local BPE tokenizer is trained to
    max_position_embeddings: int = 1024


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # "tiny", a local directory or a hub name
    revision: str | None = None  # of a hub model: a branch, tag or commit hash (null: its default branch)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as loaded
    patch: bool = False  # swap in the fused kernels (medusa_liger.patching)
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flash_attention_2"; null: transformers' default
    trust_remote_code: bool = False


@dataclass
class HeadsConfig:
    num_heads: int = 5
    num_layers: int = 1
    shared_lm_head: bool = False
    decay: float = 0.8  # head k's loss weight is decay**k
    # The fused loss skips rows whose target is ignored (masked prompts): one host sync per loss.
    skip_ignored_targets: bool = True
    # The loss takes each head's gradients before the next head runs: one head's activations alive.
    head_by_head: bool = True
    # What head k learns: "labels", the data's token k + 2 ahead; "backbone", the backbone's own
    # distribution of that token (KL; its output k + 1 positions on, from the same forward, detached).
    targets: Literal["labels", "backbone"] = "labels"


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 32
    alpha: float = 16.0
    dropout: float = 0.05
    # "all-linear" or module names (one name stands for a one-item list); each must name a module.
    target_modules: list[str] | str = "all-linear"


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=lambda: ["medusa_liger/data/pydoc_chat.jsonl"])
    split: str = "train"  # split of a hub dataset
    format: Literal["auto", "openai", "sharegpt", "text"] = "auto"
    seq_len: int = 512
    loss_on: Literal["assistant", "all"] = "assistant"
    long_examples: Literal["truncate", "split"] = "split"
    chat_template: Literal["auto", "builtin"] = "auto"  # auto: the tokenizer's, if it has one
    on_error: Literal["fail", "skip"] = "fail"  # malformed lines and invalid records
    eval_fraction: float = 0.0  # held-out packed rows, evaluated at the end
    max_examples: int | None = None
    num_proc: int = 4  # tokenization processes for large datasets (needs `datasets`)
    num_proc_min_examples: int = 20000  # below this, tokenize in-process
    cache_dir: str | None = None  # default: {output_dir}/cache


@dataclass
class LambdaConfig:
    """Weight of the heads loss in joint mode: value * ramp(step), ramp in [0, 1]."""

    value: float = 0.2
    schedule: Literal["constant", "linear", "sine"] = "constant"
    ramp_steps: int = 0  # linear/sine: steps to reach `value` (counted after any heads-only stage)


@dataclass
class TrainConfig:
    mode: Literal["heads", "joint"] = "heads"  # Medusa-1 (frozen backbone) or Medusa-2 (joint)
    seed: int = 0
    steps: int = 1000  # optimizer steps
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4  # backbone (full or LoRA) learning rate
    heads_lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak
    max_grad_norm: float | None = 1.0
    # Evaluate the held-out rows (data.eval_fraction) every this many optimizer steps, logged with the
    # step's metrics as eval/...; 0: only once, at the end (the run's summary has that one either way).
    # Without held-out rows (data.eval_fraction: 0) there is nothing to evaluate: the run says so.
    eval_every: int = 0
    heads_only_steps: int = 0  # joint mode: first stage that trains only the heads
    lm_loss_weight: float = 1.0
    # Joint mode: the backbone's own loss, "ce" against the labels or "kl" from the original backbone:
    # Medusa-2's self-distillation. One more backbone forward per step, under no_grad. With lora.enabled
    # the teacher is the backbone with its adapters off; without, a frozen copy of the backbone as
    # loaded (one more copy of its weights in model.dtype, sharded like it under train.fsdp).
    lm_loss: Literal["ce", "kl"] = "ce"
    # Temperature tau of every KL term (lm_loss: kl, heads.targets: backbone): both distributions at
    # logits / tau, the divergence times tau^2 (Hinton's scaling); 1: plain KL.
    kl_temperature: float = 1.0
    # Direction of those KL terms: "forward", KL(teacher || student), mass-covering; "reverse",
    # KL(student || teacher), mode-seeking (the student concentrates on the teacher's likeliest tokens).
    kl_direction: Literal["forward", "reverse"] = "forward"
    # beta in (0, 1) turns those terms into the generalized Jensen-Shannon divergence
    # beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student
    # (0.5: symmetric JSD; bounded, between the two KL directions); null: KL (kl_direction).
    jsd_beta: float | None = None
    # Label smoothing eps in [0, 1) of the cross-entropy terms (heads.targets: labels, lm_loss: ce), as
    # PyTorch's: the target weighs 1 - eps + eps / V, every other token eps / V.
    label_smoothing: float = 0.0
    # z-loss factor z >= 0: every loss term adds z * lse^2 per target (PaLM: 1e-4); with KL terms only
    # at kl_temperature 1.
    z_loss: float = 0.0
    heads_lambda: LambdaConfig = field(default_factory=LambdaConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # Dtype of the parameters built here and trained: the Medusa heads and the LoRA adapters (their
    # master copy, which AdamW updates). float32 keeps the small updates that bf16's 8 mantissa bits
    # round away, on any backbone dtype; auto: model.dtype. The backbone's own weights stay in model.dtype.
    master_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # Under torchrun: each rank keeps AdamW's state (2x the trainable parameters, in master_dtype) for
    # about 1/world_size of the trainable tensors and broadcasts its updated tensors after the step
    # (ZeRO stage 1). Same updates; no effect in a single process.
    shard_optimizer: bool = False
    # Under torchrun: shard the parameters, gradients and AdamW state of the whole model over the ranks
    # (FSDP2, one unit per decoder layer; see fsdp.py), for backbones that do not fit one GPU. Implies
    # shard_optimizer. Same math as the replicated mode; checkpoints hold whole tensors either way.
    fsdp: bool = False
    # Under train.fsdp: the dtype FSDP casts each unit's parameters to before gathering them, which the
    # forward and backward then compute with; gradients are reduced in float32 onto the shards, which
    # AdamW updates in their own dtype. bfloat16 halves the gathers' traffic and the gathered layers'
    # memory of a float32 backbone (torchtitan's default); activations are then bf16 throughout, the
    # residual stream too, as in a bf16 model. null: parameters are gathered in their own dtype, and
    # autocast (train.precision) casts them op by op.
    fsdp_param_dtype: Literal["bfloat16", "float16"] | None = None
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    threads: int | None = None  # torch CPU threads
    resume: str = "none"  # none, auto (newest checkpoint in output_dir) or a checkpoint directory


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (the last step always has one); 0: no checkpoints
    keep: int = 2


@dataclass
class LoggingConfig:
    every: int = 10  # progress-bar refresh and console lines
    wandb: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "medusa-liger"
    run_name: str | None = None
    progress: bool = True


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["medusa", "vllm"])
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: model.dtype (the serving dtype)
    backbone: Literal["auto", "always", "never"] = "auto"  # auto: when trained or built from scratch


@dataclass
class Config:
    name: str = "run"
    output_dir: str | None = None  # default: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Typed construction from plain dicts
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a finite number"
    return getattr(tp, "__name__", str(tp))


def _yaml_bool_hint(value: Any) -> str:
    """YAML reads yes/no/on/off as booleans: say so where a string was expected and one came."""
    return " (YAML reads yes/no/on/off as true/false: quote a string, e.g. key='off')" if isinstance(value, bool) else ""


def _yaml_string_hint(value: Any) -> str:
    """Where any string would do: YAML's booleans (``_yaml_bool_hint``), and 2024 or 1.0 read as numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # (not the text as written: 1.10 -> 1.1)
        return " (YAML reads it as a number: quote the string as written, e.g. key='1.10')"
    return _yaml_bool_hint(value)


def _convert(key: str, value: Any, tp: Any, one_item_lists: bool = True) -> Any:
    """``value`` checked against (and lightly coerced to) the annotation ``tp``; ValueError names key.
    ``one_item_lists``: a string stands for a one-item list of strings (off inside unions, where
    ``str | list[str]`` keeps a string as it is)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out: every key optional
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(key, value, option, one_item_lists=False)
            except ValueError:
                continue
        hint = _yaml_string_hint(value) if str in typing.get_args(tp) else ""
        raise ValueError(f"{key} must be {_type_name(tp)}, got {value!r}{hint}")
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, str) and DTYPE_NAMES.get(value) in options:
            return DTYPE_NAMES[value]  # bf16 -> bfloat16, as the CLIs' --dtype accepts
        if value not in options:
            raise ValueError(f"{key} must be {_type_name(tp)}, got {value!r}{_yaml_bool_hint(value)}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if one_item_lists and item_type is str and isinstance(value, str):
            value = [value]  # data.paths=chats.jsonl: one item
        if not isinstance(value, list):
            raise ValueError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return [_convert(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{key} must be null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads "1e-3" (no dot) as a string; accept numeric strings for floats.
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # No setting means anything at inf or nan (a rate, a weight): it would train NaNs to the end.
        if number is None or not math.isfinite(number):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}{_yaml_string_hint(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the schema, not input


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key '{prefix}{key}' (known keys here: {', '.join(known)})")
        kwargs[key] = _convert(prefix + key, value, hints[key])
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Validation of values (after types are right)
# ----------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check cross-field and range constraints; raise ValueError naming the key."""
    t, m, d, h = cfg.train, cfg.model.tiny, cfg.data, cfg.heads
    _require(h.num_heads >= 1, "heads.num_heads", h.num_heads, ">= 1")
    _require(h.num_layers >= 1, "heads.num_layers", h.num_layers, ">= 1")
    _require(0.0 < h.decay <= 1.0, "heads.decay", h.decay, "in (0, 1]")
    _require(m.hidden_size >= 8, "model.tiny.hidden_size", m.hidden_size, ">= 8")
    _require(m.num_layers >= 1, "model.tiny.num_layers", m.num_layers, ">= 1")
    _require(m.num_attention_heads >= 1 and m.hidden_size % m.num_attention_heads == 0,
             "model.tiny.num_attention_heads", m.num_attention_heads, f"a divisor of hidden_size={m.hidden_size}")
    _require(m.num_key_value_heads >= 1 and m.num_attention_heads % m.num_key_value_heads == 0,
             "model.tiny.num_key_value_heads", m.num_key_value_heads,
             f"a divisor of num_attention_heads={m.num_attention_heads}")
    _require(m.intermediate_size >= 1, "model.tiny.intermediate_size", m.intermediate_size, ">= 1")
    _require(m.vocab_size >= 300, "model.tiny.vocab_size", m.vocab_size, ">= 300 (256 bytes + merges + specials)")
    name = cfg.model.name_or_path
    if name != "tiny":  # a missing or non-model directory, said before the data loads (hub names pass)
        from medusa_liger.heads.export import BackboneLoadError, check_backbone_path

        try:
            check_backbone_path(name)
        except BackboneLoadError as error:
            raise ValueError(f"model.name_or_path must be 'tiny', a hub name (org/name) or a model directory, "
                             f"got {name!r}: {error}") from None
    if cfg.model.revision is not None:  # (transformers ignores a revision for a local directory)
        _require(name != "tiny" and not user_path(name).is_dir(), "model.revision", cfg.model.revision,
                 f"null for {'the tiny model' if name == 'tiny' else 'a local model directory'} (a revision picks "
                 "among a hub model's versions)")
        _require(isinstance(cfg.model.revision, str) and cfg.model.revision.strip() != "", "model.revision",
                 cfg.model.revision, "a branch, tag or commit hash")
    attn = cfg.model.attn_implementation
    _require(attn is None or attn in ATTN_IMPLEMENTATIONS or HUB_KERNEL.fullmatch(attn) is not None,
             "model.attn_implementation", attn,
             f"null, one of {', '.join(ATTN_IMPLEMENTATIONS)} or a hub kernel (org/name)")
    if name == "tiny":
        _require(m.max_position_embeddings >= d.seq_len, "model.tiny.max_position_embeddings",
                 m.max_position_embeddings, f">= data.seq_len={d.seq_len}")
    _require(cfg.lora.r >= 1, "lora.r", cfg.lora.r, ">= 1")
    _require(cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "> 0")
    _require(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", cfg.lora.dropout, "in [0, 1)")
    _require(not (cfg.lora.enabled and t.mode != "joint"), "lora.enabled", cfg.lora.enabled,
             "false unless train.mode is 'joint' (LoRA trains the backbone)")
    _require(t.lm_loss == "ce" or t.mode == "joint", "train.lm_loss", t.lm_loss,
             "'ce' unless train.mode is 'joint' ('kl' is the backbone's loss, which only joint mode trains)")
    _require(math.isfinite(t.kl_temperature) and t.kl_temperature > 0, "train.kl_temperature", t.kl_temperature,
             "a finite number > 0")
    _require(t.kl_temperature == 1.0 or t.lm_loss == "kl" or h.targets == "backbone", "train.kl_temperature",
             t.kl_temperature, "1.0 unless train.lm_loss is 'kl' or heads.targets is 'backbone' (no KL term else)")
    _require(t.kl_direction == "forward" or t.lm_loss == "kl" or h.targets == "backbone", "train.kl_direction",
             t.kl_direction, "'forward' unless train.lm_loss is 'kl' or heads.targets is 'backbone' (no KL term else)")
    _require(t.jsd_beta is None or (not isinstance(t.jsd_beta, bool) and 0.0 < t.jsd_beta < 1.0), "train.jsd_beta",
             t.jsd_beta, "null or a number in (0, 1) (0 and 1 give a zero divergence: use train.kl_direction)")
    _require(t.jsd_beta is None or t.lm_loss == "kl" or h.targets == "backbone", "train.jsd_beta", t.jsd_beta,
             "null unless train.lm_loss is 'kl' or heads.targets is 'backbone' (no divergence term else)")
    _require(t.jsd_beta is None or t.kl_direction == "forward", "train.kl_direction", t.kl_direction,
             "'forward' with train.jsd_beta (the JSD has no direction)")
    _require(math.isfinite(t.label_smoothing) and 0.0 <= t.label_smoothing < 1.0, "train.label_smoothing",
             t.label_smoothing, "a number in [0, 1)")
    _require(t.label_smoothing == 0.0 or (t.lm_loss == "ce" and h.targets == "labels"), "train.label_smoothing",
             t.label_smoothing, "0 unless train.lm_loss is 'ce' and heads.targets is 'labels' (KL terms have no "
             "labels)")
    _require(math.isfinite(t.z_loss) and t.z_loss >= 0.0, "train.z_loss", t.z_loss, "a number >= 0")
    _require(t.z_loss == 0.0 or t.kl_temperature == 1.0 or not (t.lm_loss == "kl" or h.targets == "backbone"),
             "train.z_loss", t.z_loss, "0 unless train.kl_temperature is 1 when a loss term is a divergence")
    _require(len(d.paths) >= 1, "data.paths", d.paths, "a non-empty list of files or hub dataset names")
    _require(d.seq_len >= h.num_heads + 2, "data.seq_len", d.seq_len, f">= heads.num_heads + 2 = {h.num_heads + 2}")
    _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", d.eval_fraction, "in [0, 1)")
    _require(d.max_examples is None or d.max_examples >= 1, "data.max_examples", d.max_examples, ">= 1 or null")
    _require(d.num_proc >= 1, "data.num_proc", d.num_proc, ">= 1")
    _require(t.steps >= 1, "train.steps", t.steps, ">= 1")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0: evaluate only at the end)")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, ">= 1")
    _require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    _require(t.lr >= 0, "train.lr", t.lr, ">= 0")
    _require(t.heads_lr > 0, "train.heads_lr", t.heads_lr, "> 0")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas,
             "two numbers in [0, 1)")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0 (capped at the steps of a stage)")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
    _require(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm, "> 0 or null")
    _require(0 <= t.heads_only_steps < t.steps, "train.heads_only_steps", t.heads_only_steps,
             f"in [0, train.steps={t.steps})")
    _require(t.heads_only_steps == 0 or t.mode == "joint", "train.heads_only_steps", t.heads_only_steps,
             "0 unless train.mode is 'joint'")
    _require(t.lm_loss_weight >= 0, "train.lm_loss_weight", t.lm_loss_weight, ">= 0")
    _require(t.heads_lambda.value >= 0, "train.heads_lambda.value", t.heads_lambda.value, ">= 0")
    _require(t.heads_lambda.ramp_steps >= 0, "train.heads_lambda.ramp_steps", t.heads_lambda.ramp_steps, ">= 0")
    ramped = t.heads_lambda.schedule != "constant"
    _require(ramped == (t.heads_lambda.ramp_steps > 0), "train.heads_lambda.ramp_steps", t.heads_lambda.ramp_steps,
             f">= 1 with train.heads_lambda.schedule={t.heads_lambda.schedule} (the steps of its ramp)" if ramped else
             "0 with train.heads_lambda.schedule=constant (no ramp; use linear or sine)")
    _require(t.mode == "joint" or not ramped, "train.heads_lambda.schedule", t.heads_lambda.schedule,
             "'constant' unless train.mode is 'joint' (lambda weighs the heads loss of joint mode only; heads mode "
             "trains the heads at weight 1)")
    _require(not (t.mode == "joint" and t.lm_loss_weight == 0 and t.heads_lambda.value == 0), "train.lm_loss_weight",
             t.lm_loss_weight, "> 0 when train.heads_lambda.value is 0 in joint mode (else nothing trains)")
    _require(not (t.mode == "joint" and t.heads_lambda.value == 0 and t.heads_only_steps == 0),
             "train.heads_lambda.value", t.heads_lambda.value,
             "> 0 in joint mode without a heads-only stage (train.heads_only_steps); 0 trains no head")
    _require(-(2**63) <= t.seed < 2**64, "train.seed", t.seed, "an integer in [-2**63, 2**64) (torch's seed range)")
    _require(t.fsdp_param_dtype is None or t.fsdp, "train.fsdp_param_dtype", t.fsdp_param_dtype,
             "null unless train.fsdp is true (it sets the dtype FSDP gathers parameters in)")
    _require(t.fsdp_param_dtype != "float16" or cfg.lora.enabled or t.mode != "joint", "train.fsdp_param_dtype",
             t.fsdp_param_dtype, "bfloat16 or null when the full backbone trains: its float16 gradients would "
             "underflow without loss scaling, which this trainer does not do")
    _require(is_device_name(t.device, allow_auto=True), "train.device", t.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    _require(t.threads is None or t.threads >= 1, "train.threads", t.threads, ">= 1 or null")
    # float16 weights that train need loss scaling, which this trainer does not do: AdamW's eps (1e-8)
    # is 0 in float16, so a zero gradient updates to 0/0 = NaN at the first step.
    master = cfg.model.dtype if t.master_dtype == "auto" else t.master_dtype
    _require(master != "float16", "train.master_dtype", t.master_dtype,
             "float32 or bfloat16 (or auto with model.dtype not float16): float16 weights do not train without "
             "loss scaling, which this trainer does not do")
    _require(not (t.mode == "joint" and not cfg.lora.enabled and cfg.model.dtype == "float16"), "model.dtype",
             cfg.model.dtype, "float32 or bfloat16 when the full backbone trains (train.mode=joint without LoRA): "
             "float16 weights do not train without loss scaling, which this trainer does not do")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, ">= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, ">= 1")
    _require(cfg.logging.every >= 1, "logging.every", cfg.logging.every, ">= 1")
    # A trained backbone lives on in the checkpoints (export --checkpoint rebuilds it); a tiny one that only
    # the heads trained on (heads mode) is in none of them.
    lost = (name == "tiny" and t.mode == "heads") or (t.mode == "joint" and cfg.checkpoint.every == 0)
    _require(not (cfg.export.backbone == "never" and lost), "export.backbone", cfg.export.backbone,
             "'auto' or 'always' for a backbone built here with train.mode=heads, or trained without checkpoints "
             "(checkpoint.every=0): it would be saved nowhere")
    _require(bool(cfg.export.formats) or cfg.checkpoint.every > 0, "export.formats", cfg.export.formats,
             "at least one of 'medusa', 'vllm' when checkpoint.every=0 (the trained heads would be saved nowhere)")
    for i, fmt in enumerate(cfg.export.formats):
        _require(fmt in ("medusa", "vllm"), f"export.formats[{i}]", fmt, "'medusa' or 'vllm'")
    if t.resume not in ("none", "auto"):
        # A checkpoint path is checked now, not after minutes of loading the model and the data.
        from medusa_liger.train.checkpoint import STATE_FILE

        _require((Path(t.resume) / STATE_FILE).is_file(), "train.resume", t.resume,
                 f"'none', 'auto' or a checkpoint directory (with {STATE_FILE} in it)")
    return cfg


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (``_UniqueKeyLoader``)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping. PyYAML keeps the last one
    silently: a second ``train:`` section replaced the whole first one (its other keys back at their
    defaults), a second ``lr:`` the first value, with no word. (Merge keys, ``<<``, still override.)"""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # (an unhashable key: SafeLoader's own error says so)
                    continue
                if duplicate:
                    raise _DuplicateKeyError("while constructing a mapping", node.start_mark,
                                             f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(stream) -> Any:
    """``yaml.safe_load``, refusing duplicate keys (``_UniqueKeyLoader``)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The one-line gist of a YAML syntax error (its str() spans several lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key part")
    try:
        return parts, _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        hint = ("give each key once" if isinstance(error, _DuplicateKeyError) else
                "close its brackets" if raw.lstrip()[:1] in "[{" else f"quote a string: {key.strip()}=\"'{raw}'\"")
        raise ValueError(f"override {text!r}: the value of {key.strip()} is not valid YAML "
                         f"({_yaml_problem(error)}); {hint}") from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set every dotted override in the nested dict ``values`` (in place) and return it."""
    for text in overrides:
        parts, value = parse_override(text)
        node = values
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:  # (an empty section in the file)
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: '{'.'.join(parts[: depth + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return values


def config_from_dict(values: dict[str, Any]) -> Config:
    """A validated Config from a nested dict (unknown keys, types and ranges all checked)."""
    return validate(_expand_home(_build(Config, values)))


def _expand_home(cfg: Config) -> Config:
    """``~`` expanded once, in every path-valued key, so what is validated is what the run opens
    (nothing else expands it: ``output_dir=~/run`` would make a directory named ``~``). A hub name
    never starts with ``~``, so model and data names pass unchanged."""
    home = os.path.expanduser
    cfg.output_dir = cfg.output_dir and home(cfg.output_dir)
    cfg.model.name_or_path = home(cfg.model.name_or_path)
    cfg.data.paths = [home(p) for p in cfg.data.paths]
    cfg.data.cache_dir = cfg.data.cache_dir and home(cfg.data.cache_dir)
    cfg.train.resume = home(cfg.train.resume)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate.

    ``name`` defaults to the file's stem and ``output_dir`` to ``runs/<name>``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            examples = ", ".join(str(p) for p in sorted(path.glob("*.yaml"))[:3]) or "a .yaml file"
            raise ValueError(f"config file {str(path)!r} is a directory: give a YAML file (e.g. {examples})")
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            with path.open(encoding="utf-8") as f:
                loaded = _load_yaml(f)
        except yaml.YAMLError as error:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a YAML mapping at the top level")
        values = loaded or {}
        values.setdefault("name", path.stem)
    apply_overrides(values, list(overrides or []))
    cfg = config_from_dict(values)
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / cfg.name)
    # A run directory that cannot be made (a file on its path) fails here, not after the model loads.
    existing = next((p for p in (Path(cfg.output_dir), *Path(cfg.output_dir).parents) if p.exists()), None)
    _require(existing is None or existing.is_dir(), "output_dir", cfg.output_dir,
             f"a directory or a path that can become one ({str(existing)!r} is not a directory)")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    with Path(path).open("w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
