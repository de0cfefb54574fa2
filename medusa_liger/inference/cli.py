"""``medusa-liger eval``: load a backbone and its trained heads, then run ``evaluate_heads``.

    medusa-liger eval runs/tiny                       # runs/tiny/final/{backbone,heads_medusa}
    medusa-liger eval --backbone PATH --heads PATH --prompts held_out.jsonl --output eval/

From Python: ``evaluate_run(run_dir=..., output_dir=...) -> report dict`` (same arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medusa_liger.heads.export import (  # one table of dtype names for every CLI
    DTYPES,
    BackboneLoadError,
    backbone_load_error,
    check_backbone_path,
    load_backbone,
    parse_dtype,
)
from medusa_liger.inference import cli_args
from medusa_liger.inference.backbone import stop_token_ids
from medusa_liger.inference.cli_args import POSITIVE_INT, Given, number
from medusa_liger.inference.evaluate import (
    BASELINE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_PROMPTS,
    DEFAULT_TEMPERATURE,
    ROUGH_INTERVAL_PROMPTS,
    evaluate_heads,
)
from medusa_liger.inference.prompts import (
    check_num_prompts,
    check_prompts_source,
    default_prompts_file,
    load_prompts,
    looks_like_path,
)
from medusa_liger.inference.tree import (
    DEFAULT_PRIOR_STRENGTH,
    DEFAULT_TOP_K,
    DEFAULT_TREE_SIZE,
    TREE_SEARCHES,
    normalize_tree,
)
from medusa_liger.records import check_tokenizer_files, load_json_list, load_tokenizer, looks_like_local_path
from medusa_liger.run_layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    EVAL_FILES,
    EVAL_PROMPTS_FILE,
    FINAL_DIR,
    FINAL_HEADS_PREFIX,
    final_heads_dir,
    user_path,
)


def resolve_paths(run_dir: str | Path | None, backbone: str | Path | None,
                  heads: str | Path | None) -> tuple[str, Path]:
    """(backbone path or hub name, heads directory) from a run directory and/or explicit paths.

    A run directory holds ``final/heads_medusa`` (or another ``final/heads_*``) and, when the
    backbone was trained or built there, ``final/backbone``; otherwise the heads' recorded base
    model is used.
    """
    from medusa_liger.heads.export import BACKBONE_SUBDIR, read_heads

    final = Path(run_dir) / FINAL_DIR if run_dir is not None else None
    if run_dir is not None and not Path(run_dir).is_dir():
        raise ValueError(f"run_dir {str(run_dir)!r} is not a directory")
    if heads is None:
        if final is None:
            raise ValueError("pass a run directory or --heads PATH (a directory written by save_heads)")
        if not final.is_dir() and list(Path(run_dir).glob(FINAL_HEADS_PREFIX + "*")):
            final = Path(run_dir)  # the run's final/ itself was given
        found = sorted(final.glob(FINAL_HEADS_PREFIX + "*"), key=lambda p: p.name != final_heads_dir("medusa"))
        if not found and (Path(run_dir) / "config.json").is_file():
            found = [Path(run_dir)]  # a heads directory (an export) was given as the run
        if not found:
            where = f"{final} holds no heads_* directory" if final.is_dir() else \
                f"{run_dir} has no {FINAL_DIR}/ (a run stopped before its end?)"
            raise ValueError(f"{where}; pass --heads PATH, or export a checkpoint first (medusa-liger export "
                             f"--checkpoint {Path(run_dir) / CHECKPOINTS_DIR}/step-N --output DIR)")
        heads = found[0]
    heads = Path(heads)
    if not heads.is_dir():
        raise ValueError(f"heads {str(heads)!r} is not a directory")
    if backbone is None:
        if final is not None and (final / BACKBONE_SUBDIR).is_dir():
            backbone = final / BACKBONE_SUBDIR
        elif (heads / BACKBONE_SUBDIR).is_dir():
            backbone = heads / BACKBONE_SUBDIR
        elif (final_of_heads := heads.resolve().parent).name == FINAL_DIR and \
                (final_of_heads / BACKBONE_SUBDIR).is_dir():
            backbone = final_of_heads / BACKBONE_SUBDIR  # a run's final/ (resolved: `.`, a link)
        else:
            ckpt = read_heads(heads)
            backbone = ckpt.base_model_name_or_path
            # Only a hub name or an existing directory can be loaded from what the heads record.
            if not backbone or backbone == TINY_MODEL or (looks_like_local_path(backbone)
                                                          and not user_path(backbone).is_dir()):
                raise ValueError(_no_backbone_found(heads, backbone, ckpt.config.mode))
    return str(backbone), heads


def run_of_final_heads(heads: str | Path) -> Path | None:
    """RUN_DIR when ``heads`` is a training run's ``RUN_DIR/final/heads_*`` (beside the run's
    config.yaml), else None. The path is resolved first: `.` inside final/, or a link to the heads."""
    heads = user_path(heads).resolve()
    run = heads.parent.parent
    if heads.name.startswith(FINAL_HEADS_PREFIX) and heads.parent.name == FINAL_DIR and (run / CONFIG_FILE).is_file():
        return run
    return None


# What the heads of a run on the built-in tiny model record as their base model (train's model.name_or_path).
TINY_MODEL = "tiny"


def _no_backbone_found(heads: Path, recorded: str | None, mode: str) -> str:
    """Why no backbone goes with ``heads`` (nothing beside them, nothing loadable recorded), and what to pass."""
    from medusa_liger.heads.export import BACKBONE_SUBDIR

    if not recorded:
        why = "they record no base model"
    elif recorded == TINY_MODEL:
        why = "they record base model 'tiny' (the tiny model a training run builds, not a hub name)"
    else:
        why = f"they record base model {recorded!r}, a directory that does not exist"
    message = f"no backbone found for heads {str(heads)!r}: {why}; pass --backbone PATH"
    step = heads.parent
    if step.parent.name == CHECKPOINTS_DIR:  # RUN_DIR/checkpoints/step-N/heads
        exported = step.parent.parent / FINAL_DIR / BACKBONE_SUBDIR
        if exported.is_dir():
            message += f", e.g. {exported}"
        if mode == "joint":  # the backbone trained too: the final one is not the one these heads saw
            message += (f" (these heads trained with their step's backbone: `medusa-liger export --checkpoint "
                        f"{step} --output DIR` writes it)")
    return message


def error_text(error: Exception, backbone: str | None) -> str:
    """A failed command's message; a backbone that did not load names --backbone (given, or to pass)."""
    if isinstance(error, BackboneLoadError):
        return f"--backbone: {error}" if backbone is not None else f"{error}; pass --backbone PATH"
    return str(error)


