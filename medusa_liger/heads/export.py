"""Save and load Medusa heads in the two layouts serving engines read.

``medusa`` (FasterDecoding Medusa, TensorRT-LLM, TGI):
    config.json                 medusa_num_heads, medusa_num_layers, base_model_name_or_path,
                                hidden_size, vocab_size
    medusa_lm_head.safetensors  {h}.{l}.linear.weight [H, H], {h}.{l}.linear.bias [H],
                                {h}.{num_layers}.weight [V, H]   (per-head mode only)
    medusa_lm_head.pt           the same tensors (``pt_file=True``; ``export --pt-file``): FasterDecoding's
                                own loader reads only this file (TensorRT-LLM and TGI read either), and
                                it repeats ONE ResBlock object per head, so it needs num_layers 1 or
                                equal layers (checked)
    FasterDecoding, TensorRT-LLM and TGI build a per-head projection for every head, so shared-mode
    heads in this layout are for medusa-liger itself; serve shared heads through the vllm layout.

``vllm`` (vLLM's ``Medusa`` draft model):
    config.json                 model_type "medusa", architectures ["MedusaModel"], num_heads,
                                num_hidden_layers, hidden_size, vocab_size, truncated_vocab_size,
                                medusa_fc_bias true, original_lm_head (true in shared mode)
    model.safetensors           blocks.{h}.layers.{l}.weight, blocks.{h}.layers.{l}.bias,
                                lm_heads.{h}.weight
    With ``original_lm_head`` vLLM builds ONE projection and fills it from ``lm_heads.0.weight``
    (it does not reach into the target model), so shared mode writes the backbone's lm_head there.

Both config.json files also carry our own ``"medusa_liger"`` entry (format version and the full
MedusaConfig), so a round trip restores decay, mode and loss weights; files written by other tools
(without it) are read too, with the MedusaConfig defaults for what they do not say. Heads of a hub
backbone record the commit its files came from there (``base_model_revision``): loaded with that hub
name, the backbone comes from that commit, not from whatever the name's default branch holds later.

After joint training the backbone is saved beside the heads, LoRA merged, as a normal Hugging Face
checkpoint in ``<dir>/backbone``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_liger.dtype_names import DTYPE_NAMES
from medusa_liger.heads.config import DEFAULT_HEADS_LOSS_WEIGHT, MedusaConfig
from medusa_liger.records import looks_like_local_path
from medusa_liger.run_layout import local_or_hub, user_path

FORMATS: tuple[str, ...] = ("medusa", "vllm")
FORMAT_VERSION = 1
WEIGHT_FILES = {"medusa": "medusa_lm_head.safetensors", "vllm": "model.safetensors"}
PT_FILE = "medusa_lm_head.pt"  # the medusa format's file FasterDecoding's own loader reads (only that one)
BACKBONE_SUBDIR = "backbone"
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


@dataclass
class HeadsCheckpoint:
    """Heads independent of any file layout (what both formats are converted to and from).

    tensors:        the ``MedusaHeads`` state dict: blocks.{h}.{l}.linear.{weight,bias}, lm_heads.{h}.weight
    lm_head_weight: the backbone's lm_head [V, H] where known (needed by vLLM in shared mode)
    lm_head_bias:   its bias [V] where it has one (shared mode only: per-head projections refuse it)
    serving_dtype:  the backbone's dtype when the heads were saved (what ``medusa-liger export`` casts
                    to by default: training checkpoints hold fp32 master heads), None if unknown
    base_model_revision: the hub commit the backbone's files came from (transformers' ``_commit_hash``),
                    None for a local one: loading the heads with the recorded hub name takes that commit
    """

    config: MedusaConfig
    hidden_size: int
    vocab_size: int
    tensors: dict[str, torch.Tensor]
    lm_head_weight: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None  # the backbone's, where it has one (vLLM's lm_heads have none)
    base_model_name_or_path: str | None = None
    format: str | None = None
    serving_dtype: torch.dtype | None = None
    base_model_revision: str | None = None


# What heads may be stored in: the names' dtypes, and float64 (a float64 model's own, never a flag's).
STORED_DTYPES = (*dict.fromkeys(DTYPES.values()), torch.float64)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch float dtype, or one of the names in ``DTYPES`` -> torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in STORED_DTYPES:
            raise ValueError(f"dtype must be bfloat16, float16, float32 or float64, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


# ---------------------------------------------------------------------------- key layouts
def _to_format(ckpt: HeadsCheckpoint, format: str) -> dict[str, torch.Tensor]:
    """Rename the canonical tensors into ``format``'s key names."""
    cfg, out = ckpt.config, {}
    for h in range(cfg.num_heads):
        for l in range(cfg.num_layers):
            for kind in ("weight", "bias"):
                tensor = ckpt.tensors[f"blocks.{h}.{l}.linear.{kind}"]
                key = f"{h}.{l}.linear.{kind}" if format == "medusa" else f"blocks.{h}.layers.{l}.{kind}"
                out[key] = tensor
        if not cfg.shared_lm_head:
            key = f"{h}.{cfg.num_layers}.weight" if format == "medusa" else proj_key(h)
            out[key] = ckpt.tensors[proj_key(h)]
    if cfg.shared_lm_head and format == "vllm":
        if ckpt.lm_head_weight is None:
            raise ValueError("vllm format in shared mode needs the backbone's lm_head weight (pass a backbone)")
        if ckpt.lm_head_bias is not None:  # vLLM would serve every head without it, silently
            raise ValueError("the backbone's lm_head has a bias, which vLLM's Medusa lm_heads do not have: "
                             "export the medusa format")
        out[proj_key(0)] = ckpt.lm_head_weight
    return out


