"""FSDP2 and DDP on CPU gloo ranks: what each rank holds, how long a step takes, what it moves.

One command spawns, for each world size (default 2 and 4), that many gloo ranks on this machine
(``torch.multiprocessing.spawn``, one process per rank, ``torch.set_num_threads(1)`` in each: 4
ranks on a 2-core machine are oversubscribed and their step times say so). Every rank builds the
same tiny LLaMA (``examples/tiny_llama.py``, same seed everywhere) and trains, side by side, each
wrapped by ``dl.parallelize`` (``shard=True`` for FSDP2):

- ``full-rank-fsdp2``   torch's ``fully_shard`` on every decoder block, then on the root;
                        ``torch.optim.AdamW``
- ``switchlora-fsdp2``  ``dl.transform(..., dl.SwitchLoRA(rank))``, ``dl.fully_shard(gm)``, ``dl.AdamW``,
                        ``dl.attach`` (frozen W sharded, all-gathered, never reduce-scattered)
- ``switchlora-ddp``    ``DistributedDataParallel`` over the transformed module, ``dl.AdamW``, ``dl.attach``
- ``full-rank-ddp``     ``DistributedDataParallel`` over the plain model, ``torch.optim.AdamW``

Each rank feeds its own slice of the same global batch (``--batch`` x ``--seq`` random bytes).
Setups are timed interleaved (round-robin over setups, rotating the first one each round, a
barrier before each setup's turn), after warm-up steps; step time is the median over the timed
steps of forward + loss + backward + ``opt.step()`` + ``zero_grad``. Switching runs at its peak
rate (``total_steps = 10**6``).

Per rank it reports:

- **training state**: bytes of parameters + gradients + optimizer state this rank holds, DTensors
  counted by their local shard, read after ``opt.step()`` and before
  ``zero_grad`` of the last warm-up step; buffers apart. DDP's reducer also keeps flat bucket
  buffers as large as the gradients it reduces (``ddp_bucket_bytes``, not in ``state``).
- **communication per timed step**, counted three ways:
  1. *measured*: the Python collectives FSDP2 and DDP call (``torch.distributed.all_gather_single``,
     ``reduce_scatter_single``, ``all_reduce``, ``_broadcast_coalesced``, the deprecated
     ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` / ``_*_base`` aliases, list forms) are
     wrapped during the timed steps; for DDP, whose reducer all-reduces from C++, a comm hook
     (``register_comm_hook``) records each gradient bucket and then runs torch's default
     ``allreduce_hook``; DDP's per-forward buffer broadcast (``broadcast_buffers=True``, its default)
     is counted apart;
  2. *audit*: one extra untimed step under a ``TorchDispatchMode`` that sees every ``c10d`` and
     ``_c10d_functional`` op (so also collectives that bypass the Python API);
  3. *predicted* from the parameters: all-gather = every sharded parameter's padded size (FSDP2
     pads the sharded dim to a multiple of the world size), twice for blocks that reshard after
     forward (forward + backward re-gather), once for the root (torch's default keeps it gathered);
     reduce-scatter = the padded size of every trained parameter; DDP all-reduce = every trained
     parameter, broadcast = every buffer.
  SwitchLoRA on FSDP2 also all-reduces the few vectors a switch needs from other ranks' shards
  (``all-reduce`` of ``switchlora-fsdp2``): their number varies per step (stochastic rounding), so
  they are reported, counted in the totals, but neither predicted nor cross-checked.
  Bytes are buffer sizes: the full (gathered) tensor for an all-gather, the full (unreduced) input
  for a reduce-scatter, the tensor for an all-reduce or broadcast. ``sent/rank`` converts them to
  what one rank sends under a ring algorithm: (W-1)/W of an all-gather or reduce-scatter buffer,
  2(W-1)/W of an all-reduce, (W-1)/W of a broadcast (root's share, as a pipeline).

The summary answers "the honest counterpart of the paper's -54% communication": under DDP the
gradient all-reduce shrinks to the adapters and non-adapted parameters (SwitchLoRA / full-rank);
under FSDP2 the frozen W no longer needs its reduce-scatter, but it is still all-gathered in the
forward and again in the backward, so the saving is the reduce-scatter share, offset by gathering
A and B too (ratios against full-rank FSDP2's total all-gather + reduce-scatter bytes).

Usage::

    python benchmarks/fsdp.py --markdown            # worlds 2 and 4, dim 256, 4 layers, rank 64
    python benchmarks/fsdp.py --quick               # 2 ranks, tiny model, 2 timed steps: a smoke test
    python benchmarks/fsdp.py --worlds 2 --setups full-rank-fsdp2,switchlora-fsdp2
    python benchmarks/fsdp.py --policies --markdown # 4 ranks as 2 nodes: FSDP2 / HSDP x reshard policies

``--policies`` measures, for full-rank and SwitchLoRA (``--policy-ranks``, default 16 and 64), FSDP2 over
all ranks and HSDP with one replica group per emulated node (``--node-size`` consecutive ranks), for each
``reshard_after_forward`` the blocks can take: per rank and step, peak memory, the ring bytes sent on
process groups that span nodes ("cross-node") and on those inside one, and step time
(``benchmarks/results/fsdp_policies.json``).

Writes JSON (``--out``, default ``benchmarks/results/fsdp.json``) and prints tables to stdout
(``--markdown``: GitHub markdown); progress goes to stderr.
"""

from __future__ import annotations

import os

# Sleep, don't spin, in OpenMP barriers (as benchmarks/speed.py): ranks share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

HERE = Path(__file__).resolve().parent

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dynlora_fx as dl  # noqa: E402
from dynlora_fx.parallel import data_parallel_mesh  # noqa: E402
from dynlora_fx.shards import local  # noqa: E402

