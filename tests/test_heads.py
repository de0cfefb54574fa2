"""MedusaConfig, MedusaHeads and MedusaModel on a tiny Llama built offline from its config.

The wrapper's loss is checked against a naive Medusa loss written here from the definition
(materialized logits from the backbone's full forward, per-head shifted cross-entropy, decay
weights), together with every gradient, in both modes and both projection modes.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from medusa_liger.heads import MedusaConfig, MedusaHeads, MedusaModel, ResBlock, packed_causal_mask, segment_position_ids
from medusa_liger.kernels import force_backend
from tests.utils import DEVICE, HAS_CUDA

H, V = 64, 128


def tiny_llama(attn: str = "sdpa", hidden: int = H, vocab: int = V, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def randomize_heads(model: MedusaModel, std: float = 0.05) -> None:
    """Move the heads off their identity init so the comparisons exercise every parameter."""
    with torch.no_grad():
        for blocks in model.heads.blocks:
            for block in blocks:
                block.linear.weight.normal_(0, std)
                block.linear.bias.normal_(0, std)
        for head in model.heads.lm_heads:
            head.weight.add_(torch.randn_like(head.weight) * std)


def naive_medusa_loss(model: MedusaModel, input_ids, labels):
    """The definition: full-logits backbone forward, explicit heads, shifted CE, decay weights."""
    cfg, lm = model.config, model.lm_head
    def ce(logits, targets):  # with the z-loss z * lse^2, averaged over the valid targets
        loss = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=cfg.label_smoothing)
        valid = targets != -100
        return loss + cfg.z_loss * logits.logsumexp(-1)[valid].square().sum() / valid.sum()

    out = model.backbone(input_ids=input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # after the final norm: what the lm_head reads
    total, losses = 0.0, []
    for k in range(cfg.num_heads):
        z = hidden
        for block in model.heads.blocks[k]:
            z = z + F.silu(z @ block.linear.weight.T + block.linear.bias)
        proj = lm.weight if cfg.shared_lm_head else model.heads.lm_heads[k].weight
        logits = z @ proj.T
        s = k + 2
        loss_k = ce(logits[:, :-s].reshape(-1, V).float(), labels[:, s:].reshape(-1))
        losses.append(loss_k)
        total = total + cfg.heads_loss_weight * cfg.decay**k * loss_k
    lm_loss = None
    if cfg.mode == "joint":
        lm_loss = ce(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))
        total = total + cfg.lm_loss_weight * lm_loss
    return total, torch.stack(losses), lm_loss


def batch(B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, 4] = -100
    labels[B - 1, 6:8] = -100
    return ids, labels


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_heads": 0}, "num_heads"), ({"num_layers": 0}, "num_layers"), ({"mode": "both"}, "mode"),
     ({"decay": 0.0}, "decay"), ({"decay": 1.5}, "decay"), ({"lm_loss_weight": -1}, "lm_loss_weight"),
     ({"heads_loss_weight": float("nan")}, "heads_loss_weight"), ({"num_heads": 2.0}, "num_heads"),
     ({"skip_ignored_targets": 1}, "skip_ignored_targets"), ({"label_smoothing": 1.0}, "label_smoothing"),
     ({"label_smoothing": -0.1}, "label_smoothing"), ({"label_smoothing": 0.1, "head_targets": "backbone"},
                                                      "label_smoothing must be 0 unless"),
     ({"label_smoothing": 0.1, "mode": "joint", "lm_loss": "kl"}, "label_smoothing must be 0 unless"),
     ({"z_loss": -1e-4}, "z_loss must be a finite number >= 0"), ({"z_loss": "x"}, "z_loss must be a number"),
     ({"z_loss": 1e-4, "head_targets": "backbone", "kl_temperature": 2.0}, "z_loss must be 0 unless kl_temperature"),
     ({"z_loss": 1e-4, "mode": "joint", "lm_loss": "kl", "kl_temperature": 0.5},
      "z_loss must be 0 unless kl_temperature"),
     ({"kl_temperature": 0.0}, "kl_temperature"), ({"ignore_index": "x"}, "ignore_index"),
     ({"ignore_index": True}, "ignore_index"), ({"lm_loss_weight": True}, "lm_loss_weight must be a number"),
     ({"z_loss": "1e-4"}, "z_loss must be a number"), ({"heads_loss_weight": torch.tensor(True)}, "heads_loss_weight"),
     *[({name: float("inf")}, f"{name} must be a finite number")
       for name in ("decay", "lm_loss_weight", "heads_loss_weight", "z_loss", "label_smoothing", "kl_temperature")]],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MedusaConfig(**kwargs)


def test_decay_one_weights_every_head_alike():
    assert MedusaConfig(num_heads=3, decay=1.0).head_weights() == [1.0, 1.0, 1.0]


def test_from_backbone_checks_a_config_edited_after_construction():
    config = MedusaConfig()
    config.num_heads = 0
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        MedusaModel.from_backbone(tiny_llama(), config)


def test_per_head_projections_refuse_an_lm_head_bias():
    backbone = tiny_llama()
    backbone.lm_head.bias = torch.nn.Parameter(torch.randn(V))
    with pytest.raises(ValueError, match="lm_head has a bias.*use shared_lm_head=True"):
        MedusaModel.from_backbone(backbone, MedusaConfig(shared_lm_head=False))
    MedusaModel.from_backbone(backbone, MedusaConfig(shared_lm_head=True))  # the shared one reads it


def test_config_defaults_and_weights():
    assert MedusaConfig().heads_loss_weight == 1.0
    joint = MedusaConfig(mode="joint", num_heads=3, decay=0.5)
    assert joint.heads_loss_weight == 0.2
    assert joint.head_weights() == pytest.approx([0.2, 0.1, 0.05])
    assert joint.head_shifts() == [2, 3, 4]
    assert MedusaConfig.from_dict({**joint.to_dict(), "unknown": 1}) == joint


def test_resblock_and_heads_start_as_identity():
    block = ResBlock(7)
    assert torch.count_nonzero(block.linear.weight) == 0 and torch.count_nonzero(block.linear.bias) == 0
    x = torch.randn(3, 7)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    heads = MedusaHeads(7, 11, num_heads=2, num_layers=3, shared_lm_head=True)
    assert len(heads.blocks) == 2 and len(heads.blocks[0]) == 3 and len(heads.lm_heads) == 0
    with pytest.raises(ValueError, match="num_heads"):
        MedusaHeads(7, 11, num_heads=0, num_layers=1, shared_lm_head=False)


# ------------------------------------------------------------------------------------ zero init
@pytest.mark.parametrize("shared", [False, True])
def test_zero_init_heads_predict_like_the_backbone(shared):
    backbone = tiny_llama()
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=3, num_layers=2, shared_lm_head=shared))
    ids, _ = batch()
    hidden = model.hidden_states(ids)
    assert hidden.shape == (2, 13, H)
    logits = model.head_logits(hidden)
    assert logits.shape == (3, 2, 13, V)
    with torch.no_grad():
        reference = backbone(input_ids=ids).logits
    for k in range(3):
        torch.testing.assert_close(logits[k], reference, rtol=1e-6, atol=1e-6)
    if not shared:  # per-head projections are copies, not the backbone's tensor
        assert model.heads.lm_heads[0].weight.data_ptr() != model.lm_head.weight.data_ptr()


# ------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize(("skip", "smoothing", "z_loss"), [(True, 0.0, 0.0), (False, 0.0, 0.0), (True, 0.2, 0.0),
                                                         (False, 0.1, 0.05)])
@pytest.mark.parametrize("mode", ["heads", "joint"])
@pytest.mark.parametrize("shared", [False, True])
def test_loss_and_gradients_match_naive_medusa_loss(mode, shared, skip, smoothing, z_loss):
    cfg = MedusaConfig(num_heads=3, num_layers=2, shared_lm_head=shared, mode=mode, decay=0.7, lm_loss_weight=0.9,
                       skip_ignored_targets=skip, label_smoothing=smoothing, z_loss=z_loss)
    model = MedusaModel.from_backbone(tiny_llama(), cfg)
    randomize_heads(model)
    model.train()
    naive = copy.deepcopy(model)
    ids, labels = batch()

    with force_backend("torch"):
        out = model(ids, labels=labels)
    out.loss.backward()
    ref_loss, ref_heads, ref_lm = naive_medusa_loss(naive, ids, labels)
    ref_loss.backward()

    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.head_losses, ref_heads.detach(), rtol=1e-5, atol=1e-5)
    assert out.head_losses.shape == out.head_accuracy.shape == out.head_tokens.shape == (3,)
    assert out.head_tokens.tolist() == [(labels[:, k + 2:] != -100).sum().item() for k in range(3)]
    if mode == "joint":
        torch.testing.assert_close(out.lm_loss, ref_lm.detach(), rtol=1e-5, atol=1e-5)
    else:
        assert out.lm_loss is None
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in naive.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    backbone_grads = [n for n in grads if n.startswith("backbone.")]
    if mode == "heads":
        assert not backbone_grads, "heads mode must not touch the backbone"
        assert all(not p.requires_grad for p in model.backbone.parameters())
    else:
        assert len(backbone_grads) == len(list(model.backbone.parameters()))
    assert sum(n.startswith("heads.") for n in grads) == len(list(model.heads.parameters()))


@pytest.mark.parametrize("shared", [False, True])
def test_switching_a_joint_model_to_heads_mode_freezes_the_backbone(shared):
    """A joint run's heads-only warm-up switches ``config.mode`` at runtime: no backbone gradient."""
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2, mode="joint", shared_lm_head=shared))
    model.config.mode = "heads"
    model.train()
    assert not model.backbone.training and model.heads.training
    ids, labels = batch()
    with force_backend("torch"):
        out = model(ids, labels=labels)
    out.loss.backward()
    assert out.lm_loss is None
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())


