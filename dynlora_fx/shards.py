"""Local shards of FSDP2-sharded tensors, as the runtime reads and writes them.

``dl.fully_shard`` leaves every parameter a ``DTensor`` sharded on one dim (``Shard(d)``, the
rows of ``W`` and ``B`` and the slots of ``A`` for adapted weights); under HSDP (a 2-D mesh,
placements ``(Replicate(), Shard(d))``) it is sharded on the mesh's shard dim and replicated
across the other, and everything here works inside the shard group: replica groups hold equal
shards and make the same choices, so they need no traffic of their own. The runtime works on each
rank's local shard in place — the local tensor is FSDP's own storage, so what it writes is
what the next all-gather sends — and crosses ranks only where a switch needs a vector another
rank holds. For an unsharded tensor every helper is the identity (the whole tensor is "local"),
so one code path serves both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["is_sharded", "local", "local_range", "shard_mesh_dim", "gathered", "sum_across", "assign", "shard_like"]


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (its storage, not a copy): the local shard of a DTensor, else ``t``."""
    return t._local_tensor if isinstance(t, DTensor) else t


def shard_mesh_dim(t: DTensor) -> int:
    """The mesh dim ``t`` is sharded on (FSDP2: the only one of a 1-D mesh, the last of HSDP's)."""
    (mesh_dim,) = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    return mesh_dim


def local_range(t: DTensor) -> tuple[int, int, int]:
    """``(dim, start, stop)``: the global index range along the dim a ``Shard(dim)`` DTensor is
    split on that this rank holds (``torch.chunk``'s split over the shard group, which FSDP2 uses)."""
    mesh_dim = shard_mesh_dim(t)
    dim = t.placements[mesh_dim].dim
    size = t.shape[dim]
    world, rank = t.device_mesh.size(mesh_dim), t.device_mesh.get_local_rank(mesh_dim)
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return dim, start, min(start + chunk, size)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on every rank (an all-gather for a DTensor: a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def sum_across(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over the ranks ``like`` is sharded on (a no-op when it is not sharded);
    a value held by one rank and zeros elsewhere arrive exactly on every rank. Under HSDP only
    the shard group takes part: the replicate dim is never crossed."""
    if isinstance(like, DTensor):
        dist.all_reduce(t, group=like.device_mesh.get_group(shard_mesh_dim(like)))
    return t


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a whole-tensor ``value``: each rank copies its own slice."""
    if is_sharded(param):
        dim, start, stop = local_range(param)
        value = value.narrow(dim, start, stop - start)
    local(param).copy_(value)


def shard_like(value: torch.Tensor, param: torch.Tensor, replicate: bool = False) -> torch.Tensor:
    """``value`` (this rank's part of a tensor shaped and sharded like ``param``, or a copy held by
    every rank if ``replicate``) as a DTensor on ``param``'s mesh, sharing ``value``'s storage, so a
    checkpoint saves and loads it per rank; ``value`` itself for an unsharded ``param``."""
    if not isinstance(param, DTensor):
        return value
    if replicate:
        return DTensor.from_local(value, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)
    dim, start, stop = local_range(param)
    shape = list(value.shape)
    shape[dim] = param.shape[dim]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)
