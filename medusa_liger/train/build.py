"""Everything the loop needs, built from a Config: device, tokenizer, backbone, Medusa model, optimizer.

* Backbone: ``model.name_or_path: tiny`` builds the embedded default (``tiny.py``: a tokenizer
  trained on the training texts, cached in ``{output_dir}/tokenizer``, and a random Llama); any
  other value is a local directory or hub name for ``AutoModelForCausalLM``. Optionally patched
  with our fused kernels (``model.patch``), wrapped in LoRA adapters (``lora.enabled``), and
  gradient-checkpointed.
* Mixed precision: the backbone keeps ``model.dtype``; the parameters built here and trained (the
  Medusa heads, the LoRA adapters) are kept in ``train.master_dtype`` (float32 by default), so
  AdamW updates an fp32 master copy; on CUDA the forward runs under bf16 autocast (``autocast_dtype``).
* Optimizer: AdamW over parameter groups ``heads`` (lr ``train.heads_lr``) and ``backbone``
  (lr ``train.lr``; the full backbone or only its LoRA adapters), each split into a decayed part
  (matrices) and an undecayed part (biases, norm weights).
* Schedule: linear warmup then cosine decay to ``min_lr_ratio`` of the peak. The backbone groups
  stay at 0 through the heads-only first stage and start their own warmup when it ends.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from medusa_liger.devices import parse_device
from medusa_liger.heads.export import DTYPES  # one table of dtype names (the config allows three of them)
from medusa_liger.records import load_tokenizer
from medusa_liger.train import distributed
from medusa_liger.train.config import Config, ConfigError
from medusa_liger.train.packing import ROW_SETTINGS


def resolve_device(cfg: Config) -> torch.device:
    """``train.device``; ``auto`` is CUDA when available, else CPU. A device this machine lacks is a
    ConfigError, which the command reports in one line, before any data or model loads."""
    try:
        return parse_device(cfg.train.device, allow_auto=True)
    except ValueError as error:
        raise ConfigError(f"train.device: {error}") from None


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``precision: auto`` or ``bf16``), none (fp32) otherwise."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def master_dtype(cfg: Config) -> torch.dtype:
    """Dtype of the trained heads and LoRA adapters: ``train.master_dtype`` (``auto``: ``model.dtype``)."""
    name = cfg.model.dtype if cfg.train.master_dtype == "auto" else cfg.train.master_dtype
    return DTYPES[name]


def export_dtype(cfg: Config) -> str:
    """Dtype the heads (and a written backbone) are exported in: ``export.dtype`` (``auto``: ``model.dtype``)."""
    return cfg.model.dtype if cfg.export.dtype == "auto" else cfg.export.dtype


def cast_adapters(backbone, dtype: torch.dtype) -> None:
    """Cast every peft adapter tensor (LoRA A/B, embedding A/B) of ``backbone`` to ``dtype`` in place;
    the base layers keep theirs. LoRA layers cast their input to the adapter dtype and their output
    back, so any pairing of base and adapter dtypes runs, with or without autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in backbone.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                getattr(module, name).to(dtype)  # a ModuleDict / ParameterDict keyed by adapter name


