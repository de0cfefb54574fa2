"""medusa_liger.patch / unpatch on tiny HF Llama, Mistral, Qwen2 and Qwen3 models (built offline).

The reference is always the unpatched HF model with the same weights: logits, loss and every
parameter gradient must agree (fp32 on CPU through the PyTorch path; one test runs the Triton path
end to end under the interpreter; bf16 on the GPU with the tolerances stated there).
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import medusa_liger
from medusa_liger.kernels.utils import force_backend
from medusa_liger.patching import FAMILIES, supported_model_types
from medusa_liger.patching import apply as patching_apply
from medusa_liger.patching.modules import is_patched_class
from tests.utils import HAS_CUDA, rel_norm_error

FAMILY_NAMES = sorted(FAMILIES)
VOCAB = 163  # odd on purpose: no power-of-two block fits it exactly
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model_type: str, *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB):
    """A tiny GQA config of ``model_type`` (4 query heads, 2 kv heads, head_dim 16)."""
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def build(model_type: str, *, attn: str = "sdpa", dtype=torch.float32, device="cpu", state=None, **cfg):
    """A tiny causal LM (seeded weights, or ``state`` loaded) in eval-free training mode."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **cfg), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def batch(vocab: int = VOCAB, B: int = 2, T: int = 19, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[-1, -2:] = -100
    return ids.to(device), labels.to(device)


def originals(model_type: str) -> dict[str, object]:
    """The HF objects the patch may replace in a family's modeling module (compared by identity)."""
    spec = FAMILIES[model_type]
    mod = spec.modeling_module()
    causal_lm = getattr(mod, spec.causal_lm)
    objects = {name: getattr(mod, name) for name in (*spec.rms_norm, spec.mlp, spec.rope, spec.causal_lm)}
    objects["forward"] = causal_lm.__dict__["forward"]
    return objects


_HF_ORIGINALS = {t: originals(t) for t in FAMILY_NAMES}