def test_head_accuracy_matches_argmax():
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2))
    randomize_heads(model, std=0.3)
    ids, labels = batch()
    with force_backend("torch"):
        out = model(ids, labels=labels)
    logits = model.head_logits(model.hidden_states(ids))
    for k in range(2):
        s = k + 2
        target, pred = labels[:, s:], logits[k, :, :-s].argmax(-1)
        valid = target != -100
        assert out.head_accuracy[k].item() == pytest.approx(((pred == target) & valid).sum().item() / valid.sum().item())


def test_heads_loss_weight_is_read_every_step():
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2, mode="joint", decay=0.5))
    ids, labels = batch()
    with force_backend("torch"), torch.no_grad():
        model.heads_loss_weight = 0.0
        lm_only = model(ids, labels=labels)
        model.heads_loss_weight = 0.7
        mixed = model(ids, labels=labels)
    expected = lm_only.lm_loss + 0.7 * (mixed.head_losses[0] + 0.5 * mixed.head_losses[1])
    torch.testing.assert_close(mixed.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_only.loss, lm_only.lm_loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="heads_loss_weight"):
        model.heads_loss_weight = -0.1


def test_labels_default_to_input_ids_without_padding():
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2))
    ids, _ = batch()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with force_backend("torch"), torch.no_grad():
        implicit = model(ids, attention_mask=mask)
        explicit = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        unmasked = model(ids)
    torch.testing.assert_close(implicit.loss, explicit.loss, rtol=0, atol=0)
    assert (unmasked.head_tokens - implicit.head_tokens).tolist() == [3, 3]


