"""FSDP2 (dl.fully_shard) on real gloo process groups: sharded runs follow the single-process run
on the same global batch (switches, losses to rounding, the merged model), W is a sharded DTensor
without gradient, DCP resume is bit-identical (and reshards to another world size), FSDP2's
mixed precision keeps switching exact, and bad input gets a DynLoRAError."""

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

import dynlora_fx as dl
from dynlora_fx.errors import DynLoRAError
from dynlora_fx.shards import assign

BATCH, STEPS = 8, 12
SWITCHING = dl.SwitchLoRA(rank=3, interval=4, freeze_steps=2)  # rank 3: uneven slots on 2 and 4 ranks
METHODS = {"switchlora": SWITCHING, "stored": dl.SwitchLoRA(rank=3, interval=4, freeze_steps=2, candidates="stored"),
           "relora": dl.ReLoRA(rank=3, reset_every=4, warmup=1), "compiled": SWITCHING,
           "experts": dl.SwitchLoRA(rank=4, interval=4, freeze_steps=2)}  # stacked experts: split evenly


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.up, self.proj = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.proj(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


class ExpertBlock(nn.Module):
    """Two experts stacked in one (E, m, n) parameter: each expert its own adapter."""

    def __init__(self, d: int = 16, experts: int = 2):
        super().__init__()
        self.norm, self.gate, self.proj = nn.LayerNorm(d), nn.Linear(d, experts), nn.Linear(2 * d, d)
        self.experts = nn.Parameter(torch.randn(experts, 2 * d, d) / 4)

    def forward(self, x):
        h = self.norm(x)
        y = torch.einsum("bd,emd->bem", h, self.experts)
        return x + self.proj(torch.relu((torch.softmax(self.gate(h), -1).unsqueeze(-1) * y).sum(1)))


def _net(config, checkpoint=False, experts=False):
    torch.manual_seed(0)  # every rank builds the same model, as a real job would load it
    net = Net()
    if experts:
        net.layers = nn.ModuleList(ExpertBlock() for _ in range(3))
    return dl.transform(net, (torch.randn(4, 8),), config, checkpoint=checkpoint)


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def _mse(gm, step, world, rank):
    x, y = (t.chunk(world)[rank] for t in _batch(step))
    return (gm(x) - y).pow(2).mean()


def _train(gm, steps, start=0, lr=1e-2, opt=None, total=STEPS, loss_of=_mse):
    """Steps ``start..start+steps`` on the global batch (each rank its slice); the global mean losses."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if opt is None:
        opt = dl.AdamW(gm.parameters(), lr=lr)
        dl.attach(gm, opt, total)
    losses = []
    for step in range(start, start + steps):
        loss = loss_of(gm, step, world, rank)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses, opt


PROBE = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))


def _outputs(gm) -> dict:
    merged = dl.merge(gm).eval()
    unloaded = dl.merge_and_unload(gm).eval()
    with torch.no_grad():
        out = {"eval": gm.eval()(PROBE), "merged": merged(PROBE), "unloaded": unloaded(PROBE)}
    gm.train()
    return out


# -- process harness -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out, job, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = globals()[job](*args)
        torch.save(result, os.path.join(out, f"{job}.{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while a peer is still in a collective
    finally:
        dist.destroy_process_group()


def _spawn(job: str, world: int, out: Path, *args) -> list:
    mp.spawn(_entry, args=(world, _free_port(), str(out), job, args), nprocs=world, join=True)
    return [torch.load(out / f"{job}.{rank}.pt", weights_only=False) for rank in range(world)]


# -- jobs (run on every rank) -------------------------------------------------------------------

def _job_follow(methods):
    results = {}
    for name in methods:
        gm = dl.fully_shard(_net(METHODS[name], checkpoint=name in ("switchlora", "compiled"),
                                 experts=name == "experts"))
        opt = dl.AdamW(gm.parameters(), lr=1e-2)
        dl.attach(gm, opt, STEPS)
        # compiled: FSDP2's hooks run between the compiled graphs; switching recompiles nothing
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses, _ = _train(dl.compile(gm) if name == "compiled" else gm, STEPS, opt=opt)
        sw = opt._dynlora_switcher
        w, a = gm.model.layers[0].proj.weight, gm.adapter("layers.0.proj.weight").A
        results[name] = {"losses": losses, "switched": sw.num_switched(), "outputs": _outputs(gm),
                         "w": (type(w).__name__, w.requires_grad, w.grad is None, tuple(w.to_local().shape)),
                         "a": (type(a).__name__, a.requires_grad), "sharded": gm.sharded}
    try:  # stacked experts whose rank does not split evenly over the ranks (FSDP2 splits dim 1 evenly only)
        dl.fully_shard(_net(SWITCHING, experts=True))
    except DynLoRAError as exc:
        results["uneven experts"] = str(exc)
    return results


def _job_dcp(path, save_at, resume):
    gm = dl.fully_shard(_net(SWITCHING, checkpoint=True))
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    dl.attach(gm, opt, STEPS)
    if resume:
        state = {"model": gm.state_dict(), "optim": opt.state_dict()}
        dcp.load(state, checkpoint_id=path)
        gm.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        losses, _ = _train(gm, STEPS - save_at, start=save_at, opt=opt)
    else:
        losses, _ = _train(gm, save_at, opt=opt)
        dcp.save({"model": gm.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
        losses += _train(gm, STEPS - save_at, start=save_at, opt=opt)[0]
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in gm.state_dict().items()}
    return {"losses": losses, "state": state}


def _job_mixed_precision():
    """bf16 compute, fp32 reduce: at lr 0 the switches alone must leave the function unchanged
    (the fp32 shards absorb them exactly); at a real lr, losses stay near the fp32 run's."""
    gm = dl.fully_shard(_net(SWITCHING), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                        reduce_dtype=torch.float32))
    before = _outputs(gm)["merged"]
    _, opt = _train(gm, STEPS, lr=0.0)
    after = _outputs(gm)["merged"]
    gm2 = dl.fully_shard(_net(SWITCHING), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    losses, _ = _train(gm2, STEPS)
    return {"drift": (after - before).abs().max().item(), "switched": opt._dynlora_switcher.num_switched(),
            "w_dtype": gm.model.layers[0].up.weight.dtype, "losses": losses, "nan": _nan_run(dl.fully_shard)}


def _nan_run(shard=lambda gm: gm) -> dict:
    """A NaN in one row of A (held by one rank when sharded): every rank skips the same switches
    (the finiteness check is summed across ranks), and no W absorbs a NaN."""
    gm = shard(_net(SWITCHING))
    ad = gm.adapter("layers.1.up.weight")
    with torch.no_grad():
        a = ad.A.full_tensor() if isinstance(ad.A, DTensor) else ad.A.detach().clone()
        a[2, 0] = float("nan")  # slot 2: rank 1's on 2 ranks
        assign(ad.A, a)
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    dl.attach(gm, opt, STEPS)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _train(gm, 4, opt=opt)
        opt._dynlora_switcher.state_dict()  # reads the skip counter
    w = gm.model.layers[1].up.weight
    return {"skipped": int(gm.switch_state.skipped), "finite": bool(torch.isfinite(w.full_tensor() if isinstance(
        w, DTensor) else w).all())}


def _job_hf(path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = dl.transform(model, example_kwargs={"input_ids": ids, "labels": ids}, config=SWITCHING, checkpoint=True)
    if dist.is_initialized():
        dl.fully_shard(gm)

    def lm_loss(gm, step, world, rank):
        batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step)).chunk(world)[rank]
        return gm(input_ids=batch, labels=batch).loss

    losses, _ = _train(gm, 6, total=6, loss_of=lm_loss)
    rank = dist.get_rank() if dist.is_initialized() else 0
    merged = dl.merge(gm)
    report = dl.export_onnx(merged, (), path, example_kwargs={"input_ids": ids, "labels": ids}) if rank == 0 else None
    with torch.no_grad():
        logits = merged.eval()(input_ids=ids, labels=ids).logits
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in gm.state_dict().items()}
    return {"losses": losses, "logits": logits, "sharded": gm.sharded, "state": state,
            "onnx": None if report is None else report.max_rel_error}