def proj_key(h: int) -> str:
    """Head h's projection's key, in the heads' state dict and the vllm format alike (head 0's holds the
    backbone's lm_head in shared mode)."""
    return f"lm_heads.{h}.weight"


def _from_format(tensors: dict[str, torch.Tensor], format: str, num_heads: int, num_layers: int,
                 has_bias: bool, original_lm_head: bool, where: Path) -> tuple[dict[str, torch.Tensor], bool, torch.Tensor | None]:
    """Rename ``format``'s keys to the canonical ones -> (tensors, shared_lm_head, original lm_head).

    Shared mode is what the vllm config says (``original_lm_head``); in the medusa format it is the
    absence of every per-head projection.
    """
    tensors = {k.removeprefix("medusa_heads."): v for k, v in tensors.items()}
    if format == "vllm" and not has_bias:
        # vLLM builds bias-free blocks under medusa_fc_bias false and skips such tensors: read what it serves.
        ignored = sorted(k for k in tensors if k.startswith("blocks.") and k.endswith(".bias"))
        if ignored:
            warnings.warn(f"{where}: medusa_fc_bias is false, so vLLM ignores the blocks' bias tensors "
                          f"({ignored[:3]}...); they are left out here too", stacklevel=3)
            for key in ignored:
                del tensors[key]
    if format == "vllm" and original_lm_head and "lm_head.weight" in tensors and proj_key(0) not in tensors:
        tensors[proj_key(0)] = tensors.pop("lm_head.weight")  # vLLM maps the one to the other
    out: dict[str, torch.Tensor] = {}
    for h in range(num_heads):
        for l in range(num_layers):
            for kind in ("weight", "bias"):
                key = f"{h}.{l}.linear.{kind}" if format == "medusa" else f"blocks.{h}.layers.{l}.{kind}"
                if key in tensors:
                    out[f"blocks.{h}.{l}.linear.{kind}"] = tensors.pop(key)
                elif kind == "bias" and not has_bias:
                    # medusa_fc_bias false: y = x + silu(W x) is our block with a zero bias.
                    weight = out[f"blocks.{h}.{l}.linear.weight"]
                    out[f"blocks.{h}.{l}.linear.bias"] = weight.new_zeros(weight.shape[0])
                else:
                    raise ValueError(f"heads checkpoint {where} is missing tensor {key!r}")
    proj = [f"{h}.{num_layers}.weight" if format == "medusa" else proj_key(h) for h in range(num_heads)]
    present = [k in tensors for k in proj]
    original = None
    shared = original_lm_head if format == "vllm" else not any(present)
    if shared:
        # vLLM's original_lm_head layout: one projection, lm_heads.0, which is the backbone's.
        original = tensors.pop(proj[0], None) if format == "vllm" else None
    else:
        if not all(present):
            missing = [k for k, p in zip(proj, present) if not p]
            raise ValueError(f"heads checkpoint {where} is missing projection tensors {missing}")
        for h, key in enumerate(proj):
            out[proj_key(h)] = tensors.pop(key)
    tensors.pop("token_map", None)  # checked against truncated_vocab_size by the caller
    if tensors:
        raise ValueError(f"heads checkpoint {where} holds unexpected tensors {sorted(tensors)[:8]}")
    return out, shared, original


