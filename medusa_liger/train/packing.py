"""Packing tokenized examples into fixed-length rows, the cached dataset, and the batch loader.

Packing: examples are placed, in order, into rows of ``seq_len`` tokens; an example that does not
fit in what is left of the current row starts a new one (the rest is padding). Every example in a
row gets its own ``segment_id`` (1, 2, ...; padding is 0), which the model uses to restart
positions and keep attention inside the example, and the loss uses so that no target crosses into
another example. An example longer than ``seq_len`` is cut to its first ``seq_len`` tokens
(``truncate``) or split into consecutive ``seq_len`` pieces, each packed as its own segment
(``split``). Pieces without any target are dropped.

The packed tensors are cached under ``cache_dir`` keyed by a fingerprint of the data files, the
tokenizer and every data option that changes them, so a rerun skips reading and tokenizing; the
cache keeps the data warnings building them gave (records skipped, targets cut off) and says them again.

``PackedLoader`` yields micro-batches of rows in an order reshuffled every epoch from
``(seed, epoch)``; its state is ``(epoch, position, micro_step)``, which a checkpoint stores so that a
resumed run sees exactly the batches the uninterrupted run would have seen. An epoch ends where the
next optimizer step's rows (``micro_batch_size x world_size x grad_accum``) do not fit.

Data parallel: with ``world_size`` ranks, each draw takes the next ``micro_batch_size x
world_size`` rows of the shared order and rank r keeps rows ``[r * micro_batch_size, (r + 1) *
micro_batch_size)`` of them: the shards are disjoint, depend only on the seed, and one step of W
ranks with grad_accum A reads exactly the rows of one step of one process with grad_accum W x A, in
every epoch. ``(epoch, position)`` counts global rows, so it is the same on every rank and one
checkpointed state restores every rank's position (also under another world size).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa_liger.kernels.reference import shifted_targets
from medusa_liger.records import (DataWarning, data_warning, hub_dataset_version, local_source,
                                  recorded_data_warnings)
from medusa_liger.seeds import torch_seed
from medusa_liger.train.data import IGNORE_INDEX, load_examples, tokenize_examples

CACHE_VERSION = 5  # 2: PackedData.continued; 3: PackedData.follows; 4: follows after any kept piece; 5: notes


@dataclass
class PackedData:
    """Packed rows, all [N, seq_len]: input_ids, labels (-100 = no target), segment_ids (0 = padding),
    ``continued`` (bool; True on the tokens of a segment that is a later piece of a split example,
    which starts mid-document; None: no segment is) and ``follows`` (bool; True where an earlier piece
    of that example was kept, so that the piece packed right before it is of the same document; a
    piece without a target is dropped, and when all earlier ones were, what precedes it is another
    document; None: as ``continued``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    continued: torch.Tensor | None = None
    follows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> PackedData:
        continued = None if self.continued is None else self.continued[index]
        follows = None if self.follows is None else self.follows[index]
        return PackedData(self.input_ids[index], self.labels[index], self.segment_ids[index], continued, follows)


def pack(
    examples: list[tuple[list[int], list[int]]], seq_len: int, long_examples: str, pad_id: int
) -> PackedData:
    """Pack (input_ids, labels) examples into rows of ``seq_len`` (see the module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if long_examples not in ("truncate", "split"):
        raise ValueError(f"long_examples must be 'truncate' or 'split', got {long_examples!r}")
    # (ids, labels, a later piece of its example, following its example's previous piece in this list)
    pieces: list[tuple[list[int], list[int], bool, bool]] = []
    cut_examples, cut_targets, all_targets = 0, 0, 0  # what truncation drops, said below
    for ids, labels in examples:
        if long_examples == "truncate" and len(ids) > seq_len:
            cut_examples += 1
            cut_targets += len(labels) - seq_len - labels[seq_len:].count(IGNORE_INDEX)
        all_targets += len(labels) - labels.count(IGNORE_INDEX)
        starts = range(0, len(ids), seq_len) if long_examples == "split" else [0]
        kept_before = False  # an earlier piece of this example was kept (it is then the last piece listed)
        for start in starts:
            piece_ids, piece_labels = ids[start : start + seq_len], labels[start : start + seq_len]
            # A piece needs a target after its first token to contribute anything.
            if any(label != IGNORE_INDEX for label in piece_labels[1:]):
                pieces.append((piece_ids, piece_labels, start > 0, kept_before))
                kept_before = True

    if cut_targets:
        data_warning(f"data.long_examples=truncate: {cut_examples} of {len(examples)} examples are longer than "
                     f"data.seq_len={seq_len}, and {cut_targets} of their targets ({cut_targets / all_targets:.1%} of "
                     "all) are cut off; data.long_examples=split trains on them")
    rows: list[list[tuple[list[int], list[int], bool]]] = []
    used = seq_len  # forces a new row for the first piece
    for piece in pieces:
        if used + len(piece[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])

    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    continued = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    follows = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for r, row in enumerate(rows):
        offset = 0
        for segment, (piece_ids, piece_labels, later, after_kept) in enumerate(row, start=1):
            end = offset + len(piece_ids)
            input_ids[r, offset:end] = torch.tensor(piece_ids)
            labels[r, offset:end] = torch.tensor(piece_labels)
            segment_ids[r, offset:end] = segment
            continued[r, offset:end] = later
            follows[r, offset:end] = after_kept
            offset = end
    return PackedData(input_ids, labels, segment_ids, continued, follows)


def rows_fingerprint(data: PackedData) -> str:
    """A digest of the packed rows themselves (tokens, targets, documents), whatever produced them."""
    digest = hashlib.sha256()
    for tensor in (data.input_ids, data.labels, data.segment_ids):
        digest.update(str(list(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def most_common_target_frequency(data: PackedData, shift: int) -> tuple[int, float]:
    """(token, frequency) of the most common target of a head with ``shift``: a constant predictor's accuracy."""
    targets = shifted_targets(data.labels, shift, IGNORE_INDEX, data.segment_ids)
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() == 0:
        return -1, 0.0
    token, count = Counter(valid.tolist()).most_common(1)[0]
    return int(token), count / valid.numel()


# The data settings that decide the packed rows (the cache's key; a resume names those that changed).
ROW_SETTINGS = ("paths", "split", "format", "seq_len", "loss_on", "long_examples", "chat_template", "on_error",
                "max_examples")


# Settings of how and where a tokenizer was read, not of how it splits text (a copy elsewhere is the same).
_LOAD_SETTINGS = {"name_or_path", "is_local", "local_files_only", "model_max_length", "cache_dir", "revision", "token",
                  "_commit_hash", "use_fast", "trust_remote_code",
                  "chat_template"}  # (the template is keyed on its own)
_LOAD_SUFFIXES = ("_file", "_path", "_dir")


def tokenizer_identity(tokenizer) -> str:
    """What decides how ``tokenizer`` splits text: its ``tokenizers`` backend serialized, or for one
    without (a Python or SentencePiece tokenizer) its class, vocabulary and plain settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    settings = {k: v for k, v in tokenizer.init_kwargs.items()
                if isinstance(v, (str, int, float, bool))
                and k not in _LOAD_SETTINGS and not k.endswith(_LOAD_SUFFIXES)}
    return json.dumps([type(tokenizer).__qualname__, sorted(tokenizer.get_vocab().items()), settings], sort_keys=True)


def data_fingerprint(data_cfg, tokenizer) -> str:
    """A digest of everything that decides the packed rows: the data settings, the local files' bytes
    (a hub dataset by the version of its split loaded now) and the tokenizer (the cache's key)."""
    digest = hashlib.sha256(f"packed-v{CACHE_VERSION}".encode())
    options = {k: getattr(data_cfg, k) for k in ROW_SETTINGS}
    digest.update(json.dumps(options, sort_keys=True).encode())
    for path in data_cfg.paths:
        local = local_source(path)  # (a missing file or a directory: its own error, never a hub lookup)
        if local is not None:
            digest.update(hashlib.sha256(local.read_bytes()).digest())
        else:  # (a new revision of a hub dataset is a new key, not the rows packed from the old one)
            digest.update(hub_dataset_version(path, data_cfg.split).encode())
    digest.update(tokenizer_identity(tokenizer).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    # Which tokens play BOS/EOS/PAD (the template renders them, documents get them, rows are padded
    # with PAD) is not in the backend's serialization: a base model and its instruct version differ here.
    # Nor is ``split_special_tokens`` (special tokens' text, the chat template's markers too, encoded
    # as plain text).
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                              tokenizer.pad_token_id, split_special]).encode())
    return digest.hexdigest()[:20]