def load_causal_lm(backbone: str | Path, *, device: str | None = None, dtype: str = "auto",
                   attn_implementation: str = "sdpa", revision: str | None = None):
    """(causal LM in eval mode on ``device``, tokenizer) for a backbone path or hub name (at the hub
    ``revision``, a branch, tag or commit, when given).

    dtype "auto": the checkpoint's dtype on CUDA, float32 on CPU. A backbone that cannot be found or
    loaded is a BackboneLoadError naming it (transformers raises OSError, for a path a misleading one);
    a ``revision`` for a local directory is a ValueError (transformers would ignore it).
    """
    if revision is not None and user_path(backbone).is_dir():
        raise ValueError(f"--revision picks among a hub model's versions; the backbone {str(backbone)!r} is a "
                         "local directory")
    try:
        device = cli_args.parse_device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as error:
        raise ValueError(f"device: {error}") from None
    if dtype == "auto":  # (None: the checkpoint's dtype)
        torch_dtype = None if device.type == "cuda" else torch.float32
    else:
        torch_dtype = parse_dtype(dtype)
    check_backbone_path(backbone)  # (what it is not: heads, a file, no model: said first)
    try:
        check_tokenizer_files(str(backbone))  # said before the weights load (a hub name is noted there)
    except ValueError as error:
        raise backbone_load_error(backbone, error) from error
    pinned = {} if revision is None else {"revision": revision}
    causal_lm = load_backbone(backbone, torch_dtype, attn_implementation=attn_implementation, **pinned)
    commit = getattr(causal_lm.config, "_commit_hash", None)  # (a hub model: the tokenizer of that commit too)
    try:
        tokenizer = load_tokenizer(str(backbone), **({"revision": commit} if commit else pinned))
    except (OSError, ValueError) as error:
        raise backbone_load_error(backbone, error) from error
    return causal_lm.to(device).eval(), tokenizer


