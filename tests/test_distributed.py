"""Data-parallel training under torchrun (2 CPU processes over gloo) against one process.

Two ranks with micro-batch 2 read, per step, the rows one process reads with micro-batch 2 and
grad_accum 2 (``PackedLoader`` hands rank r the r-th micro-batch of each global draw); with the
token counts summed over ranks and the gradients summed after the backward passes, the two runs
must log the same losses and end with the same heads. Rank 0 alone writes; a 2-rank run resumed
from a checkpoint, with its optimizer state sharded over the ranks, continues with the same losses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa_liger.heads.export import read_heads
from medusa_liger.kernels import force_backend
from medusa_liger.train import distributed, fsdp
from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone
from medusa_liger.train.config import ConfigError, load_config
from medusa_liger.train.data import load_examples
from medusa_liger.train.finish import format_summary
from medusa_liger.train.logging import read_metrics
from medusa_liger.train.loop import train
from medusa_liger.train.packing import PackedData, PackedLoader
from tests.train_helpers import SHORT, TINY

ROOT = Path(__file__).resolve().parents[1]
# SHORT with one thread per rank and 2-row micro-batches; 4 steps with checkpoints at 2 and 4. Pinned to
# the CPU (gloo, fp32) so equality is exact on any machine: on GPUs bf16 autocast and NCCL's reduction
# order make the two runs agree only to rounding.
RUN = [*[o for o in SHORT if not o.startswith(("train.threads=", "train.micro_batch_size="))],
       "train.device=cpu", "train.threads=1", "train.micro_batch_size=2", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2",
       "export.formats=[medusa]", "train.heads_only_steps=1"]
# Everything a step logs that does not depend on wall-clock time.
COMPARED = ("loss", "lm_loss", "acc/lm", "loss/head0", "loss/head2", "acc/head0", "acc/head1", "grad_norm",
            "tokens", "lr/heads", "lr/backbone", "epoch", "stage")
SUMMARY_LINE = "=== medusa-liger training summary ==="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*program: str, nproc: int = 2) -> subprocess.Popen:
    """``torchrun --nproc_per_node nproc *program`` on this machine, started in the background."""
    env = {**os.environ, "TRITON_INTERPRET": "0",  # CPU tensors take the kernels' PyTorch path
           "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *program]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def launch(output_dir: Path, *extra: str, nproc: int = 2, options: list[str] = RUN) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m medusa_liger train`` (on the CPU over gloo with the default
    ``options``), started in the background."""
    return torchrun("-m", "medusa_liger", "train", str(TINY), *options, f"output_dir={output_dir}", *extra, nproc=nproc)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    return output


def compared(path: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in read_metrics(path / "metrics.jsonl")]


