"""State files: atomic training checkpoints and the ``--out`` bundle.

A checkpoint is one file written to a temporary name and renamed into place, so an
interrupted run always leaves the previous checkpoint whole. A sharded run's checkpoint is
one ``torch.distributed.checkpoint`` folder, swapped into place the same way. Weights for
others to load go out as safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn

from .errors import StateError

if TYPE_CHECKING:
    from .training import Trainer

__all__ = ["save_checkpoint", "load_checkpoint", "save_training", "load_training", "has_training_checkpoint",
           "write_bundle", "ensure_writable_dir", "ensure_parent"]

CHECKPOINT = "checkpoint.pt"
DCP_DIR = "checkpoint.dcp"  # a sharded run's checkpoint folder
_LOOP = "loop.pt"  # step, losses and LR schedule of each run (rank 0 writes it into DCP_DIR)


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StateError(f"{what} {p}", f"cannot write there ({exc.strerror or exc})",
                         "pass a folder you can write to") from None
    return p


def ensure_parent(path: str | os.PathLike, what: str) -> Path:
    """Create the folder a file will be written to; a DynLoRAError if that is impossible."""
    return ensure_writable_dir(Path(path).absolute().parent, f"{what} {path}: folder")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it into place: nobody sees a
    half-written file, and an interrupted write leaves the previous one whole."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C mid-write included
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise StateError(f"--resume {out_dir}", f"no {CHECKPOINT} there",
                         "resume from the --out folder of an earlier --train run, or drop --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise StateError(str(path), f"the checkpoint cannot be read ({type(exc).__name__}: {exc})",
                         "delete it and train again") from None


# -- the CLI's training checkpoint: run "adapted" (the transformed module) and optionally run
# "baseline" (the full-rank model), each with its Trainer's optimizer and loop state ----------
def has_training_checkpoint(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a training checkpoint of either kind."""
    return (Path(out_dir) / CHECKPOINT).exists() or _sharded_folder(out_dir) is not None


def _sharded_folder(out_dir: str | os.PathLike) -> Path | None:
    """The folder of ``out_dir``'s sharded checkpoint: ``checkpoint.dcp``, or its ``.old`` where a save
    was killed between its two renames (see ``_save_sharded``); None without one."""
    folder = Path(out_dir) / DCP_DIR
    return next((f for f in (folder, folder.with_name(DCP_DIR + ".old")) if (f / _LOOP).exists()), None)


def save_training(out_dir: str | os.PathLike, gm: nn.Module, base: nn.Module | None,
                  runs: Mapping[str, Trainer], *, sharded: bool) -> None:
    """Checkpoint the transformed module ``gm``, the full-rank ``base`` (or None) and their trainers
    (``runs["adapted"]``, ``runs["baseline"]``) into ``out_dir``. ``sharded``: every rank writes its
    shards into ``checkpoint.dcp`` (a collective); else rank 0 writes ``checkpoint.pt`` (replicas are equal)."""
    if sharded:
        _save_sharded(out_dir, gm, base, runs)
        return
    if not _is_rank0():
        return
    state = {"adapted_module": gm.state_dict(), "adapted": runs["adapted"].state_dict()}
    if base is not None:
        state["baseline_module"] = base.state_dict()
        state["baseline"] = runs["baseline"].state_dict()
    save_checkpoint(out_dir, state)