def load_medusa(backbone: str, heads: str | Path, *, device: str | None = None, dtype: str = "auto",
                attn_implementation: str = "sdpa", revision: str | None = None):
    """(MedusaModel in eval mode on ``device``, tokenizer) for a backbone path and a heads directory.

    dtype "auto": the checkpoint's dtype on CUDA, float32 on CPU. A hub backbone is read at ``revision``
    (a branch, tag or commit) when given, else at the commit the heads record for it (the one they were
    trained on), else at its default branch; a revision whose commit is not the recorded one is warned of.
    """
    import warnings

    from medusa_liger.heads import MedusaModel
    from medusa_liger.heads.export import recorded_base, recorded_revision

    # The backbone the heads name: at the commit they were trained on (where they record it).
    recorded = recorded_revision(*recorded_base(heads), backbone).get("revision")
    pinned = {"revision": revision or recorded} if (revision or recorded) else {}
    causal_lm, tokenizer = load_causal_lm(backbone, device=device, dtype=dtype,
                                          attn_implementation=attn_implementation, **pinned)
    commit = getattr(causal_lm.config, "_commit_hash", None)
    if recorded and revision is not None and commit != recorded:
        warnings.warn(f"the heads were trained on commit {recorded} of {backbone!r}; --revision {revision} loads "
                      f"{commit or 'another version'}: heads predict best on the weights they trained on",
                      UserWarning, stacklevel=2)
    model = MedusaModel.from_pretrained(heads, backbone=causal_lm)
    model.to(device=causal_lm.device, dtype=causal_lm.dtype).eval()
    return model, tokenizer


