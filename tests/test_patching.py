"""medusa_liger.patch / unpatch on tiny HF Llama, Mistral, Qwen2 and Qwen3 models (built offline).

The reference is always the unpatched HF model with the same weights: logits, loss and every
parameter gradient must agree (fp32 on CPU through the PyTorch path; one test runs the Triton path
end to end under the interpreter). Patch lifecycle, options, round trips and the bf16 GPU checks are
in test_patching_lifecycle.py; shared helpers in patching_helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import medusa_liger
from medusa_liger.kernels.utils import force_backend
from tests.patching_helpers import (
    BF16_GRAD_REL,
    BF16_LOGITS_REL,
    BF16_LOSS_REL,
    FAMILY_NAMES,
    VOCAB,
    _clean_patch_state,  # noqa: F401  (autouse fixture)
    assert_results_agree,
    batch,
    build,
    count_patched,
    expected_patched,
    results,
)
from tests.utils import HAS_CUDA, rel_norm_error

# ---------------------------------------------------------------------------------------------
# Equivalence, both routes, every family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["instance", "module"])
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_patched_matches_unpatched(model_type, route):
    reference = build(model_type)
    ids, labels = batch()
    with force_backend("torch"):
        want = results(reference, ids, labels)
        if route == "instance":
            patched = medusa_liger.patch(build(model_type, state=reference.state_dict()))
        else:
            medusa_liger.patch(model_type)
            patched = build(model_type, state=reference.state_dict())
        # The module route fuses the causal LM's forward in place: its class stays HF's.
        assert count_patched(patched) == expected_patched(model_type) - (route == "module")
        assert patched.state_dict().keys() == reference.state_dict().keys()
        assert type(patched).__name__ == type(reference).__name__
        assert_results_agree(results(patched, ids, labels), want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_and_gradient_checkpointing(attn):
    reference = build("llama", attn=attn)
    patched = build("llama", attn=attn, state=reference.state_dict())
    for model in (reference, patched):
        model.gradient_checkpointing_enable()
        model.train()
    ids, labels = batch()
    with force_backend("torch"):
        want = results(reference, ids, labels)
        assert_results_agree(results(medusa_liger.patch(patched), ids, labels), want)


def test_bf16_weights_cpu_torch_path():
    reference = build("qwen2", dtype=torch.bfloat16)
    patched = build("qwen2", dtype=torch.bfloat16, state=reference.state_dict())
    ids, labels = batch()
    with force_backend("torch"):
        want = results(reference, ids, labels)
        got = results(medusa_liger.patch(patched), ids, labels)
    assert got["loss_logits"] is None and got["grads"]["lm_head.weight"].dtype == torch.bfloat16
    assert rel_norm_error(got["logits"], want["logits"]) <= BF16_LOGITS_REL
    assert abs(float(got["loss"]) - float(want["loss"])) <= BF16_LOSS_REL * float(want["loss"])
    for name, grad in want["grads"].items():
        assert rel_norm_error(got["grads"][name], grad) <= BF16_GRAD_REL, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_memory_policy_small_chunks(monkeypatch, dtype):
    """LOSS_CHUNK_BYTES sets the logit chunk and LOSS_ACCUM_DTYPE (None) accumulates the lm_head
    gradient in the weight's dtype: with many chunks the results still match HF's."""
    from medusa_liger.kernels import fused_linear_cross_entropy as flce
    from medusa_liger.patching import causal_lm

    monkeypatch.setattr(causal_lm, "LOSS_CHUNK_BYTES", 8 * VOCAB * dtype.itemsize)  # 8 rows
    calls = []  # (chunk rows, accumulation dtype) of each fused loss call
    original = flce.MultiHeadLinearCrossEntropyFunction.apply
    monkeypatch.setattr(flce.MultiHeadLinearCrossEntropyFunction, "apply",
                        lambda plan, *a: (calls.append((plan.chunk_size, plan.accum_dtype)), original(plan, *a))[1])
    reference = build("llama", dtype=dtype)
    patched = build("llama", dtype=dtype, state=reference.state_dict())
    ids, labels = batch()
    with force_backend("torch"):
        want = results(reference, ids, labels)
        got = results(medusa_liger.patch(patched), ids, labels)
    assert calls == [(8, None)]  # 38 tokens in chunks of 8 rows
    assert got["grads"]["lm_head.weight"].dtype == dtype
    if dtype == torch.float32:
        assert_results_agree(got, want)
        return
    assert abs(float(got["loss"]) - float(want["loss"])) <= BF16_LOSS_REL * float(want["loss"])
    for name, grad in want["grads"].items():
        assert rel_norm_error(got["grads"][name], grad) <= BF16_GRAD_REL, name


@pytest.mark.parametrize("skip_ignored", [False, True])
def test_fused_loss_skip_ignored_matches_hf(monkeypatch, skip_ignored):
    """LOSS_SKIP_IGNORED runs the loss's GEMMs on the valid targets only: HF's loss and gradients."""
    from medusa_liger.kernels import fused_linear_cross_entropy as flce
    from medusa_liger.patching import causal_lm

    monkeypatch.setattr(causal_lm, "LOSS_SKIP_IGNORED", skip_ignored)
    monkeypatch.setattr(causal_lm, "LOSS_CHUNK_BYTES", 8 * VOCAB * 4)  # several chunks of valid rows
    flags, rows = [], []
    original_apply, original_rows = flce.MultiHeadLinearCrossEntropyFunction.apply, flce.ce_rows
    monkeypatch.setattr(flce.MultiHeadLinearCrossEntropyFunction, "apply",
                        lambda plan, *a: (flags.append(plan.skip_ignored), original_apply(plan, *a))[1])
    monkeypatch.setattr(flce, "ce_rows", lambda z, *a, **k: (rows.append(z.shape[0]), original_rows(z, *a, **k))[1])
    reference = build("mistral")
    patched = build("mistral", state=reference.state_dict())
    ids, labels = batch()
    labels[1, 4:11] = -100  # a second masked span
    with force_backend("torch"):
        want = results(reference, ids, labels)
        assert_results_agree(results(medusa_liger.patch(patched), ids, labels), want)
    assert flags == [skip_ignored]
    # 2 x 19 positions: the last of each row has no target, nor have the positions before the
    # masked labels (2 + 7 + 2 of them; labels[0, 0] is nobody's target).
    assert sum(rows) == (2 * 19 - 2 - 11 if skip_ignored else 2 * 19)


def test_loss_options_match_hf():
    """num_items_in_batch, logits_to_keep, shift_labels, return_dict=False and no-grad evaluation."""
    reference = build("qwen3")
    patched = build("qwen3", state=reference.state_dict())
    ids, labels = batch()
    with force_backend("torch"):
        # Gradient accumulation: sum over tokens divided by the count of the whole accumulated batch.
        n_items = torch.tensor(57)
        want = results(reference, ids, labels, num_items_in_batch=n_items)
        medusa_liger.patch(patched)
        assert_results_agree(results(patched, ids, labels, num_items_in_batch=n_items), want)
        # Below, both models run the fused RoPE (module-level): the checks are about the loss.
        # logits_to_keep: the loss reads the kept positions; labels then cover those positions.
        keep_labels = labels[:, -7:]
        got = patched(input_ids=ids, labels=keep_labels, logits_to_keep=7)
        want = reference(input_ids=ids, labels=keep_labels, logits_to_keep=7)
        torch.testing.assert_close(got.loss, want.loss)
        with pytest.raises(ValueError, match="labels must have shape"):
            patched(input_ids=ids, labels=labels, logits_to_keep=7)
        # shift_labels: already shifted targets (context-parallel style), no further shift. HF reads
        # them instead of labels (which must still be given: labels decide that there is a loss).
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        got = patched(input_ids=ids, shift_labels=shift, labels=torch.zeros_like(labels))
        want = reference(input_ids=ids, labels=labels)
        torch.testing.assert_close(got.loss, want.loss)
        alone, want = patched(input_ids=ids, shift_labels=shift), reference(input_ids=ids, shift_labels=shift)
        assert alone.loss is None and want.loss is None
        torch.testing.assert_close(alone.logits, want.logits)
        # return_dict=False gives HF's tuple layout (loss first, no logits), and no_grad works.
        with torch.no_grad():
            loss_tuple = patched(input_ids=ids, labels=labels, return_dict=False, use_cache=False)
            torch.testing.assert_close(loss_tuple[0], reference(input_ids=ids, labels=labels).loss)
        # Without labels the forward is HF's own, logits_to_keep included.
        torch.testing.assert_close(
            patched(input_ids=ids, logits_to_keep=1).logits, reference(input_ids=ids, logits_to_keep=1).logits
        )


def test_generate_is_unchanged():
    reference = build("mistral").eval()
    ids, _ = batch(B=1, T=5)
    want = reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    patched = medusa_liger.patch(build("mistral", state=reference.state_dict())).eval()
    with force_backend("torch"):
        got = patched.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_custom_loss_function_is_respected():
    reference = build("llama")
    patched = medusa_liger.patch(build("llama", state=reference.state_dict()))
    ids, labels = batch()

    def constant_loss(logits, labels, vocab_size, **kwargs):
        return logits.float().mean() * 0 + 3.0

    patched.loss_function = constant_loss
    with force_backend("torch"):
        out = patched(input_ids=ids, labels=labels)
    assert out.logits is not None and float(out.loss.detach()) == 3.0

# ---------------------------------------------------------------------------------------------
# The Triton path end to end (interpreter on CPU, the GPU otherwise)
# ---------------------------------------------------------------------------------------------


def test_triton_path_end_to_end():
    device = "cuda" if HAS_CUDA else "cpu"
    reference = build("qwen3", device=device)
    ids, labels = batch(B=1, T=8, device=device)
    want = results(reference, ids, labels)
    patched = medusa_liger.patch(build("qwen3", device=device, state=reference.state_dict()))
    with force_backend("triton"):
        norm_out = patched.model.norm(torch.randn(2, 64, device=device, requires_grad=True))
        assert "RMSNorm" in type(norm_out.grad_fn).__name__, "the Triton kernel did not run"
        # fp32 reductions in another order (and TF32 GEMMs, if enabled, on the GPU)
        atol, rtol = (1e-3, 1e-2) if HAS_CUDA else (1e-4, 1e-3)
        assert_results_agree(results(patched, ids, labels), want, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# What the fused loss takes from HF's forward, and what it leaves to it (third mutation audit)
# ---------------------------------------------------------------------------------------------


def _loss_pair(model_type: str = "llama", **cfg):
    reference = build(model_type, **cfg)
    return reference, medusa_liger.patch(build(model_type, state=reference.state_dict(), **cfg))


def test_ignore_index_lm_head_bias_and_2d_logits_to_keep_match_hf():
    reference, patched = _loss_pair()
    ids, labels = batch()
    with force_backend("torch"):
        seven = labels.masked_fill(labels == -100, 7)
        got = patched(input_ids=ids, labels=seven, ignore_index=7)
        assert got.logits is None  # fused
        torch.testing.assert_close(got.loss, reference(input_ids=ids, labels=seven, ignore_index=7).loss)
        # Per-row kept positions (int [B, n]) and a boolean mask [B, T], labels for the kept positions.
        positions = torch.tensor([[2, 5, 9, 11], [0, 4, 8, 18]])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, 3:9], mask[1, 10:] = True, True
        for keep, kept_labels in ((positions, torch.take_along_dim(labels, positions, 1)), (mask, labels[mask])):
            try:
                want = reference(input_ids=ids, labels=kept_labels, logits_to_keep=keep)
            except (ValueError, IndexError):  # older transformers (5.17) take neither 2-D form
                continue
            torch.testing.assert_close(patched(input_ids=ids, labels=kept_labels, logits_to_keep=keep).loss, want.loss)
        for model in (reference, patched):  # a head with a bias (none of the families has one; a user may add it)
            with torch.no_grad():
                head = torch.nn.Linear(model.lm_head.in_features, VOCAB, bias=True)
                head.weight.copy_(reference.lm_head.weight)
                head.bias.copy_(torch.linspace(-1, 1, VOCAB))
            model.lm_head = head
        got = patched(input_ids=ids, labels=labels)
        assert got.logits is None
        torch.testing.assert_close(got.loss, reference(input_ids=ids, labels=labels).loss)


def test_what_the_fused_loss_cannot_see_is_left_to_hf():
    """A non-causal loss_type, a Linear subclass with its own forward and a forward hook on lm_head all
    change the logits the loss reads: HF's forward computes it (with the logits)."""
    class HalvedHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    ids, labels = batch()
    for change in ("loss_type", "subclass", "hook"):
        reference, patched = _loss_pair()
        for model in (reference, patched):
            if change == "loss_type":
                model.loss_type = "ForMaskedLM"
            elif change == "subclass":
                head = HalvedHead(model.lm_head.in_features, VOCAB, bias=False)
                head.weight = model.lm_head.weight
                model.lm_head = head
            else:
                model.lm_head.register_forward_hook(lambda module, args, out: out * 0.5)
        with force_backend("torch"):
            got = patched(input_ids=ids, labels=labels)
        assert got.logits is not None, change
        torch.testing.assert_close(got.loss, reference(input_ids=ids, labels=labels).loss, msg=change)


