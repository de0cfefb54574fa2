"""The training loop: ``train(cfg)`` runs a whole Medusa training job and exports the result.

One optimizer step:

1. take ``grad_accum`` micro-batches of packed rows from the loader;
2. count, for every loss term j (the backbone's shift-1 loss in joint mode, then head k's shift
   k + 2), the valid targets n_j of each micro-batch and their total N_j over the step;
3. run each micro-batch with loss weights multiplied by n_j / N_j and backpropagate: the model's
   losses are means over each micro-batch's own targets, so the accumulated gradient is exactly
   that of  sum_j w_j * (sum of target losses of term j) / N_j,  the loss of one big batch, however
   unevenly the targets fall into the micro-batches;
4. clip the gradient norm, step AdamW and the schedule, zero the gradients.

Data parallel (``torchrun``, see ``distributed.py``): each rank reads its own rows of every
micro-batch, the counts N_j are summed over ranks before step 3, and the gradients of the trainable
parameters are summed over ranks after it, so every rank holds the gradient of the global batch
(``grad_accum x world_size`` micro-batches) and takes the same step. Rank 0 alone logs, writes
checkpoints (the others wait in a barrier) and exports; evaluation is split over the ranks.

Sharded (``train.fsdp``, see ``fsdp.py``): the same step over FSDP2 units; checkpoints gather whole
tensors on rank 0 and exports read a plain copy that rank 0 rebuilds on the CPU.

Joint mode (Medusa-2) may start with ``train.heads_only_steps`` steps that train only the heads
(the model runs in "heads" mode, lambda = 1); after that the backbone trains too and lambda
follows ``train.heads_lambda`` (constant, linear or sine ramp).

Reproducibility: the model init, data order (``PackedLoader``) and every random draw depend only on
``train.seed``; checkpoints hold parameters, optimizer, schedule, RNG and loader position, so a run
resumed with ``train.resume=auto`` logs the same losses as an uninterrupted one.

Precision: the backbone keeps ``model.dtype``, the heads and LoRA adapters ``train.master_dtype``
(fp32 by default, so AdamW's small updates are not rounded away), and the forward runs under bf16
autocast on CUDA (``train.precision``). Checkpoints hold the trained tensors in their master dtype
(resume is exact); the final export casts to ``export.dtype`` (auto: ``model.dtype``).

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``plot.png``,
``checkpoints/step-XXXXXX/`` (see ``checkpoint.py``; the heads in ``heads/`` in the medusa format),
``final/heads_<format>/`` per export format and, when the backbone trained or was built here,
``final/backbone/`` (LoRA merged, with the tokenizer; the heads' ``base_model_name_or_path``
points at it). A fresh start (no checkpoint to resume) deletes an old ``checkpoints/`` directory
and names the deleted steps in a warning; an earlier run's ``eval/`` report and held-out prompts go too.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medusa_liger.heads import MedusaConfig
from medusa_liger.heads.export import (
    hub_commit,
    mistyped_path_hint,
    note_hub_lookup,
    parse_dtype,
    read_heads,
    write_heads,
)
from medusa_liger.kernels.cross_entropy import row_targets
from medusa_liger.records import recorded_data_warnings
from medusa_liger.run_layout import (
    CHECKPOINT_HEADS_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
)
from medusa_liger.seeds import torch_seed
from medusa_liger.train import distributed, fsdp
from medusa_liger.train.build import (
    RANKS_KEY,
    autocast_dtype,
    build_medusa,
    build_optimizer,
    build_scheduler,
    build_tokenizer_and_backbone,
    check_position_range,
    check_token_range,
    data_changes,
    data_settings,
    export_dtype,
    fixed_changes,
    fixed_settings,
    heads_lambda,
    objective_changes,
    objective_settings,
    precision_line,
    precision_warning,
    reapply_schedule,
    resolve_device,
    trainable_parameters,
)
from medusa_liger.train.checkpoint import (
    ResumeError,
    check_resume_heads,
    delete_earlier_evaluation,
    delete_old_checkpoints,
    drop_later_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    remove_killed_saves,
    rng_state,
    run_dir_lock,
    save_checkpoint,
)
from medusa_liger.train.config import Config, ConfigError, save_config
from medusa_liger.train.data import IGNORE_INDEX, data_errors, load_examples
from medusa_liger.train.finish import finish_run, format_summary
from medusa_liger.train.logging import MetricsLogger, NullLogger
from medusa_liger.train.packing import (
    PackedLoader,
    build_packed_data,
    most_common_target_frequency,
    rows_fingerprint,
    split_eval,
)


@dataclass
class _ScaledMedusaConfig(MedusaConfig):
    """A MedusaConfig whose head weights are further multiplied per head (token normalization)."""

    head_scales: list[float] = field(default_factory=list)

    def head_weights(self) -> list[float]:
        return [w * s for w, s in zip(super().head_weights(), self.head_scales, strict=True)]


@dataclass
class TrainResult:
    """What a finished run produced: its directories and its final numbers."""

    output_dir: Path
    final_dir: Path
    summary: dict[str, Any]
    paths: dict[str, Path]


def _loss_shifts(model) -> list[int]:
    return ([1] if model.config.mode == "joint" else []) + model.config.head_shifts()


def count_targets(labels: torch.Tensor, segment_ids: torch.Tensor, shift: int, vocab_size: int) -> torch.Tensor:
    """Number of valid targets (a 0-dim int64 tensor on ``labels``' device) of the loss term with
    ``shift`` over [B, T] ``labels`` / ``segment_ids``.

    The cross-entropy kernel's own rule (``row_targets``): a target past the row's end, in another
    segment, equal to IGNORE_INDEX or outside [0, vocab_size) does not count, so the loop's
    normalization divides by exactly the number of targets the kernel averages over.
    """
    B, T = labels.shape
    _, valid = row_targets(labels.reshape(-1), segment_ids.reshape(-1), T, shift, 0, B * T, IGNORE_INDEX, vocab_size)
    return valid.sum()


def _set_stage(model, cfg: Config, step: int) -> str:
    """Put a joint run in its heads-only first stage or in joint training at ``step``; return the stage."""
    if cfg.train.mode != "joint":
        return "heads"
    if step < cfg.train.heads_only_steps:
        model.config.mode, model.heads_loss_weight, stage = "heads", 1.0, "heads_only"
    else:
        model.config.mode, stage = "joint", "joint"
        model.heads_loss_weight = heads_lambda(cfg, step - cfg.train.heads_only_steps)
    model.train()  # re-applies the frozen backbone's eval mode in the heads-only stage
    return stage


def accumulate_gradients(model, batches, device, amp=None) -> dict[str, Any]:
    """Forward and backward every micro-batch of ``batches`` with token-normalized weights.

    The gradients left in ``.grad`` equal those of one forward over all the rows together, of
    every rank when data-parallel (see the module docstring); returns the step's token-weighted
    loss / accuracy metrics over all of them.
    """
    shifts = _loss_shifts(model)
    joint = model.config.mode == "joint"
    V = model.heads.vocab_size
    counts = [[int(count_targets(b["labels"], b["segment_ids"], s, V)) for s in shifts] for b in batches]
    # Every rank divides by the global count of each term, so the summed gradients are the global batch's.
    totals = distributed.all_reduce_sum(torch.tensor([sum(c[j] for c in counts) for j in range(len(shifts))]))
    totals = [int(t) for t in totals]
    base = model.config
    K = base.num_heads
    # Metric sums stay on the device (no metric copy per micro-batch) in the dtypes a host copy would
    # use (loss in fp64, the rest fp32), so the numbers are bit-identical; one transfer per step.
    # (With heads.skip_ignored_targets the fused loss itself reads its row counts once per micro-batch.)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    lm_sums = torch.zeros(2, device=device)
    head_sums = torch.zeros(2, K, device=device)  # rows: loss * tokens, accuracy * tokens
    tokens = sum(int((b["segment_ids"] != 0).sum()) for b in batches)  # on the host, before the copy
    try:
        for batch, n in zip(batches, counts):
            scales = [n_j / N_j if N_j else 0.0 for n_j, N_j in zip(n, totals)]
            lm_scale, head_scales = (scales[0], scales[1:]) if joint else (0.0, scales)
            # Loss weights scaled by this micro-batch's share of each term's targets.
            model.config = _ScaledMedusaConfig(**{**base.to_dict(), "lm_loss_weight": base.lm_loss_weight * lm_scale},
                                               head_scales=head_scales)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                out = model(batch["input_ids"], labels=batch["labels"], segment_ids=batch["segment_ids"])
            out.loss.backward()
            loss_total += out.loss.detach().double()
            head_tokens = out.head_tokens.float()
            head_sums[0] += out.head_losses.detach().float() * head_tokens
            head_sums[1] += out.head_accuracy.detach().float() * head_tokens
            if joint:
                lm_sums += torch.stack([out.lm_loss.detach().float(), out.lm_accuracy.detach().float()]) * n[0]
    finally:
        model.config = base
    # Replicated parameters are summed here; FSDP has already reduce-scattered the sharded ones.
    distributed.all_reduce_grads(p for p in model.parameters() if p.requires_grad and not fsdp.is_sharded(p))
    # Metric sums over ranks, each in the dtype it was accumulated in (so one rank's numbers are unchanged).
    sums32 = distributed.all_reduce_sum(torch.cat([head_sums.flatten(), lm_sums]))
    sums64 = distributed.all_reduce_sum(torch.stack([loss_total, loss_total.new_tensor(float(tokens))]))
    sums32, (loss_total, tokens) = sums32.cpu(), sums64.tolist()  # the step's one wait for the device
    head_sums, lm_sums = sums32[: 2 * K].view(2, K), sums32[2 * K :]
    tokens = int(tokens)

    head_totals = torch.tensor(totals[1:] if joint else totals, dtype=torch.float32).clamp(min=1)
    metrics: dict[str, Any] = {"loss": loss_total}
    if joint:
        metrics["lm_loss"] = float(lm_sums[0] / max(totals[0], 1))
        metrics["acc/lm"] = float(lm_sums[1] / max(totals[0], 1))
    for k in range(K):
        metrics[f"loss/head{k}"] = float(head_sums[0, k] / head_totals[k])
        metrics[f"acc/head{k}"] = float(head_sums[1, k] / head_totals[k])
    metrics.update({"lambda": float(base.heads_loss_weight), "tokens": tokens})
    return metrics


class DivergedError(RuntimeError):
    """A step's loss or gradient norm is not finite: training stops before that step's update."""


def _train_step(model, batches, optimizer, scheduler, params, cfg: Config, device, amp,
                step: int | None = None) -> dict[str, Any]:
    """One optimizer step (``step``, counted from 1, names it in errors): accumulate, clip, AdamW,
    schedule, zero the gradients."""
    metrics = accumulate_gradients(model, batches, device, amp)
    if cfg.train.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    else:  # no clipping, but the norm still: a non-finite gradient must stop the run before its update
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = fsdp.total_norm(norm)
    # Both are host numbers already (all-reduced: every rank stops alike). A NaN update would make
    # every weight NaN, and the run would go on to export them.
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
        which = "this step" if step is None else f"step {step}"
        raise DivergedError(
            f"{which}: the loss is {metrics['loss']} and the gradient norm {grad_norm}: stopped before this step's "
            "update (the checkpoints are as they were). Lower train.lr / train.heads_lr, set train.max_grad_norm, "
            "or keep weights in float32 or bfloat16")
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics.update({"lr/heads": lrs.get("heads", 0.0), "lr/backbone": lrs.get("backbone", 0.0),
                    "grad_norm": grad_norm})
    return metrics


@torch.no_grad()
def evaluate(model, data, micro_batch_size: int, device, amp) -> dict[str, float]:
    """Token-weighted loss and top-1 accuracy of every head (and the backbone in joint mode) on ``data``.

    Data parallel: rank r evaluates micro-batches r, r + W, ... and the sums are added over ranks.
    Sharded (FSDP), every rank runs the same number of forwards (each gathers the layers): a rank
    past the end runs the first micro-batch again and counts nothing.
    """
    was_training = model.training
    model.eval()
    joint = model.config.mode == "joint"
    K = model.config.num_heads
    sums, total = torch.zeros(2, K), torch.zeros(K)
    lm_sums, lm_total = torch.zeros(2), 0
    stride = micro_batch_size * distributed.world_size()
    rounds = -(-len(data) // stride) if fsdp.has_sharded(model.parameters()) else None
    starts = range(distributed.rank() * micro_batch_size, len(data) if rounds is None else rounds * stride, stride)
    for start in starts:
        counted = start < len(data)  # False: a lockstep forward past the end, counted nowhere
        start = start if counted else 0
        rows = data.select(torch.arange(start, min(start + micro_batch_size, len(data))))
        labels, segment_ids = rows.labels.to(device), rows.segment_ids.to(device)
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            out = model(rows.input_ids.to(device), labels=labels, segment_ids=segment_ids)
        n = out.head_tokens.float().cpu() * counted
        sums += torch.stack([out.head_losses.float().cpu(), out.head_accuracy.float().cpu()]) * n
        total += n
        if joint:
            n_lm = int(count_targets(labels, segment_ids, 1, model.heads.vocab_size)) if counted else 0
            lm_sums += torch.stack([out.lm_loss.float().cpu(), out.lm_accuracy.float().cpu()]) * n_lm
            lm_total += n_lm
    model.train(was_training)
    sums, total = distributed.all_reduce_sum(sums), distributed.all_reduce_sum(total)
    lm_sums = distributed.all_reduce_sum(lm_sums)
    lm_total = int(distributed.all_reduce_sum(torch.tensor([lm_total]))[0])
    result = {f"eval/loss/head{k}": float(sums[0, k] / total[k].clamp(min=1)) for k in range(K)}
    result.update({f"eval/acc/head{k}": float(sums[1, k] / total[k].clamp(min=1)) for k in range(K)})
    if joint:
        result["eval/lm_loss"] = float(lm_sums[0] / max(lm_total, 1))
        result["eval/acc/lm"] = float(lm_sums[1] / max(lm_total, 1))
    return result


def train(cfg: Config) -> TrainResult:
    """Run the training job ``cfg`` end to end (see module docstring); return where things went
    (under ``torchrun`` every rank calls this; only rank 0's result has a summary and paths)."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    check_wandb_login(cfg)
    with distributed.setup(resolve_device(cfg)) as device, hf_progress_bars(cfg.logging.progress), \
            run_dir_lock(Path(cfg.output_dir)):
        return _train(cfg, device)


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``logging.progress`` off, transformers' own bars (loading weights, writing shards) are off
    too for the run, then as they were: such a run writes no bar to its log."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()


def check_wandb_login(cfg: Config) -> None:
    """``logging.wandb: online`` needs credentials: said now, not by wandb.init after the data and the
    model loaded. Without wandb installed the logger warns and trains on, so nothing to check then."""
    if cfg.logging.wandb != "online":
        return
    try:
        import wandb
    except ImportError:
        return
    if not wandb.login(prompt=False, verify=False):  # reads WANDB_API_KEY, the settings and .netrc only
        raise ConfigError("logging.wandb=online but wandb has no API key: run `wandb login` or set WANDB_API_KEY, "
                          "or use logging.wandb=offline (or disabled)")


@contextmanager
def model_errors(cfg: Config) -> Iterator[None]:
    """Failures to load ``model.name_or_path`` (a mistyped hub name, a model not cached offline) or to
    use ``model.attn_implementation`` with it, as ConfigErrors naming the key: the user's input, not bugs."""
    try:
        yield
    except OSError as error:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path} cannot be loaded"
                          f"{mistyped_path_hint(cfg.model.name_or_path)}: {' '.join(str(error).split())}") from error
    except (ImportError, ValueError) as error:
        attn = cfg.model.attn_implementation  # transformers' errors about it name "attention"
        if isinstance(error, ConfigError) or attn is None or "attention" not in str(error).lower():
            raise  # already said (e.g. lora.target_modules), or not about attention: a bug, with its traceback
        raise ConfigError(f"model.attn_implementation={attn}: {' '.join(str(error).split())}") from error


