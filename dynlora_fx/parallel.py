"""``dl.parallelize``: a module made ready for data-parallel training, replicated or sharded.

One call applies the techniques in a fixed order: shard (FSDP2), then compile (FSDP2's hooks
stay outside the compiled graphs, one per block and the root), then replicate (DDP wraps the
compiled module). A module ``dl.transform`` returned goes through ``dl.fully_shard`` and
``dl.compile``; any other model (a full-rank baseline, say) through torch's ``fully_shard`` per
repeated block and at the root, and ``torch.compile``: both train side by side the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .compile import compile as compile_transformed
from .distributed import fully_shard as shard_transformed
from .errors import DynLoRAError
from .module import DynLoRAModule
from .passes import repeated_blocks

__all__ = ["parallelize", "data_parallel_mesh"]


def parallelize(module: nn.Module, *, shard: bool = False, compile: bool = False,  # noqa: A002 - as dl.compile
                mesh: DeviceMesh | None = None, reshard_after_forward: bool | int = True) -> nn.Module:
    """Return ``module`` ready to train on every rank of the default process group (or alone).

    ``shard``: shard it in place with FSDP2 over ``mesh`` (default: all ranks; a 2-D mesh with dims
    ``(replicate, shard)`` is HSDP, see ``data_parallel_mesh``), each repeated block one unit that
    ``reshard_after_forward`` applies to (torch's: ``True``, ``False``, or a smaller group's size), the
    root kept gathered. Without ``shard``, under a process group (torchrun's, say) it is replicated with
    ``DistributedDataParallel``; a process without one gets it as it is. ``compile``: ``dl.compile`` for a
    transformed module, ``torch.compile`` for a plain one. Call it on every rank with the same arguments,
    then build the optimizer on the returned module's parameters (and ``dl.attach`` it).
    """
    _check_wrappable(module, shard, mesh)
    transformed = isinstance(module, DynLoRAModule)
    if shard and transformed:
        shard_transformed(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    elif shard:
        from torch.distributed.fsdp import fully_shard

        for name in repeated_blocks(module):
            fully_shard(module.get_submodule(name), mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=mesh)  # torch's default for the root: gathered from forward to backward
    if compile:
        module = compile_transformed(module) if transformed else torch.compile(module)
    if not shard and _has_group():
        module = nn.parallel.DistributedDataParallel(module)
    return module


def data_parallel_mesh(replicas: int = 1, device: str = "cpu") -> DeviceMesh:
    """Every rank of the default process group as a mesh for ``parallelize(shard=True)``: 1-D (FSDP2),
    or with ``replicas`` > 1 2-D ``(replicate, shard)`` (HSDP): ``replicas`` groups of consecutive ranks
    (a node each, as torchrun numbers them), sharded inside a group, only gradients crossing between."""
    world = dist.get_world_size()
    if replicas == 1:
        return init_device_mesh(device, (world,))
    return init_device_mesh(device, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def _has_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_wrappable(module: nn.Module, shard: bool, mesh: DeviceMesh | None) -> None:
    if mesh is not None and not shard:
        raise DynLoRAError("dl.parallelize(mesh=...)", "a mesh places shards, and shard is False",
                           "pass shard=True with the mesh, or leave the mesh out (DDP replicates over all ranks)")
    if shard and not _has_group():
        raise DynLoRAError("dl.parallelize(shard=True)", "no default process group",
                           "call torch.distributed.init_process_group first (e.g. under torchrun)")
    inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
    if isinstance(inner, DynLoRAModule):
        raise DynLoRAError(f"dl.parallelize({type(module).__name__})", "the transformed module is already wrapped "
                           "(torch.compile or DDP)", "pass the module dl.transform returned: dl.parallelize "
                           "compiles and wraps it itself")