def build_tokenizer_and_backbone(cfg: Config, examples_for_tokenizer=None, on_meta: bool = False,
                                 commit: str | None = None, resolved: bool = False):
    """(tokenizer, backbone) on the CPU; ``examples_for_tokenizer`` () -> Examples, for the tiny model.

    ``on_meta``: the backbone's architecture only, on the meta device (no weights read, no memory):
    an FSDP rank other than 0, whose shards ``fsdp.shard_model`` then fills from rank 0's tensors.
    A hub model's tokenizer, config and weights are all read at one commit: ``commit`` (the training
    loop resolves it on rank 0, so that every rank reads the same), else the one ``model.name_or_path``
    at ``model.revision`` resolves to now (``heads.export.hub_commit``); ``config._commit_hash`` records it.
    ``resolved``: the caller resolved ``commit`` (and said ``note_hub_lookup``'s note) already: None is then
    not resolved again (every rank would otherwise ask the hub, each perhaps for another commit).
    """
    dtype = DTYPES[cfg.model.dtype]
    where = torch.device("meta") if on_meta else nullcontext()
    if cfg.model.name_or_path == "tiny":
        from medusa_liger.train.tiny import build_tiny_backbone, train_tokenizer

        examples = examples_for_tokenizer()
        texts = [e.text if e.text is not None else "\n".join(m["content"] for m in e.messages) for e in examples]
        tokenizer = train_tokenizer(texts, cfg.model.tiny.vocab_size, Path(cfg.output_dir) / "tokenizer")
        torch.manual_seed(cfg.train.seed)  # the random init depends on the seed only
        with where:
            backbone = build_tiny_backbone(cfg.model.tiny, tokenizer, dtype, cfg.model.attn_implementation)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from medusa_liger.heads.export import hub_commit, note_hub_lookup

        if distributed.is_main() and not resolved:
            note_hub_lookup(cfg.model.name_or_path)
        # One commit for every file read (where the name resolves to one; else model.revision as given).
        if not resolved:
            commit = commit or hub_commit(cfg.model.name_or_path, cfg.model.revision)
        revision = commit or cfg.model.revision
        hub = {"trust_remote_code": cfg.model.trust_remote_code} | ({"revision": revision} if revision else {})
        try:
            tokenizer = load_tokenizer(cfg.model.name_or_path, **hub)
        except ValueError as error:  # (transformers blames a missing package for missing tokenizer files)
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: no usable tokenizer: "
                              f"{' '.join(str(error).split())}") from error
        kwargs = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
        if cfg.model.attn_implementation is not None:
            kwargs["attn_implementation"] = cfg.model.attn_implementation
        if on_meta:
            config = AutoConfig.from_pretrained(cfg.model.name_or_path, **hub)
            with where:
                backbone = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            backbone = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kwargs | hub)
        # Resumes and heads record it. Ours, not transformers' (which varies by version: none, or one
        # taken from a local path inside a hub cache): none for a local directory.
        backbone.config._commit_hash = commit
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.model.patch:
        from medusa_liger.patching import patch

        patch(backbone)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(cfg.lora.target_modules)
        check_lora_targets(backbone, targets, cfg.lora.target_modules)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        # peft would upcast only bf16/fp16 adapters to fp32; cast to train.master_dtype explicitly instead.
        try:
            backbone = get_peft_model(backbone, lora, autocast_adapter_dtype=False)
        except ValueError as error:  # e.g. target modules the backbone does not have
            raise ConfigError(f"lora.target_modules={cfg.lora.target_modules}: {error}") from error
        cast_adapters(backbone, master_dtype(cfg))
    return tokenizer, backbone


def check_token_range(cfg: Config, input_ids: torch.Tensor, backbone) -> None:
    """ConfigError when the tokenizer gave ids past the backbone's embedding rows (a tokenizer not the
    model's): the first forward failed with an IndexError (a device-side assert on a GPU). Rows past the
    tokenizer's last id are fine: models pad their vocabulary (Qwen2.5: 151,665 tokens, 152,064 rows)."""
    rows = backbone.get_input_embeddings().num_embeddings
    highest = int(input_ids.max()) if input_ids.numel() else -1
    if highest >= rows:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: its tokenizer gives token ids up to "
                          f"{highest}, but the model's embedding has {rows} rows: the tokenizer is not this model's")