def _train(cfg: Config, device: torch.device) -> TrainResult:
    if cfg.train.fsdp:
        fsdp.require_processes()  # said now, not after loading the model
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    amp = autocast_dtype(cfg, device)

    # Data and model (the tiny tokenizer is trained on the same examples the run trains on).
    examples: list = []
    load_notes: list[str] = []  # their data warnings, for the packed-data cache to keep

    def get_examples():
        if not examples:
            with data_errors(), recorded_data_warnings(load_notes):
                examples.extend(load_examples(cfg.data))
        return examples

    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    # A hub backbone's commit, resolved on rank 0 and read at by every rank: the replicas start from the
    # same weights, and every rank judges a resume by the same commit.
    # (Rank 0's None too: no rank asks the hub again; each loads model.revision as given.)
    commit = None
    if cfg.model.name_or_path != "tiny":
        if main:
            note_hub_lookup(cfg.model.name_or_path)  # (before the lookup, which may take a minute)
        commit = distributed.all_gather_objects(hub_commit(cfg.model.name_or_path, cfg.model.revision)
                                                if main else None)[0]
    # Rank 0 first fills the caches (the tiny tokenizer, the packed rows) that the other ranks then read.
    with distributed.main_first() if cfg.model.name_or_path == "tiny" else nullcontext():
        # Sharded, only rank 0 reads the weights; the others build the architecture on the meta device.
        # (The tiny backbone is built here, not loaded: its errors are data or disk errors, not the name's.)
        with model_errors(cfg) if cfg.model.name_or_path != "tiny" else nullcontext():
            tokenizer, backbone = build_tokenizer_and_backbone(cfg, get_examples, on_meta=cfg.train.fsdp and not main,
                                                               commit=commit, resolved=True)
    check_position_range(cfg, backbone)  # before the data packs
    with distributed.main_first(), data_errors():
        data = build_packed_data(cfg.data, tokenizer, cache_dir, examples=examples or None, load_notes=load_notes,
                                 quiet=not main)
    check_token_range(cfg, data.input_ids, backbone)
    # Checkpoints (rank 0's) keep it: a resume says when the rows changed (files edited in place too).
    rows = rows_fingerprint(data) if main else None
    with data_errors():  # also: fewer packed rows than one optimizer step reads
        train_data, eval_data = split_eval(data, cfg.data.eval_fraction, cfg.train.seed)
        loader = PackedLoader(train_data, cfg.train.micro_batch_size, cfg.train.seed, rank=distributed.rank(),
                              world_size=distributed.world_size(), grad_accum=cfg.train.grad_accum)
    backbone_config = backbone.config  # (its hub revision: checkpoints of adapters or heads keep it)
    model = build_medusa(cfg, backbone)
    if cfg.train.fsdp:  # every rank's shards filled from rank 0's tensors
        param_dtype = getattr(torch, cfg.train.fsdp_param_dtype) if cfg.train.fsdp_param_dtype else None
        fsdp_units = fsdp.shard_model(model, device, param_dtype)
    else:
        fsdp_units, model = 0, model.to(device)
        # Replicas start equal even where initialization is random and unseeded (e.g. LoRA adapters).
        distributed.broadcast_from_main(trainable_parameters(model).values())
    params = trainable_parameters(model)  # after sharding: FSDP's parameters replace the module's
    if distributed.rank() > 0:  # each rank its own dropout masks (rank 0 draws what one process draws);
        # (data order has its own generator)
        torch.manual_seed(torch_seed(cfg.train.seed + distributed.rank()))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)

    # Resume: parameters, optimizer, schedule, RNG and data position from the newest checkpoint.
    ckpt_root = out / CHECKPOINTS_DIR
    start_step, wandb_id, rewound = 0, None, False
    resume_dir = find_resume_checkpoint(cfg.train.resume, ckpt_root)
    distributed.barrier()  # every rank has chosen before rank 0 may delete old checkpoints below
    # Checkpoints hold the heads in the export format (heads/) and every other trainable tensor here.
    other_params = {name: p for name, p in params.items() if not name.startswith("heads.")}

    if resume_dir is not None:
        saved_heads = read_heads(resume_dir / CHECKPOINT_HEADS_DIR)
        check_resume_heads(saved_heads.config, model.config, resume_dir,  # a clear error before any state loads
                           (saved_heads.hidden_size, saved_heads.vocab_size),
                           (model.heads.hidden_size, model.heads.vocab_size))
        state = load_checkpoint(resume_dir, other_params, optimizer, scheduler, rank=distributed.rank())
        with torch.no_grad():
            fsdp.load_module_(model.heads, saved_heads.tensors)
        start_step, wandb_id = int(state["step"]), state.get("wandb_id")
        fixed = fixed_changes(state.get("fixed"), cfg, tokenizer, backbone_config)
        if fixed:  # before save_config, as the step check below
            raise ResumeError(f"train.resume: checkpoint {str(resume_dir)!r} was trained under other settings that its "
                              f"weights depend on: {'; '.join(fixed)}. Restore them, or start afresh "
                              "(train.resume=none)")
        if start_step > cfg.train.steps:  # before save_config: the run's config.yaml stays as it was
            raise ResumeError(f"train.resume: checkpoint {str(resume_dir)!r} is at step {start_step}, past "
                              f"train.steps={cfg.train.steps}: nothing is left to train (give train.steps >= "
                              f"{start_step})")
        loader.load_state_dict(state["data"])
        changed = reapply_schedule(cfg, optimizer, scheduler)  # this config's rates and schedule, not the checkpoint's
        changed += objective_changes(state.get("objective"), cfg)  # a new loss is allowed (a curriculum), and said
        saved_data = state.get("data_settings")
        if saved_data is not None and RANKS_KEY not in saved_data and "world_size" in state:  # (older checkpoints)
            saved_data = saved_data | {RANKS_KEY: state["world_size"]}
        changed += data_changes(saved_data, cfg, rows)  # new data to continue on, likewise
        if changed and main:
            print(f"note: resuming at step {start_step} with {', '.join(changed)} (from here on)",
                  file=sys.stderr, flush=True)
        rewound = bool(changed)  # (then what was logged past the checkpoint is not what this resume logs)
        if main and resume_dir.resolve().parent == ckpt_root.resolve():
            dropped = drop_later_checkpoints(ckpt_root, start_step)  # resumed from an older one of its own
            if dropped:  # (not rewound by itself: an exact resume logs the steps it replays as they were)
                print(f"warning: resuming from step {start_step} abandons the later checkpoints {', '.join(dropped)} "
                      f"(deleted)", file=sys.stderr, flush=True)
            remove_killed_saves(ckpt_root, cfg.checkpoint.keep, resumed=resume_dir)
        elif main:  # another run's checkpoint: this directory's own checkpoints and metrics are of a third run
            wandb_id = None  # (nor is that run's wandb run this one's)
            if ckpt_root.is_dir() and ckpt_root.resolve() not in resume_dir.resolve().parents:  # never the source
                delete_old_checkpoints(ckpt_root, why=f"resuming from another run's checkpoint {resume_dir}",
                                       hint="")
            delete_earlier_evaluation(out)
            if (out / METRICS_FILE).is_file():
                (out / METRICS_FILE).unlink()  # (else its first records would be the old run's)
    elif main:  # a fresh start: another run's checkpoints and evaluation go (with a warning)
        if ckpt_root.is_dir():
            delete_old_checkpoints(ckpt_root)
        delete_earlier_evaluation(out)
    if main:  # only now: a resume refused above leaves the run's config.yaml as its checkpoints were made
        save_config(cfg, out / CONFIG_FILE)
    _, baseline = most_common_target_frequency(train_data, 2)

    logger = MetricsLogger(out, cfg.train.steps, start_step, wandb_mode=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, run_name=cfg.logging.run_name or cfg.name,
                           config=cfg.to_dict(), progress=cfg.logging.progress, every=cfg.logging.every,
                           wandb_id=wandb_id, rewound=rewound) if main else NullLogger()
    with logger:
        world = distributed.world_size()
        logger.write(f"{len(train_data)} packed rows of {cfg.data.seq_len} tokens"
                     f"{f', {len(eval_data)} held out' if eval_data is not None else ''}; "
                     f"{sum(p.numel() for p in params.values()):,} trainable parameters on {device}"
                     + (f" x {world} ranks" if world > 1 else "")
                     + (f"; resumed from {resume_dir}" if resume_dir is not None else ""))
        logger.write(precision_line(cfg, amp))
        warning = precision_warning(cfg) if main else None
        if warning:
            print(warning, file=sys.stderr, flush=True)
        if cfg.train.eval_every and eval_data is None:
            logger.write(f"train.eval_every={cfg.train.eval_every}: no held-out rows to evaluate "
                         "(data.eval_fraction=0)")
        if fsdp_units:
            logger.write(f"model, gradients and optimizer state sharded over {world} ranks "
                         f"(FSDP2: {fsdp_units} decoder-layer units, the heads and the root)"
                         + (f"; parameters gathered in {cfg.train.fsdp_param_dtype}, gradients reduced in "
                            "float32" if cfg.train.fsdp_param_dtype else ""))
        elif cfg.train.shard_optimizer:
            logger.write(f"optimizer state sharded over {world} ranks (ZeRO-1)" if world > 1 else
                         "train.shard_optimizer: one process, nothing to shard")
        for step in range(start_step, cfg.train.steps):
            step_start = time.perf_counter()
            stage = _set_stage(model, cfg, step)
            batches = [loader.next_batch() for _ in range(cfg.train.grad_accum)]
            metrics = _train_step(model, batches, optimizer, scheduler, list(params.values()), cfg, device, amp,
                                  step + 1)
            seconds = time.perf_counter() - step_start
            metrics.update({"tokens_per_s": metrics["tokens"] / seconds, "epoch": loader.epoch, "stage": stage})
            if device.type == "cuda":  # the allocator's own counter: a host read, no device sync
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            done = step + 1
            # Held-out metrics along the way and at the last step, in that step's record (every rank
            # evaluates: FSDP gathers in lockstep). Evaluation draws no random numbers, so resuming stays exact.
            last = done == cfg.train.steps
            if eval_data is not None and (last or (cfg.train.eval_every and done % cfg.train.eval_every == 0)):
                if last:
                    _set_stage(model, cfg, done)  # the finished model's stage (joint: with its lm metrics)
                metrics.update(evaluate(model, eval_data, cfg.train.micro_batch_size, device, amp))
                if not last:  # the last one is in the summary
                    logger.write(f"step {done}: held-out top-1 " + ", ".join(
                        f"head{k} {metrics[f'eval/acc/head{k}']:.4f}" for k in range(cfg.heads.num_heads)))
            logger.log(done, metrics)
            if cfg.checkpoint.every and (done % cfg.checkpoint.every == 0 or done == cfg.train.steps):
                rng_states = distributed.all_gather_objects(rng_state())  # each rank resumes its own streams
                # Whole tensors on rank 0: gathered where sharded (collectives: every rank takes part).
                distributed.consolidate_optimizer(optimizer)  # ZeRO-1
                heads = fsdp.heads_checkpoint(model, cfg.model.name_or_path)
                if heads is not None:  # the dtype the run exports in, not the one it trains a whole backbone in
                    heads.serving_dtype = parse_dtype(export_dtype(cfg))
                trained = fsdp.full_tensors(other_params) if fsdp_units else other_params
                optimizer_state = fsdp.full_optimizer_state(optimizer) if fsdp_units else optimizer
                if main:
                    run_state = {"data": loader.state_dict(), "wandb_id": logger.wandb_id, "world_size": world,
                                 "objective": objective_settings(cfg),
                                 "fixed": fixed_settings(cfg, tokenizer, backbone_config),
                                 "data_settings": data_settings(cfg, rows)}
                    save_checkpoint(ckpt_root, done, trained, optimizer_state, scheduler, run_state, cfg.checkpoint.keep,
                                    write_extra=lambda d, h=heads: write_heads(h, d / CHECKPOINT_HEADS_DIR, "medusa"),
                                    rng_states=rng_states)
                del heads, trained, optimizer_state
                distributed.barrier()  # the checkpoint is complete before any rank goes on
        _set_stage(model, cfg, cfg.train.steps)
        model.eval()
        if eval_data is None:
            eval_metrics = {}
        elif start_step < cfg.train.steps:  # the loop's last step evaluated the finished model
            eval_metrics = {key: value for key, value in metrics.items() if key.startswith("eval/")}
        else:  # resumed from the last checkpoint: nothing left to train
            eval_metrics = evaluate(model, eval_data, cfg.train.micro_batch_size, device, amp)
        final, summary, paths = out / FINAL_DIR, {}, {}
        if fsdp_units:  # exports read a plain copy that rank 0 builds on the CPU
            optimizer.state.clear()  # no step follows: free the sharded AdamW state first
            model = fsdp.unsharded_copy(cfg, model, params, get_examples)
        if main and resume_dir is not None:  # (fresh starts deleted it; the checkpoint's heads may be others)
            delete_earlier_evaluation(out, prompts=False, what="the evaluation of the heads this resume replaces")
        if main:
            summary, paths = finish_run(cfg, model, tokenizer, logger, eval_data, eval_metrics=eval_metrics,
                                        baseline=baseline, final=final, started=started)
    distributed.barrier()  # the other ranks return once rank 0's exports exist
    if main:
        # After the logger closed (wandb prints its own report on finish), so the summary comes last.
        print(format_summary(summary, paths, cfg.heads.num_heads), flush=True)
    return TrainResult(out, final, summary, paths)