def test_loader_shards_are_disjoint_and_cover_one_process_accumulation():
    n, mb = 24, 3  # a multiple of mb x 2 ranks: both drop the same (empty) tail, so epochs align
    data = PackedData(*(torch.arange(n).unsqueeze(1).repeat(1, 4) for _ in range(3)))
    single = PackedLoader(data, mb, seed=5)
    ranks = [PackedLoader(data, mb, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(9):  # two and a quarter epochs of 4 global draws of 6 rows
        expected = [single.next_batch()["input_ids"][:, 0] for _ in range(2)]
        got = [loader.next_batch()["input_ids"][:, 0] for loader in ranks]
        assert [g.tolist() for g in got] == [e.tolist() for e in expected]
        assert not set(got[0].tolist()) & set(got[1].tolist())
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    resumed = PackedLoader(data, mb, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(resumed.next_batch()["input_ids"], ranks[1].next_batch()["input_ids"])
    with pytest.raises(ValueError, match="rank must be in"):
        PackedLoader(data, mb, seed=5, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"x 9 ranks"):
        PackedLoader(data, mb, seed=5, world_size=9)


def test_helpers_are_the_identity_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    tensor = torch.arange(4.0)
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.tolist() == [0, 1, 2, 3]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    device = torch.device("cpu")
    with distributed.setup(device) as got:
        assert got == device and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        distributed.env_world_size()


# Every rank: join the group, take a ZeRO-1 step and an FSDP2 step, importing torch's modules where
# the training code does, then leave. Leaving must free the group and with it gloo's worker threads:
# one still holding the last reference to a finished collective's tensors aborts the process if it
# drops them while the interpreter shuts down (SIGABRT after a run that finished).
GROUP_LIFETIME = """
import os, sys, torch
from medusa_liger.train import distributed
threads = lambda: sorted(os.listdir("/proc/self/task"))
# The autograd engine starts its device threads (and, with CUDA, the driver's) at the first backward
# and keeps them for the process: start them before counting.
torch.nn.Linear(2, 1)(torch.ones(2)).sum().backward()
before = threads()
with distributed.setup(torch.device("cpu")):
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    optimizer = distributed.sharded_optimizer([{"params": params}], torch.optim.AdamW, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    distributed.consolidate_optimizer(optimizer)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    mesh = init_device_mesh("cpu", (2,))
    for module in [*model, model]:
        fully_shard(module, mesh=mesh)
    model(torch.randn(2, 4)).sum().backward()
    whole = model[0].weight.full_tensor()  # as checkpoints gather FSDP's shards
    del optimizer, whole, params, model, mesh, module
    assert len(threads()) > len(before)  # gloo's threads, while the group lives
def name(tid):
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:  # ended meanwhile
        return None
left = sorted(filter(None, map(name, set(threads()) - set(before))))
with open(os.path.join(sys.argv[1], "threads-left-rank" + os.environ["RANK"]), "w") as f:
    f.write(" ".join(left))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_leaving_setup_frees_the_group_and_its_threads(tmp_path):
    script = tmp_path / "group_lifetime.py"
    script.write_text(GROUP_LIFETIME)
    finish(torchrun(str(script), str(tmp_path)))
    assert [(tmp_path / f"threads-left-rank{r}").read_text() for r in range(2)] == ["", ""]


def test_two_ranks_match_one_process_with_accumulation_and_resume(tmp_path):
    ddp = launch(tmp_path / "ddp")
    with force_backend("torch"):  # the same PyTorch path the ranks take, meanwhile in this process
        train(load_config(TINY, [*RUN, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    output = finish(ddp)

    # The same losses, accuracies, gradient norms and token counts, step by step, and the same heads.
    assert compared(tmp_path / "ddp") == compared(tmp_path / "single")
    single_heads = read_heads(tmp_path / "single" / "final" / "heads_medusa").tensors
    for name, tensor in read_heads(tmp_path / "ddp" / "final" / "heads_medusa").tensors.items():
        torch.testing.assert_close(tensor, single_heads[name], rtol=1e-6, atol=1e-7)

    # Only rank 0 wrote: one summary, one record per step, no leftovers of a second writer.
    assert output.count(SUMMARY_LINE) == 1, output
    assert [r["step"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl")] == [1, 2, 3, 4]
    ckpts = tmp_path / "ddp" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    for step in ckpts.iterdir():  # every rank's RNG streams, one data position for all
        assert (step / "rng.pt").is_file() and (step / "rng-rank1.pt").is_file()
        assert not (step / "rng-rank2.pt").exists()
        # Each rank draws its own dropout masks: the ranks' streams were one stream, repeated.
        states = [torch.load(step / name, weights_only=False)["torch"] for name in ("rng.pt", "rng-rank1.pt")]
        assert not torch.equal(*states)

    # Two ranks resumed from the step-2 checkpoint log steps 3-4 exactly as the straight run did, here
    # with AdamW's state sharded over the ranks (ZeRO-1): the unsharded checkpoint loads into the
    # sharded optimizer, the updates are the same, and the step-4 checkpoint it writes (gathered on
    # rank 0) holds the unsharded run's optimizer state.
    resumed = finish(launch(tmp_path / "resumed", f"train.resume={ckpts / 'step-000002'}", "train.shard_optimizer=true"))
    assert "resumed from" in resumed and "optimizer state sharded over 2 ranks" in resumed
    assert compared(tmp_path / "resumed") == compared(tmp_path / "ddp")[2:]
    sharded, plain = (torch.load(d / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=False)
                      for d in (tmp_path / "resumed", tmp_path / "ddp"))
    assert sharded["param_groups"] == plain["param_groups"]
    assert sorted(sharded["state"]) == sorted(plain["state"]) and plain["state"]
    for index, state in plain["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(sharded["state"][index][key], value, rtol=0, atol=0)


def _close(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-7), key
            else:
                assert ra[key] == rb[key], key


def test_fsdp_ranks_match_one_process_and_resume(tmp_path):
    # FSDP2 over 2 ranks (the tiny joint run: every decoder layer a unit, the whole backbone and the
    # heads trained) against one process with grad_accum 2. The gradients are the same sums, but the
    # gradient norm is summed shard by shard, so the runs agree to rounding, not bit for bit.
    # 73 held-out rows: the last evaluation round has rows for rank 0 only, so rank 1 must still run
    # a forward (FSDP gathers each layer from every rank) and count nothing.
    held_out = "data.eval_fraction=0.13"
    sharded = launch(tmp_path / "fsdp", "train.fsdp=true", held_out)
    with force_backend("torch"):
        single = train(load_config(TINY, [*RUN, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2", held_out]))
    output = finish(sharded)
    assert "73 held out" in output
    assert "sharded over 2 ranks (FSDP2: 2 decoder-layer units, the heads and the root)" in output
    _close(compared(tmp_path / "fsdp"), compared(tmp_path / "single"))
    held_out_line = next(line for line in format_summary(single.summary, single.paths, 3).splitlines()
                         if line.startswith("held-out"))
    assert held_out_line in output.splitlines()

    # Exports and checkpoints hold whole tensors, as one process writes them. (AdamW's first steps
    # amplify the rounding differences of the gradient norm, hence looser tolerances than for the
    # logged numbers; a wrong gradient scale shows in grad_norm above.)
    single_heads = read_heads(tmp_path / "single" / "final" / "heads_medusa").tensors
    for name, tensor in read_heads(tmp_path / "fsdp" / "final" / "heads_medusa").tensors.items():
        torch.testing.assert_close(tensor, single_heads[name], rtol=1e-3, atol=1e-5)
    from safetensors.torch import load_file

    single_backbone = load_file(str(tmp_path / "single" / "final" / "backbone" / "model.safetensors"))
    for name, tensor in load_file(str(tmp_path / "fsdp" / "final" / "backbone" / "model.safetensors")).items():
        torch.testing.assert_close(tensor, single_backbone[name], rtol=1e-3, atol=1e-5)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000004"
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    reference = torch.load(tmp_path / "single" / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=False)
    assert sorted(state["state"]) == sorted(reference["state"])
    for index, entry in reference["state"].items():
        for key, value in entry.items():
            assert type(state["state"][index][key]) is torch.Tensor  # not a DTensor
            torch.testing.assert_close(state["state"][index][key], value, rtol=1e-3, atol=1e-7)

    # Resumed from its step-2 checkpoint (whole tensors, sharded again on load), the FSDP run logs
    # steps 3-4 exactly as it did straight through.
    ckpts = tmp_path / "fsdp" / "checkpoints"
    resumed = finish(launch(tmp_path / "resumed", f"train.resume={ckpts / 'step-000002'}", "train.fsdp=true", held_out))
    assert "resumed from" in resumed
    assert compared(tmp_path / "resumed") == compared(tmp_path / "fsdp")[2:]


def test_fsdp_param_dtype_computes_in_bf16_on_float32_shards(tmp_path):
    # train.fsdp_param_dtype=bfloat16: each unit's float32 shards are cast to bf16 before the gather,
    # the step computes in bf16 and reduces its gradients in float32 onto float32 shards. The run then
    # follows the float32 one to bf16 rounding: equal to the 1e-5 that float32 FSDP keeps (test above)
    # would mean nothing was cast; far apart, that the update went wrong.
    mixed = launch(tmp_path / "mixed", "train.fsdp=true", "train.fsdp_param_dtype=bf16")
    with force_backend("torch"):
        train(load_config(TINY, [*RUN, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    output = finish(mixed)
    assert "parameters gathered in bfloat16, gradients reduced in float32" in output
    assert "cast to bfloat16 for the forward and backward" in output
    ours, single = compared(tmp_path / "mixed"), compared(tmp_path / "single")
    assert len(ours) == len(single) == 4
    for a, b in zip(ours, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)
    assert max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(ours, single)) > 1e-4
    # The master weights stay float32: in checkpoints (AdamW's state too) and in the exported heads.
    from safetensors.torch import load_file

    ckpt = tmp_path / "mixed" / "checkpoints" / "step-000004"
    assert {t.dtype for t in load_file(str(ckpt / "trainable.safetensors")).values()} == {torch.float32}
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)["state"]
    assert {v.dtype for entry in state.values() for v in entry.values() if v.dim()} == {torch.float32}
    heads = read_heads(tmp_path / "mixed" / "final" / "heads_medusa").tensors
    assert {t.dtype for t in heads.values()} == {torch.float32}


@pytest.mark.parametrize("lora", [True, False])
def test_fsdp_self_distillation_matches_one_process(tmp_path, lora):
    # Medusa-2 with the backbone's term distilled (train.lm_loss=kl): each step runs the FSDP-sharded
    # backbone and, under no_grad, its teacher: the same backbone with its LoRA adapters off, or a
    # frozen copy that FSDP shards like the backbone (full Medusa-2). Two ranks against one process
    # with grad_accum 2. LoRA dropout is off: its masks come from each rank's own random stream, so
    # with dropout the runs differ by design.
    pytest.importorskip("peft")
    extra = ["train.lm_loss=kl"]
    if lora:
        extra += ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0"]
    sharded = launch(tmp_path / "fsdp", "train.fsdp=true", *extra)
    with force_backend("torch"):
        train(load_config(TINY, [*RUN, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2", *extra]))
    finish(sharded)
    runs = compared(tmp_path / "fsdp"), compared(tmp_path / "single")
    _close(*runs)
    assert runs[0][1]["lm_loss"] == 0.0 and runs[0][-1]["lm_loss"] > 0.0  # the student starts as its teacher


def test_fsdp_helpers_without_a_process_group(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with force_backend("torch"):
        cfg = load_config(TINY, [*RUN, f"output_dir={tmp_path}"])
        tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
        model = build_medusa(cfg, backbone)
    assert fsdp.decoder_layer_classes(model) == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="train.fsdp needs several processes"):
        fsdp.shard_model(model, torch.device("cpu"))
    # A ConfigError: the command prints it in one line (exit 2), not a traceback (a ValueError did).
    with pytest.raises(ConfigError, match="train.fsdp needs several processes"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fsdp=True)))
    # Unsharded tensors pass through: whole tensors are the tensors themselves.
    w = model.heads.state_dict()
    assert fsdp.full_tensors(w).keys() == w.keys() and all(torch.equal(fsdp.full_tensors(w)[k], w[k]) for k in w)
    before = {k: v.clone() for k, v in w.items()}
    fsdp.load_module_(model.heads, {k: v + 1 for k, v in before.items()})
    assert all(torch.equal(model.heads.state_dict()[k], before[k] + 1) for k in before)
    with pytest.raises(RuntimeError, match="Missing key"):
        fsdp.load_module_(model.heads, {})
    # The architecture alone on the meta device (what FSDP ranks other than 0 build).
    _, meta = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data), on_meta=True)
    assert all(p.is_meta for p in meta.parameters())
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in backbone.named_parameters()]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_on_gpus_resumes_exactly(tmp_path):
    # NCCL, bf16 autocast, one rank per GPU: a sharded checkpoint resumed sharded and replicated.
    gpus = [o for o in RUN if o != "train.device=cpu"] + ["train.device=cuda", "train.steps=6", "checkpoint.every=3"]
    nproc = torch.cuda.device_count()
    output = finish(launch(tmp_path / "straight", "train.fsdp=true", nproc=nproc, options=gpus))
    assert f"sharded over {nproc} ranks" in output and "cuda:0" in output
    step3 = tmp_path / "straight" / "checkpoints" / "step-000003"
    finish(launch(tmp_path / "sharded", "train.fsdp=true", f"train.resume={step3}", nproc=nproc, options=gpus))
    finish(launch(tmp_path / "replicated", f"train.resume={step3}", nproc=nproc, options=gpus))
    straight = compared(tmp_path / "straight")[3:]
    assert compared(tmp_path / "sharded") == straight
    # Replicated, the gradient norm is summed in another order; under bf16 autocast AdamW carries that
    # into the next steps at ~2e-5 (measured on 2 x H100).
    _close(compared(tmp_path / "replicated"), straight, rel=1e-3)



def test_a_rank_sets_only_its_own_gpus_random_state(monkeypatch):
    """A one-process checkpoint holds every GPU's state: each rank set all of them (a CUDA context on
    every GPU, and an error on a host with fewer GPUs); a rank without its own file took rank 0's."""
    from medusa_liger.train import checkpoint

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append((states, "all")))
    state = {"python": checkpoint.random.getstate(), "torch": torch.get_rng_state(), "cuda": ["gpu0", "gpu1", "gpu2"]}
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    checkpoint.set_rng_state(state)
    assert calls == [("gpu1", "cuda")]
    calls.clear()
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    checkpoint.set_rng_state(state)  # one process on a host with 2 of the 3 GPUs
    assert calls == [("gpu0", 0), ("gpu1", 1)]
