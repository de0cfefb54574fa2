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
import re
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


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    """The run's output, once it has exited 0; a run still going after ``timeout`` seconds (a hang in a
    collective) is stopped with its ranks, never left behind."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun stops its ranks (each in a session of its own) before it exits itself.
        process.terminate()
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # torchrun itself stuck: killed, so that this call returns
            process.kill()
            output, _ = process.communicate()
        raise AssertionError(f"still running after {timeout} s, stopped:\n{output[-4000:]}") from None
    assert process.returncode == 0, output[-4000:]
    return output


def compared(path: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in read_metrics(path / "metrics.jsonl")]


@pytest.mark.parametrize("n, accum", [(24, 1), (27, 1), (27, 2)])
def test_loader_shards_are_disjoint_and_cover_one_process_accumulation(n, accum):
    # 2 ranks with grad_accum A read, step by step, what one process with grad_accum 2A reads. 27 rows:
    # an epoch's tail of 3 rows holds one micro-batch but no whole step, so it is dropped by both (one
    # process used to read it as the first half of a step that ended in the next epoch, and the orders
    # parted after the first epoch).
    mb = 3
    data = PackedData(*(torch.arange(n).unsqueeze(1).repeat(1, 4) for _ in range(3)))
    single = PackedLoader(data, mb, seed=5, grad_accum=2 * accum)
    ranks = [PackedLoader(data, mb, seed=5, rank=r, world_size=2, grad_accum=accum) for r in range(2)]
    for _ in range(9 * accum):  # two epochs and more of global draws of 6 rows
        expected = [single.next_batch()["input_ids"][:, 0] for _ in range(2)]
        got = [loader.next_batch()["input_ids"][:, 0] for loader in ranks]
        assert [g.tolist() for g in got] == [e.tolist() for e in expected]
        assert not set(got[0].tolist()) & set(got[1].tolist())
        assert ranks[0].state_dict() == ranks[1].state_dict()
        assert ranks[0].state_dict()["epoch"] == single.state_dict()["epoch"]
    assert single.state_dict()["epoch"] >= 2
    resumed = PackedLoader(data, mb, seed=5, rank=1, world_size=2, grad_accum=accum)
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(resumed.next_batch()["input_ids"], ranks[1].next_batch()["input_ids"])
    with pytest.raises(ValueError, match="rank must be in"):
        PackedLoader(data, mb, seed=5, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"x 10 ranks;"):
        PackedLoader(data, mb, seed=5, world_size=10)
    with pytest.raises(ValueError, match=r"fewer than one optimizer step reads: .* x 2 ranks x train.grad_accum=9"):
        PackedLoader(data, mb, seed=5, world_size=2, grad_accum=9)


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


# Every rank: the helpers with a live group of 2 (gloo), each against what one process computes. Sums
# (not maxima, not one rank's values), rank 0's tensors broadcast, gradients summed bucket by bucket
# (buckets smaller than a tensor, two dtypes, a parameter without gradient), rank 0 first and barriers
# that hold, and FSDP2 on a toy backbone: rank 0's weights and buffers on every rank, summed gradients,
# whole tensors (and optimizer state) on rank 0 only and sharded again on load, bad input refused.
HELPERS = """
import copy, datetime, os, sys, time, torch
import torch.distributed as dist
from medusa_liger.train import distributed, fsdp
shared, r = sys.argv[1], int(os.environ["RANK"])
flag = lambda name: os.path.join(shared, name)
with distributed.setup(torch.device("cpu")):
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (r, 2, r == 0)
    t = torch.tensor([r + 1.0, -3.0 * (r + 1)])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [3.0, -9.0], t  # a sum, in place
    assert distributed.all_gather_objects({"rank": r}) == [{"rank": 0}, {"rank": 1}]
    p = torch.nn.Parameter(torch.full((3,), float(r + 5)))
    distributed.broadcast_from_main([p, torch.full((2,), float(r))])
    assert p.tolist() == [5.0] * 3
    # Gradients summed in buckets smaller than some tensors, mixed dtypes, one parameter without a gradient.
    sizes = [2, 3, 1, 5, 2, 4]
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64 if i == 4 else torch.float32))
              for i, n in enumerate(sizes)]
    for i, q in enumerate(params):
        if i != 2:
            q.grad = (torch.arange(q.numel(), dtype=q.dtype) + 10 * i) * (r + 1)
    for bucket in (3, 4, 1, 100):
        grads = [q.grad.clone() if q.grad is not None else None for q in params]
        distributed.all_reduce_grads(params, bucket_numel=bucket)
        for q, g in zip(params, grads):
            assert (q.grad is None) if g is None else torch.equal(q.grad, g * 3 / (r + 1)), (bucket, q.grad, g)
        for q, g in zip(params, grads):
            q.grad = g
    # main_first: rank 0's block ends before the others' begins; barrier: nobody passes before all arrive.
    with distributed.main_first():
        if r == 0:
            time.sleep(0.5)
            open(flag("first"), "w").close()
        else:
            assert os.path.exists(flag("first"))
    # Every rank left main_first having waited as often as the others (else a later collective hangs).
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    if r == 0:
        time.sleep(0.5)
        open(flag("barrier"), "w").close()
    distributed.barrier()
    assert os.path.exists(flag("barrier"))
    # ZeRO-1: consolidated on rank 0, the sharded optimizer's state_dict is the whole one.
    zparams = [torch.nn.Parameter(torch.ones(4)) for _ in range(3)]
    zero = distributed.sharded_optimizer([{"params": zparams}], torch.optim.AdamW, lr=0.1)
    for q in zparams:
        q.grad = torch.ones(4)
    zero.step()
    distributed.consolidate_optimizer(zero)
    if r == 0:
        assert sorted(zero.state_dict()["state"]) == [0, 1, 2]
    # FSDP2 on a toy model: rank 1's random weights and buffers are replaced by rank 0's.
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
        def forward(self, x):
            return torch.tanh(self.lin(x))
    class Toy(torch.nn.Module):
        _no_split_modules = ["Layer"]
        def __init__(self):
            super().__init__()
            self.embed, self.heads = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
            self.layers = torch.nn.ModuleList([Layer(), Layer()])
            self.register_buffer("table", torch.randn(4), persistent=False)
        def forward(self, x):
            x = self.embed(x) + self.table
            for layer in self.layers:
                x = layer(x)
            return self.heads(x)
    torch.manual_seed(r)
    model = Toy()
    reference = copy.deepcopy(model)
    distributed.broadcast_from_main([*reference.parameters(), *reference.buffers()])
    assert fsdp.shard_model(model, torch.device("cpu")) == 2
    assert fsdp.has_sharded(model.parameters()) and torch.equal(model.table, reference.table)
    whole = fsdp.full_tensors(dict(model.named_parameters()))
    assert (whole.keys() == dict(reference.named_parameters()).keys()) if r == 0 else whole == {}
    for name, tensor in whole.items():
        assert type(tensor) is torch.Tensor and torch.equal(tensor, dict(reference.named_parameters())[name]), name
    # Gradients are summed over ranks, not averaged: those of one process's loss over both ranks' rows.
    inputs = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(7))
    model(inputs[r]).square().sum().backward()
    sum(reference(x).square().sum() for x in inputs).backward()
    for (name, q), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(fsdp.full_tensor(q.grad), ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Gathered in bf16 (train.fsdp_param_dtype), gradients are still summed in float32: finer than bf16.
    torch.manual_seed(0)
    mixed = Toy()
    fsdp.shard_model(mixed, torch.device("cpu"), param_dtype=torch.bfloat16)
    mixed(inputs[r]).square().sum().backward()
    grad = fsdp.full_tensor(mixed.layers[0].lin.weight.grad)
    assert grad.dtype == torch.float32 and not torch.equal(grad, grad.bfloat16().float()), grad
    # Optimizer state gathered whole on rank 0 and sharded again on load (the step counters are scalars).
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    optimizer.step()
    full = fsdp.full_optimizer_state(optimizer)
    assert (full is None) != (r == 0)
    full = distributed.all_gather_objects(full)[0]
    again = torch.optim.AdamW(model.parameters(), lr=0.01)
    again.load_state_dict(fsdp.shard_optimizer_state(full, again))
    back = fsdp.full_optimizer_state(again)
    if r == 0:
        assert back["param_groups"] == full["param_groups"] and back["state"].keys() == full["state"].keys()
        for index, entry in full["state"].items():
            for key, value in entry.items():
                assert type(back["state"][index][key]) is torch.Tensor and torch.equal(back["state"][index][key], value)
    # Loading whole tensors into sharded heads: each rank keeps its shard; wrong names or shapes are refused.
    heads = {k: torch.full(v.shape, 2.0) for k, v in reference.heads.state_dict().items()}
    fsdp.load_module_(model.heads, heads)
    assert all(torch.equal(fsdp.full_tensor(v), heads[k]) for k, v in model.heads.state_dict().items())
    errors = []
    for bad in ({"weight": heads["weight"]}, {**heads, "extra": heads["bias"]}, {**heads, "bias": torch.ones(3)}):
        try:
            fsdp.load_module_(model.heads, bad)
        except ValueError as error:
            errors.append(str(error).split(":")[0])
    assert errors == ["cannot load", "cannot load", "bias"], errors
    # A backbone without decoder-layer classes, and one whose unit mixes trainable dtypes, are refused.
    for broken, match in ((torch.nn.Sequential(torch.nn.Linear(2, 2)), "names no decoder-layer class"),
                          (Toy(), "mix dtypes")):
        if match == "mix dtypes":
            broken.layers[1].lin.bias.data = broken.layers[1].lin.bias.data.double()
        broken.heads = getattr(broken, "heads", torch.nn.Linear(2, 2))
        try:
            fsdp.shard_model(broken, torch.device("cpu"))
            raise AssertionError("no error for " + match)
        except ValueError as error:
            assert match in str(error), error
assert not dist.is_initialized()  # the group setup made is gone
# A group the caller made is used as it is and left open.
# (A fresh store: the first group's keys are still in torchrun's, and joining those can hang.)
dist.init_process_group("gloo", init_method="file://" + flag("store"), rank=r, world_size=2)
with distributed.setup(torch.device("cpu")) as device:
    assert device == torch.device("cpu") and distributed.world_size() == 2
assert dist.is_initialized()
dist.destroy_process_group()
open(flag(f"ok-rank{r}"), "w").close()
"""


def test_helpers_across_two_ranks_match_one_process(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    finish(torchrun(str(script), str(tmp_path)))
    assert (tmp_path / "ok-rank0").is_file() and (tmp_path / "ok-rank1").is_file()


@pytest.mark.parametrize("env, device, expected", [
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda", "cuda:1"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1", "cuda:1"),
    ({"WORLD_SIZE": "2"}, "cuda", "cuda:0"),  # LOCAL_RANK unset
    ({"WORLD_SIZE": "2", "LOCAL_RANK": ""}, "cuda", "cuda:0"),  # set but empty: unset
    ({"WORLD_SIZE": "1", "LOCAL_RANK": "1"}, "cuda:0", "cuda:0"),  # one process: the device as configured
    ({"WORLD_SIZE": ""}, "cuda:1", "cuda:1"),
    ({}, "cuda:1", "cuda:1"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu", "cpu"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:0", "must be 'auto' or 'cuda' under torchrun"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "cuda", "LOCAL_RANK=2 but only 2 CUDA devices"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "one"}, "cuda", "LOCAL_RANK must be an integer, got 'one'"),
])
def test_training_device_under_torchrun(monkeypatch, env, device, expected):
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if ":" in expected or expected in ("cuda", "cpu"):
        assert distributed.training_device(torch.device(device)) == torch.device(expected)
        assert distributed.env_world_size() == int(env.get("WORLD_SIZE") or 1)
    else:
        with pytest.raises(ValueError, match=re.escape(expected)):
            distributed.training_device(torch.device(device))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, in torch.distributed's modules
@pytest.mark.parametrize("missing", ["RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_setup_without_torchrun_says_which_variable_is_missing(monkeypatch, missing):
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(missing)
    with pytest.raises(ValueError, match=f"WORLD_SIZE is set but {missing} is not: launch with torchrun"):
        with distributed.setup(torch.device("cpu")):
            pass
    assert not torch.distributed.is_initialized()


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
    # A lambda ramp longer than the run: the exports' config holds the last step's lambda, not the config's.
    held_out = "data.eval_fraction=0.13"
    ramp = ["train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps=10"]
    sharded = launch(tmp_path / "fsdp", "train.fsdp=true", held_out, *ramp)
    with force_backend("torch"):
        single = train(load_config(TINY, [*RUN, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2", held_out,
                                          *ramp]))
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
    single_heads = read_heads(tmp_path / "single" / "final" / "heads_medusa")
    sharded_heads = read_heads(tmp_path / "fsdp" / "final" / "heads_medusa")
    assert sharded_heads.config == single_heads.config
    assert single_heads.config.heads_loss_weight == pytest.approx(0.2 * 3 / 10)  # steps 4, 1 of them heads only
    for name, tensor in sharded_heads.tensors.items():
        torch.testing.assert_close(tensor, single_heads.tensors[name], rtol=1e-3, atol=1e-5)
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
    resumed = finish(launch(tmp_path / "resumed", f"train.resume={ckpts / 'step-000002'}", "train.fsdp=true", held_out,
                            *ramp))
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


def test_fsdp_lora_on_a_bf16_base_matches_one_process(tmp_path):
    # A unit holding a frozen bf16 base beside float32 LoRA adapters: FSDP2 needs one dtype among a
    # unit's *trainable* parameters only, so this layout (Medusa-2 with LoRA on a bf16 model) shards.
    pytest.importorskip("peft")
    extra = ["model.dtype=bfloat16", "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0"]
    sharded = launch(tmp_path / "fsdp", "train.fsdp=true", *extra)
    with force_backend("torch"):
        train(load_config(TINY, [*RUN, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2", *extra]))
    output = finish(sharded)
    assert "precision: backbone bfloat16, heads and LoRA float32" in output
    assert "sharded over 2 ranks (FSDP2: 2 decoder-layer units, the heads and the root)" in output
    _close(compared(tmp_path / "fsdp"), compared(tmp_path / "single"))


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
