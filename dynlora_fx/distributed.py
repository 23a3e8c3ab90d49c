"""FSDP2 for transformed modules: ``dl.fully_shard``, and the full module back from its shards.

torch's ``fully_shard`` gathers a module's parameters in that module's forward hooks, but the
captured graph reads every weight by attribute and never calls the model's blocks. So each
repeated block is outlined as a region of every graph (``passes/outline.py``, the partition
activation checkpointing uses too); the block's model module and its adapter subtree are
sharded together as one FSDP unit, whose ``run_block`` is registered as an FSDP forward method
(``register_fsdp_forward_method``); and the region's runner is entered through it
(``RegionRunner.shard_with``, ``runtime/regions.py``). torch's own hooks
then gather the block's ``W``, ``A``, ``B`` before the block, free them after it, gather them
again for its backward and reduce-scatter its gradients. Frozen ``W`` has no gradient, so it is
gathered but never reduced. Everything outside the blocks is sharded at the root.

Switching then runs on each rank's shards (``runtime/switchlora.py``, ``runtime/cohorts.py``, ``shards.py``).

HSDP: on a 2-D mesh ``(replicate, shard)`` torch places every parameter ``(Replicate(), Shard(d))``,
reduce-scatters gradients in the shard group and all-reduces them across replica groups. Frozen
``W`` has no gradient, so it never crosses the replicate dim; switching's collectives run on the
shard dim only (``shards.sum_across``), and replica groups, holding equal shards and drawing from
equal generators, make the same switches with no traffic between them.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, register_fsdp_forward_method
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import Shard

from .errors import DynLoRAError
from .adapter import Adapter, AdapterTree
from .module import DynLoRAModule
from .passes import find_regions, outline_regions, region_modules, repeated_blocks
from .shards import gathered

__all__ = ["fully_shard", "is_fully_sharded", "unsharded_copy", "whole_copy", "MergeTemplate"]


@dataclass(frozen=True)
class MergeTemplate:
    """``DynLoRAModule.merge_template``: a meta-device copy of a module as it was before
    ``dl.fully_shard``, which :func:`unsharded_copy` fills with the gathered state. A plain holder,
    so nn.Module does not register the copy as a submodule (its parameters would join the module's)."""

    module: DynLoRAModule


def is_fully_sharded(gm: DynLoRAModule) -> bool:
    """Whether ``dl.fully_shard`` sharded ``gm`` (with or without per-block units)."""
    return isinstance(gm, FSDPModule)


Reshard = bool | int  # torch's reshard_after_forward: True, False, or the size of a smaller group


def fully_shard(module: nn.Module, *, mesh: DeviceMesh | None = None,
                reshard_after_forward: Reshard | Mapping[str, Reshard | None] = True,
                mp_policy: MixedPrecisionPolicy | None = None,
                offload_policy: OffloadPolicy | None = None) -> DynLoRAModule:
    """Shard a transformed module in place with torch's FSDP2 and return it.

    Each repeated block of the model (with its adapters) becomes one FSDP unit, gathered only
    while the block runs; the rest is sharded at the root. Call it on every rank, after
    ``torch.distributed.init_process_group`` and before building the optimizer and ``dl.attach``.
    ``mesh`` (default: all ranks) is 1-D over the whole process group (FSDP2), or 2-D with dims
    named ``(replicate, shard)`` (HSDP: sharded inside each replica group; only what has a gradient,
    the adapters and non-adapted parameters, is all-reduced across groups, never frozen ``W``).
    ``reshard_after_forward`` is torch's (``True``, ``False``, or an int: reshard to groups of that
    many ranks, e.g. one node, so the backward all-gather stays inside them) for the block units;
    ``{"blocks": ..., "root": ...}`` sets it per unit type (the root's default, None, is torch's:
    kept gathered, as backward needs it first).
    ``mp_policy`` is FSDP2's ``MixedPrecisionPolicy``: keep parameters fp32 (switching then
    absorbs into fp32 shards exactly) and set ``param_dtype=torch.bfloat16`` for bf16 compute.
    """
    gm = _check_shardable(module)
    mesh = _check_mesh(gm, mesh)
    options: dict[str, Any] = {"mesh": mesh, "shard_placement_fn": _placements(gm, _shard_size(mesh))}  # checks first
    blocks_policy, root_policy = _reshard_policy(reshard_after_forward, _shard_size(mesh))
    blocks = _unit_blocks(gm)
    gm.merge_template = MergeTemplate(_meta_copy(gm))
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if offload_policy is not None:
        options["offload_policy"] = offload_policy
    for block, regions in blocks.items():
        tree = _adapter_tree(gm, block)
        torch_fully_shard([gm.model.get_submodule(block), tree], reshard_after_forward=blocks_policy, **options)
        register_fsdp_forward_method(tree, "run_block")
        for region in regions:
            region.shard_with(tree)
    torch_fully_shard(gm, reshard_after_forward=root_policy, **options)
    gm.sharded = tuple(blocks)
    return gm


def _check_shardable(module: nn.Module) -> DynLoRAModule:
    if isinstance(module, FSDPModule) and isinstance(module, DynLoRAModule):
        raise DynLoRAError("dl.fully_shard", "the module is already sharded",
                           "call dl.fully_shard once per module")
    if not isinstance(module, DynLoRAModule):
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if isinstance(inner, DynLoRAModule):
            raise DynLoRAError(f"dl.fully_shard({type(module).__name__})", "the transformed module is wrapped "
                               "(torch.compile or DDP)", "shard the module dl.transform returned, then compile it")
        raise DynLoRAError(f"dl.fully_shard({type(module).__name__})", "the module was not produced by dl.transform",
                           "transform first: dl.fully_shard(dl.transform(model, example_inputs, config)); for a plain "
                           "model use torch.distributed.fsdp.fully_shard")
    if not dist.is_available() or not dist.is_initialized():
        raise DynLoRAError("dl.fully_shard", "no default process group",
                           "call torch.distributed.init_process_group first (e.g. under torchrun)")
    if module.switch_state.attached:
        raise DynLoRAError("dl.fully_shard", "a switcher is already attached: its optimizer holds the unsharded "
                           "parameters, which sharding replaces",
                           "call dl.fully_shard first, then build dl.AdamW(gm.parameters()) and dl.attach")
    for ad in module.iter_adapters():
        weight = module.model.get_parameter(ad.target.weight)
        if weight.dtype == torch.bfloat16:
            raise DynLoRAError(ad.target.weight, "the weight is bfloat16: under FSDP2 the fp32 shard is what keeps "
                               "switching exact",
                               "keep the model in float32 and pass mp_policy=MixedPrecisionPolicy("
                               "param_dtype=torch.bfloat16) to dl.fully_shard for bf16 compute")
    return module


def _check_mesh(gm: DynLoRAModule, mesh: DeviceMesh | None) -> DeviceMesh:
    """The mesh to shard on: 1-D over the whole group (FSDP2), or 2-D ``(replicate, shard)``
    over the whole group (HSDP), dims named so it is clear which is which."""
    first = next(gm.parameters())
    device_type = first.device.type
    world = dist.get_world_size()
    if mesh is None:
        return init_device_mesh(device_type, (world,))
    supported = (f"init_device_mesh('{device_type}', ({world},)) for FSDP2, or init_device_mesh('{device_type}', "
                 f"(replicas, {world} // replicas), mesh_dim_names=('replicate', 'shard')) for HSDP")
    if not isinstance(mesh, DeviceMesh):
        raise DynLoRAError("dl.fully_shard mesh", f"expected a DeviceMesh, got {type(mesh).__name__}",
                           f"pass mesh={supported}, or leave mesh=None")
    if mesh.ndim > 2:
        raise DynLoRAError("dl.fully_shard mesh", f"the mesh has {mesh.ndim} dims {tuple(mesh.shape)}: dl.fully_shard "
                           "shards on one dim and replicates on at most one more (HSDP)", f"pass {supported}")
    if mesh.size() != world:
        raise DynLoRAError("dl.fully_shard mesh", f"the mesh has shape {tuple(mesh.shape)} ({mesh.size()} ranks) but "
                           f"the process group has {world}: the mesh must cover the whole group, every rank in "
                           "one shard group (and one replica group, for HSDP)", f"pass {supported}, or leave mesh=None")
    if mesh.ndim == 2:
        names = mesh.mesh_dim_names
        if names is None or "replicate" not in names[0] or "shard" not in names[1]:
            raise DynLoRAError("dl.fully_shard mesh", f"a 2-D mesh is placed as (replicate, shard), as torch's "
                               f"fully_shard does, but its dims are named {names}",
                               "name them so: mesh_dim_names=('replicate', 'shard') (or e.g. ('dp_replicate', "
                               "'dp_shard')), the replicate dim first")
    if mesh.device_type != device_type:
        raise DynLoRAError("dl.fully_shard mesh", f"the mesh is on {mesh.device_type} but the module's parameters "
                           f"are on {device_type}", "move the module to the mesh's device first, or pass a mesh "
                           "of the parameters' device type")
    return mesh


def _reshard_policy(value: Any, shard_size: int) -> tuple[Reshard, Reshard | None]:
    """(blocks, root) ``reshard_after_forward`` from a single value (for the blocks) or a mapping."""
    where = "dl.fully_shard reshard_after_forward"
    per_type = dict(value) if isinstance(value, Mapping) else {"blocks": value}
    unknown = sorted(set(per_type) - {"blocks", "root"})
    if unknown:
        raise DynLoRAError(where, f"unknown unit type(s) {unknown}",
                           "pass True, False, an int, or a dict with keys 'blocks' and/or 'root'")
    policy = {"blocks": per_type.get("blocks", True), "root": per_type.get("root")}
    for kind, v in policy.items():
        if v is None or isinstance(v, bool):  # None: torch's default (True for blocks, gathered root)
            continue
        if not isinstance(v, int) or v <= 1 or v >= shard_size or shard_size % v:
            raise DynLoRAError(f"{where} ({kind})", f"{v!r} is not True, False or a group size that divides the "
                               f"{shard_size} ranks of a shard group (other than 1 and {shard_size})",
                               "pass True (reshard fully), False (keep gathered), or e.g. the ranks per node")
    return policy["blocks"], policy["root"]


def _shard_size(mesh: DeviceMesh) -> int:
    """Ranks a parameter is split over: the whole 1-D mesh, or the shard dim of an HSDP mesh."""
    return mesh.size(mesh.ndim - 1)


def _unit_blocks(gm: DynLoRAModule) -> dict[str, list[Any]]:
    """The repeated blocks that can be FSDP units, each with its region module in every graph.
    Blocks are outlined where needed (a checkpointed region is reused). A block is not a unit
    when some graph cannot outline it or reads its state outside its region; a warning says why."""
    candidates = repeated_blocks(gm.model)
    graphs = gm._unique_graphs()
    skipped: dict[str, str] = {}
    by_block: dict[str, list[Any]] = {b: [] for b in candidates}
    for graph in graphs:
        have = {r.block for r in region_modules(graph)}
        plan = find_regions(graph, [b for b in candidates if b not in have], recompute=False)
        outline_regions(graph, plan, recompute=False)
        for block, reason in plan.skipped:
            skipped.setdefault(block, reason)
        for region in region_modules(graph):
            if region.block in by_block:
                by_block[region.block].append(region)
    units = {}
    for block in candidates:
        if block in skipped:
            continue
        if len(by_block[block]) != len(graphs):
            skipped[block] = "not every mode's graph runs it as one region"
            continue
        outside = _read_outside(gm, graphs, block)
        if outside:
            skipped[block] = f"{outside} is read outside the block (a tied weight)"
            continue
        units[block] = by_block[block]
    if skipped:
        listed = "; ".join(f"{b}: {why}" for b, why in list(skipped.items())[:3])
        warnings.warn(f"dynlora: {len(skipped)} block(s) are sharded with the root instead of as their own FSDP "
                      f"unit, so they are gathered for the whole forward ({listed})", RuntimeWarning, stacklevel=3)
    return units


def _read_outside(gm: DynLoRAModule, graphs: list[Any], block: str) -> str | None:
    """The first state of ``block`` some graph reads outside the block's region, or None."""
    prefixes = (f"model.{block}.", f"adapters.{block}.")
    for graph in graphs:
        bodies = [graph] + [r.body for r in region_modules(graph) if r.block != block]
        for body in bodies:
            for node in body.graph.nodes:
                if node.op == "get_attr" and str(node.target).startswith(prefixes):
                    return str(node.target)
    names: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        inside = name.startswith(prefixes)
        if id(p) in names and (names[id(p)].startswith(prefixes) != inside):
            return name if inside else names[id(p)]
        names.setdefault(id(p), name)
    return None


def _adapter_tree(gm: DynLoRAModule, block: str) -> AdapterTree:
    """The module holding ``block``'s adapters (created empty for a block without any)."""
    tree = gm.adapters
    for part in block.split("."):
        if not hasattr(tree, part):
            tree.add_module(part, AdapterTree())
        tree = getattr(tree, part)
    return tree


def _placements(gm: DynLoRAModule, world: int):
    """FSDP2 shards on dim 0 by default. A stacked expert weight ``(*batch, m, n)`` and its factors
    are sharded on the matrix rows (``W``, ``B``) and slots (``A``) instead, as plain ones are, so
    each rank switches its rows of every expert (FSDP2 splits a dim other than 0 only evenly)."""
    dims = {}
    for ad in gm.iter_adapters():
        t = ad.target
        if t.batch:
            if t.rows % world or t.rank % world:
                raise DynLoRAError(t.weight, f"stacked experts {t.shape} with rank {t.rank} are sharded on their "
                                   f"rows ({t.rows}) and rank, which FSDP2 splits only evenly, over {world} ranks",
                                   f"choose a rank that is a multiple of {world} (and rows that are), or exclude "
                                   "the weight (exclude=[...])")
            d = len(t.batch)
            for p in (gm.model.get_parameter(ad.target.weight), ad.A, ad.B):
                dims[id(p)] = d
    if not dims:
        return None
    return lambda p: Shard(dims[id(p)]) if id(p) in dims else None


def _meta_copy(gm: DynLoRAModule) -> DynLoRAModule:
    """A copy of ``gm`` whose parameters and persistent buffers are on the meta device (no memory):
    the skeleton a merge fills with the gathered state. Non-persistent buffers (rotary tables, …),
    which no state dict carries, are copied as they are."""
    memo: dict[int, Any] = {}
    for module in gm.modules():
        for name, t in itertools.chain(module._parameters.items(), module._buffers.items()):
            if t is None or id(t) in memo or name in module._non_persistent_buffers_set:
                continue
            twin = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(gm, memo)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer of ``module`` (uninitialised) memory on ``device``."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    real = torch.empty_like(t, device=device)
                    table[name] = nn.Parameter(real, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else real


@torch.no_grad()
def unsharded_copy(gm: DynLoRAModule) -> DynLoRAModule:
    """The whole module, unsharded, on every rank (a collective: every rank must call it): the
    module as it was before ``dl.fully_shard``, holding the sharded module's current state."""
    state = {k: gathered(v) for k, v in gm.state_dict().items()}
    out = copy.deepcopy(gm.merge_template.module)
    _materialize(out, next(iter(state.values())).device)
    out.load_state_dict(state)
    return out


def whole_copy(gm: DynLoRAModule) -> DynLoRAModule:
    """A copy of ``gm`` holding all of its state on this rank: :func:`unsharded_copy` of a sharded
    module (a collective), else a deep copy."""
    return unsharded_copy(gm) if is_fully_sharded(gm) else copy.deepcopy(gm)


def whole_model(gm: DynLoRAModule) -> tuple[nn.Module, list[Adapter]]:
    """A copy of the wrapped model holding all of its weights on this rank, and the adapters to fold
    into it: of a sharded module, :func:`unsharded_copy`'s (a collective); else a deep copy of
    ``gm.model`` alone, with ``gm``'s own adapters (read, not copied)."""
    if is_fully_sharded(gm):
        whole = unsharded_copy(gm)
        return whole.model, whole.iter_adapters()
    return copy.deepcopy(gm.model), gm.iter_adapters()