@pytest.fixture(autouse=True)
def _clean_patch_state():
    """Every test ends with HF's modeling modules untouched, whatever it patched."""
    yield
    for state in patching_apply._STATES.values():
        state.rope_models.clear()  # forget the test's patched models (a failed test's traceback keeps them)
    for model_type in FAMILY_NAMES:
        medusa_liger.unpatch(model_type)
        assert originals(model_type) == _HF_ORIGINALS[model_type], f"{model_type}: HF objects not restored"


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def results(model, ids, labels, **kwargs) -> dict:
    """Logits without labels; loss, logits and every parameter gradient with labels."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out, grads = loss_and_grads(model, ids, labels, **kwargs)
    return {"logits": logits, "loss": out.loss.detach(), "loss_logits": out.logits, "grads": grads}


def assert_results_agree(got: dict, want: dict, *, atol=1e-5, rtol=1e-4) -> None:
    """A patched model's :func:`results` match HF's (computed before anything was patched: RoPE
    is module-level, so a reference run after patching would use the fused RoPE too)."""
    torch.testing.assert_close(got["logits"], want["logits"], atol=atol, rtol=rtol)
    assert got["loss_logits"] is None, "the fused loss must not materialize logits"
    torch.testing.assert_close(got["loss"], want["loss"], atol=atol, rtol=rtol)
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=atol, rtol=rtol, msg=name)


def count_patched(model) -> int:
    return sum(is_patched_class(type(m)) for m in model.modules())


def expected_patched(model_type: str, layers: int = 2) -> int:
    # per layer: 2 norms + MLP (+ q_norm, k_norm for qwen3); the final norm; the causal LM
    per_layer = 3 + (2 if model_type == "qwen3" else 0)
    return layers * per_layer + 2


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
        # shift_labels: already shifted targets (context-parallel style), no further shift.
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        got = patched(input_ids=ids, shift_labels=shift, labels=None)
        want = reference(input_ids=ids, labels=labels)
        torch.testing.assert_close(got.loss, want.loss)
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
# The patch itself: errors, idempotence, unpatch, RoPE bookkeeping
# ---------------------------------------------------------------------------------------------


def test_bad_targets_and_options_raise():
    with pytest.raises(ValueError, match=r"llama.*mistral.*qwen2.*qwen3"):
        medusa_liger.patch("gpt2")
    with pytest.raises(ValueError, match="model_type must be one of"):
        medusa_liger.unpatch("phi3")
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    )
    with pytest.raises(ValueError, match=r"found \['gpt2'\]"):
        medusa_liger.patch(gpt2)
    with pytest.raises(ValueError, match="rope must be True or False"):
        medusa_liger.patch("llama", rope="yes")
    with pytest.raises(ValueError, match="target must be"):
        medusa_liger.patch(3)
    assert supported_model_types() == ["llama", "mistral", "qwen2", "qwen3"]


def test_patch_twice_and_unpatch_restore_everything():
    spec = FAMILIES["llama"]
    mod = spec.modeling_module()
    hf = originals("llama")
    # Module route: twice is the same as once; unpatch restores the very same objects.
    medusa_liger.patch("llama")
    first = originals("llama")
    medusa_liger.patch("llama")
    assert originals("llama") == first
    assert mod.LlamaRMSNorm is not hf["LlamaRMSNorm"] and issubclass(mod.LlamaRMSNorm, hf["LlamaRMSNorm"])
    assert mod.apply_rotary_pos_emb is not hf["apply_rotary_pos_emb"]
    assert mod.LlamaForCausalLM.forward is not hf["forward"]
    medusa_liger.unpatch("llama")
    assert originals("llama") == hf

    # Instance route: twice is harmless; unpatch(model) restores HF classes and the RoPE function.
    reference = build("llama")
    model = build("llama", state=reference.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patching a plain HF model warns about nothing
        medusa_liger.patch(model)
    classes = [type(m) for m in model.modules()]
    medusa_liger.patch(model)
    assert [type(m) for m in model.modules()] == classes
    assert mod.apply_rotary_pos_emb is not hf["apply_rotary_pos_emb"]
    medusa_liger.unpatch(model)
    assert count_patched(model) == 0 and originals("llama") == hf
    ids, labels = batch()
    got, want = model(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)


def test_rope_stays_while_any_patched_model_needs_it():
    mod = FAMILIES["mistral"].modeling_module()
    hf_rope = originals("mistral")["apply_rotary_pos_emb"]
    first, second = medusa_liger.patch(build("mistral")), medusa_liger.patch(build("mistral"))
    medusa_liger.unpatch(first)
    assert mod.apply_rotary_pos_emb is not hf_rope  # `second` still uses it
    medusa_liger.patch("mistral", rms_norm=False, swiglu=False, fused_loss=False)
    medusa_liger.unpatch(second)
    assert mod.apply_rotary_pos_emb is not hf_rope  # the module patch still holds it
    medusa_liger.unpatch("mistral")
    assert mod.apply_rotary_pos_emb is hf_rope


def test_options_select_pieces():
    model = medusa_liger.patch(build("qwen2"), rms_norm=False, rope=False, swiglu=True, fused_loss=False)
    assert [type(m).__name__ for m in model.modules() if is_patched_class(type(m))] == ["Qwen2MLP"] * 2
    assert originals("qwen2")["apply_rotary_pos_emb"] is _HF_ORIGINALS["qwen2"]["apply_rotary_pos_emb"]
    ids, labels = batch()
    with force_backend("torch"):
        assert model(input_ids=ids, labels=labels).logits is not None  # HF's loss, not fused


# ---------------------------------------------------------------------------------------------
# Training: convergence, peft LoRA, save / load
# ---------------------------------------------------------------------------------------------


def train_losses(model, steps: int, *, lr: float = 3e-3, B: int = 2, T: int = 24) -> list[float]:
    """AdamW on a fixed token stream (a repeating pattern the model can learn); per-step losses."""
    device = next(model.parameters()).device
    stream = (torch.arange(B * T * steps) * 7 % 41).view(steps, B, T).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        loss = model(input_ids=stream[step], labels=stream[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_convergence_30_adamw_steps_cpu():
    reference = build("llama")
    patched = build("llama", state=reference.state_dict())
    with force_backend("torch"):
        want = train_losses(reference, 30)  # before patching: RoPE is patched module-wide
        got = train_losses(medusa_liger.patch(patched), 30)
    assert want[-1] < 0.6 * want[0], f"the reference did not learn: {want}"
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-4 * max(1.0, abs(w)), f"step {step}: patched {g} vs HF {w}"


def test_peft_lora_trains_and_round_trips(tmp_path):
    peft = pytest.importorskip("peft")
    reference = build("llama")
    base = medusa_liger.patch(build("llama", state=reference.state_dict()))
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    model = peft.get_peft_model(base, lora)
    medusa_liger.patch(model)  # patching the peft wrapper finds the same modules: harmless
    assert count_patched(model) == expected_patched("llama")
    with force_backend("torch"):
        losses = train_losses(model, 12, lr=1e-2)
        assert losses[-1] < losses[0], losses
        model.eval()
        ids, _ = batch()
        with torch.no_grad():
            want = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "adapter")
        # The adapter's keys are HF's: load it into a fresh, *unpatched* HF model.
        fresh = build("llama", state=reference.state_dict())
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, want)


def test_save_pretrained_round_trip(tmp_path):
    model = medusa_liger.patch(build("qwen3"))
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.architectures == ["Qwen3ForCausalLM"]
    assert count_patched(reloaded) == 0  # built from the unpatched module
    state, loaded = model.state_dict(), reloaded.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# Optional dependencies: HF `kernels` absent or present; no Triton needed to import
# ---------------------------------------------------------------------------------------------

_CHILD_COMMON = """
import sys, types, warnings, torch
from medusa_liger.kernels.utils import force_backend
from tests.test_patching import build, batch, results, assert_results_agree
import medusa_liger
from medusa_liger.patching import FAMILIES