from _common import (add_model_flags, benchmark_parser, build_llama, chosen, code_version, fill_defaults, human_bytes,
                     llama_config, log, machine_info, median, print_table, publish, write_json)  # noqa: E402

SETUPS = ("full-rank-fsdp2", "switchlora-fsdp2", "switchlora-ddp", "full-rank-ddp")
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "other")


# ---------------------------------------------------------------------------------------------
# counting collectives
# ---------------------------------------------------------------------------------------------
def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


# Python collectives and how big their buffer is: (kind, function of the bound arguments).
# all-gather: the gathered output; reduce-scatter: the unreduced input; the rest: the tensor(s).
_WRAPPED: dict[str, tuple[str, Callable[[dict], int]]] = {
    "all_gather_single": ("all_gather", lambda a: _nbytes(a["output_tensor"])),
    "all_gather_into_tensor": ("all_gather", lambda a: _nbytes(a["output_tensor"])),
    "_all_gather_base": ("all_gather", lambda a: _nbytes(a["output_tensor"])),
    "all_gather": ("all_gather", lambda a: _nbytes(a["tensor_list"])),
    "reduce_scatter_single": ("reduce_scatter", lambda a: _nbytes(a["input"])),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: _nbytes(a["input"])),
    "_reduce_scatter_base": ("reduce_scatter", lambda a: _nbytes(a["input"])),
    "reduce_scatter": ("reduce_scatter", lambda a: _nbytes(a["input_list"])),
    "all_reduce": ("all_reduce", lambda a: _nbytes(a["tensor"])),
    "broadcast": ("broadcast", lambda a: _nbytes(a["tensor"])),
    # a pybind function without a signature: (process_group, tensors, buffer_size, src)
    "_broadcast_coalesced": ("broadcast", lambda a: _nbytes(a["tensors"] if "tensors" in a else a["_args"][1])),
}


