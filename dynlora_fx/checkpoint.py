"""State files: atomic training checkpoints and the ``--out`` bundle.

A checkpoint is one file written to a temporary name and renamed into place, so an
interrupted run always leaves the previous checkpoint whole. Weights for others to
load go out as safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import StateError

__all__ = ["save_checkpoint", "load_checkpoint", "write_bundle", "ensure_writable_dir", "ensure_parent"]

CHECKPOINT = "checkpoint.pt"


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