def build_packed_data(data_cfg, tokenizer, cache_dir: str | Path | None, examples: list | None = None, *,
                      load_notes: Sequence[str] = (), quiet: bool = False) -> PackedData:
    """Read, tokenize and pack ``data_cfg.paths`` (or load the cached result).

    ``examples``: the already loaded ``load_examples(data_cfg)``, to avoid reading the files twice, and
    ``load_notes`` the ``DataWarning`` messages that loading them gave (``recorded_data_warnings``).
    The cache keeps the data warnings of reading and packing, and reading it says them again (those of
    reading only when ``examples`` were not loaded anew), unless ``quiet`` (e.g. on all ranks but one).
    """
    examples = examples or None  # (none loaded: read them here)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"packed-{data_fingerprint(data_cfg, tokenizer)}.pt"
        if cache_file.is_file():
            saved = torch.load(cache_file, weights_only=True)
            notes = saved.pop("notes")
            said_again = notes["pack"] if examples is not None else notes["load"] + notes["pack"]
            for message in [] if quiet else said_again:
                warnings.warn(f"{message} (said when the packed-data cache {cache_file} was written)",
                              DataWarning, stacklevel=2)
            return PackedData(**saved)
    notes = {"load": list(load_notes), "pack": []}
    if examples is None:
        with recorded_data_warnings(notes["load"]):
            examples = load_examples(data_cfg)
    with recorded_data_warnings(notes["pack"]):
        tokenized = tokenize_examples(examples, tokenizer, data_cfg)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        data = pack(tokenized, data_cfg.seq_len, data_cfg.long_examples, pad_id)
    if len(data) == 0:
        raise ValueError(f"data.paths {data_cfg.paths}: no example has a target token after tokenization")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({**data.__dict__, "notes": notes}, tmp)
        os.replace(tmp, cache_file)  # atomic: a concurrent reader never sees half a file
    return data