@pytest.mark.parametrize("mode", ["heads", "joint"])
def test_left_padding_predicts_nothing(mode):
    """A left-padded row's loss is the unpadded row's: padding positions (attention_mask == 0) are no
    source of predictions (they were: the pads before the text predicted its first tokens)."""
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2, mode=mode))
    randomize_heads(model)
    text = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), text], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :3] = 0
    with force_backend("torch"), torch.no_grad():
        plain = model(text)
        left = model(padded, attention_mask=mask)
    assert left.head_tokens.tolist() == plain.head_tokens.tolist() == [8 - 2, 8 - 3]
    torch.testing.assert_close(left.head_losses, plain.head_losses, rtol=1e-5, atol=1e-5)
    if mode == "joint":
        torch.testing.assert_close(left.lm_loss, plain.lm_loss, rtol=1e-5, atol=1e-5)


def test_lora_backbone_in_joint_mode_trains_only_lora_and_heads():
    from peft import LoraConfig, get_peft_model

    backbone = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2, mode="joint"))
    model.train()
    ids, labels = batch()
    with force_backend("torch"):
        out = model(ids, labels=labels)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(("lora_" in n) or n.startswith("heads.") for n in trained)
    assert any("lora_B" in n for n in trained) and len([n for n in trained if n.startswith("heads.")]) == 2 * 2 + 2
    assert out.lm_loss is not None