def position_limit(config) -> int | None:
    """The positions ``config``'s model reaches: ``max_position_embeddings``, or more where a RoPE
    scaling extends it (linear, dynamic, yarn, ...: e.g. vicuna-v1.5-16k says 4096 with a linear
    factor of 4, Qwen's YaRN 32768 with a factor of 4; ``original_max_position_embeddings`` times the
    factor where given). None where the config says no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    candidates = [rope] if isinstance(rope, dict) else []
    if candidates and all(isinstance(v, dict) for v in rope.values()):  # (per layer type)
        candidates = list(rope.values())
    for params in candidates:
        factor = params.get("factor")
        kind = params.get("rope_type", params.get("type"))
        if kind == "llama3":
            # Its max_position_embeddings is the extended length already, and its factor no length ratio:
            # Llama 3.1 has 8192 x 8, Llama 3.2 8192 x 32, both 131072. (A config that does not say which
            # length it gives, as Gemma 3's linear 8 on 131072, is read the permissive way.)
            continue
        if kind not in (None, "default") and isinstance(factor, (int, float)) and factor > 1:
            original = params.get("original_max_position_embeddings") or limit
            limit = max(limit, int(original * factor))
    return limit


def check_position_range(cfg: Config, backbone) -> None:
    """ConfigError when ``data.seq_len`` is longer than the backbone's ``max_position_embeddings``
    (what ``model.tiny.max_position_embeddings`` is checked against for the tiny model): a model with
    learned positions (GPT-2's ``n_positions``) failed at the first forward with an IndexError (a
    device-side assert on a GPU), after the model and the data loaded; a rotary one trained on
    positions it never saw. Packed documents restart their positions, so a row uses at most seq_len."""
    limit = position_limit(backbone.config)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the {limit} positions the backbone reaches "
                          f"(max_position_embeddings, times its RoPE scaling factor if any; {cfg.model.name_or_path}): "
                          f"give data.seq_len <= {limit}")


def lora_targets(target_modules: list[str] | str) -> list[str] | str:
    """``lora.target_modules`` as peft takes it: "all-linear", or a list of module names. One name
    stands for a one-item list: peft reads a lone string as a regular expression over full module
    paths, so ``q_proj`` alone matched nothing."""
    if target_modules == "all-linear":
        return target_modules
    return [target_modules] if isinstance(target_modules, str) else list(target_modules)


def check_lora_targets(backbone, targets: list[str] | str, given: list[str] | str) -> None:
    """ConfigError naming the entries of ``targets`` that match no module of ``backbone`` (peft's
    rule: the module's name, or the end of its path after a dot). peft raises only when none
    matches, so one typo in a list silently left those layers without adapters."""
    if targets == "all-linear":
        return
    names = [name for name, _ in backbone.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)})
        regex = any(set(t) & set("*+?[]()|^$\\") for t in unmatched)
        raise ConfigError(f"lora.target_modules={given}: {unmatched} match no module of the backbone, whose linear "
                          f"layers are named {linear}" + (" (module names, not regular expressions)" if regex else ""))


def build_medusa(cfg: Config, backbone, teacher: bool = True):
    """``MedusaModel`` over ``backbone`` in ``train.mode`` (joint mode starts in "heads" when a
    heads-only stage comes first; the loop switches it), its heads in ``master_dtype(cfg)``.

    ``train.lm_loss: kl`` without LoRA keeps a frozen copy of ``backbone`` as it is here (the weights
    as loaded, before any step or resume) as the teacher; ``teacher=False`` skips it (for exports).

    The heads start in the lm_head's dtype (per-head projections copy it) and are then cast: a
    bf16 -> fp32 cast is exact, so an fp32 head starts at exactly the backbone's prediction. The
    heads cast the backbone's hidden state to their dtype, and the fused loss computes in the
    autocast dtype (or the inputs' promoted one) and returns each gradient in its parameter's dtype.
    """
    from medusa_liger.heads import MedusaConfig, MedusaModel
    from medusa_liger.heads.model import carries_peft_adapter

    medusa_cfg = MedusaConfig(
        num_heads=cfg.heads.num_heads, num_layers=cfg.heads.num_layers, shared_lm_head=cfg.heads.shared_lm_head,
        decay=cfg.heads.decay, mode=cfg.train.mode, lm_loss_weight=cfg.train.lm_loss_weight,
        lm_loss=cfg.train.lm_loss, head_targets=cfg.heads.targets, kl_temperature=cfg.train.kl_temperature,
        kl_direction=cfg.train.kl_direction, jsd_beta=cfg.train.jsd_beta, label_smoothing=cfg.train.label_smoothing,
        z_loss=cfg.train.z_loss,
        skip_ignored_targets=cfg.heads.skip_ignored_targets, head_by_head=cfg.heads.head_by_head,
        heads_loss_weight=cfg.train.heads_lambda.value if cfg.train.mode == "joint" else None,
    )
    head = backbone.get_output_embeddings()
    if carries_peft_adapter(head):  # (MedusaModel's own check, said with the key)
        raise ConfigError(f"lora.target_modules={cfg.lora.target_modules} puts an adapter on lm_head, which the "
                          "fused losses read as a plain weight: it would never train; leave lm_head out")
    try:
        embeddings = backbone.get_input_embeddings() if cfg.lora.enabled else None
    except NotImplementedError:  # (a remote-code model without the accessor: no adapter found there)
        embeddings = None
    # The same tensor object, not the same address: on the meta device (FSDP ranks > 0) every address is 0.
    if carries_peft_adapter(embeddings) and head is not None and embeddings.base_layer.weight is head.weight:
        # Training reads lm_head's plain weight; the merged export would add the embeddings' update to it.
        raise ConfigError(f"lora.target_modules={cfg.lora.target_modules} puts an adapter on the input embeddings, "
                          "which share their weight with lm_head (tie_word_embeddings): the exported lm_head would "
                          "not be the one the heads trained against; leave the embeddings out")
    model = MedusaModel.from_backbone(backbone, medusa_cfg)
    if "vllm" in cfg.export.formats and getattr(model.lm_head, "bias", None) is not None:  # said now, not at the end
        raise ConfigError("export.formats includes vllm, but the backbone's lm_head has a bias, which vLLM's Medusa "
                          "lm_heads do not have: export only the medusa format (export.formats=[medusa])")
    model.heads.to(master_dtype(cfg))
    if teacher and cfg.train.lm_loss == "kl" and not cfg.lora.enabled:
        model.add_frozen_teacher()  # before gradient checkpointing: the teacher runs under no_grad
    if cfg.model.gradient_checkpointing:
        # MedusaModel's method picks the transformers version's (non-deprecated) name of the switch.
        model.gradient_checkpointing_enable()  # (every training forward passes use_cache=False: the exported
        # config keeps the model's own use_cache)
    return model


def _is_head_param(name: str) -> bool:
    return name.startswith("heads.")


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of everything the optimizer updates (what a checkpoint stores)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def group_settings(cfg: Config, kind: str, decay: bool) -> dict[str, float]:
    """The learning rate and weight decay of an optimizer group: heads or backbone, with or without decay."""
    return {"lr": cfg.train.heads_lr if kind == "heads" else cfg.train.lr,
            "weight_decay": cfg.train.weight_decay if decay else 0.0}


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """AdamW over groups heads/backbone x decay/no_decay (empty groups left out); its state sharded
    over the ranks (``distributed.sharded_optimizer``) with ``train.shard_optimizer`` under torchrun."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in trainable_parameters(model).items():
        kind = "heads" if _is_head_param(name) else "backbone"
        groups.setdefault((kind, param.dim() >= 2), []).append(param)
    param_groups = [{"params": params, "name": f"{kind}{'' if decay else '_no_decay'}", "kind": kind,
                     **group_settings(cfg, kind, decay)}
                    for (kind, decay), params in sorted(groups.items())]
    if not param_groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    options = dict(betas=tuple(cfg.train.betas), fused=False, foreach=None)
    if cfg.train.shard_optimizer and not cfg.train.fsdp and distributed.is_distributed():  # FSDP shards it already
        return distributed.sharded_optimizer(param_groups, torch.optim.AdamW, **options)
    return torch.optim.AdamW(param_groups, **options)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at ``step`` (0-based): linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GroupSchedule:
    """Picklable per-group LR multiplier (``LambdaLR`` saves callable objects' state)."""

    def __init__(self, kind: str, cfg: Config) -> None:
        t = cfg.train
        self.kind, self.warmup, self.total, self.min_ratio = kind, t.warmup_steps, t.steps, t.min_lr_ratio
        self.offset = t.heads_only_steps if kind == "backbone" else 0

    def __call__(self, step: int) -> float:
        if step < self.offset:
            return 0.0  # heads-only stage: the backbone does not move
        total = self.total - self.offset
        return warmup_cosine(step - self.offset, min(self.warmup, total), total, self.min_ratio)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [GroupSchedule(group["kind"], cfg) for group in optimizer.param_groups]
    )


# GroupSchedule's fields and the optimizer groups' hyperparameters, by the config key that sets them.
SCHEDULE_KEYS = {"total": "train.steps", "warmup": "train.warmup_steps", "min_ratio": "train.min_lr_ratio",
                 "offset": "train.heads_only_steps"}


def reapply_schedule(cfg: Config, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[str]:
    """After a resume, this run's learning rates, weight decay, betas and schedule, from the
    checkpoint's step on.

    ``load_state_dict`` of the optimizer and the scheduler brings back the checkpoint's own (its
    groups' hyperparameters, its schedules' total and warmup steps), so a resume that extends a run
    (``train.steps``) or changes a rate would otherwise keep the old ones while config.yaml says the
    new. The Adam moments and the step count stay the checkpoint's. Returns the changed settings as
    ``"train.steps 4 -> 8"`` (none when the config is the checkpoint's: the rates are then those
    ``LambdaLR`` computed, bit for bit)."""
    changed: dict[str, str] = {}

    def note(key: str, old, new) -> None:
        if old != new:
            changed.setdefault(key, f"{key} {old} -> {new}")

    for i, group in enumerate(optimizer.param_groups):
        kind = group["kind"]
        settings = group_settings(cfg, kind, decay=not group["name"].endswith("_no_decay"))
        lr, decay = settings["lr"], settings["weight_decay"]
        schedule = GroupSchedule(kind, cfg)
        for field, key in SCHEDULE_KEYS.items():
            note(key, getattr(scheduler.lr_lambdas[i], field), getattr(schedule, field))
        note("train.heads_lr" if kind == "heads" else "train.lr", scheduler.base_lrs[i], lr)
        note("train.weight_decay", group["weight_decay"], decay)
        note("train.betas", list(group["betas"]), list(cfg.train.betas))
        scheduler.lr_lambdas[i], scheduler.base_lrs[i] = schedule, lr
        group.update(initial_lr=lr, weight_decay=decay, betas=tuple(cfg.train.betas), lr=lr * schedule(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return list(changed.values())


def objective_settings(cfg: Config) -> dict[str, object]:
    """The settings that define the training loss, by config key: checkpoints keep them so that a
    resume can say which of them it changes (as ``reapply_schedule`` does for the rates)."""
    t = cfg.train
    settings: dict[str, object] = {
        "heads.decay": cfg.heads.decay, "heads.targets": cfg.heads.targets, "train.kl_temperature": t.kl_temperature,
        "train.kl_direction": t.kl_direction, "train.jsd_beta": t.jsd_beta,
        "train.label_smoothing": t.label_smoothing, "train.z_loss": t.z_loss,
    }
    if t.mode == "joint":  # the backbone's term and lambda weigh nothing in heads mode
        settings.update({"train.lm_loss": t.lm_loss, "train.lm_loss_weight": t.lm_loss_weight,
                         "train.heads_lambda.value": t.heads_lambda.value,
                         "train.heads_lambda.schedule": t.heads_lambda.schedule,
                         "train.heads_lambda.ramp_steps": t.heads_lambda.ramp_steps})
    return settings


def objective_changes(saved: dict[str, object] | None, cfg: Config) -> list[str]:
    """``"heads.decay 0.8 -> 0.5"`` for each loss setting of this run that differs from the
    checkpoint's ``saved`` ones (none for a checkpoint written before they were kept)."""
    if not saved:
        return []
    return [f"{key} {saved[key]} -> {value}" for key, value in objective_settings(cfg).items()
            if key in saved and saved[key] != value]


def fixed_settings(cfg: Config, tokenizer, backbone_config=None) -> dict[str, object]:
    """What a checkpoint's weights only mean something under, by name: checkpoints keep it, and a
    resume that changes any of it is refused (``fixed_changes``).

    ``backbone_config``: the loaded backbone's transformers config. Where checkpoints do not hold the
    whole backbone (heads mode, LoRA, the frozen KL teacher), the hub revision its weights came from
    (``_commit_hash``; none for a local directory) is fixed too: adapters and heads trained on one
    revision would go on another's weights, under the same model name, without a word."""
    fixed: dict[str, object] = {}
    # Base weights the checkpoints do not hold: frozen (heads mode), under adapters, or the KL teacher's.
    unsaved_base = cfg.train.mode == "heads" or cfg.lora.enabled or cfg.train.lm_loss == "kl"
    revision = getattr(backbone_config, "_commit_hash", None)
    if revision and unsaved_base:
        fixed["the backbone's hub revision"] = revision
    if cfg.model.name_or_path == "tiny":
        # Trained anew at every start on the run's data (data.paths, data.max_examples, ...): other data
        # give other token ids. Its base weights are drawn from the seed, and saved only when they train.
        fixed["the tiny model's tokenizer"] = tokenizer_fingerprint(tokenizer)
        if unsaved_base:
            fixed["train.seed"] = cfg.train.seed
            # ... and their shapes: another model.tiny draws other frozen weights from the same seed.
            for key in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
                fixed[f"model.tiny.{key}"] = getattr(cfg.model.tiny, key)
    if cfg.lora.enabled:
        fixed["lora.alpha"] = cfg.lora.alpha  # scales every adapter's output: another model
    return fixed


def fixed_changes(saved: dict[str, object] | None, cfg: Config, tokenizer, backbone_config=None) -> list[str]:
    """``"lora.alpha 16 -> 64"`` for each of ``fixed_settings`` that differs from a checkpoint's."""
    changes = []
    for key, value in fixed_settings(cfg, tokenizer, backbone_config).items():
        if saved and key in saved and saved[key] != value:
            said = f" {saved[key]} -> {value}"
            if key.startswith("the tiny"):
                said = (" differs (its training texts or model.tiny.vocab_size changed: data.paths, data.split, "
                        "data.format, data.max_examples or data.on_error)")
            elif key == "the backbone's hub revision":
                said += f" (model.revision={saved[key]} loads the checkpoint's)"
            changes.append(key + said)
    return changes


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary (token -> id)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]


ROWS_KEY = "the packed rows (content)"  # data_settings' entry for packing.rows_fingerprint (files edited in place too)

# A step's batch is train.micro_batch_size x train.grad_accum x the ranks: a resume on another number of
# GPUs changes it as surely as those two settings do.
RANKS_KEY = "data-parallel ranks"


def data_settings(cfg: Config, rows: str | None = None) -> dict[str, object]:
    """The backbone, and what decides the training rows, their order and the held-out split, by config
    key (and ``rows``, the packed rows' fingerprint, under ``ROWS_KEY``): a resume may change them (new
    data to continue on, a moved model directory), and says so (``data_changes``)."""
    d, t = cfg.data, cfg.train
    # The backbone too: a resume may load it from elsewhere (a moved directory, a local snapshot), but
    # adapters or heads trained on one model put on another would be said nowhere else.
    return ({ROWS_KEY: rows} if rows is not None else {}) | {"model.name_or_path": cfg.model.name_or_path} \
        | {f"data.{key}": getattr(d, key) for key in ROW_SETTINGS} \
        | {"data.eval_fraction": d.eval_fraction, "train.seed": t.seed, "train.micro_batch_size": t.micro_batch_size,
           "train.grad_accum": t.grad_accum, RANKS_KEY: distributed.world_size()}


# Those that change the packed rows or how they are drawn (the rest: the backbone's name, batch sizes).
SPLIT_KEYS = (ROWS_KEY, *(f"data.{key}" for key in ROW_SETTINGS), "data.eval_fraction", "train.seed")


def data_changes(saved: dict[str, object] | None, cfg: Config, rows: str | None = None) -> list[str]:
    """``"train.micro_batch_size 4 -> 2"`` for each of ``data_settings`` that differs from a checkpoint's
    (the rows without a data setting: "other packed rows"); where the held-out split is drawn anew, the
    last entry says so."""
    if not saved:
        return []
    current = data_settings(cfg, rows)
    changed = [key for key, value in current.items() if key in saved and saved[key] != value]
    notes = [f"{key} {saved[key]} -> {current[key]}" for key in changed if key != ROWS_KEY]
    if ROWS_KEY in changed and not any(key in SPLIT_KEYS for key in changed if key != ROWS_KEY):
        # No data setting changed, the rows did: files edited, another tokenizer, a new hub revision.
        notes.append("other packed rows (the data files' content or the tokenizer changed)")
    if any(key in SPLIT_KEYS for key in changed) and cfg.data.eval_fraction > 0:
        notes.append("a held-out split drawn anew (rows trained on may now be held out, and in eval_prompts.jsonl)")
    return notes


def heads_lambda(cfg: Config, step: int) -> float:
    """lambda (weight of the heads loss in joint mode) at optimizer step ``step`` (0-based)."""
    lam = cfg.train.heads_lambda
    ramp_steps = lam.ramp_steps
    progress = 1.0 if lam.schedule == "constant" or ramp_steps == 0 else min(1.0, step / ramp_steps)
    if lam.schedule == "sine":
        progress = math.sin(0.5 * math.pi * progress)
    return lam.value * progress


def precision_line(cfg: Config, amp: torch.dtype | None) -> str:
    """Which dtypes the run keeps its weights and computes in (and a warning where updates lose bits)."""
    line = (f"precision: backbone {cfg.model.dtype}, heads{' and LoRA' if cfg.lora.enabled else ''} "
            f"{str(master_dtype(cfg)).removeprefix('torch.')}, "
            f"{'autocast ' + str(amp).removeprefix('torch.') if amp is not None else 'no autocast'}")
    if cfg.train.fsdp and cfg.train.fsdp_param_dtype:
        line += (f", parameters cast to {cfg.train.fsdp_param_dtype} for the forward and backward "
                 "(train.fsdp_param_dtype)")
    if cfg.train.mode == "joint" and not cfg.lora.enabled and cfg.model.dtype != "float32":
        line += f" (the full backbone trains in {cfg.model.dtype}, without an fp32 master copy)"
    return line


def precision_warning(cfg: Config) -> str | None:
    """A warning where a backbone that trains whole keeps bf16 weights: AdamW's small updates round away."""
    if cfg.train.mode != "joint" or cfg.lora.enabled or cfg.model.dtype == "float32":
        return None
    # bf16 keeps 8 significant bits: w + u == w when |u| < |w| / 2**9 (1.0 + 2e-5 is 1.0).
    return (f"warning: the whole backbone trains in {cfg.model.dtype} weights without an fp32 master copy: an "
            f"update smaller than 1/512 of its weight is lost (at train.lr={cfg.train.lr:g}, every update of a norm "
            "weight near 1, and most of the matrices'); model.dtype=float32 keeps fp32 weights and computes under "
            "bf16 autocast (export.dtype sets the export's dtype)")
