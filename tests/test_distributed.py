"""Invariant 6: under DDP every rank makes the same switching decisions, so W stays equal
with only adapter and non-adapted gradients reduced."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import dynlora_fx as dl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same init on every rank, as a real job broadcasts it
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        gm = dl.transform(model, (torch.randn(4, 16),), dl.SwitchLoRA(rank=4, interval=10, freeze_steps=2))
        ddp = nn.parallel.DistributedDataParallel(gm)
        reduced = {n for n, p in ddp.named_parameters() if p.requires_grad}
        opt = dl.AdamW(ddp.parameters(), lr=1e-2)
        sw = dl.attach(ddp, opt, 40)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(40):
            x = torch.randn(8, 16, generator=g)
            ddp(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        state = {k: v.clone() for k, v in gm.state_dict().items()}
        torch.save({"state": state, "reduced": sorted(reduced), "switched": sw.num_switched()},
                   os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer is still in a collective (an abort at exit)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["switched"] == r1["switched"] and r0["switched"][0] >= 3
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # only adapters and non-adapted parameters take part in the gradient all-reduce
    assert not any(n.endswith(".weight") and n.startswith("module.model.") for n in r0["reduced"])
    assert any(".adapters." in n or n.startswith("module.adapters.") for n in r0["reduced"])
