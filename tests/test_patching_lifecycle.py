"""medusa_liger.patch / unpatch lifecycle on tiny HF models: errors, idempotence, RoPE bookkeeping,
options, training, peft LoRA and save / load round trips, optional imports, and bf16 GPU runs."""

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
from medusa_liger.patching.modules import is_patched_class
from tests.patching_helpers import (
    _HF_ORIGINALS,
    BF16_CURVE_ABS,
    BF16_GRAD_REL,
    BF16_LOGITS_REL,
    BF16_LOSS_REL,
    FAMILY_NAMES,
    _clean_patch_state,  # noqa: F401  (autouse fixture)
    assert_results_agree,
    batch,
    build,
    count_patched,
    expected_patched,
    originals,
    results,
)
from tests.utils import DEVICE, rel_norm_error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_unpatch_model_warns_while_the_module_patch_still_reaches_it():
    # The README's sequence: patch("llama"), build, patch(model), unpatch(model). The fused loss is
    # LlamaForCausalLM.forward itself, so only unpatch("llama") takes it out; unpatch(model) says so.
    reference = build("llama")  # built before the module patch: plain HF classes
    medusa_liger.patch("llama")
    model = medusa_liger.patch(build("llama", state=reference.state_dict()))
    with pytest.warns(UserWarning, match=r"still patched \(fused_loss, rms_norm, rope, swiglu\).*unpatch\('llama'\)"):
        medusa_liger.unpatch(model)
    ids, labels = batch()
    with force_backend("torch"):
        assert model(input_ids=ids, labels=labels).logits is None  # the class-level fused loss, still
    medusa_liger.unpatch("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to warn about
        medusa_liger.unpatch(model)
    got, want = model(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)


def test_rope_stays_while_any_patched_model_needs_it():
    mod = FAMILIES["mistral"].modeling_module()
    hf_rope = originals("mistral")["apply_rotary_pos_emb"]
    first, second = medusa_liger.patch(build("mistral")), medusa_liger.patch(build("mistral"))
    medusa_liger.unpatch(first)
    assert mod.apply_rotary_pos_emb is not hf_rope  # `second` still uses it
    medusa_liger.patch("mistral", rms_norm=False, swiglu=False, fused_loss=False)
    with pytest.warns(UserWarning, match=r"still patched \(rope\)"):
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


def test_an_offloaded_lm_head_is_left_to_hf(tmp_path):
    """accelerate's big-model loading puts an offloaded lm_head's weight on the meta device and moves it
    in only inside the head's forward: the fused loss, which reads the weight itself, must not run
    (it crashed on the meta weight)."""
    pytest.importorskip("accelerate")
    build("llama").save_pretrained(tmp_path / "m")  # (untied: the head is a module of its own)
    ids, labels = batch()

    def load(**offload):  # (in training mode: the fused loss runs in training only)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "m", **offload).train()

    offload = {"device_map": {"model": "cpu", "lm_head": "disk"}, "offload_folder": tmp_path / "offload"}
    with force_backend("torch"):
        want = load(**offload)(input_ids=ids, labels=labels).loss
        medusa_liger.patch("llama")
        model = load(**offload)
        assert model.lm_head.weight.device.type == "meta" and hasattr(model.lm_head, "_hf_hook")
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want, rtol=1e-5, atol=1e-6)
        # The patched backbone still runs: only the loss went to HF's forward.
        assert count_patched(model) == count_patched(load()) > 0


@pytest.mark.parametrize("route", ["instance", "module"])
def test_a_patched_model_pickles_deep_copies_and_loads_elsewhere(tmp_path, route):
    """torch.save of a model patched in place failed: pickle looked its classes up by name and found
    HF's. Loaded (here or in a process that patched nothing) or deep-copied, it is patched as before."""
    reference = build("qwen3")
    ids, labels = batch()
    with force_backend("torch"):
        want = results(reference, ids, labels)
        if route == "instance":
            model = medusa_liger.patch(build("qwen3", state=reference.state_dict()))
        else:
            medusa_liger.patch("qwen3")
            model = build("qwen3", state=reference.state_dict())
        patched = count_patched(model)
        assert patched > 0
        torch.save(model, tmp_path / "model.pt")
        for copy_ in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
            assert count_patched(copy_) == patched
            assert_results_agree(results(copy_, ids, labels), want)
    # A process that patched nothing loads it patched too.
    script = f"""
import torch
from tests.patching_helpers import count_patched
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
print(count_patched(model))
"""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == str(patched), proc.stderr[-3000:]