def evaluate_run(
    run_dir: str | Path | None = None,
    *,
    backbone: str | Path | None = None,
    heads: str | Path | None = None,
    prompts: str | Path | None = None,
    prompts_split: str = "train",
    output_dir: str | Path | None = None,
    num_prompts: int = DEFAULT_NUM_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    tree_size: int = DEFAULT_TREE_SIZE,
    top_k: int = DEFAULT_TOP_K,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    batch_size: int = 1,
    acceptance: str = "greedy",
    temperature: float = DEFAULT_TEMPERATURE,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    seed: int = 0,
    tree: str | Path | list[list[int]] | None = None,
    tree_search: str = "conditional",
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    revision: str | None = None,
) -> dict[str, Any]:
    """Evaluate the heads of a training run (or explicit paths) and return the report dict.

    tree: a ``medusa_choices`` list, or a JSON file holding one (e.g. an earlier eval's tree.json),
    to measure instead of searching a tree of ``tree_size`` nodes. tree_search, prior_strength: the
    estimate the tree is searched (or the given one scored) by (``evaluate_heads``).

    Heads given as a run's ``final/heads_*`` make that run the run directory (its held-out prompts,
    its eval/, its final backbone unless one is given).

    output_dir defaults to ``{run_dir}/eval`` (``eval`` without a run directory); prompts (a file or
    a hub dataset name, with ``prompts_split``) to the run's held-out documents
    (``{run_dir}/eval_prompts.jsonl``, written when ``data.eval_fraction`` > 0 holds out prompts), else to the shipped
    ``medusa_liger/data/pydoc_chat.jsonl`` (training data of the tiny default: an optimistic number).
    """
    if isinstance(tree, (str, Path)):
        tree = load_tree(tree)
    # A run's final heads (given as --heads or as the run) or its final/: the run's held-out prompts and
    # eval/ are the defaults (not the shipped prompts, nor an eval/ inside the run's exports).
    if run_dir is None and heads is not None:
        run_dir = run_of_final_heads(heads)
    elif run_dir is not None and heads is None:
        given, resolved = run_dir, user_path(run_dir).resolve()
        if (run := run_of_final_heads(resolved)) is not None:
            run_dir, heads = run, given
        elif resolved.name == FINAL_DIR and (resolved.parent / CONFIG_FILE).is_file():
            run_dir = resolved.parent
    check_num_prompts(num_prompts)  # before the model loads (load_prompts checks it again, for its own callers)
    if prompts is not None:  # a missing file fails before the model loads
        try:
            check_prompts_source(prompts)
        except ValueError as error:
            raise ValueError(f"--prompts: {error}") from None
    if output_dir is None:
        output_dir = Path(run_dir) / EVAL_DIR if run_dir is not None else Path(EVAL_DIR)
    check_output_dir(output_dir, "--output")  # before the evaluation, not when its report is written
    if (Path(output_dir) / EVAL_FILES["report"]).is_file():  # said up front: an earlier evaluation is replaced
        print(f"note: {str(output_dir)!r} holds an earlier evaluation (report.json), which this one replaces "
              "(pass another --output to keep both)", file=sys.stderr)
    if backbone is not None:
        check_backbone_path(backbone)
    backbone_path, heads_dir = resolve_paths(run_dir, backbone, heads)
    model, tokenizer = load_medusa(backbone_path, heads_dir, device=device, dtype=dtype,
                                   attn_implementation=attn_implementation, revision=revision)
    given_prompts = prompts is not None
    if prompts is None:
        held_out = None if run_dir is None else Path(run_dir) / EVAL_PROMPTS_FILE
        prompts = held_out if held_out is not None and held_out.is_file() else default_prompts_file()
    prompts_source = str(prompts)
    try:
        prompt_ids = load_prompts(prompts_source, tokenizer, num_prompts, split=prompts_split)
    except ValueError as error:  # name the argument a user passed
        raise ValueError(f"--prompts: {error}" if given_prompts else str(error)) from error
    # Keep prompts that leave room for the continuation inside the model's context.
    limit = getattr(model.backbone.config, "max_position_embeddings", None)
    if limit is not None:
        if limit <= max_new_tokens:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the model's context ({limit})")
        # Over-long prompts keep their last tokens (the part the continuation depends on most), said.
        room = limit - max_new_tokens
        truncated = sum(len(p) > room for p in prompt_ids)
        if truncated:
            print(f"note: {truncated} of {len(prompt_ids)} prompts are longer than the model's context ({limit}) "
                  f"minus --max-new-tokens ({max_new_tokens}) and keep their last {room} tokens", file=sys.stderr)
        prompt_ids = [p[-room:] if len(p) > room else p for p in prompt_ids]
    else:
        truncated = 0
    eos = stop_token_ids(tokenizer, model)  # an instruct model's end of turn too: replies end there
    return evaluate_heads(
        model, prompt_ids, output_dir, max_new_tokens=max_new_tokens, tree_size=tree_size, top_k=top_k,
        eos_token_id=eos, batch_size=batch_size, acceptance=acceptance, temperature=temperature,
        posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha, seed=seed, tree=tree,
        tree_search=tree_search, prior_strength=prior_strength,
        metadata={"backbone": backbone_path, "heads": str(heads_dir),
                  "backbone_revision": getattr(model.backbone.config, "_commit_hash", None),
                  "prompts": prompts_source, "truncated_prompts": truncated, "stop_token_ids": eos},
    )


