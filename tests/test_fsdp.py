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


class _ReplicaBytes:
    """Bytes torch.distributed.all_reduce moves on ``group`` (FSDP2's HSDP all-reduce calls it as
    ``dist.all_reduce``): the real collectives run, only their buffer sizes are added up."""

    def __init__(self, group):
        self.group, self.bytes, self.calls, self._orig = group, 0, 0, dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, group=None, **kwargs):
            if group is self.group:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self._orig(tensor, *args, group=group, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _hsdp_mesh(replicas):
    world = dist.get_world_size()
    if replicas == 1:
        return init_device_mesh("cpu", (world,))
    return init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def _job_hsdp(path):
    """2 replica groups x 2 shards: the run, its merge and DCP (same layout; 2x2 resumed as 1x4 and
    back), the bytes across replica groups against full-rank HSDP's, and a mesh that misses ranks."""
    mesh = _hsdp_mesh(2)
    out = {}
    try:
        dl.fully_shard(_net(SWITCHING), mesh=mesh["shard"])
    except DynLoRAError as exc:
        out["partial mesh"] = str(exc)
    half, ckpt = STEPS // 2, os.path.join(path, "hsdp")
    gm = dl.fully_shard(_net(SWITCHING, checkpoint=True), mesh=mesh)
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    dl.attach(gm, opt, STEPS)
    losses, _ = _train(gm, half, opt=opt)
    dcp.save({"model": gm.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
    losses += _train(gm, STEPS - half, start=half, opt=opt)[0]
    w, a = gm.model.layers[0].proj.weight, gm.adapter("layers.0.proj.weight").A
    out.update(losses=losses, switched=opt._dynlora_switcher.num_switched(), outputs=_outputs(gm),
               state=_full_state(gm), sharded=gm.sharded,
               w=(w.placements, w.requires_grad, w.grad is None, tuple(w.to_local().shape)), a=a.placements)
    # bytes at rank 4, which splits evenly over a shard group (rank 3's A is padded to 4 slots by FSDP2)
    even = dl.fully_shard(_net(dl.SwitchLoRA(rank=4, interval=4, freeze_steps=2)), mesh=mesh)
    with _ReplicaBytes(mesh.get_group("replicate")) as sl_bytes:
        _train(even, 1)
    out.update(sl_bytes=sl_bytes.bytes, sl_trainable=sum(p.numel() for p in even.parameters() if p.requires_grad))
    # full-rank HSDP on the same mesh: torch's fully_shard per block, then the root
    torch.manual_seed(0)
    net = Net()
    for layer in net.layers:
        torch.distributed.fsdp.fully_shard(layer, mesh=mesh)
    torch.distributed.fsdp.fully_shard(net, mesh=mesh)
    full_opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    with _ReplicaBytes(mesh.get_group("replicate")) as full_bytes:
        _train(net, 1, opt=full_opt)
    out.update(full_bytes=full_bytes.bytes, full_trainable=sum(p.numel() for p in net.parameters()))
    # resume: on the same 2x2 layout (bit-identical), as 1x4, and a 1x4 checkpoint back on 2x2
    out["resumed"] = _resume(ckpt, 2, half)
    out["as_1x4"] = _resume(ckpt, 1, half, save_to=os.path.join(path, "flat"))
    out["back_to_2x2"] = _resume(os.path.join(path, "flat"), 2, half)
    return out


def _full_state(gm):
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in gm.state_dict().items()}


def _resume(ckpt, replicas, start, save_to=None):
    gm = dl.fully_shard(_net(SWITCHING, checkpoint=True), mesh=_hsdp_mesh(replicas))
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    dl.attach(gm, opt, STEPS)
    state = {"model": gm.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    gm.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    if save_to:  # the loaded state, saved again in this layout
        dcp.save({"model": gm.state_dict(), "optim": opt.state_dict()}, checkpoint_id=save_to)
    losses, _ = _train(gm, STEPS - start, start=start, opt=opt)
    return {"losses": losses, "state": _full_state(gm)}


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


def test_hsdp_2x2_follows_single_process_keeps_w_off_the_replica_link_and_resumes(tmp_path):
    got = _spawn("_job_hsdp", 4, tmp_path, str(tmp_path))
    gm = _net(SWITCHING, checkpoint=True)
    want, opt = _train(gm, STEPS)
    outputs, state = _outputs(gm), _full_state(gm)
    for rank, r in enumerate(got):
        assert "must cover the whole group" in r["partial mesh"] and "Remedy" in r["partial mesh"]
        assert r["sharded"] == ("layers.0", "layers.1", "layers.2")
        torch.testing.assert_close(r["losses"], want, rtol=1e-4, atol=1e-6, msg=f"rank {rank}")
        assert r["switched"] == opt._dynlora_switcher.num_switched() and r["switched"][0] > 0
        for key in ("eval", "merged", "unloaded"):
            torch.testing.assert_close(r["outputs"][key], outputs[key], rtol=1e-5, atol=1e-6)
        for k, v in state.items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        # W: (Replicate, Shard(0)), rows split over the 2 ranks of a shard group, no gradient
        placements, trains, no_grad, shape = r["w"]
        assert [type(p).__name__ for p in placements] == ["Replicate", "Shard"] and placements[1].dim == 0
        assert not trains and no_grad and shape == (8, 32)
        assert [type(p).__name__ for p in r["a"]] == ["Replicate", "Shard"]
        # across replica groups only what trains: the all-reduce shrinks with the trainable parameters
        ratio, bound = r["sl_bytes"] / r["full_bytes"], r["sl_trainable"] / r["full_trainable"] * 1.05
        assert 0 < ratio <= bound, (ratio, bound)
        resumed = r["resumed"]  # the same layout: bit-identical
        assert resumed["losses"] == r["losses"][STEPS // 2:]
        for k, v in r["state"].items():
            assert torch.equal(resumed["state"][k], v), k
        for other in ("as_1x4", "back_to_2x2"):  # another layout: the same run, to rounding
            torch.testing.assert_close(r[other]["losses"], r["losses"][STEPS // 2:], rtol=1e-5, atol=1e-6)
    print(f"cross-replica all-reduce SwitchLoRA/full-rank HSDP {got[0]['sl_bytes']}/{got[0]['full_bytes']} B "
          f"= {got[0]['sl_bytes'] / got[0]['full_bytes']:.3f}; trainable {got[0]['sl_trainable']}/"
          f"{got[0]['full_trainable']} = {got[0]['sl_trainable'] / got[0]['full_trainable']:.3f}")


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
        with pytest.raises(DynLoRAError, match=r"placed as \(replicate, shard\).*named \('a', 'b'\).*Remedy"):
            dl.fully_shard(_net(SWITCHING), mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b")))
        with pytest.raises(DynLoRAError, match="named \\('shard', 'replicate'\\).*the replicate dim first"):
            dl.fully_shard(_net(SWITCHING), mesh=init_device_mesh("cpu", (1, 1),
                                                                  mesh_dim_names=("shard", "replicate")))
        with pytest.raises(DynLoRAError, match="3 dims.*HSDP.*Remedy"):
            dl.fully_shard(_net(SWITCHING), mesh=init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("a", "b", "c")))
        with pytest.raises(DynLoRAError, match="reshard_after_forward.*divides"):
            dl.fully_shard(_net(SWITCHING), reshard_after_forward=3)
        with pytest.raises(DynLoRAError, match="unknown unit type"):
            dl.fully_shard(_net(SWITCHING), reshard_after_forward={"layers": False})
        # a 1x1 HSDP mesh (one replica group of one rank) is valid: dims named as torch places them; its
        # dl.compile'd module (checkpointed regions) follows the eager single-process run, switching without recompiles
        hsdp = dl.fully_shard(_net(SWITCHING, checkpoint=True), mesh=init_device_mesh(
            "cpu", (1, 1), mesh_dim_names=("replicate", "shard")), reshard_after_forward={"blocks": False, "root": True})
        opt = dl.AdamW(hsdp.parameters(), lr=1e-2)
        dl.attach(hsdp, opt, STEPS)
        torch._dynamo.reset()  # graphs other tests compiled in this process would count as recompiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses, _ = _train(dl.compile(hsdp), 4, opt=opt)
        torch.testing.assert_close(losses, _train(_net(SWITCHING, checkpoint=True), 4)[0], rtol=1e-5, atol=1e-6)
        assert opt._dynlora_switcher.num_switched()[0] > 0
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