def split_eval(data: PackedData, fraction: float, seed: int) -> tuple[PackedData, PackedData | None]:
    """(train, eval) rows: ``fraction`` of the rows, drawn with ``seed``, are held out (at least 1).

    A document split over consecutive rows (``long_examples="split"``) goes wholly to one side: a
    held-out piece whose other pieces trained would not be held out. Rows are drawn in groups (a row
    with its continuation rows; alone otherwise), each taken if it still fits in ``fraction`` of the
    rows (the first one drawn in any case), until they are filled.
    """
    if fraction <= 0:
        return data, None
    n_eval = max(1, round(len(data) * fraction))
    if n_eval >= len(data):
        raise ValueError(f"data.eval_fraction={fraction} leaves no training rows out of {len(data)}")
    # Row r starts a group unless its first token continues the document the row before ends with
    # (pieces are packed in order: a piece that follows its kept predecessor at a row's start follows
    # the row before's last piece).
    starts = torch.ones(len(data), dtype=torch.long)
    follows = data.follows if data.follows is not None else data.continued
    if follows is not None:
        starts[1:] = (~follows[1:, 0]).long()
    group = starts.cumsum(0) - 1  # [N]
    sizes = torch.bincount(group).tolist()
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed))
    taken, count = [], 0
    for g in order.tolist():
        if count + sizes[g] <= n_eval or not taken:
            taken.append(g)
            count += sizes[g]
        if count >= n_eval:
            break
    held_out = torch.isin(group, torch.tensor(taken))
    if held_out.all():
        raise ValueError(f"data.eval_fraction={fraction} leaves no training rows out of {len(data)}: one document "
                         "split by data.long_examples=split fills them all")
    return data.select(torch.nonzero(~held_out).squeeze(1)), data.select(torch.nonzero(held_out).squeeze(1))


class PackedLoader:
    """Endless micro-batches of packed rows, reshuffled per epoch; resumable through ``state_dict``.

    Each optimizer step reads ``micro_batch_size x world_size x grad_accum`` consecutive rows of the
    epoch's order (rank r takes the r-th micro-batch of each ``micro_batch_size x world_size`` draw), and
    an epoch ends where the next step's rows would not fit, so a step never spans two epochs. The rows of
    every step therefore depend on the product alone: W ranks with grad_accum A read what one process
    with grad_accum W x A reads, also after the first epoch.
    """

    def __init__(self, data: PackedData, micro_batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if len(data) < micro_batch_size * world_size * grad_accum:
            raise ValueError(
                f"the dataset packs into {len(data)} rows, fewer than one optimizer step reads: "
                f"train.micro_batch_size={micro_batch_size}"
                + (f" x {world_size} ranks" if world_size > 1 else "")
                + (f" x train.grad_accum={grad_accum}" if grad_accum > 1 else "")
                + "; lower the batch size or data.seq_len, or add data"
            )
        self.data, self.micro_batch_size, self.seed = data, micro_batch_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch, self.position, self.micro_step = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        # In torch's seed range: a large train.seed overflowed.
        generator = torch.Generator().manual_seed(torch_seed(self.seed * 1_000_003 + epoch))
        return torch.randperm(len(self.data), generator=generator)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels", "segment_ids"}: [micro_batch_size, seq_len] each."""
        draw = self.micro_batch_size * self.world_size  # one micro-batch on every rank
        if self.micro_step == 0 and self.position + draw * self.grad_accum > len(self.data):
            # Drop the tail that a whole step does not fit in (every micro-batch on every rank has the
            # same shape, and a step's rows come from one epoch).
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.rank * self.micro_batch_size  # this rank's slice of the draw
        index = self._order[start : start + self.micro_batch_size]
        self.position += draw
        self.micro_step = (self.micro_step + 1) % self.grad_accum
        rows = self.data.select(index)
        return {"input_ids": rows.input_ids, "labels": rows.labels, "segment_ids": rows.segment_ids}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # (A checkpoint is written between steps: older ones have no micro_step, which is then 0.)
        self.micro_step = int(state.get("micro_step", 0)) % self.grad_accum
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