def load_tree(path: str | Path) -> list[list[int]]:
    """The ``medusa_choices`` list in a JSON file, its paths checked (against the model when it is used);
    errors name --tree, the flag of eval and generate."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--tree: tree file {str(path)!r} does not exist")
    try:
        tree = load_json_list(path, "a tree file must hold a list of paths (lists of ranks)")
    except ValueError as error:
        raise ValueError(f"--tree: {error}") from None
    try:  # here, not at decoding: a flat [0, 1] would fail there as a TypeError, after the model loaded
        normalize_tree(tree)
    except ValueError as error:
        raise ValueError(f"--tree: {path}: {error} (a tree is a list of paths, e.g. [[0], [1], [0, 0]])") from None
    return tree


def check_output_dir(path: str | Path, name: str) -> None:
    """ValueError naming ``name`` when a file stands where the directory ``path`` (or a parent) must be."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            if existing.is_dir():
                return
            where = "is a file" if existing == path else f"cannot be a directory: {str(existing)!r} is a file"
            raise ValueError(f"{name}: {str(path)!r} {where}; pass a directory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.setup(parser)
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="training output directory (uses final/backbone and final/heads_medusa)")
    parser.add_argument("--backbone", default=None, help="backbone checkpoint (HF directory or hub name)")
    cli_args.add_revision_argument(parser)
    parser.add_argument("--heads", default=None, help="heads directory written by save_heads (either format); a "
                                                      "run's RUN_DIR/final/heads_* makes RUN_DIR the run directory")
    parser.add_argument("--prompts", default=None,
                        help="held-out prompts: JSONL/JSON (prompt, input_ids, messages, conversations or text), "
                             "a text file with one prompt a line, or a hub dataset name (default: RUN_DIR/"
                             f"{EVAL_PROMPTS_FILE}, the run's held-out documents, else the shipped pydoc_chat.jsonl)")
    parser.add_argument("--prompts-split", default="train", action=Given,
                        help="split of a hub dataset given as --prompts: train by default, but pick one the "
                             "heads did not train on (e.g. test) for an unbiased number")
    parser.add_argument("--num-prompts", type=POSITIVE_INT, default=DEFAULT_NUM_PROMPTS,
                        help="prompts to use (first N)")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=DEFAULT_MAX_NEW_TOKENS, help="tokens per prompt")
    parser.add_argument("--tree-size", type=POSITIVE_INT, default=DEFAULT_TREE_SIZE, action=Given,
                        help="nodes of the searched tree")
    parser.add_argument("--tree", default=None,
                        help="measure this tree instead: a JSON file with a medusa_choices list (e.g. an earlier "
                             "eval's tree.json, or the one your serving engine uses); --tree-size is then unused")
    parser.add_argument("--tree-search", default="conditional", choices=TREE_SEARCHES,
                        help="how a path's acceptance is estimated: conditional (from the heads' joint ranks on the "
                             "prompts: heads tend to be right together) or independent (the Medusa paper's product "
                             "of per-head accuracies)")
    parser.add_argument("--prior-strength", type=number(float, minimum=0), default=DEFAULT_PRIOR_STRENGTH,
                        action=Given, help="conditional search: pseudo-positions of the independent estimate behind "
                                           "each conditional one (rare paths lean on it)")
    parser.add_argument("--top-k", type=POSITIVE_INT, default=DEFAULT_TOP_K,
                        help="ranks per head in the accuracy table")
    parser.add_argument("--output", default=None, help="output directory (default: RUN_DIR/eval)")
    parser.add_argument("--device", type=cli_args.device, default=None,
                        help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                        help="attention implementation (both take Medusa's tree mask)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1,
                        help="also measure Medusa against greedy over batches of this many prompts (> 1; at most "
                             "the number of prompts)")
    parser.add_argument("--acceptance", default="greedy", choices=["greedy", "typical"],
                        help="greedy: lossless, against plain greedy decoding; typical: sampling at --temperature "
                             "with typical acceptance, against plain sampling")
    parser.add_argument("--temperature", type=number(float, above=0), default=DEFAULT_TEMPERATURE, action=Given,
                        help="sampling temperature of --acceptance typical")
    cli_args.add_posterior_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, action=Given,
                        help="sampling seed of --acceptance typical (prompt i: seed + i)")