# -- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,methods", [(2, ("switchlora", "stored", "relora", "compiled")),
                                           (4, ("switchlora", "experts"))])
def test_sharded_runs_follow_the_single_process_run(tmp_path, world, methods):
    got = _spawn("_job_follow", world, tmp_path, methods)
    for name in methods:
        gm = _net(METHODS[name], checkpoint=name in ("switchlora", "compiled"), experts=name == "experts")
        want, opt = _train(gm, STEPS)
        outputs = _outputs(gm)
        for rank, result in enumerate(got):
            r = result[name]
            assert r["sharded"] == ("layers.0", "layers.1", "layers.2")
            torch.testing.assert_close(r["losses"], want, rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}")
            if name != "relora":
                assert r["switched"] == opt._dynlora_switcher.num_switched() and r["switched"][0] > 0
            for key in ("eval", "merged", "unloaded"):
                torch.testing.assert_close(r["outputs"][key], outputs[key], rtol=1e-5, atol=1e-6)
            # frozen W: a sharded DTensor (rows split over the ranks) with no gradient; A trains
            kind, trains, no_grad, shape = r["w"]
            assert kind == "DTensor" and not trains and no_grad and shape == (16 // world, 32)
            assert r["a"] == ("DTensor", True)
    if world == 2:  # stacked experts of rank 3 over 2 ranks
        assert "choose a rank that is a multiple of 2" in got[0]["uneven experts"]


def test_dcp_resume_is_bit_identical_and_reshards(tmp_path):
    path = str(tmp_path / "ckpt")
    (whole,) = _spawn("_job_dcp", 2, tmp_path, path, STEPS // 2, False)[:1]
    (resumed,) = _spawn("_job_dcp", 2, tmp_path, path, STEPS // 2, True)[:1]
    assert resumed["losses"] == whole["losses"][STEPS // 2:]  # bit-identical
    for k, v in whole["state"].items():
        assert torch.equal(v, resumed["state"][k]), k
    # another world size: DCP reshards the DTensors (W, A, B, their AdamW state); same run to rounding
    (four,) = _spawn("_job_dcp", 4, tmp_path, path, STEPS // 2, True)[:1]
    torch.testing.assert_close(four["losses"], whole["losses"][STEPS // 2:], rtol=1e-5, atol=1e-6)


def test_mixed_precision_policy_and_nan_safety_keep_switching_exact(tmp_path):
    (r,) = _spawn("_job_mixed_precision", 2, tmp_path)[:1]
    assert r["switched"][0] > 0 and r["w_dtype"] == torch.float32
    assert r["drift"] < 1e-5  # bf16 compute, yet the absorbed switches are exact in the fp32 shards
    fp32, _ = _train(_net(SWITCHING), STEPS)
    torch.testing.assert_close(r["losses"], fp32, rtol=3e-2, atol=1e-3)
    single = _nan_run()
    assert r["nan"] == single and single["skipped"] > 0 and single["finite"]


def test_hf_llama_with_checkpointing_follows_single_process_and_exports(tmp_path):
    (r,) = _spawn("_job_hf", 2, tmp_path, str(tmp_path / "m.onnx"))[:1]
    want = _job_hf(str(tmp_path / "single.onnx"))
    assert r["sharded"] == ("model.layers.0", "model.layers.1")
    torch.testing.assert_close(r["losses"], want["losses"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    for name, value in want["state"].items():  # every weight, factor, index, counter and generator
        torch.testing.assert_close(r["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert r["onnx"] is not None and r["onnx"] < 1e-4


def test_bad_input_gets_a_dynlora_error():
    gm = _net(SWITCHING)
    with pytest.raises(DynLoRAError, match="no default process group"):
        dl.fully_shard(gm)
    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(DynLoRAError, match="not produced by dl.transform"):
            dl.fully_shard(Net())
        with pytest.raises(DynLoRAError, match="wrapped"):
            dl.fully_shard(dl.compile(_net(SWITCHING)))
        with pytest.raises(DynLoRAError, match="mesh has shape"):
            dl.fully_shard(_net(SWITCHING), mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b")))
        attached = _net(SWITCHING)
        dl.attach(attached, dl.AdamW(attached.parameters()), 10)
        with pytest.raises(DynLoRAError, match="call dl.fully_shard first"):
            dl.fully_shard(attached)
        with pytest.raises(DynLoRAError, match="bfloat16"):
            dl.fully_shard(_net(SWITCHING).to(torch.bfloat16))
        early = _net(SWITCHING)
        opt = dl.AdamW(early.parameters())
        dl.fully_shard(early)
        with pytest.raises(DynLoRAError, match="after dl.fully_shard"):
            dl.attach(early, opt, 10)
        with pytest.raises(DynLoRAError, match="already sharded"):
            dl.fully_shard(early)
        # a 1-rank group is a valid (if pointless) FSDP job: it still trains and switches
        losses, opt = _train(early, 4)
        assert opt._dynlora_switcher.num_switched()[0] > 0 and all(map(torch.isfinite, torch.tensor(losses)))
    finally:
        dist.destroy_process_group()
