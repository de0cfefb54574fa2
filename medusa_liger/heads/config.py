"""``MedusaConfig``: how many heads, how deep, which projection, and how the losses are weighted.

The training objective of ``MedusaModel`` is

    loss = lm_loss_weight * L_lm  [joint mode only]  +  sum_k heads_loss_weight * decay**k * L_k

where ``L_k`` is the cross-entropy of head ``k`` (0-based) against the token ``k + 2`` positions
ahead and ``L_lm`` is the backbone's own next-token loss (shift 1): the cross-entropy against the
labels (``lm_loss="ce"``) or, for Medusa-2's self-distillation (``lm_loss="kl"``), the KL divergence
from the original backbone's next-token distribution (the backbone with its LoRA adapters off, or a
frozen copy of it), which keeps the backbone's outputs where they were while it learns to serve the
heads. With ``head_targets="backbone"`` each ``L_k`` is the KL divergence from the backbone's own distribution
of the head's token (its output at position t + k + 1) instead of the cross-entropy against the
data's token: the heads learn what the backbone would write, from any text.

* ``mode="heads"`` (Medusa-1): the backbone is frozen; only the heads train. ``heads_loss_weight``
  defaults to 1.0, so the head losses are weighted ``decay**k``.
* ``mode="joint"`` (Medusa-2): the backbone trains too (fully or through LoRA);
  ``heads_loss_weight`` (lambda in the paper) defaults to 0.2 and is typically scheduled by the
  trainer: it is read at every forward, so changing it between steps needs no rebuild.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from medusa_liger.kernels.jsd import check_jsd_beta
from medusa_liger.numeric import is_int

Mode = Literal["heads", "joint"]
MODES: tuple[str, ...] = ("heads", "joint")
LmLoss = Literal["ce", "kl"]
LM_LOSSES: tuple[str, ...] = ("ce", "kl")
HeadTargets = Literal["labels", "backbone"]
HEAD_TARGETS: tuple[str, ...] = ("labels", "backbone")
KlDirection = Literal["forward", "reverse"]
KL_DIRECTIONS: tuple[str, ...] = ("forward", "reverse")

# Default lambda per mode when ``heads_loss_weight`` is left as None.
DEFAULT_HEADS_LOSS_WEIGHT: dict[str, float] = {"heads": 1.0, "joint": 0.2}


@dataclass
class MedusaConfig:
    """Hyper-parameters of the Medusa heads and of their loss.

    num_heads:         K >= 1 heads; head k predicts the token k + 2 positions ahead.
    num_layers:        residual blocks per head (>= 1).
    shared_lm_head:    True: every head projects with the backbone's own lm_head (frozen in
                       ``heads`` mode); False: each head owns a [V, H] copy of it.
    decay:             head k's loss is weighted ``decay**k`` (0 < decay <= 1).
    mode:              "heads" (backbone frozen) or "joint" (backbone trains too); read at every
                       forward, so a joint run may switch to "heads" for a warm-up and back.
    lm_loss_weight:    weight of the backbone's next-token loss in ``joint`` mode (>= 0).
    lm_loss:           that loss: "ce" (against the labels) or "kl" (KL divergence from the
                       original backbone: a peft backbone with its adapters off, or the frozen
                       copy ``MedusaModel.add_frozen_teacher`` keeps of one that trains whole).
    head_targets:      "labels" (head k learns the data's token k + 2 ahead) or "backbone" (the
                       backbone's own distribution of that token, read at position t + k + 1 of the
                       same forward, detached: one more [.., V] logits GEMM per head, no extra
                       backbone pass).
    kl_temperature:    tau > 0 of the KL terms (``lm_loss="kl"``, ``head_targets="backbone"``): both
                       distributions at logits / tau, the divergence times tau^2; 1: plain KL.
    kl_direction:      "forward", KL(teacher || student) (mass-covering), or "reverse",
                       KL(student || teacher) (mode-seeking), for those same terms.
    jsd_beta:          None (those terms are KLs), or beta in (0, 1): they are the generalized
                       Jensen-Shannon divergence beta KL(teacher || m) + (1 - beta) KL(student || m),
                       m = beta teacher + (1 - beta) student (kernels/jsd.py; kl_direction "forward").
    label_smoothing:   eps in [0, 1) of the cross-entropy terms (PyTorch's: the target gets
                       1 - eps + eps / V, every other token eps / V); needs head_targets "labels"
                       and lm_loss "ce" (a KL term has no labels to smooth).
    z_loss:            z >= 0: every loss term adds z * lse^2 per target (lse: the log-sum-exp of
                       the head's logits; PaLM's 1e-4 keeps the logits from drifting); with KL terms
                       only at kl_temperature 1.
    heads_loss_weight: lambda, multiplying every head weight; None -> 1.0 ("heads"), 0.2 ("joint").
    ignore_index:      label value that contributes no loss.
    skip_ignored_targets: the fused loss runs its GEMMs only on rows with a valid target (masked
                       prompt tokens cost nothing); one host sync per loss, so False under CUDA graphs.
    head_by_head:      the loss runs one head at a time and takes each head's gradients (its
                       residual blocks' included) before the next head runs, so one head's
                       activations are alive instead of K (``kernels.head_by_head``); same math.
    """

    num_heads: int = 5
    num_layers: int = 1
    shared_lm_head: bool = False
    decay: float = 0.8
    mode: Mode = "heads"
    lm_loss_weight: float = 1.0
    lm_loss: LmLoss = "ce"
    head_targets: HeadTargets = "labels"
    kl_temperature: float = 1.0
    kl_direction: KlDirection = "forward"
    jsd_beta: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    heads_loss_weight: float | None = None
    ignore_index: int = -100
    skip_ignored_targets: bool = True
    head_by_head: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.heads_loss_weight is None:
            self.heads_loss_weight = DEFAULT_HEADS_LOSS_WEIGHT[self.mode]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        for name in ("num_heads", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("shared_lm_head", "skip_ignored_targets", "head_by_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (0.0 < check_loss_weight("decay", self.decay) <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        check_loss_weight("lm_loss_weight", self.lm_loss_weight)
        if self.lm_loss not in LM_LOSSES:
            raise ValueError(f"lm_loss must be one of {LM_LOSSES}, got {self.lm_loss!r}")
        if self.head_targets not in HEAD_TARGETS:
            raise ValueError(f"head_targets must be one of {HEAD_TARGETS}, got {self.head_targets!r}")
        check_loss_weight("heads_loss_weight", self.heads_loss_weight)
        if not (check_loss_weight("kl_temperature", self.kl_temperature) > 0):
            raise ValueError(f"kl_temperature must be a finite number > 0, got {self.kl_temperature!r}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {self.kl_direction!r}")
        if self.jsd_beta is not None:
            self.jsd_beta = check_jsd_beta("jsd_beta", self.jsd_beta)
            if self.kl_direction != "forward":
                raise ValueError(f"kl_direction must be 'forward' with jsd_beta (the JSD has no direction), "
                                 f"got {self.kl_direction!r}")
        if not is_int(self.ignore_index):
            raise ValueError(f"ignore_index must be an integer, got {self.ignore_index!r}")
        if not (check_loss_weight("label_smoothing", self.label_smoothing) < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.label_smoothing and (self.head_targets != "labels" or self.lm_loss != "ce"):
            raise ValueError("label_smoothing must be 0 unless head_targets is 'labels' and lm_loss is 'ce' "
                             f"(it smooths labels; a KL term has none), got {self.label_smoothing!r}")
        check_loss_weight("z_loss", self.z_loss)
        divergence = self.head_targets == "backbone" or (self.mode == "joint" and self.lm_loss == "kl")
        if self.z_loss and divergence and self.kl_temperature != 1.0:
            raise ValueError(f"z_loss must be 0 unless kl_temperature is 1 when a loss term is a divergence, "
                             f"got {self.z_loss!r}")

    def head_weights(self) -> list[float]:
        """Loss weight of each Medusa head: ``heads_loss_weight * decay**k`` for k = 0..K-1."""
        return [float(self.heads_loss_weight) * float(self.decay) ** k for k in range(self.num_heads)]

    def head_shifts(self) -> list[int]:
        """How far ahead each head predicts: head k -> k + 2 (the backbone's lm_head is 1)."""
        return [k + 2 for k in range(self.num_heads)]

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-serializable; what ``save_heads`` writes into config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MedusaConfig:
        """Build from a dict, ignoring keys this version does not know (forward compatibility)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def check_loss_weight(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ValueError unless it is a finite number >= 0."""
    # (float() reads "1e-4" and True, numpy's and torch's bools too; a config should not)
    if isinstance(value, (bool, str, bytes)) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not (number >= 0.0 and number != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number