def load_training(out_dir: str | os.PathLike, gm: nn.Module, base: nn.Module | None,
                  runs: Mapping[str, Trainer], *, sharded: bool) -> None:
    """Resume what ``save_training`` wrote, in place: modules, optimizers and loop state (every rank
    reads ``checkpoint.pt``; sharded, each reads its own shards, a collective)."""
    if sharded:
        _load_sharded(out_dir, gm, base, runs)
        return
    state = load_checkpoint(out_dir)
    gm.load_state_dict(state["adapted_module"])
    runs["adapted"].load_state_dict(state["adapted"])
    if base is not None and "baseline" in state:
        base.load_state_dict(state["baseline_module"])
        runs["baseline"].load_state_dict(state["baseline"])


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _sharded_state(gm: nn.Module, base: nn.Module | None, runs: Mapping[str, Trainer]) -> dict[str, Any]:
    """What dcp saves and loads in place: model and optimizer state, DTensor shards as they are. dl.AdamW
    holds its state from the start; torch's AdamW of the baseline creates it at its first step, so its
    state dict comes from torch's helper, which creates it first (dcp.load only fills what exists)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": gm.state_dict(), "optim": runs["adapted"].optimizer.state_dict()}
    if base is not None:
        state["baseline_model"] = base.state_dict()
        state["baseline_optim"] = get_optimizer_state_dict(base, runs["baseline"].optimizer)
    return state


def _save_sharded(out_dir: str | os.PathLike, gm: nn.Module, base: nn.Module | None, runs: Mapping[str, Trainer]) -> None:
    """dcp.save of model and optimizer state into ``out/checkpoint.dcp`` (every rank writes its shards;
    written beside it and renamed into place, so an interrupted save leaves the last one whole)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = Path(out_dir) / DCP_DIR
    tmp, old = final.with_name(DCP_DIR + ".tmp"), final.with_name(DCP_DIR + ".old")
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_sharded_state(gm, base, runs), checkpoint_id=str(tmp))
    if main:
        loop = {name: {k: v for k, v in trainer.state_dict().items() if k != "optimizer"}
                for name, trainer in runs.items()}
        torch.save(loop, tmp / _LOOP)
        # a complete checkpoint exists at every instant: final, or old between the renames (then
        # final is missing, and old, which _load_sharded falls back to, must stay until tmp is final)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _check_complete(folder: Path) -> None:
    """Every shard file the checkpoint's metadata names is there: a folder missing a rank's shard
    is refused (dcp.load would fail on it, or load what is there only), naming the file."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001
        raise StateError(str(folder), f"its metadata cannot be read ({type(exc).__name__})",
                         "resume from a complete checkpoint (delete this folder to start fresh)") from None
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        ranks = [f.split("_")[2] if f.startswith("__") and f.count("_") >= 3 else "?" for f in missing]
        raise StateError(str(folder), f"the checkpoint is incomplete: {', '.join(missing[:4])} (the shard of rank "
                         f"{', '.join(ranks[:4])}) is missing", "restore the file, or delete the folder to start fresh")


def _load_sharded(out_dir: str | os.PathLike, gm: nn.Module, base: nn.Module | None, runs: Mapping[str, Trainer]) -> None:
    import torch.distributed.checkpoint as dcp

    folder = _sharded_folder(out_dir)
    if folder is None:
        raise StateError(f"--resume {out_dir}", f"no sharded checkpoint ({DCP_DIR}) there",
                         "resume a --shard run from the --out folder of an earlier --shard --train run (a checkpoint "
                         "of a run without --shard resumes without --shard)")
    _check_complete(folder)
    loop = torch.load(folder / _LOOP, map_location="cpu", weights_only=False)
    if (base is not None) != ("baseline" in loop):
        raise StateError(f"--resume {out_dir}", "the checkpoint was written " + ("without" if base is not None else "with")
                         + " --baseline", "resume with the options of the run that wrote it")
    state = _sharded_state(gm, base, runs)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # noqa: BLE001
        raise StateError(str(folder), f"the sharded checkpoint does not fit this run ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                         "resume with the model, options and number of ranks of the run that wrote it") from None
    gm.load_state_dict(state["model"])
    runs["adapted"].optimizer.load_state_dict(state["optim"])
    if base is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        base.load_state_dict(state["baseline_model"])
        set_optimizer_state_dict(base, runs["baseline"].optimizer, state["baseline_optim"])
    for name, trainer in runs.items():
        trainer.step, trainer.losses = loop[name]["step"], list(loop[name]["losses"])
        trainer.scheduler.load_state_dict(loop[name]["scheduler"])


def write_bundle(out_dir: str | os.PathLike, gm: nn.Module, meta: dict[str, Any]) -> list[str]:
    """The transformed module's generated code, weights (safetensors) and config JSON. The weights are
    ``gm.state_dict()`` as it is (switching state included): safetensors takes it, see DynLoRAModule."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    written = []
    seen: set[int] = set()
    for mode in ("train", "eval"):
        g = gm.graph_module(mode)
        if id(g) in seen:  # one graph for both modes: one file
            continue
        seen.add(id(g))
        (out / f"graph_{mode}.py").write_text(g.code)
        written.append(str(out / f"graph_{mode}.py"))
    atomic_write(out / "weights.safetensors",
                 lambda tmp: save_file(gm.state_dict(), str(tmp), metadata={"format": "pt"}))
    written.append(str(out / "weights.safetensors"))
    (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    written.append(str(out / "config.json"))
    return written