def test_copies_keep_their_classes_under_the_module_route():
    """Under patch("llama") pickle found the fused subclass under an HF class's name: an HF-class model
    (built before, or unpatched) could not be saved, and a user's subclass of the fused class came back
    as the fused class itself (its own forward lost)."""
    import pickle

    ids, _ = batch()
    plain = build("llama")
    medusa_liger.patch("llama")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm  # the fused subclass now

    class ScaledNorm(LlamaRMSNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    norm = ScaledNorm(8)
    x = torch.randn(2, 8)
    with force_backend("torch"):
        want = plain(input_ids=ids).logits
        for copy_ in (pickle.loads(pickle.dumps(plain)), copy.deepcopy(plain)):
            assert count_patched(copy_) == 0
            torch.testing.assert_close(copy_(input_ids=ids).logits, want)  # (RoPE: within tolerance)
        copied = copy.deepcopy(norm)  # (a local class cannot be pickled by name; deepcopy took the same path)
        assert type(copied) is ScaledNorm
        torch.testing.assert_close(copied(x), norm(x))


def test_unpatch_reaches_a_forward_an_accelerate_hook_holds():
    """A hook added after the patch keeps the bound fused forward (``_old_forward``): unpatch(model)
    restored the classes, yet the fused loss still ran."""
    accelerate = pytest.importorskip("accelerate")
    ids, labels = batch()
    with force_backend("torch"):
        model, _ = accelerate.cpu_offload_with_hook(medusa_liger.patch(build("llama")), execution_device="cpu")
        assert model(input_ids=ids, labels=labels).logits is None  # fused: no logits
        medusa_liger.unpatch(model)
        assert model(input_ids=ids, labels=labels).logits is not None


# ---------------------------------------------------------------------------------------------
# Optional dependencies: HF `kernels` absent or present; no Triton needed to import
# ---------------------------------------------------------------------------------------------

_CHILD_COMMON = """
import sys, types, warnings, torch
from medusa_liger.kernels.utils import force_backend
from tests.patching_helpers import build, batch, results, assert_results_agree
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
# GPU, bf16 (Triton kernels): tolerances in tests/patching_helpers.py
# ---------------------------------------------------------------------------------------------


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


def test_reentrant_backward_twice_matches_hf_on_the_triton_path():
    # The patched MLP always asked SwiGLU for its in-place backward, which overwrote the saved
    # activations: inside reentrant_backward() the second backward's gradients were silently wrong.
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import medusa_liger
    from medusa_liger.kernels.fused_linear_cross_entropy import reentrant_backward
    from medusa_liger.kernels.utils import force_backend

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    hf = LlamaForCausalLM(config).float().to(DEVICE)
    ours = copy.deepcopy(hf)
    medusa_liger.patch(ours)
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    for model, backend in ((hf, "torch"), (ours, "triton")):
        with force_backend(backend), reentrant_backward():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward(retain_graph=True)
            loss.backward()
    for (name, a), b in zip(hf.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_an_unpatched_model_pickles_as_hf_does():
    """Patching registered a pickle rule for the HF classes for good: every later pickle of a model of the
    family, never patched or restored by unpatch, named medusa_liger and failed to load without it."""
    import pickle

    restored = medusa_liger.unpatch(medusa_liger.patch(build("qwen2")))
    never_patched = build("qwen2")
    for model in (restored, never_patched):
        assert b"medusa_liger" not in pickle.dumps(model)


def test_eval_mode_returns_hf_logits_with_the_loss(monkeypatch):
    """An evaluation with labels (HF Trainer's compute_metrics) got logits=None: in eval mode the forward
    is HF's, unless FUSE_IN_EVAL asks for the fused loss there too."""
    from medusa_liger.patching import causal_lm

    reference = build("llama").eval()
    patched = medusa_liger.patch(build("llama", state=reference.state_dict())).eval()
    ids, labels = batch()
    with torch.no_grad(), force_backend("torch"):
        got, want = patched(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
        torch.testing.assert_close(got.logits, want.logits)
        torch.testing.assert_close(got.loss, want.loss)
        monkeypatch.setattr(causal_lm, "FUSE_IN_EVAL", True)
        fused = patched(input_ids=ids, labels=labels)
        assert fused.logits is None
        torch.testing.assert_close(fused.loss, want.loss)
        assert patched.train()(input_ids=ids, labels=labels).logits is None  # training: fused


def test_without_triton_the_kernels_import_and_patched_models_train(tmp_path):
    """triton is a dependency on Linux only: on macOS/Windows three kernel modules failed to import, so
    patch() (and model.patch=true) raised ImportError instead of taking the PyTorch path."""
    script = textwrap.dedent("""
        import sys

        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoTriton())
        import importlib, pkgutil
        import torch
        import medusa_liger, medusa_liger.kernels
        for info in pkgutil.iter_modules(medusa_liger.kernels.__path__):
            importlib.import_module(f"medusa_liger.kernels.{info.name}")
        from tests.patching_helpers import batch, build
        model = medusa_liger.patch(build("qwen3"))
        ids, labels = batch()
        model(input_ids=ids, labels=labels).loss.backward()
        assert "triton" not in sys.modules
        from types import SimpleNamespace
        from medusa_liger.kernels.utils import force_backend, use_triton
        assert not use_triton(SimpleNamespace(dtype=torch.bfloat16, is_cuda=True))  # a CUDA torch without triton
        try:
            with force_backend("triton"):
                pass
        except ValueError as error:
            assert "needs the triton package" in str(error)
        else:
            raise AssertionError("force_backend('triton') without triton")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                            timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Targets and bookkeeping the third mutation audit found untested
# ---------------------------------------------------------------------------------------------


def test_a_bare_base_model_and_a_plain_wrapper_are_patched_and_unpatched():
    mod = FAMILIES["mistral"].modeling_module()
    hf_rope = _HF_ORIGINALS["mistral"]["apply_rotary_pos_emb"]
    base = build("mistral").model  # the decoder alone: one model that needs the fused RoPE
    medusa_liger.patch(base)
    assert mod.apply_rotary_pos_emb is not hf_rope
    medusa_liger.unpatch(base)
    assert mod.apply_rotary_pos_emb is hf_rope

    class Wrapper(torch.nn.Module):  # (e.g. a trainer's module holding the model)
        def __init__(self):
            super().__init__()
            self.backbone = build("llama")

    wrapper = Wrapper()
    assert medusa_liger.patch(wrapper) is wrapper and count_patched(wrapper) == expected_patched("llama")
    medusa_liger.unpatch(wrapper)
    assert count_patched(wrapper) == 0


def test_a_second_module_patch_only_adds_pieces_and_unpatch_leaves_what_it_did_not_install():
    mod = FAMILIES["llama"].modeling_module()
    hf = _HF_ORIGINALS["llama"]
    medusa_liger.patch("llama")
    medusa_liger.patch("llama", rope=False)  # (documented: does not take the fused RoPE out)
    assert mod.apply_rotary_pos_emb is not hf["apply_rotary_pos_emb"]
    medusa_liger.unpatch("llama")
    assert originals("llama") == hf

    class Elsewhere:  # another library's replacement, installed after our unpatch
        pass

    mod.LlamaRMSNorm = Elsewhere
    try:
        medusa_liger.unpatch("llama")  # nothing of ours is installed: nothing to put back
        assert mod.LlamaRMSNorm is Elsewhere
    finally:
        mod.LlamaRMSNorm = hf["LlamaRMSNorm"]


def test_unpatch_of_an_unsupported_model_is_a_no_op_and_of_no_model_an_error():
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    )
    assert medusa_liger.unpatch(gpt2) is gpt2
    with pytest.raises(ValueError, match="target must be"):
        medusa_liger.unpatch(3)