def check_args(args: argparse.Namespace) -> None:
    """Usage errors the parser cannot see flag by flag, before anything loads."""
    cli_args.check_needs(args, cli_args.TYPICAL_FLAGS, "--acceptance typical", args.acceptance == "typical")
    cli_args.check_needs(args, ["--prior-strength"], "--tree-search conditional", args.tree_search == "conditional")
    if args.tree is not None and cli_args.given(args, "--tree-size"):
        cli_args.error(args, "--tree-size sizes the searched tree: with --tree, the given tree is measured as it is")
    hub_prompts = (args.prompts is not None and not looks_like_path(args.prompts)
                   and not user_path(args.prompts).exists())
    cli_args.check_needs(args, ["--prompts-split"], "--prompts naming a hub dataset", hub_prompts)
    if args.prompts is not None:
        try:
            check_prompts_source(args.prompts)
        except ValueError as error:
            cli_args.error(args, f"--prompts: {error}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        report = evaluate_run(
            args.run_dir, backbone=args.backbone, heads=args.heads, prompts=args.prompts,
            prompts_split=args.prompts_split, output_dir=args.output,
            num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, tree_size=args.tree_size,
            top_k=args.top_k, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
            batch_size=args.batch_size, acceptance=args.acceptance, temperature=args.temperature,
            posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha, seed=args.seed,
            tree=args.tree, tree_search=args.tree_search, prior_strength=args.prior_strength, revision=args.revision,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"medusa-liger eval: error: {error_text(error, args.backbone)}", file=sys.stderr)
        return 2
    acc, tree, measured = report["head_accuracy"], report["tree"], report["measured"]
    print("head top-1 accuracy: " + ", ".join(f"head{k} (t+{k + 2}) {a:.3f}" for k, a in enumerate(acc["top1"])))
    print(f"tree{' (given)' if tree['source'] == 'given' else ''}: {tree['size']} nodes, depth {tree['max_depth']}, "
          f"estimated acceleration {tree['estimated_acceleration']:.2f} ({tree['estimate']}; independent heads: "
          f"{tree['estimated_acceleration_independent']:.2f})")
    searched = "the searched tree by size" if tree["source"] == "search" else \
        "searched trees by size (for comparison with the given tree)"
    print(f"estimated acceleration of {searched}: "
          + ", ".join(f"{n}: {a:.2f}" for n, a in tree["estimated_acceleration_by_size"].items()))
    print(f"measured{_how(report['decoding'])}: acceleration {measured['acceleration_rate']:.2f} tokens/step"
          f"{interval_text(measured['acceleration_rate_ci95'], report['num_prompts'])}, "
          f"{_speedup(measured, report['decoding']['acceptance'])}")
    histogram = measured["tokens_per_step_histogram"]
    steps = sum(histogram.values())
    print("tokens per step: " + ", ".join(f"{n}: {count / steps:.0%}" for n, count in histogram.items()))
    batched = report.get("measured_batched")
    if batched:
        fewer = "" if batched["batch_size"] == batched["requested_batch_size"] else \
            f" (--batch-size {batched['requested_batch_size']}, but only {report['num_prompts']} prompts)"
        print(f"measured at batch {batched['batch_size']}{fewer}: acceleration {batched['acceleration_rate']:.2f} "
              f"tokens/step, {_speedup(batched, report['decoding']['acceptance'])}")
    print(f"wrote {report['files']['report']}, {report['files']['tree']}, {report['files']['heatmap']}")
    return 0


def _how(decoding: dict[str, Any]) -> str:
    """'' (greedy) or ' (typical acceptance at temperature T)'."""
    if decoding["acceptance"] == "greedy":
        return ""
    return f" (typical acceptance at temperature {decoding['temperature']:g})"


def interval_text(interval: Sequence[float] | None, num_prompts: int) -> str:
    """' (95% interval over N prompts: A to B)', marked rough below ROUGH_INTERVAL_PROMPTS prompts."""
    if interval is None:
        return ""
    rough = f", rough with fewer than {ROUGH_INTERVAL_PROMPTS}" if num_prompts < ROUGH_INTERVAL_PROMPTS else ""
    return f" (95% interval over {num_prompts} prompts{rough}: {interval[0]:.2f} to {interval[1]:.2f})"


def _speedup(measured: dict[str, Any], acceptance: str) -> str:
    """'speedup 1.80x (a vs b tokens/s), ...' for a measured section of the report."""
    baseline = BASELINE[acceptance]
    text = (f"speedup {measured['speedup']:.2f}x ({measured['medusa']['tokens_per_s']:.1f} vs "
            f"{measured[baseline]['tokens_per_s']:.1f} tokens/s of plain {baseline})")
    if "greedy_match_rate" in measured:
        text += f", identical to greedy on {measured['greedy_match_rate']:.0%} of prompts"
    return text