def test_patched_backbone_gives_the_same_loss_and_gradients():
    """Heads never import the patching; a backbone the user patched first works the same."""
    patching = pytest.importorskip("medusa_liger.patching")
    cfg = MedusaConfig(num_heads=2, mode="joint")
    plain = MedusaModel.from_backbone(tiny_llama(), cfg)
    patched = copy.deepcopy(plain)
    patching.patch(patched.backbone)
    ids, labels = batch()
    try:
        outs = []
        for model in (plain, patched):
            with force_backend("torch"):
                outs.append(model(ids, labels=labels))
            outs[-1].loss.backward()
    finally:
        patching.unpatch(patched.backbone)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = MedusaConfig(num_heads=2, mode="joint")
    plain = MedusaModel.from_backbone(tiny_llama(), cfg)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    ids, labels = batch()
    for model in (plain, checkpointed):
        model.train()
        with force_backend("torch"):
            model(ids, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ packing
def test_segment_position_ids_restart_per_segment():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_position_ids(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match=r"segment_ids must be a \[B, T\] tensor, got \[6\]"):  # (was an unpack error)
        segment_position_ids(seg[0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_packed_documents_do_not_see_each_other(attn, with_mask):
    model = MedusaModel.from_backbone(tiny_llama(attn), MedusaConfig(num_heads=2))
    g = torch.Generator().manual_seed(3)
    doc_a, doc_b = torch.randint(0, V, (1, 7), generator=g), torch.randint(0, V, (1, 5), generator=g)
    packed = torch.cat([doc_a, doc_b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 5])
    mask = torch.ones_like(packed) if with_mask else None
    hidden = model.hidden_states(packed, mask, segment_ids=segments)
    separate = torch.cat([model.hidden_states(doc_a), model.hidden_states(doc_b)], dim=1)
    torch.testing.assert_close(hidden, separate, rtol=1e-5, atol=1e-5)
    with force_backend("torch"), torch.no_grad():
        out = model(packed, attention_mask=mask, segment_ids=segments)
    assert out.head_tokens.tolist() == [(7 - 2) + (5 - 2), (7 - 3) + (5 - 3)]


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_position_ids_win_over_the_segments(with_mask):
    """Positions that do not restart are the caller's: attention may then span segments (documented)."""
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2))
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(4))
    segments = torch.tensor([[0] * 7 + [1] * 5])
    mask = torch.ones_like(ids) if with_mask else None
    restarting = model.hidden_states(ids, mask, segment_ids=segments)
    given = segment_position_ids(segments)
    torch.testing.assert_close(model.hidden_states(ids, mask, segment_ids=segments, position_ids=given), restarting)
    # (RoPE is relative, and with a mask attention stays in the segment: positions spaced 2 apart differ)
    spaced = model.hidden_states(ids, mask, segment_ids=segments, position_ids=2 * torch.arange(12)[None])
    assert not torch.allclose(spaced[:, 1:7], restarting[:, 1:7], atol=1e-4)


def test_packed_causal_mask_blocks_other_segments_and_padding():
    mask = packed_causal_mask(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 1, 1, 0]]))
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    allowed = mask[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    # Padding before real tokens of the same segment (left padding): never attended (causality hid the above).
    left = packed_causal_mask(torch.tensor([[0, 0, 0]]), torch.tensor([[0, 1, 1]]))[0, 0].int().tolist()
    assert left == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


# ------------------------------------------------------------------------------------ errors, dtypes, backends
def test_bad_inputs_raise_clear_errors():
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=2))
    ids, labels = batch()
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    for name in ("attention_mask", "segment_ids", "position_ids"):
        bad = torch.zeros(ids.shape[0], 5, dtype=torch.long)
        with pytest.raises(ValueError, match=rf"{name} must have the shape of input_ids"):
            model(ids, **{name: bad})  # (attention_mask was a broadcast error from the default labels)
        with pytest.raises(ValueError, match=rf"{name} must have the shape of input_ids"):
            model.hidden_states(ids, **{name: bad})
    with pytest.raises(ValueError, match="config"):
        MedusaModel.from_backbone(tiny_llama(), {"num_heads": 2})
    with pytest.raises(ValueError, match="backbone"):
        MedusaModel.from_backbone(torch.nn.Linear(3, 3), MedusaConfig())
    # An empty batch failed inside HF's attention (a reshape error, an IndexError).
    for empty in (ids[:0], ids[:, :0]):
        with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\] with B, T >= 1"):
            model(empty)
        with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\] with B, T >= 1"):
            model.hidden_states(empty)
    # None or float ids failed deep inside (an AttributeError, the embedding's error about 'indices').
    for wrong, said in ((None, "NoneType"), (ids.float(), "torch.float32")):
        with pytest.raises(ValueError, match=f"input_ids must be a \\[B, T\\] tensor of integer token ids, got {said}"):
            model(wrong)