# ---------------------------------------------------------------------------- writing
def checkpoint_of(model: nn.Module, base_model_name_or_path: str | None = None) -> HeadsCheckpoint:
    """The ``HeadsCheckpoint`` of a ``MedusaModel`` (tensors are the live parameters, detached)."""
    lm_weight = model.lm_head.weight.detach()
    name = base_model_name_or_path
    if name is None:
        name = getattr(getattr(model.backbone, "config", None), "_name_or_path", None) or None
    if name and name != "tiny" and user_path(name).is_dir():
        # A local backbone as its absolute path, as `export --backbone` records it: a relative one would
        # name another directory (or none) for eval, generate or a serving engine run from elsewhere.
        name = str(user_path(name).resolve())
    return HeadsCheckpoint(
        config=copy.deepcopy(model.config),
        hidden_size=model.heads.hidden_size,
        vocab_size=model.heads.vocab_size,
        tensors={k: v.detach() for k, v in model.heads.state_dict().items()},
        lm_head_weight=lm_weight,
        lm_head_bias=lm_head_bias_of(model.lm_head),
        base_model_name_or_path=name,
        serving_dtype=lm_weight.dtype,  # the backbone's own weight, never a trainable master copy
        base_model_revision=commit_of(getattr(model.backbone, "config", None), name),
    )


def commit_of(backbone_config: Any, name: str | None) -> str | None:
    """The hub commit heads naming ``name`` record: the one the backbone was read at, where ``name`` is the
    hub name it was read under. Heads naming a local directory (e.g. a saved backbone) or another model
    record none (another name's commit is not that model's)."""
    if not name or name != getattr(backbone_config, "_name_or_path", None) or not names_a_hub_model(name):
        return None
    return getattr(backbone_config, "_commit_hash", None) or None


def names_a_hub_model(name: str | Path) -> bool:
    """Whether ``name`` can only mean a hub model: not the tiny model, no existing path, not path-shaped
    (``looks_like_local_path``). Only such a name has commits to pin."""
    return str(name) != "tiny" and not user_path(name).exists() and not looks_like_local_path(str(name))


