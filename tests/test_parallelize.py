"""dl.parallelize on one process: the module as it is or compiled without a process group; in a
1-rank gloo group FSDP2 units (dl.fully_shard for a transformed module, torch's per block and root
for a plain one) or DDP; and a DynLoRAError for what cannot be wrapped. DDP and HSDP over several ranks: tests/test_cli_distributed.py."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

import dynlora_fx as dl
from dynlora_fx.distributed import is_fully_sharded
from dynlora_fx.errors import DynLoRAError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def _net():
    return Net()


def _transformed():
    return dl.transform(_net(), (torch.randn(2, 8),), dl.SwitchLoRA(rank=2), checkpoint=False)


@pytest.fixture
def one_rank_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_process_gets_the_module_as_it_is_or_compiled():
    gm, net = _transformed(), _net()
    assert dl.parallelize(gm) is gm and dl.parallelize(net) is net
    assert dl.parallelize(gm, compile=True)._orig_mod is gm  # dl.compile: a transformed module's graphs
    assert dl.parallelize(net, compile=True)._orig_mod is net  # torch.compile


def test_shard_makes_fsdp2_units_of_the_blocks_and_the_root(one_rank_group):
    gm = dl.parallelize(_transformed(), shard=True)
    assert is_fully_sharded(gm) and gm.sharded == ("layers.0", "layers.1")
    net = dl.parallelize(_net(), shard=True)
    assert isinstance(net, FSDPModule) and all(isinstance(block, FSDPModule) for block in net.layers)
    assert not isinstance(net.inp, FSDPModule)
    assert isinstance(dl.parallelize(_net()), nn.parallel.DistributedDataParallel)  # a group, not sharded


def test_what_cannot_be_wrapped_is_a_dynlora_error():
    with pytest.raises(DynLoRAError, match="no default process group"):
        dl.parallelize(_transformed(), shard=True)
    with pytest.raises(DynLoRAError, match="shard is False"):
        dl.parallelize(_net(), mesh=object())
    with pytest.raises(DynLoRAError, match="already wrapped"):
        dl.parallelize(dl.compile(_transformed()))