def test_a_backward_hook_on_lm_head_runs():
    _, patched = _loss_pair()
    fired = []
    patched.lm_head.register_full_backward_hook(lambda module, grad_in, grad_out: fired.append(1))
    ids, labels = batch()
    with force_backend("torch"):
        out = patched(input_ids=ids, labels=labels)
        out.loss.backward()
    assert out.logits is not None and fired  # HF's forward: the hook's backward ran


def test_return_dict_false_gives_a_tuple_while_training():
    _, patched = _loss_pair()
    ids, labels = batch()
    with force_backend("torch"):
        out = patched(input_ids=ids, labels=labels, return_dict=False)
        assert isinstance(out, tuple) and out[0].requires_grad
        patched.config.return_dict = False
        assert isinstance(patched(input_ids=ids, labels=labels), tuple)


def test_an_rms_norm_eps_and_a_non_silu_activation_are_honoured():
    ids, labels = batch()
    for model_type, cfg in (("llama", {"rms_norm_eps": 0.5}), ("qwen2", {"hidden_act": "gelu"})):
        reference = build(model_type, **cfg)
        want = results(reference, ids, labels)
        patched = medusa_liger.patch(build(model_type, state=reference.state_dict(), **cfg))
        with force_backend("torch"):
            assert_results_agree(results(patched, ids, labels), want)


def test_every_fused_kernel_runs_in_a_patched_forward(monkeypatch):
    """HF's "silu" activation is a SiLUActivation, not nn.SiLU: without the name check the fused
    SwiGLU never ran (same numbers, none of the speed)."""
    from medusa_liger.patching import modules

    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0, "multi_head_linear_cross_entropy": 0}
    ops = modules.kernels()

    def counted(name):
        real = getattr(ops, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(modules, "_KERNELS", type(ops)(**{**vars(ops), **{n: counted(n) for n in calls}}))
    model = medusa_liger.patch(build("llama"))
    ids, labels = batch()
    with force_backend("torch"):
        model(input_ids=ids, labels=labels).loss.backward()
    assert calls == {"rms_norm": 5, "rope": 2, "swiglu": 2, "multi_head_linear_cross_entropy": 1}