def readable_by_others(path: Path) -> None:
    """Give ``path`` the permissions the umask allows (a file 0644, a directory 0755 under 022), which a
    serving engine running as another user needs: safetensors 0.8 writes its files 0600, and
    ``tempfile.mkdtemp`` makes its directories (an export's scratch, moved into place) 0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_heads(ckpt: HeadsCheckpoint, directory: str | Path, format: str, dtype: torch.dtype | str | None = None,
                pt_file: bool = False) -> Path:
    """Write ``ckpt`` in ``format`` ("medusa" | "vllm") to ``directory``, cast to ``dtype`` if given;
    ``pt_file`` (medusa format): also ``medusa_lm_head.pt``, for FasterDecoding's loader."""
    check_format(format)
    if pt_file:
        check_fasterdecoding_heads(ckpt, format)
    dtype = parse_dtype(dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in _to_format(ckpt, format).items()}
    # safetensors refuses tensors that share memory: FasterDecoding's [ResBlock] * L heads repeat
    # one block, so its files load with layers aliasing each other. Each gets its own copy here.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensors[key] = tensor.clone()
        seen.add(tensors[key].untyped_storage().data_ptr())
    saved_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    cfg = ckpt.config
    if format == "medusa":
        config: dict[str, Any] = {
            "medusa_num_heads": cfg.num_heads,
            "medusa_num_layers": cfg.num_layers,
            "base_model_name_or_path": ckpt.base_model_name_or_path,
            "hidden_size": ckpt.hidden_size,
            "vocab_size": ckpt.vocab_size,
        }
    else:
        for name, value in (("hidden_size", ckpt.hidden_size), ("vocab_size", ckpt.vocab_size)):
            if value is None:  # vLLM would build its lm_head at size None and fail at load
                raise ValueError(f"the vllm format needs the heads' {name}, which is unknown (shared heads whose "
                                 "config does not say it): attach the backbone (--backbone)")
        config = {
            "model_type": "medusa",
            "architectures": ["MedusaModel"],
            "num_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers,
            "hidden_size": ckpt.hidden_size,
            "vocab_size": ckpt.vocab_size,
            "truncated_vocab_size": ckpt.vocab_size,
            "medusa_fc_bias": True,
            "original_lm_head": bool(cfg.shared_lm_head),
            "base_model_name_or_path": ckpt.base_model_name_or_path,
        }
    config["medusa_liger"] = {"format_version": FORMAT_VERSION, "format": format, "dtype": saved_dtype, **cfg.to_dict()}
    if ckpt.serving_dtype is not None:
        config["medusa_liger"]["serving_dtype"] = str(ckpt.serving_dtype).removeprefix("torch.")
    if ckpt.base_model_revision is not None:
        config["medusa_liger"]["base_model_revision"] = ckpt.base_model_revision
    save_file(tensors, str(directory / WEIGHT_FILES[format]), metadata={"format": "pt"})
    readable_by_others(directory / WEIGHT_FILES[format])
    if pt_file:
        torch.save(tensors, directory / PT_FILE)
        readable_by_others(directory / PT_FILE)
    elif format == "medusa" and (directory / PT_FILE).is_file():  # FasterDecoding would serve the old heads
        warnings.warn(f"deleting {directory / PT_FILE} of an earlier save (pass pt_file=True to write it anew)",
                      stacklevel=2)
        (directory / PT_FILE).unlink()
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def check_fasterdecoding_heads(ckpt: HeadsCheckpoint, format: str) -> None:
    """ValueError unless FasterDecoding's loader reads ``ckpt`` as it is: it opens only
    ``medusa_lm_head.pt``, builds a projection per head, and repeats ONE ResBlock object
    ``medusa_num_layers`` times per head (so every position would get the last layer's weights)."""
    if format != "medusa":
        raise ValueError(f"pt_file: {PT_FILE} is a file of the medusa format, not of {format!r}")
    cfg = ckpt.config
    if cfg.shared_lm_head:
        raise ValueError("pt_file: FasterDecoding builds a projection for every head; these heads share the "
                         "backbone's lm_head (serve them through the vllm format)")
    for h in range(cfg.num_heads):
        for l in range(1, cfg.num_layers):
            for kind in ("weight", "bias"):
                layer, first = (ckpt.tensors[f"blocks.{h}.{i}.linear.{kind}"] for i in (l, 0))
                if not torch.equal(layer, first):
                    raise ValueError(
                        f"pt_file: FasterDecoding's loader repeats one ResBlock medusa_num_layers={cfg.num_layers} "
                        f"times per head, so it would serve head {h}'s last layer in all of them; these heads' layers "
                        f"differ: serve them through TensorRT-LLM or TGI ({WEIGHT_FILES['medusa']}) or vLLM")