@pytest.mark.parametrize("args, message", [
    ((8, 16, True, 1, False), "num_heads must be an integer >= 1, got True"),  # built one head
    ((8, 16, 2, 1, "yes"), "shared_lm_head must be a bool, got 'yes'"),  # taken for True
    ((8, 0, 2, 1, False), "vocab_size must be an integer >= 1, got 0"),
])
def test_heads_refuse_what_the_config_refuses(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MedusaHeads(*args)


def test_bf16_forward_and_backward_on_cpu():
    model = MedusaModel.from_backbone(tiny_llama().to(torch.bfloat16), MedusaConfig(num_heads=2, mode="joint"))
    assert model.heads.blocks[0][0].linear.weight.dtype == torch.bfloat16
    ids, labels = batch()
    with force_backend("torch"):
        out = model(ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.heads.blocks[1][0].linear.weight.grad.dtype == torch.bfloat16


def assert_triton_path_matches_torch_path(model: MedusaModel) -> None:
    """One forward + backward of ``model`` (on DEVICE) through the Triton kernels (the interpreter on
    CPU, compiled on a GPU) against a copy through the PyTorch path: the losses and every gradient.
    On the device under test: Triton cannot read CPU tensors without the interpreter."""
    other = copy.deepcopy(model)
    ids, labels = (t.to(DEVICE) for t in batch(B=1, T=9))
    with force_backend("triton"):
        out = model(ids, labels=labels)
    out.loss.backward()
    with force_backend("torch"):
        ref = other(ids, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.head_losses, ref.head_losses, rtol=1e-4, atol=1e-5)
    if out.lm_loss is not None:
        torch.testing.assert_close(out.lm_loss, ref.lm_loss, rtol=1e-4, atol=1e-5)
    trained = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    assert trained and len(trained) == len([q for q in other.parameters() if q.grad is not None])
    for (name, a), b in zip(trained, [q for q in other.parameters() if q.grad is not None]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_triton_path_end_to_end_matches_torch_path():
    cfg = MedusaConfig(num_heads=2, mode="joint", shared_lm_head=False)
    model = MedusaModel.from_backbone(tiny_llama().to(DEVICE), cfg)
    randomize_heads(model)
    assert_triton_path_matches_torch_path(model)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_bf16_joint_matches_fp32_reference(shared):
    assert HAS_CUDA
    cfg = MedusaConfig(num_heads=3, mode="joint", shared_lm_head=shared)
    model = MedusaModel.from_backbone(tiny_llama(hidden=128, vocab=1000).to(DEVICE), cfg)
    randomize_heads(model)
    fp32 = copy.deepcopy(model)
    model.to(torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 64), device=DEVICE)
    out = model(ids)
    out.loss.backward()
    with force_backend("torch"):
        ref = fp32(ids)
    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.head_losses, ref.head_losses, rtol=3e-2, atol=3e-2)
    assert all(p.grad is not None for p in model.heads.parameters())


@pytest.mark.gpu
def test_cuda_autocast_packed_batch_runs_through_sdpa():
    """fp32 model under bf16 autocast, packed rows with a padding mask: the boolean 4-D mask path."""
    model = MedusaModel.from_backbone(tiny_llama("sdpa").to(DEVICE), MedusaConfig(num_heads=2, mode="joint"))
    model.train()
    ids = torch.randint(0, V, (2, 32), device=DEVICE)
    segments = torch.zeros_like(ids)
    segments[:, 20:] = 1
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, segment_ids=segments)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.lm_loss)
    assert all(torch.isfinite(p.grad).all() for p in model.heads.parameters())


@pytest.mark.parametrize("decay", ["abc", None, [0.8], 0.0, 1.5, float("nan")])
def test_a_bad_decay_is_named(decay):
    # "abc" gave "could not convert string to float", None a bare TypeError.
    with pytest.raises(ValueError, match="decay must be"):
        MedusaConfig(num_heads=2, decay=decay)


def test_a_peft_adapter_on_lm_head_is_refused():
    # Its .weight is the base weight: every loss silently ignored the adapter, which never trained.
    from peft import LoraConfig, get_peft_model

    backbone = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"\(lm_head\) carries a peft adapter"):
        MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2, mode="joint"))
    backbone = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=2, mode="joint"))  # other targets are fine


def test_a_segment_id_that_comes_back_starts_a_new_document():
    # Positions restarted at every change, but the attention mask and the loss compared ids: a third
    # document reusing the first's id attended to it, and targets crossed the second.
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=3))
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))
    reused, distinct = torch.tensor([[1, 1, 1, 2, 2, 1, 1, 1]]), torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3]])
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids)):
            torch.testing.assert_close(model.hidden_states(ids, mask, segment_ids=reused),
                                       model.hidden_states(ids, mask, segment_ids=distinct))
        assert model(ids, segment_ids=reused).head_tokens.tolist() == [2, 0, 0]