def check_family(model_type):
    reference = build(model_type)
    with force_backend("torch"):
        want = results(reference, *batch())
        patched = medusa_liger.patch(build(model_type, state=reference.state_dict()))
        assert_results_agree(results(patched, *batch()), want)
        medusa_liger.unpatch(patched)
        medusa_liger.patch(model_type)
        built = build(model_type, state=reference.state_dict())
        assert_results_agree(results(built, *batch()), want)
        medusa_liger.unpatch(model_type)
"""

_CHILD_PRESENT = """
import sys, types
# A stand-in for the HF `kernels` package with its decorator API: they tag classes / functions
# and register hidden kernels per instance, as the real package does for `kernelize`.
fake = types.ModuleType("kernels")
def use_kernel_forward_from_hub(name):
    def tag(obj):
        obj.kernel_layer_name = name
        return obj
    return tag
def use_kernelized_func(*funcs):
    def deco(cls):
        init = cls.__init__
        def new_init(self, *a, **k):
            init(self, *a, **k)
            self.__dict__.setdefault("_hidden_kernels", {}).update({f.__name__: f for f in funcs})
        cls.__init__ = new_init
        return cls
    return deco
class _Any:
    def __init__(self, *a, **k): pass
fake.use_kernel_forward_from_hub = use_kernel_forward_from_hub
fake.use_kernelized_func = use_kernelized_func
def _getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Any
fake.__getattr__ = _getattr
sys.modules["kernels"] = fake
import transformers.utils.import_utils as iu
iu.is_kernels_available = lambda *a, **k: True
COMMON
mod = FAMILIES["llama"].modeling_module()
assert mod.LlamaRMSNorm.kernel_layer_name == "RMSNorm", "the hub decorators did not run"
check_family("qwen3")
# A module whose forward kernelize replaced on the instance is left alone, with a warning.
model = build("llama")
model.model.norm.forward = model.model.norm.forward
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    medusa_liger.patch(model)
assert any("left 1 module" in str(w.message) for w in caught), caught
print("OK")
"""


def test_import_needs_no_triton_and_hf_kernels_absent(monkeypatch):
    # Importing the patching package must not import the kernels (nor Triton): re-import it with
    # Triton made unimportable (monkeypatch puts the original modules back afterwards).
    monkeypatch.setattr(medusa_liger, "patching", sys.modules["medusa_liger.patching"])
    for name in [m for m in sys.modules if m.startswith("medusa_liger.patching")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)
    kernels_before = {m for m in sys.modules if m.startswith("medusa_liger.kernels.")}
    fresh = importlib.import_module("medusa_liger.patching")
    assert callable(fresh.patch) and fresh.supported_model_types() == supported_model_types()
    assert {m for m in sys.modules if m.startswith("medusa_liger.kernels.")} == kernels_before
    monkeypatch.undo()
    # The HF `kernels` package unimportable: patching never asks for it.
    monkeypatch.setitem(sys.modules, "kernels", None)
    reference = build("llama")
    ids, labels = batch()
    with force_backend("torch"):
        want = results(reference, ids, labels)
        patched = medusa_liger.patch(build("llama", state=reference.state_dict()))
        assert_results_agree(results(patched, ids, labels), want)


def test_hf_kernels_present():
    """In a fresh interpreter, a stand-in `kernels` package makes HF's hub decorators live."""
    script = _CHILD_PRESENT.replace("COMMON", _CHILD_COMMON)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


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
# GPU, bf16 (Triton kernels): tolerances stated here
# ---------------------------------------------------------------------------------------------