def write_backbone(backbone: nn.Module, directory: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Save ``backbone`` as a plain HF checkpoint; a peft model is merged on a copy first.

    The copy costs one more backbone in memory but leaves the training model (and its adapters)
    untouched and bit-exact (merging then unmerging in place would round the base weights).
    """
    dtype = parse_dtype(dtype)
    directory = Path(directory)
    model = backbone
    if hasattr(backbone, "merge_and_unload"):
        model = copy.deepcopy(backbone).merge_and_unload()
    state_dict = None
    if dtype is not None:
        # Cast each storage once: tied weights (lm_head and embed_tokens) stay one tensor, which
        # save_pretrained writes once; two casts would be two tensors, the embedding stored twice.
        cast: dict[tuple, torch.Tensor] = {}
        state_dict = {}
        for name, tensor in model.state_dict().items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
            if key not in cast:
                cast[key] = tensor.to(dtype)
            state_dict[name] = cast[key]
    model.save_pretrained(str(directory), state_dict=state_dict)
    for path in directory.glob("*.safetensors"):
        readable_by_others(path)
    if dtype is not None:
        # save_pretrained records the parameters' dtype; record the one written instead.
        path = directory / "config.json"
        config = json.loads(path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(config, indent=2) + "\n")
    return directory


class ServingFormatWarning(UserWarning):
    """Heads written in a format that serving engines cannot load as they are (``SHARED_MEDUSA_NOTE``)."""


SHARED_MEDUSA_NOTE = ("shared-lm_head heads in the medusa format hold no per-head projection, which TGI, TensorRT-LLM "
                      "and FasterDecoding load for every head: that copy is for medusa-liger (eval, generate, export); "
                      "serve them through the vllm format")


def save_heads(model: nn.Module, directory: str | Path, format: str = "medusa", dtype: torch.dtype | str | None = None,
               save_backbone: bool | None = None, base_model_name_or_path: str | None = None,
               pt_file: bool = False, serving_dtype: torch.dtype | str | None = None) -> Path:
    """``MedusaModel.save_heads``: heads in ``format``, plus the merged backbone when ``save_backbone``
    (default: in joint mode) in ``directory/backbone``; ``pt_file``: see ``write_heads``. ``serving_dtype``:
    the dtype to record as the heads' serving dtype (default: the backbone's, as it is in memory; a run
    training a whole fp32 backbone serves it in its export dtype)."""
    check_format(format)
    if save_backbone is None:
        save_backbone = model.config.mode == "joint"
    if save_backbone and base_model_name_or_path is None:
        # Engines load the model config.json names: the trained copy, not the base it started from
        # (as the export command and the trainer write it). Its tokenizer is the caller's to save there.
        base_model_name_or_path = str((Path(directory) / BACKBONE_SUBDIR).resolve())
    if format == "medusa" and model.config.shared_lm_head:
        warnings.warn(SHARED_MEDUSA_NOTE, ServingFormatWarning, stacklevel=3)
    ckpt = checkpoint_of(model, base_model_name_or_path)
    if serving_dtype is not None:
        ckpt.serving_dtype = parse_dtype(serving_dtype)
    directory = write_heads(ckpt, directory, format, dtype, pt_file)
    if not save_backbone and (directory / BACKBONE_SUBDIR).is_dir():
        warnings.warn(f"{directory} still holds {BACKBONE_SUBDIR}/ from an earlier save, which from_pretrained pairs "
                      f"with these heads; remove it unless it is their backbone", stacklevel=3)
    if save_backbone:
        write_backbone(model.backbone, directory / BACKBONE_SUBDIR, dtype)
    return directory


# ---------------------------------------------------------------------------- reading
class HeadsVersionError(ValueError):
    """Heads whose config.json says a format version this medusa-liger cannot read."""


class NotHeadsConfigError(ValueError):
    """A readable config.json that is not a Medusa heads config (e.g. a backbone's)."""


def detect_format(directory: str | Path) -> str:
    """"medusa" or "vllm", from ``directory/config.json``; errors name what was found."""
    config = _read_config(Path(directory))
    if "medusa_num_heads" in config:
        return "medusa"
    if config.get("model_type") == "medusa" and "num_heads" in config:
        return "vllm"
    raise NotHeadsConfigError(
        f"{directory}/config.json is not a Medusa heads config: expected 'medusa_num_heads' (medusa format) "
        f"or model_type 'medusa' with 'num_heads' (vllm format), found keys {sorted(config)}"
    )


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"heads directory {directory} does not exist")
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        hint = ""
        if (directory / "heads" / "config.json").is_file():  # a training checkpoint (step-N/)
            hint = (f": {directory} is a training checkpoint, its heads are in {directory / 'heads'} (`medusa-liger "
                    f"export --checkpoint {directory} --output DIR` writes them with a jointly trained backbone)")
        raise FileNotFoundError(f"expected {path} (a Medusa heads config), found only {found}{hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    ours = config.get("medusa_liger", {})
    if not isinstance(ours, dict):  # our own entry, read by read_heads
        raise ValueError(f"{path}: 'medusa_liger' must be an object, got {type(config['medusa_liger']).__name__}")
    # Checked before any tensor is read: a newer layout would otherwise fail as a "missing tensor".
    version = ours.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise HeadsVersionError(f"{path}: medusa_liger.format_version must be an integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise HeadsVersionError(f"{directory} was written by a newer medusa-liger (format_version {version}, this one "
                         f"reads <= {FORMAT_VERSION})")
    return config


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:  # e.g. a truncated copy: name the file
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded safetensors checkpoint (``*.safetensors.index.json``'s weight_map
    names each tensor's file), checked against the index so a missing shard or tensor is an error."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a safetensors index (a JSON object with 'weight_map'): {error}") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names the shard {shard}, which is not in {index_path.parent}")
        tensors.update(_load_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index_path} lists tensors its shards do not hold: {missing[:5]}")
    return {name: tensors[name] for name in weight_map}


def _read_weights(directory: Path, format: str) -> dict[str, torch.Tensor]:
    """The heads' tensors: the format's weight file, or what other tools write instead (a sharded
    ``model.safetensors.index.json`` or a ``pytorch_model.bin`` for vllm, like the hub's vLLM Medusa
    heads; FasterDecoding's older ``medusa_lm_head.pt``)."""
    path = directory / WEIGHT_FILES[format]
    if path.is_file():
        return _load_safetensors(path)
    index = directory / (WEIGHT_FILES[format] + ".index.json")
    if index.is_file():
        return _read_sharded(index)
    legacy = directory / {"medusa": "medusa_lm_head.pt", "vllm": "pytorch_model.bin"}[format]
    if legacy.is_file():
        return torch.load(str(legacy), map_location="cpu", weights_only=True)
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"expected weights file {path} for the {format} format, found only {found}")


def read_heads(directory: str | Path) -> HeadsCheckpoint:
    """Read heads written in either format (by us or by other tools) into a ``HeadsCheckpoint``."""
    directory = Path(directory)
    format = detect_format(directory)
    config = _read_config(directory)
    if format == "medusa":
        num_heads, num_layers, has_bias = config["medusa_num_heads"], config.get("medusa_num_layers", 1), True  # FasterDecoding's default
    else:
        num_heads, num_layers = config["num_heads"], config.get("num_hidden_layers", 1)
        has_bias = bool(config.get("medusa_fc_bias", False))
        vocab, truncated = config.get("vocab_size"), config.get("truncated_vocab_size")
        if truncated is not None and vocab is not None and truncated != vocab:
            raise ValueError(f"{directory}: truncated_vocab_size={truncated} (a token_map draft vocab) is not "
                             f"supported; expected truncated_vocab_size == vocab_size == {vocab}")
    for name, value in (("num_heads", num_heads), ("num_layers", num_layers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{directory}/config.json: {name} must be an integer >= 1, found {value!r}")
    original_lm_head = bool(config.get("original_lm_head", False))
    tensors, shared, original = _from_format(
        _read_weights(directory, format), format, num_heads, num_layers, has_bias, original_lm_head, directory)
    hidden = tensors["blocks.0.0.linear.weight"].shape[1]
    vocab = tensors[proj_key(0)].shape[0] if not shared else (
        original.shape[0] if original is not None else config.get("vocab_size"))
    for name, found, expected in (("hidden_size", config.get("hidden_size"), hidden), ("vocab_size", config.get("vocab_size"), vocab)):
        if found is not None and expected is not None and found != expected:
            raise ValueError(f"{directory}/config.json says {name}={found} but its tensors have {name}={expected}")
    # Every head's tensors, not only the first's: a serving engine builds each at these shapes.
    for key, tensor in tensors.items():
        expected_shape = [hidden] if key.endswith("bias") else [vocab if key.startswith("lm_heads") else hidden, hidden]
        if list(tensor.shape) != expected_shape:
            raise ValueError(f"{directory}: tensor {key} has shape {list(tensor.shape)}, expected {expected_shape} "
                             f"(hidden_size={hidden}, vocab_size={vocab})")
    ours = config.get("medusa_liger", {})
    values = {**ours, "num_heads": num_heads, "num_layers": num_layers, "shared_lm_head": shared}
    serving = ours.get("serving_dtype")
    return HeadsCheckpoint(
        config=MedusaConfig.from_dict(values), hidden_size=hidden, vocab_size=vocab, tensors=tensors,
        lm_head_weight=original, base_model_name_or_path=config.get("base_model_name_or_path"), format=format,
        serving_dtype=None if serving is None else parse_dtype(getattr(torch, str(serving), serving)),
        base_model_revision=ours.get("base_model_revision"),
    )


def check_backbone_matches(ckpt: HeadsCheckpoint, backbone: nn.Module, where: str | Path) -> None:
    """Raise ValueError naming found vs expected when the heads do not fit ``backbone``'s lm_head."""
    vocab, hidden = backbone.get_output_embeddings().weight.shape
    for name, found, expected in (("hidden_size", ckpt.hidden_size, hidden), ("vocab_size", ckpt.vocab_size, vocab)):
        if found is not None and found != expected:
            raise ValueError(f"heads checkpoint {where} has {name}={found} but the backbone expects {name}={expected}")


class BackboneLoadError(ValueError, FileNotFoundError):
    """A backbone that is no model directory and no hub model that loads (the CLIs name the flag)."""


def check_backbone_path(path: str | Path) -> None:
    """Say what is wrong with a backbone path before transformers does (BackboneLoadError): a
    local-looking path (``records.looks_like_local_path``) that does not exist (the hub would answer
    about repo ids); a directory without config.json (e.g. a run's directory), holding Medusa heads,
    or whose config.json names no ``model_type``. Hub names pass."""
    from medusa_liger.records import looks_like_local_path
    from medusa_liger.run_layout import FINAL_DIR

    name = str(path)
    directory = user_path(path)
    run_backbone = f"a run's backbone is in RUN_DIR/{FINAL_DIR}/{BACKBONE_SUBDIR}"
    if not directory.is_dir():
        if looks_like_local_path(path):
            raise BackboneLoadError(f"backbone directory {name!r} does not exist")
        return
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise BackboneLoadError(f"{name!r} is not a Hugging Face model directory (no config.json); {run_backbone}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # transformers says what is wrong with the file
    if not isinstance(config, dict):
        return
    # Heads in the vllm format have model_type "medusa"; in the medusa format, none (a full Medusa-2
    # model records medusa_num_heads beside its own model_type: a backbone).
    if config.get("model_type") == "medusa" or ("medusa_num_heads" in config and not config.get("model_type")):
        raise BackboneLoadError(f"{name!r} holds Medusa heads, not a backbone: pass the base model they were "
                                f"trained on ({run_backbone})")
    if not config.get("model_type"):
        raise BackboneLoadError(f"{name!r} is not a transformers model: its config.json names no model_type")


def _local_owner(name: str) -> str | None:
    """'runs/ (holding [...])' when ``name``'s first part is a local directory but ``name`` is not
    (a hub name ``owner/model`` that is likely a mistyped local path), else None."""
    parts = name.split("/")
    owner = user_path(parts[0])
    if len(parts) < 2 or not parts[0] or user_path(name).exists() or not owner.is_dir():
        return None
    try:
        return f"{parts[0]}/ (holding {sorted(p.name for p in owner.iterdir() if not p.name.startswith('.'))[:8]})"
    except OSError:  # not listable: named without its entries
        return f"{parts[0]}/"


def mistyped_path_hint(name: str | Path) -> str:
    """' (runs/ (holding [...]) is a local directory: a mistyped path?)', or '' (``_local_owner``)."""
    owner = _local_owner(str(name))
    return "" if owner is None else f" ({owner} is a local directory: a mistyped path?)"


def note_hub_lookup(name: str | Path) -> None:
    """Print a note (stderr) before a name that looks like a mistyped local path is asked of the hub
    (unless its model is in the local cache): offline, the lookup takes a minute to fail."""
    owner = _local_owner(str(name))
    if owner is not None and not _in_hub_cache(str(name)):
        print(f"note: {str(name)!r} is no local directory, though {owner} is one; asking the hub for a model "
              "of that name", file=sys.stderr, flush=True)


def _in_hub_cache(name: str) -> bool:
    """Whether the hub model ``name`` has a config.json in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, or an older huggingface_hub: not cached
        return False


def backbone_load_error(path: str | Path, error: Exception, revision: str | None = None) -> BackboneLoadError:
    """The one-line BackboneLoadError for transformers' error loading the backbone at ``path`` (at the hub
    ``revision``, when one was asked for; its messages run to paragraphs of upgrade advice, and a path's
    OSError talks about repo ids)."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if user_path(path).is_dir():
        return BackboneLoadError(f"backbone {str(path)!r} could not be loaded: {reason}")
    offline = " (HF_HUB_OFFLINE is set: only models in the local cache load)" if is_offline() else ""
    at = "" if revision is None else f" at revision {revision!r}"
    return BackboneLoadError(f"backbone {str(path)!r} is not a local directory{mistyped_path_hint(path)}, and no "
                             f"hub model of that name could be loaded{at}{offline}: {reason}")


def is_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def lm_head_bias_of(lm_head: nn.Module) -> torch.Tensor | None:
    """An output projection's bias, detached, or None (most causal LMs' lm_head has none)."""
    bias = getattr(lm_head, "bias", None)
    return None if bias is None else bias.detach()


def load_backbone(path: str | Path, dtype: torch.dtype | str | None = None, **options: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in the saved dtype (or ``dtype``); ``options``:
    more of its keyword arguments (e.g. attn_implementation). A path that cannot be a model, or a
    model that does not load, is a one-line BackboneLoadError. A hub model is read at the commit its
    name (and ``revision``) resolves to (``hub_commit``), which its config then records."""
    from transformers import AutoModelForCausalLM

    check_backbone_path(path)
    dtype = parse_dtype(dtype)
    note_hub_lookup(path)
    asked = options.get("revision")
    commit = hub_commit(path, asked)
    if commit is not None:  # every file read at that one commit, and the commit recorded
        options = {**options, "revision": commit}
    try:
        model = AutoModelForCausalLM.from_pretrained(local_or_hub(path), dtype=dtype if dtype is not None else "auto",
                                                     **options)
    except (OSError, ValueError) as error:
        raise backbone_load_error(path, error, asked) from error
    # Ours, not transformers': 5.24 records none, 5.17 takes one from a local path inside a hub cache
    # (``snapshots/<commit>/``), so a local directory would record a commit on some versions only.
    model.config._commit_hash = commit
    return model


def hub_commit(name: str | Path, revision: str | None = None) -> str | None:
    """The commit that the hub model ``name`` at ``revision`` (a branch, tag or commit; None: its default
    branch) resolves to now: its config.json fetched into the Hugging Face cache (or found there, offline),
    whose ``snapshots/<commit>/`` path says it. None for a local directory or the tiny model, or where it
    cannot be resolved (``from_pretrained`` then says why). Resolved once before loading, the commit is
    what every file is then read at (transformers 5.x no longer records it in ``config._commit_hash``)."""
    import re

    if not names_a_hub_model(name):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(name), "config.json", revision=revision)
    except Exception:  # not found, offline and not cached, an invalid repo id: from_pretrained says which
        return None
    found = re.search(r"/snapshots/([0-9a-f]{40})/", Path(path).as_posix())
    return found.group(1) if found else None


def recorded_base(directory: str | Path) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, base_model_revision) that the heads in ``directory`` record, from their
    config.json alone (no tensor is read)."""
    config = _read_config(Path(directory))
    return config.get("base_model_name_or_path"), config.get("medusa_liger", {}).get("base_model_revision")


def recorded_revision(name: str | None, revision: str | None, backbone: str | Path) -> dict[str, str]:
    """``{"revision": revision}`` when ``backbone`` is the hub name ``name`` that heads record with the
    commit ``revision`` its files came from (``from_pretrained``'s keyword), else ``{}``: the heads'
    backbone is what they were trained on, not whatever the name's default branch holds now."""
    if revision and str(backbone) == name and names_a_hub_model(backbone):
        return {"revision": revision}
    return {}


def load_pretrained(cls: type, directory: str | Path, backbone: nn.Module | str | None = None, **overrides: Any):
    """``MedusaModel.from_pretrained``: read the heads, find the backbone, check sizes, load exactly."""
    directory = Path(directory)
    ckpt = read_heads(directory)
    if backbone is None:
        if not (directory / BACKBONE_SUBDIR).is_dir():
            raise ValueError(f"backbone is required: {directory} holds no {BACKBONE_SUBDIR}/ subdirectory; pass a "
                             f"model or a path (the heads were trained on {ckpt.base_model_name_or_path!r})")
        backbone = directory / BACKBONE_SUBDIR
    if isinstance(backbone, (str, Path)):
        backbone = load_backbone(backbone, **recorded_revision(ckpt.base_model_name_or_path,
                                                                ckpt.base_model_revision, backbone))
    check_backbone_matches(ckpt, backbone, directory)
    fixed = {"num_heads", "num_layers", "shared_lm_head"} & set(overrides)
    if fixed:
        raise ValueError(f"{sorted(fixed)} are fixed by the checkpoint and cannot be overridden")
    saved = ckpt.config
    if ("mode" in overrides and "heads_loss_weight" not in overrides
            and saved.heads_loss_weight == DEFAULT_HEADS_LOSS_WEIGHT[saved.mode]):
        # The stored weight is the stored mode's default (to_dict writes it resolved): another mode
        # takes its own default, as a new MedusaConfig(mode=...) would.
        overrides = {**overrides, "heads_loss_weight": None}
    config = dataclasses.replace(saved, **overrides)
    model = cls.from_backbone(backbone, config)
    model.heads.load_state_dict(ckpt.tensors, strict=True)
    if ckpt.lm_head_weight is not None:
        lm, stored = model.lm_head.weight, ckpt.lm_head_weight
        # Compared in the stored dtype: an fp32 backbone's lm_head exported in bf16 is the same one.
        if not torch.equal(stored.to(lm.device), lm.detach().to(stored.dtype)):
            warnings.warn(f"the lm_head stored in {directory} (original_lm_head) differs from the backbone's; "
                          "the backbone's is used", stacklevel=3)
    return model
