"""The process group of a CLI run: joining torchrun's (or a 1-rank local one), and leaving it.

Every rank of a run reports how it ended through the store before the group goes, so a failed
rank does not leave its peers blocked in a collective, and rank 0 alone prints a shared error.
Under ``torchrun --max-restarts`` each attempt keeps its keys under its own store prefix.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DynLoRAError

__all__ = ["Membership", "launcher_rank"]

_RUNS = itertools.count(1)  # ids of the CLI runs started in this process


def launcher_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 without torchrun), before any group exists."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


@dataclass
class Membership:
    """This process's place in a data-parallel CLI run (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # the CLI initialised the process group (and destroys it)
    run_id: int = 0  # runs in one process group (a caller's own) keep their keys in the store apart

    @property
    def on(self) -> bool:
        return self.owned or self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, shard: bool) -> "Membership":
        """Join torchrun's process group (WORLD_SIZE > 1), or a 1-rank local one for ``--shard``."""
        import torch.distributed as dist

        run_id = next(_RUNS)
        if dist.is_available() and dist.is_initialized():  # a caller's own group: use it, leave it alone
            return cls(dist.get_rank(), dist.get_world_size(), False, run_id)
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:
            raise DynLoRAError("WORLD_SIZE", f"{os.environ['WORLD_SIZE']!r} is not a number",
                               "launch with torchrun --nproc-per-node N, which sets it") from None
        if world <= 1 and not shard:
            return cls()
        if not dist.is_available():
            raise DynLoRAError("torch.distributed", "this torch build has no distributed support",
                               "install a torch build with torch.distributed, or run without torchrun/--shard")
        options: dict[str, Any] = {}
        if world <= 1:  # --shard alone: FSDP2 over a 1-rank group on this machine
            options = {"init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
        else:
            for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
                if var not in os.environ:
                    raise DynLoRAError(f"WORLD_SIZE={world}", f"{var} is not set",
                                       "launch with torchrun --nproc-per-node N -m dynlora_fx.cli MODEL.py ..., "
                                       "which sets RANK, MASTER_ADDR and MASTER_PORT")
        # the CLI trains on the CPU (gloo); CUDA tensors, where there are any, go through nccl
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if world > 1 and attempt is not None:
                # torchrun (--max-restarts) keeps one store across attempts: a restarted group would
                # read the dead attempt's addresses under the same keys, so each attempt gets its own
                store, rank, size = next(dist.rendezvous("env://"))
                options = {"store": dist.PrefixStore(f"dynlora/attempt-{attempt}", store), "rank": rank,
                           "world_size": size}
            dist.init_process_group(backend, **options)
        except Exception as exc:  # noqa: BLE001
            raise DynLoRAError(f"process group ({backend}, WORLD_SIZE={world})",
                               f"initialisation failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                               "launch with torchrun --nproc-per-node N -m dynlora_fx.cli MODEL.py ...") from None
        return cls(dist.get_rank(), dist.get_world_size(), True, run_id)

    # -- the end of a run: every rank reports through the store, then the group goes --------
    def _key(self, rank: int) -> str:
        return f"dynlora-cli/{self.run_id}/end/{rank}"

    def _store(self) -> Any:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()

    def finish(self, error: str | None, grace: float = 10.0) -> bool:
        """Tell the other ranks how this one ended (``error``: its one-line message, or None) and wait
        for theirs; when all have ended, barrier and destroy the group this CLI created. A failed rank
        waits ``grace`` seconds at most (its peers may be stuck in a collective it left: it then
        exits, and torchrun stops them). True when rank 0 failed too, so this rank need not print."""
        import torch.distributed as dist

        if not self.on:
            return False
        try:
            store = self._store()
            store.set(self._key(self.rank), "error" if error else "ok")
            keys = [self._key(r) for r in range(self.world)]
            deadline = time.monotonic() + (grace if error else 3600.0)
            while not store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            everyone = store.check(keys)
            main_failed = store.check([keys[0]]) and store.get(keys[0]) == b"error"
        except Exception:  # noqa: BLE001 - the store went away: torchrun is tearing the job down
            return False
        if everyone and self.owned:
            try:
                dist.barrier()  # no rank tears gloo down while a peer is still in a collective
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        return main_failed

    def peer_failed(self) -> bool:
        """Whether another rank has reported an error (a collective this rank was in then breaks)."""
        if not self.on:
            return False
        try:
            store = self._store()
            others = [self._key(r) for r in range(self.world) if r != self.rank]
            return any(store.check([k]) and store.get(k) == b"error" for k in others)
        except Exception:  # noqa: BLE001
            return True  # the store is gone: the job is being torn down


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