class CommCounter:
    """Counts the bytes of the torch.distributed collectives called while ``active``.

    Wraps the functions both on ``torch.distributed`` (what FSDP2 and DDP call, as ``dist.X``) and
    on ``distributed_c10d`` (what the deprecated aliases call by global name); a thread-local depth
    keeps a call that goes through an alias from counting twice."""

    def __init__(self) -> None:
        self.active = False
        self._local = threading.local()
        self.reset()
        for name, (kind, size) in _WRAPPED.items():
            orig = getattr(c10d, name, None) or getattr(dist, name, None)
            if orig is None:
                continue
            wrapped = self._wrap(orig, kind, size)
            for mod in (c10d, dist):
                if getattr(mod, name, None) is orig:
                    setattr(mod, name, wrapped)

    link_of: Callable[[Any], tuple[str, int]] | None = None  # group -> (link, group size), for --policies

    def reset(self) -> None:
        self.calls = {k: 0 for k in KINDS}
        self.bytes = {k: 0 for k in KINDS}
        self.hook_bytes = 0  # DDP comm hook: gradient buckets
        self.hook_calls = 0
        self.links: dict[str, float] = {"cross": 0.0, "inside": 0.0}  # ring bytes this rank sends, per link

    def _wrap(self, orig: Callable, kind: str, size: Callable[[dict], int]) -> Callable:
        try:
            sig = inspect.signature(orig)
        except (TypeError, ValueError):
            sig = None

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if self.active and depth == 0:
                try:
                    bound = sig.bind(*args, **kwargs).arguments if sig is not None else {"_args": args, **kwargs}
                    n = size(bound)
                except (TypeError, KeyError, IndexError):
                    n = 0
                self.calls[kind] += 1
                self.bytes[kind] += n
                if self.link_of is not None:
                    link, w = self.link_of(bound.get("group") if sig is not None else None)
                    self.links[link] += (2 if kind == "all_reduce" else 1) * (w - 1) / w * n
            self._local.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._local.depth = depth

        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
        return wrapper

    def ddp_hook(self, process_group, bucket):  # no annotations: DDP checks them, and they'd be strings here
        """A DDP comm hook: record the bucket, then torch's default all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        if self.active:
            self.hook_calls += 1
            self.hook_bytes += _nbytes(bucket.buffer())
        return allreduce_hook(process_group, bucket)


class DispatchAudit(TorchDispatchMode):
    """Sees every ``c10d`` / ``_c10d_functional`` op dispatched while open (also collectives that
    bypass torch.distributed's Python functions) and adds up their buffer sizes by kind."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.calls = {k: 0 for k in KINDS}
        self.bytes = {k: 0 for k in KINDS}
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if "c10d" in name and not name.startswith("_c10d_functional.wait_tensor"):
            op = name.split(".")[1] if "." in name else name
            kind = ("all_gather" if "allgather" in op or "all_gather" in op else
                    "reduce_scatter" if "reduce_scatter" in op else
                    "all_reduce" if "allreduce" in op or "all_reduce" in op else
                    "broadcast" if "broadcast" in op else "other")
            tensors = _tensors(args) + _tensors(list((kwargs or {}).values()))
            n = max((_nbytes(t) for t in tensors), default=0) if kind in ("all_gather", "reduce_scatter") \
                else _nbytes(tensors)
            if name.startswith("_c10d_functional.") and kind == "all_gather":
                n *= self.world  # functional all-gather takes only the local input
            if kind == "all_gather" and op.startswith("allgather_") and not op.startswith("allgather_into"):
                n = _nbytes(_tensors(args[:1]))  # list form: the output lists
            if kind != "other" or "barrier" not in op:
                self.calls[kind] += 1
                self.bytes[kind] += n
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


# ---------------------------------------------------------------------------------------------
# bytes held, bytes predicted
# ---------------------------------------------------------------------------------------------
def local_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else _nbytes(local(t))


def state_bytes(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters, gradients and optimizer state this rank holds (local shards of DTensors)."""
    params = list({id(p): p for p in module.parameters()}.values())
    out = {"params": sum(local_bytes(p) for p in params),
           "frozen_params": sum(local_bytes(p) for p in params if not p.requires_grad),
           "grads": sum(local_bytes(p.grad) for p in params),
           "optimizer": sum(local_bytes(v) for s in opt.state.values() for v in s.values()
                            if isinstance(v, torch.Tensor)),
           "buffers": sum(local_bytes(b) for b in module.buffers())}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def _shard_dim(p: torch.Tensor) -> int:
    """The dim a DTensor parameter is sharded on (FSDP2's default Shard(0), or a shard_placement_fn's)."""
    for pl in getattr(p, "placements", ()):
        if hasattr(pl, "dim"):
            return pl.dim
    return 0


def _padded_bytes(p: torch.Tensor, world: int) -> int:
    """FSDP2 pads the sharded dim to a multiple of the world size before it shards."""
    shape = list(p.shape)
    if not shape:
        return p.element_size() * world  # a 0-d parameter is viewed as (1,) and padded
    d = _shard_dim(p)
    shape[d] = math.ceil(shape[d] / world) * world
    return math.prod(shape) * p.element_size()


def predict_fsdp(module: nn.Module, world: int, reshard_after_forward: bool) -> dict[str, Any]:
    """Per-step all-gather and reduce-scatter bytes predicted from the sharded parameters."""
    from torch.distributed.fsdp import FSDPModule
    units = {name: m for name, m in module.named_modules() if isinstance(m, FSDPModule)}
    roots = [n for n in units if not any(n != o and n.startswith(o + ".") or (o == "" and n != "")
                                         for o in units)]
    gathers_of: dict[str, int] = {}
    for name, m in units.items():
        regather = reshard_after_forward and name not in roots
        try:  # FSDP2 keeps the root gathered after forward: its group has no post-forward mesh
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                regather = group.post_forward_mesh_info is not None
        except AttributeError:
            pass
        gathers_of[name] = 2 if regather else 1
    out = {"all_gather": 0, "reduce_scatter": 0, "all_gather_frozen": 0, "all_gather_unpadded": 0,
           "reduce_scatter_unpadded": 0, "frozen_padded_bytes": 0, "units": len(units)}
    for pname, p in module.named_parameters():
        owner = max((u for u in units if u == "" or pname.startswith(u + ".")), key=len, default=None)
        if owner is None:
            continue  # not managed by FSDP: not gathered
        k = gathers_of[owner]
        padded, plain = _padded_bytes(p, world), p.numel() * p.element_size()
        out["all_gather"] += k * padded
        out["all_gather_unpadded"] += k * plain
        if p.requires_grad:
            out["reduce_scatter"] += padded
            out["reduce_scatter_unpadded"] += plain
        else:
            out["all_gather_frozen"] += k * padded
            out["frozen_padded_bytes"] += padded
    return out


def predict_ddp(module: nn.Module) -> dict[str, int]:
    params = list({id(p): p for p in module.parameters()}.values())
    return {"all_reduce": sum(_nbytes(p) for p in params if p.requires_grad),
            "broadcast": sum(_nbytes(b) for b in module.buffers())}


def ring_sent(bytes_: dict[str, float], world: int) -> float:
    f = (world - 1) / world
    return f * (bytes_["all_gather"] + bytes_["reduce_scatter"] + 2 * bytes_["all_reduce"] + bytes_["broadcast"])


# ---------------------------------------------------------------------------------------------
# setups
# ---------------------------------------------------------------------------------------------
class Setup:
    def __init__(self, name: str, model: nn.Module, opt: torch.optim.Optimizer, inner: nn.Module,
                 prediction: Callable[[], dict[str, Any]]):
        self.name, self.model, self.opt, self.inner, self.prediction = name, model, opt, inner, prediction
        self.times: list[float] = []
        self.calls = {k: 0 for k in KINDS}
        self.bytes = {k: 0 for k in KINDS}
        self.hook_bytes = self.hook_calls = 0
        self.links = {"cross": 0.0, "inside": 0.0}  # ring bytes sent per link (--policies)
        self.state: dict[str, int] = {}
        self.switcher: Any = None

    def add_counts(self, counter: CommCounter) -> None:
        """Add what ``counter`` counted during this setup's turn."""
        for kind in KINDS:
            self.calls[kind] += counter.calls[kind]
            self.bytes[kind] += counter.bytes[kind]
        self.hook_bytes += counter.hook_bytes
        self.hook_calls += counter.hook_calls
        for link, n in counter.links.items():
            self.links[link] += n


def model_config(args: argparse.Namespace) -> Any:
    return llama_config(args.dim, args.layers, args.heads, max_seq_len=max(256, args.seq))


def build_setup(name: str, args: argparse.Namespace, world: int, example: torch.Tensor,
                counter: CommCounter) -> Setup:
    """``name``'s model, wrapped by ``dl.parallelize`` (FSDP2 on every decoder block and the root, the root
    kept gathered; or DDP with the counting comm hook), with its optimizer and, for SwitchLoRA, switcher."""
    model = build_llama(model_config(args))  # seeded: the same on every rank
    raf = args.reshard_after_forward
    inner = model
    if name.startswith("switchlora"):
        inner = dl.transform(model, (example,), dl.SwitchLoRA(rank=args.rank, tokens_per_step=example.numel()),
                             checkpoint=False)
    sharded = name.endswith("fsdp2")
    wrapped = dl.parallelize(inner, shard=sharded, reshard_after_forward=raf)
    if not sharded:
        wrapped.register_comm_hook(None, counter.ddp_hook)
    adamw = dl.AdamW if name.startswith("switchlora") else torch.optim.AdamW
    opt = adamw(wrapped.parameters(), lr=args.lr)
    prediction = (lambda: predict_fsdp(inner, world, raf)) if sharded else (lambda: predict_ddp(inner))
    s = Setup(name, wrapped, opt, inner, prediction)
    if name.startswith("switchlora"):
        s.switcher = dl.attach(wrapped, opt, args.total_steps)
    return s


def train_step(s: Setup, batch: tuple[torch.Tensor, torch.Tensor], before_zero: Callable | None = None) -> float:
    x, y = batch
    t0 = time.perf_counter()
    logits = s.model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    s.opt.step()
    if before_zero is not None:
        before_zero()
    s.opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"{s.name}: loss is {loss.item()}")
    return dt


def make_batches(args: argparse.Namespace, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slice of each of ``--data-batches`` global batches of random bytes."""
    g = torch.Generator().manual_seed(args.seed)
    per = args.batch // world
    out = []
    for _ in range(args.data_batches):
        data = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)[rank * per:(rank + 1) * per]
        out.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return out


def run_rounds(setups: list[Setup], batches: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace,
               counter: CommCounter, label: str) -> int:
    """The timed steps, after ``args.warmup`` untimed ones: ``args.rounds`` rounds over ``setups``, each
    round starting one setup later, a barrier before each setup's turn of ``args.steps_per_round`` steps;
    each setup's step times and what ``counter`` counted in its turns added to it. Returns the number of
    steps taken (the index of the next batch)."""
    step = args.warmup
    for r in range(args.rounds):
        k = r % max(1, len(setups))
        for s in setups[k:] + setups[:k]:
            dist.barrier()
            counter.reset()
            counter.active = True
            for _ in range(args.steps_per_round):
                s.times.append(train_step(s, batches[step % len(batches)]))
                step += 1
            counter.active = False
            s.add_counts(counter)
        if dist.get_rank() == 0:
            log(f"{label} round {r + 1}/{args.rounds} done")
    return step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
    result: dict[str, Any] = {"rank": rank, "world": world, "setups": {}, "errors": {}}
    try:
        counter = CommCounter()
        batches = make_batches(args, rank, world)
        setups: list[Setup] = []
        for name in args.setups:
            t0 = time.perf_counter()
            try:
                s = build_setup(name, args, world, batches[0][0], counter)
            except Exception as exc:  # noqa: BLE001 - the same on every rank: report, go on
                result["errors"][name] = f"{type(exc).__name__}: {exc}"
                if rank == 0:
                    log(f"[world {world}] {name}: build failed: {type(exc).__name__}: {exc}")
                    if args.verbose:
                        traceback.print_exc()
                continue
            try:  # a failure here is the same on every rank too (same model, same code path)
                for i in range(args.warmup):
                    last = i == args.warmup - 1
                    train_step(s, batches[i % len(batches)],
                               (lambda s=s: s.state.update(state_bytes(s.inner, s.opt))) if last else None)
            except Exception as exc:  # noqa: BLE001
                result["errors"][name] = f"{type(exc).__name__} in a warm-up step: {exc}"
                if rank == 0:
                    log(f"[world {world}] {name}: warm-up step failed: {type(exc).__name__}: {exc}")
                    if args.verbose:
                        traceback.print_exc()
                del s
                gc.collect()
                dist.barrier()
                continue
            s.build_s = time.perf_counter() - t0
            setups.append(s)
            if rank == 0:
                log(f"[world {world}] {name}: built and warmed up in {s.build_s:.1f} s")
        step = run_rounds(setups, batches, args, counter, f"[world {world}]")
        for s in setups:
            dist.barrier()
            audit = DispatchAudit(world)
            with audit:
                train_step(s, batches[step % len(batches)])
            n = len(s.times)
            per = lambda d: {k: v / n for k, v in d.items()}  # noqa: E731
            measured = per(s.bytes)
            row = {"step_ms": 1e3 * median(s.times), "step_ms_all": [1e3 * t for t in s.times],
                   "build_s": s.build_s, "state": s.state, "timed_steps": n,
                   "comm_per_step": measured, "calls_per_step": per(s.calls),
                   "audit_per_step": audit.bytes, "audit_calls": audit.calls, "audit_ops": audit.ops,
                   "predicted_per_step": s.prediction(),
                   "sent_per_step_ring": ring_sent(measured, world)}
            if s.name.endswith("ddp"):
                row["ddp_hook_bytes_per_step"] = s.hook_bytes / n
                row["ddp_hook_buckets_per_step"] = s.hook_calls / n
                row["ddp_bucket_bytes"] = s.hook_bytes / n  # the reducer's flat buckets, held all run
            if s.switcher is not None:
                try:
                    row["switched"] = [int(v) for v in s.switcher.num_switched()]
                except Exception:  # noqa: BLE001 - informative only
                    pass
            result["setups"][s.name] = row
        dist.barrier()
    except Exception as exc:  # noqa: BLE001
        result["errors"]["worker"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        raise
    finally:
        Path(out_dir, f"world{world}_rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# --policies: FSDP2 and HSDP layouts x reshard_after_forward policies, bytes per link
# ---------------------------------------------------------------------------------------------
def policy_cases(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """Every (layout, policy, model): FSDP2 over all ranks, and HSDP with one replica group per node;
    policies True, False and each non-trivial divisor of the shard group (reshard to that many
    ranks: one node, when it is --node-size); models full-rank and SwitchLoRA at each --policy-ranks."""
    cases = []
    for layout, replicas in (("FSDP2", 1), ("HSDP", world // args.node_size)):
        shard = world // replicas
        for policy in [True, False] + [d for d in range(2, shard) if shard % d == 0]:
            for model in ["full-rank"] + [f"switchlora r{r}" for r in args.policy_ranks]:
                cases.append({"layout": layout, "replicas": replicas, "shard": shard, "policy": policy,
                              "model": model, "name": f"{model} {layout} {replicas}x{shard} raf={policy}"})
    return cases


def build_policy_case(case: dict[str, Any], args: argparse.Namespace, example: torch.Tensor) -> Setup:
    """The case's model sharded by ``dl.parallelize`` over its FSDP2 or HSDP mesh (the root stays gathered)."""
    mesh = data_parallel_mesh(case["replicas"])
    model = build_llama(model_config(args))
    if case["model"] == "full-rank":
        dl.parallelize(model, shard=True, mesh=mesh, reshard_after_forward=case["policy"])
        return Setup(case["name"], model, torch.optim.AdamW(model.parameters(), lr=args.lr), model, dict)
    rank = int(case["model"].rsplit("r", 1)[1])
    gm = dl.transform(model, (example,), dl.SwitchLoRA(rank=rank, tokens_per_step=example.numel()), checkpoint=False)
    dl.parallelize(gm, shard=True, mesh=mesh, reshard_after_forward=case["policy"])
    opt = dl.AdamW(gm.parameters(), lr=args.lr)
    s = Setup(case["name"], gm, opt, gm, dict)
    s.switcher = dl.attach(gm, opt, args.total_steps)
    return s


def link_classifier(node_size: int) -> Callable[[Any], tuple[str, int]]:
    """A process group's link: "cross" when its ranks sit on more than one node (consecutive blocks
    of ``node_size`` ranks, as torchrun numbers them), else "inside"; with the group's size."""
    cache: dict[int, tuple[str, int]] = {}

    def link_of(group: Any) -> tuple[str, int]:
        key = id(group)
        if key not in cache:
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            cache[key] = ("cross" if len({r // node_size for r in ranks}) > 1 else "inside", len(ranks))
        return cache[key]
    return link_of


def peak_step_bytes(s: Setup, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """How far the bytes of live CPU tensors rise above the step's start during one training step
    (allocations and frees recorded by torch.profiler, in time order)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(s, batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def policy_worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
    result: dict[str, Any] = {"rank": rank, "cases": {}}
    try:
        counter = CommCounter()
        counter.link_of = link_classifier(args.node_size)
        batches = make_batches(args, rank, world)
        setups = []
        for case in policy_cases(args, world):
            s = build_policy_case(case, args, batches[0][0])
            for i in range(args.warmup):
                train_step(s, batches[i % len(batches)])
            held = state_bytes(s.inner, s.opt)  # between steps: parameters and optimizer state (no gradients)
            s.state = {"between_steps": held["params"] + held["optimizer"], **held}
            setups.append((case, s))
            if rank == 0:
                log(f"[policies] built {case['name']}")
        step = run_rounds([s for _, s in setups], batches, args, counter, "[policies]")
        for case, s in setups:
            dist.barrier()
            rise = peak_step_bytes(s, batches[step % len(batches)])
            n = len(s.times)
            result["cases"][s.name] = {
                **case, "step_ms": 1e3 * median(s.times), "timed_steps": n, "state": s.state,
                "peak_bytes": s.state["between_steps"] + rise, "peak_rise_bytes": rise,
                "cross_bytes_per_step": s.links["cross"] / n,
                "inside_bytes_per_step": s.links["inside"] / n,
                "trainable_params": sum(p.numel() for p in s.inner.parameters() if p.requires_grad)}
        dist.barrier()
    finally:
        Path(out_dir, f"policies_rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def summarize_policies(ranks: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for name, first in ranks[0]["cases"].items():
        per = [r["cases"][name] for r in ranks]
        row = {k: first[k] for k in ("layout", "replicas", "shard", "policy", "model", "name", "trainable_params")}
        row.update(peak_bytes_max=max(p["peak_bytes"] for p in per),
                   between_steps_max=max(p["state"]["between_steps"] for p in per),
                   step_ms_max=max(p["step_ms"] for p in per),
                   cross_bytes_per_step=max(p["cross_bytes_per_step"] for p in per),
                   inside_bytes_per_step=max(p["inside_bytes_per_step"] for p in per), per_rank=per)
        rows.append(row)
    for row in rows:  # against full-rank on the same layout and policy
        ref = next(r for r in rows if r["model"] == "full-rank" and r["layout"] == row["layout"]
                   and r["policy"] == row["policy"])
        row["cross_vs_full_rank"] = _ratio(row["cross_bytes_per_step"], ref["cross_bytes_per_step"])
        row["trainable_vs_full_rank"] = _ratio(row["trainable_params"], ref["trainable_params"])
    return rows


def policy_table(rows: list[dict[str, Any]], node_size: int) -> tuple[list[str], list[list[str]]]:
    head = ["layout", "reshard_after_forward", "model", "peak memory/rank", "cross-node sent/rank",
            "vs full-rank (trainable ratio)", "inside-node sent/rank", "step ms"]
    out = []
    for r in rows:
        pol = str(r["policy"]) if isinstance(r["policy"], bool) else \
            f"{r['policy']}{' (one node)' if r['policy'] == node_size else ''}"
        vs = "" if r["model"] == "full-rank" else \
            f"{_fmt_ratio(r['cross_vs_full_rank'])}x ({_fmt_ratio(r['trainable_vs_full_rank'])})"
        out.append([f"{r['layout']} {r['replicas']}x{r['shard']}", pol, r["model"], human_bytes(r["peak_bytes_max"]),
                    human_bytes(r["cross_bytes_per_step"]), vs, human_bytes(r["inside_bytes_per_step"]),
                    f"{r['step_ms_max']:.0f}"])
    return head, out


def run_policies(args: argparse.Namespace) -> dict[str, Any]:
    world = args.worlds[-1]
    if world % args.node_size or world // args.node_size < 2:
        raise SystemExit(f"--policies needs at least 2 nodes of --node-size {args.node_size}: got {world} ranks")
    t_start = time.perf_counter()
    log(f"[policies] spawning {world} gloo ranks, nodes of {args.node_size}")
    with tempfile.TemporaryDirectory(prefix="fsdp-policies-") as tmp:
        mp.spawn(policy_worker, args=(world, _free_port(), args, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"policies_rank{r}.json").read_text()) for r in range(world)]
    result = {"benchmark": "fsdp-policies", "machine": machine_info(), "code": code_version(HERE.parent),
              "args": vars(args), "world": world, "rows": summarize_policies(ranks),
              "runtime_s": time.perf_counter() - t_start,
              "notes": [
                  "Nodes are consecutive blocks of --node-size ranks on this one machine (gloo over loopback): the "
                  "byte counts are what a multi-node job would move; the step times are not a multi-node job's.",
                  "cross-node / inside-node: ring bytes this rank sends per step (all-gather and reduce-scatter "
                  "(W-1)/W of the buffer, all-reduce 2(W-1)/W, W the group's size), attributed to the process "
                  "group each collective runs on: 'cross' when that group's ranks sit on more than one node. A "
                  "ring over such a group also has hops inside a node: 'cross' bounds the slow link's share.",
                  "peak memory: parameters + optimizer state held between steps (local shards) plus the highest "
                  "rise of live CPU tensor bytes during one step (torch.profiler allocation events).",
                  "The root module stays gathered from forward to backward (torch's default) in every case; "
                  "the policy is the blocks'.",
              ]}
    result["machine"]["torch_threads_per_rank"] = 1
    path = write_json(args.out, result)
    h, rows = policy_table(result["rows"], args.node_size)
    if args.markdown:
        a = args
        print(f"_tiny LLaMA, {a.layers} layers, dim {a.dim}; global batch {a.batch}x{a.seq}; {world} CPU gloo ranks "
              f"as {world // a.node_size} nodes of {a.node_size}; per rank and step (the largest over ranks); step "
              f"ms = median of {a.rounds}x{a.steps_per_round} interleaved steps, slowest rank._\n")
    print_table("reshard policies", h, rows, ["l", "l", "l"] + ["r"] * (len(h) - 3), markdown=args.markdown)
    log(f"wrote {path} ({result['runtime_s']:.0f} s)")
    return result


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _same(xs: list[float]) -> bool:
    return max(xs) - min(xs) <= 1e-9 * max(1.0, abs(max(xs)))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize_world(world: int, ranks: list[dict]) -> dict[str, Any]:
    setups: list[dict[str, Any]] = []
    names = [n for n in SETUPS if any(n in r["setups"] for r in ranks)]
    errors = {n: e for r in ranks for n, e in r["errors"].items()}
    for name in names:
        per_rank = [dict(rank=r["rank"], **r["setups"][name]) for r in ranks if name in r["setups"]]
        comm = per_rank[0]["comm_per_step"]
        entry = {"setup": name, "per_rank": per_rank,
                 "ranks_agree_on_comm": all(_same([p["comm_per_step"][k] for p in per_rank]) for k in KINDS),
                 "state_bytes_max": max(p["state"]["total"] for p in per_rank),
                 "step_ms_max": max(p["step_ms"] for p in per_rank),
                 "comm_per_step": comm, "sent_per_step_ring": per_rank[0]["sent_per_step_ring"]}
        pred, audit = per_rank[0]["predicted_per_step"], per_rank[0]["audit_per_step"]
        checks = {}
        for kind in ("all_gather", "reduce_scatter", "all_reduce", "broadcast"):
            if kind in pred:
                checks[kind] = {"measured": comm[kind], "predicted": pred[kind], "audit": audit[kind],
                                "match": comm[kind] == pred[kind] == audit[kind]}
        if name.endswith("ddp"):
            hook = per_rank[0]["ddp_hook_bytes_per_step"]
            checks["all_reduce"]["ddp_hook"] = hook
            checks["all_reduce"]["match"] = checks["all_reduce"]["match"] and hook == comm["all_reduce"]
        entry["cross_check"] = checks
        setups.append(entry)
    by = {s["setup"]: s for s in setups}
    claims: dict[str, Any] = {}
    ff, sf = by.get("full-rank-fsdp2"), by.get("switchlora-fsdp2")
    if ff and sf:
        fc, sc = ff["comm_per_step"], sf["comm_per_step"]
        full_total = fc["all_gather"] + fc["reduce_scatter"] + fc["all_reduce"]
        sl_total = sc["all_gather"] + sc["reduce_scatter"] + sc["all_reduce"]  # + switching's all-reduces
        sp = sf["per_rank"][0]["predicted_per_step"]
        w_gather = sp["all_gather_frozen"]  # frozen W, forward + backward re-gather
        w_rs_saved = sp["frozen_padded_bytes"]  # the reduce-scatter full-rank does for the same weights
        claims["fsdp2"] = {
            "full_rank_bytes_per_step": full_total, "switchlora_bytes_per_step": sl_total,
            "total_ratio": _ratio(sl_total, full_total),
            "all_gather_ratio": _ratio(sc["all_gather"], fc["all_gather"]),
            "reduce_scatter_ratio": _ratio(sc["reduce_scatter"], fc["reduce_scatter"]),
            "switching_all_reduce_bytes": sc["all_reduce"],
            "frozen_w_all_gather_bytes": w_gather, "frozen_w_reduce_scatter_avoided_bytes": w_rs_saved,
            "frozen_w_all_gather_vs_full_total": _ratio(w_gather, full_total),
            "frozen_w_reduce_scatter_avoided_vs_full_total": _ratio(w_rs_saved, full_total),
            "sent_ratio_ring": _ratio(sf["sent_per_step_ring"], ff["sent_per_step_ring"]),
            "state_ratio": _ratio(sf["state_bytes_max"], ff["state_bytes_max"]),
            "step_ratio": _ratio(sf["step_ms_max"], ff["step_ms_max"]),
        }
    fd, sd = by.get("full-rank-ddp"), by.get("switchlora-ddp")
    if fd and sd:
        fc, sc = fd["comm_per_step"], sd["comm_per_step"]
        claims["ddp"] = {
            "all_reduce_ratio": _ratio(sc["all_reduce"], fc["all_reduce"]),
            "with_buffer_broadcast_ratio": _ratio(sc["all_reduce"] + sc["broadcast"],
                                                  fc["all_reduce"] + fc["broadcast"]),
            "state_ratio": _ratio(sd["state_bytes_max"], fd["state_bytes_max"]),
            "step_ratio": _ratio(sd["step_ms_max"], fd["step_ms_max"]),
        }
    if sf and fd:
        claims["switchlora_fsdp2_sent_vs_full_rank_ddp_sent"] = _ratio(sf["sent_per_step_ring"],
                                                                       fd["sent_per_step_ring"])
    return {"world": world, "setups": setups, "claims": claims, "errors": errors}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _range(xs: list[float], fmt: Callable[[float], str]) -> str:
    lo, hi = fmt(min(xs)), fmt(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"


def table_rows(w: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["ranks", "setup", "state/rank", "frozen", "grads", "optim", "step ms", "all-gather/step",
            "reduce-scatter/step", "all-reduce/step", "broadcast/step", "sent/rank/step", "= predicted"]
    rows = []
    by = {s["setup"]: s for s in w["setups"]}
    for s in w["setups"]:
        pr = s["per_rank"]
        st = lambda k: _range([p["state"][k] for p in pr], human_bytes)  # noqa: E731
        c = s["comm_per_step"]
        ok = all(v["match"] for v in s["cross_check"].values())
        ref = by.get("full-rank-" + s["setup"].rsplit("-", 1)[-1])  # the same engine, full-rank
        vs = lambda k: "" if ref is None or ref is s else f" ({_fmt_ratio(_ratio(s[k], ref[k]))}x)"  # noqa: E731
        rows.append([str(w["world"]), s["setup"], st("total") + vs("state_bytes_max"), st("frozen_params"),
                     st("grads"), st("optimizer"),
                     _range([p["step_ms"] for p in pr], lambda x: f"{x:.0f}") + vs("step_ms_max"),
                     human_bytes(c["all_gather"]) if c["all_gather"] else "–",
                     human_bytes(c["reduce_scatter"]) if c["reduce_scatter"] else "–",
                     human_bytes(c["all_reduce"]) if c["all_reduce"] else "–",
                     human_bytes(c["broadcast"]) if c["broadcast"] else "–",
                     human_bytes(s["sent_per_step_ring"]), "yes" if ok else "no (see JSON)"])
    return head, rows


def claim_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["ranks", "FSDP2 total (SL/full)", "all-gather", "reduce-scatter", "W all-gather / full total",
            "W reduce-scatter avoided / full total", "DDP all-reduce (SL/full)", "incl. buffer broadcast"]
    rows = []
    for w in result["worlds"]:
        f, d = w["claims"].get("fsdp2", {}), w["claims"].get("ddp", {})
        rows.append([str(w["world"]), _fmt_ratio(f.get("total_ratio")), _fmt_ratio(f.get("all_gather_ratio")),
                     _fmt_ratio(f.get("reduce_scatter_ratio")), _fmt_ratio(f.get("frozen_w_all_gather_vs_full_total")),
                     _fmt_ratio(f.get("frozen_w_reduce_scatter_avoided_vs_full_total")),
                     _fmt_ratio(d.get("all_reduce_ratio")), _fmt_ratio(d.get("with_buffer_broadcast_ratio"))])
    return head, rows


def mismatch_notes(result: dict[str, Any]) -> list[str]:
    notes = []
    for w in result["worlds"]:
        for s in w["setups"]:
            if not s["ranks_agree_on_comm"]:
                notes.append(f"{w['world']} ranks, {s['setup']}: ranks counted different bytes (see JSON per_rank)")
            for kind, c in s["cross_check"].items():
                if not c["match"]:
                    extra = f", DDP hook {human_bytes(c['ddp_hook'])}" if "ddp_hook" in c else ""
                    notes.append(f"{w['world']} ranks, {s['setup']}, {kind}/step: measured {human_bytes(c['measured'])}"
                                 f" ({c['measured']:.0f} B), audit {human_bytes(c['audit'])} ({c['audit']:.0f} B), "
                                 f"predicted {human_bytes(c['predicted'])} ({c['predicted']:.0f} B){extra}")
        for name, err in w["errors"].items():
            notes.append(f"{w['world']} ranks, {name}: {err}")
    return notes


def print_report(result: dict[str, Any], markdown: bool) -> None:
    a = result["args"]
    head = (f"tiny LLaMA, {a['layers']} layers, dim {a['dim']}, SwitchLoRA rank {a['rank']}; global batch "
            f"{a['batch']}x{a['seq']} split over the ranks; CPU gloo, 1 thread per rank on "
            f"{result['machine']['cpu_count']} CPUs (4 ranks are oversubscribed); reshard_after_forward="
            f"{a['reshard_after_forward']}; step ms = median of {a['rounds']}x{a['steps_per_round']} interleaved "
            f"steps; "
            f"every figure is per rank (a-b: the ranks differ), bytes per training step")
    ch, cr = claim_rows(result)
    notes = mismatch_notes(result)
    print(f"_{head}._\n" if markdown else head)
    for w in result["worlds"]:
        h, rows = table_rows(w)
        print_table(f"{w['world']} ranks", h, rows, ["r", "l"] + ["r"] * (len(h) - 3) + ["l"], markdown=markdown)
    print_table("Communication, SwitchLoRA / full-rank (bytes per step)", ch, cr, ["r"] * len(ch), markdown=markdown)
    for n in notes:
        print(f"- {n}" if markdown else n)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, HERE / "results" / "fsdp.json", "2 ranks, tiny model, 2 timed steps: a smoke test")
    p.add_argument("--worlds", help="comma list of world sizes (default 2,4; quick 2)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma list out of {', '.join(SETUPS)}")
    add_model_flags(p, rank="SwitchLoRA rank (default 64; quick 8)",
                    batch="global batch, split over the ranks (default 8; quick 4)",
                    seq="sequence length (default 128; quick 32)")
    p.add_argument("--warmup", type=int, help="untimed steps per setup (default 2; quick 1)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--steps-per-round", type=int, help="timed steps per setup per round (default 2; quick 2)")
    p.add_argument("--no-reshard-after-forward", dest="reshard_after_forward", action="store_false",
                   help="keep blocks gathered from forward to backward (one all-gather per step, not two)")
    p.add_argument("--total-steps", type=int, default=10**6, help="dl.attach total_steps (peak switching rate)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the random byte batches")
    p.add_argument("--data-batches", type=int, default=4, help="distinct global batches cycled through")
    p.add_argument("--timeout", type=int, default=600, help="gloo collective timeout, seconds")
    p.add_argument("--verbose", action="store_true", help="tracebacks of setups that fail to build")
    p.add_argument("--policies", action="store_true",
                   help="instead: FSDP2 and HSDP x reshard_after_forward policies on --worlds ranks (default 4), "
                        "bytes per link (--out default benchmarks/results/fsdp_policies.json)")
    p.add_argument("--node-size", type=int, default=2, help="--policies: ranks per (emulated) node")
    p.add_argument("--policy-ranks", default="16,64", help="--policies: SwitchLoRA ranks (default 16,64)")
    args = p.parse_args(argv)
    args.policy_ranks = [int(r) for r in str(args.policy_ranks).split(",") if r.strip()]
    if args.policies:  # one world; its own JSON
        args.worlds = args.worlds or "4"
        if args.out == str(HERE / "results" / "fsdp.json"):
            args.out = str(HERE / "results" / "fsdp_policies.json")
    fill_defaults(args, dict(worlds=("2", "2,4"), dim=(64, 256), layers=(2, 4), heads=(2, 4), rank=(8, 64),
                             batch=(4, 8), seq=(32, 128), warmup=(1, 2), rounds=(1, 3), steps_per_round=(2, 2)))
    try:
        args.worlds = [int(w) for w in str(args.worlds).split(",") if w.strip()]
        assert args.worlds and min(args.worlds) >= 1
    except (ValueError, AssertionError):
        p.error(f"--worlds: expected e.g. 2,4, got {args.worlds!r}")
    args.setups = chosen(p, "--setups", args.setups, SETUPS)
    for w in args.worlds:
        if args.batch % w:
            p.error(f"--batch {args.batch} must split evenly over {w} ranks")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        p.error(f"--dim {args.dim} must split into --heads {args.heads} even-sized heads")
    if min(args.warmup, args.rounds, args.steps_per_round) < 1:
        p.error("--warmup, --rounds and --steps-per-round must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.policies:
        return run_policies(args)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "fsdp", "machine": machine_info(), "code": code_version(HERE.parent),
                              "args": vars(args), "has_dl_fully_shard": hasattr(dl, "fully_shard"), "worlds": []}
    result["machine"]["torch_threads_per_rank"] = 1
    for world in args.worlds:
        log(f"[world {world}] spawning {world} gloo ranks ({', '.join(args.setups)})")
        with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as tmp:
            mp.spawn(worker, args=(world, _free_port(), args, tmp), nprocs=world, join=True)
            ranks = [json.loads(Path(tmp, f"world{world}_rank{r}.json").read_text()) for r in range(world)]
        result["worlds"].append(summarize_world(world, ranks))
    result["runtime_s"] = time.perf_counter() - t_start
    result["machine"]["load_average_end"] = machine_info()["load_average"]
    result["notes"] = [
        "One process per rank, torch.set_num_threads(1) in each; with more ranks than cores the ranks "
        "time-share the CPUs, so step times at 4 ranks on 2 cores measure oversubscription, not scaling.",
        "state: parameters + gradients + optimizer state held by the rank (DTensor local shards), after "
        "opt.step() and before zero_grad; buffers apart; DDP's reducer buckets (ddp_bucket_bytes) not included.",
        "comm bytes are buffer sizes per timed step: gathered output (all-gather), unreduced input "
        "(reduce-scatter), tensor (all-reduce, broadcast); sent/rank = ring-algorithm bytes one rank sends.",
        "measured: wrapped torch.distributed Python collectives (+ a DDP comm hook) during the timed steps; "
        "audit: c10d dispatcher ops in one extra untimed step; predicted: from parameter shapes (FSDP2 pads "
        "dim 0 to a multiple of the world size).",
        "DDP broadcasts the module's buffers from rank 0 before every forward (broadcast_buffers=True, its default).",
        "switchlora-fsdp2's all-reduce: switching on shards sums the few vectors a switch needs across ranks; "
        "it varies per step, is in the totals, and is not predicted or cross-checked.",
    ]
    return publish(args.out, result, print_report, args.markdown)


if __name__ == "__main__":
    main()