# bf16 has 8 mantissa bits; fused and unfused paths round at different points (the fused RMSNorm
# multiplies by the weight before rounding, the loss accumulates in fp32 chunk by chunk):
BF16_LOGITS_REL = 3e-2  # ||logits_p - logits_r|| / ||logits_r||
BF16_LOSS_REL = 1e-2  # |loss_p - loss_r| / loss_r
BF16_GRAD_REL = 1e-1  # per parameter ||g_p - g_r|| / ||g_r|| (a wrong kernel gives O(1))
BF16_CURVE_ABS = 5e-2  # per step |loss_p - loss_r| over 30 AdamW steps, plus 2% of the loss


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_gpu_bf16_matches_unpatched(model_type):
    cfg = dict(hidden=256, layers=2, vocab=1031)
    reference = build(model_type, dtype=torch.bfloat16, device="cuda", **cfg)
    patched = build(model_type, dtype=torch.bfloat16, device="cuda", state=reference.state_dict(), **cfg)
    ids, labels = batch(vocab=1031, B=2, T=256, device="cuda")
    want = results(reference, ids, labels)  # before patching: RoPE is patched module-wide
    got = results(medusa_liger.patch(patched), ids, labels)
    assert got["loss_logits"] is None
    err = rel_norm_error(got["logits"], want["logits"])
    assert err <= BF16_LOGITS_REL, f"logits rel error {err:.3e}"
    assert abs(float(got["loss"]) - float(want["loss"])) <= BF16_LOSS_REL * float(want["loss"])
    for name, grad in want["grads"].items():
        err = rel_norm_error(got["grads"][name], grad)
        assert err <= BF16_GRAD_REL, f"{name}: gradient rel error {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_gpu_bf16_convergence(model_type):
    reference = build(model_type, dtype=torch.bfloat16, device="cuda", hidden=128)
    patched = copy.deepcopy(reference)
    want = train_losses(reference, 30, lr=1e-3)  # before patching: RoPE is patched module-wide
    got = train_losses(medusa_liger.patch(patched), 30, lr=1e-3)
    assert want[-1] < want[0]
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= BF16_CURVE_ABS + 0.02 * abs(w), f"step {step}: patched {g} vs HF {w}"
