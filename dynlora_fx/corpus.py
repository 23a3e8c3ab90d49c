"""Built-in byte-level text corpus, available offline on any machine.

The corpus is the ``.py`` source of the running interpreter's standard library, read as
raw bytes (vocabulary 256). Files are taken in sorted order of their path relative to
the stdlib root, so every machine with the same Python version builds the same corpus.
Each file goes wholly to train or validation, decided by a stable hash of its relative
path (``zlib.crc32(path) % 20 == 0`` means validation, about 5 % of files).

The first :func:`load_corpus` builds the corpus (a few seconds) and caches it as
``train.bin`` / ``val.bin`` / ``meta.json``; later calls read the cache::

    corpus = load_corpus()
    for x, y in batches(corpus.train, batch_size=8, seq_len=128, seed=0, steps=100):
        ...                                   # x, y: int64 (8, 128), y = x shifted by one
    val = val_batches(corpus.val, batch_size=8, seq_len=128, max_batches=16)

This module prints nothing; callers show progress.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["Corpus", "load_corpus", "batches", "val_batches"]

FORMAT_VERSION = 1
VAL_MODULUS = 20  # a file goes to validation when crc32(relpath) % VAL_MODULUS == 0
MAX_FILE_BYTES = 200_000  # larger (mostly generated) files are skipped
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"})
FILE_SEPARATOR = b"\n\n"  # appended after every file so files do not run together
HASH_RULE = f"zlib.crc32(relpath.encode('utf-8')) % {VAL_MODULUS} == 0 -> val"


@dataclass(frozen=True)
class Corpus:
    """A byte-level train/validation corpus.

    Attributes:
        train: uint8 1-D tensor of training bytes.
        val: uint8 1-D tensor of validation bytes.
        meta: how it was built (python version, files, bytes, split rule, cache dir).
    """

    train: torch.Tensor  # uint8 (n_train,)
    val: torch.Tensor  # uint8 (n_val,)
    meta: dict


def _is_val(relpath: str) -> bool:
    return zlib.crc32(relpath.encode("utf-8")) % VAL_MODULUS == 0


def _source_files(root: Path) -> list[tuple[str, Path]]:
    """Sorted ``(relpath, path)`` of the stdlib ``.py`` files that enter the corpus."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and d != "__pycache__"]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                    continue
            except OSError:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _build(max_bytes: int) -> tuple[bytes, bytes, dict]:
    """Read the stdlib sources and split them; returns ``(train, val, meta)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} not found; "
                                "the built-in corpus needs the interpreter's .py sources")
    caps = {"train": max_bytes, "val": max_bytes // 16}
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    files = {"train": 0, "val": 0}
    for relpath, path in _source_files(root):
        split = "val" if _is_val(relpath) else "train"
        try:
            data = path.read_bytes() + FILE_SEPARATOR
        except OSError:
            continue
        if sizes[split] + len(data) > caps[split]:
            continue  # skip a file that would overflow its split; a later, smaller one may fit
        parts[split].append(data)
        sizes[split] += len(data)
        files[split] += 1
    if sizes["train"] == 0 or sizes["val"] == 0:
        raise ValueError(f"max_bytes={max_bytes} is too small to hold a single stdlib file in "
                         f"both splits (train {sizes['train']} B, val {sizes['val']} B); "
                         "use at least 100_000")
    meta = {
        "format_version": FORMAT_VERSION,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "implementation": sys.implementation.name,
        "max_bytes": max_bytes,
        "train_files": files["train"],
        "val_files": files["val"],
        "train_bytes": sizes["train"],
        "val_bytes": sizes["val"],
        "hash_rule": HASH_RULE,
        "skip_dirs": sorted(SKIP_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
    }
    return b"".join(parts["train"]), b"".join(parts["val"]), meta


def _default_cache_dir(max_bytes: int) -> Path:
    base = os.environ.get("DYNLORA_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "dynlora-fx"
    v = sys.version_info
    return root / f"corpus-py{v.major}{v.minor}-{max_bytes}"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _to_tensor(data: bytes | bytearray) -> torch.Tensor:
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    # a bytearray is writable, so torch.frombuffer does not warn; the tensor owns no copy
    return torch.frombuffer(bytearray(data) if isinstance(data, bytes) else data, dtype=torch.uint8)


def _read_cache(cache: Path, max_bytes: int) -> Corpus | None:
    """The cached corpus, or None when missing, stale or damaged."""
    try:
        meta = json.loads((cache / "meta.json").read_text())
        if (meta.get("format_version") != FORMAT_VERSION or meta.get("max_bytes") != max_bytes
                or meta.get("hash_rule") != HASH_RULE
                or meta.get("python_version", "").split(".")[:2] != [str(sys.version_info.major),
                                                                      str(sys.version_info.minor)]):
            return None
        train = bytearray((cache / "train.bin").read_bytes())
        val = bytearray((cache / "val.bin").read_bytes())
    except (OSError, ValueError, AttributeError):
        return None
    if len(train) != meta.get("train_bytes") or len(val) != meta.get("val_bytes"):
        return None
    meta["cache_dir"] = str(cache)
    return Corpus(train=_to_tensor(train), val=_to_tensor(val), meta=meta)


def load_corpus(max_bytes: int = 8_000_000, cache_dir: str | None = None) -> Corpus:
    """Load the stdlib byte corpus, building and caching it on first use.

    Args:
        max_bytes: cap on training bytes (validation is capped at ``max_bytes // 16``);
            whole files are taken in sorted path order, skipping any that would overflow
            its split's cap.
        cache_dir: directory holding ``train.bin``, ``val.bin`` and ``meta.json``. Default:
            ``$DYNLORA_CACHE/corpus-py{major}{minor}-{max_bytes}`` when ``DYNLORA_CACHE`` is
            set, else ``~/.cache/dynlora-fx/corpus-py{major}{minor}-{max_bytes}``.

    Returns:
        A :class:`Corpus` of uint8 tensors. If the cache cannot be written (read-only home,
        full disk) the freshly built corpus is still returned, with ``meta["cache_dir"]``
        set to None.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir(max_bytes)
    cached = _read_cache(cache, max_bytes)
    if cached is not None:
        return cached
    train, val, meta = _build(max_bytes)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache / "train.bin", train)
        _atomic_write(cache / "val.bin", val)
        # meta last: its presence (with matching sizes) marks a complete cache
        _atomic_write(cache / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
        meta["cache_dir"] = str(cache)
    except OSError:
        meta["cache_dir"] = None
    return Corpus(train=_to_tensor(train), val=_to_tensor(val), meta=meta)


def _check_data(data: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError(f"data must be a 1-D tensor of tokens, got "
                         f"{type(data).__name__}{tuple(data.shape) if isinstance(data, torch.Tensor) else ''}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if data.numel() < seq_len + 1:
        raise ValueError(f"data has {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use a shorter seq_len or a larger corpus (max_bytes)")


def batches(data: torch.Tensor, batch_size: int, seq_len: int, seed: int,
            steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random training windows ``(x, y)``, each int64 ``(batch_size, seq_len)``, ``y = x`` shifted by one.

    Offsets are drawn uniformly from a private ``torch.Generator`` seeded with ``seed``
    (the global RNG is neither read nor advanced), so the same seed gives the same batches
    in the same order. Yields ``steps`` batches, or forever when ``steps`` is None.
    """
    _check_data(data, batch_size, seq_len)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be a non-negative int or None, got {steps!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    span = torch.arange(seq_len + 1)  # (T+1,)
    high = data.numel() - seq_len  # offsets in [0, n - seq_len - 1]
    step = 0
    while steps is None or step < steps:
        offsets = torch.randint(0, high, (batch_size,), generator=gen)  # (B,)
        window = data[(offsets[:, None] + span).to(data.device)].long()  # (B, T+1)
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()
        step += 1


def val_batches(data: torch.Tensor, batch_size: int, seq_len: int,
                max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches: non-overlapping windows spread evenly over ``data``.

    Takes ``max_batches * batch_size`` windows of ``seq_len`` tokens (fewer when ``data``
    is too short to hold that many without overlap; then the last batch may be smaller).
    Each batch is ``(x, y)`` int64 ``(b, seq_len)`` with ``y = x`` shifted by one.
    """
    _check_data(data, batch_size, seq_len)
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    n = data.numel()
    count = min(max_batches * batch_size, (n - 1) // seq_len)
    last = n - 1 - seq_len  # the largest start that still has a target for every position
    if count == 1:
        starts = torch.zeros(1, dtype=torch.long)
    else:
        # floor(i * last / (count - 1)): consecutive starts differ by >= seq_len since
        # count * seq_len <= n - 1
        starts = torch.arange(count, dtype=torch.long) * last // (count - 1)
    window = data[(starts[:, None] + torch.arange(seq_len + 1)).to(data.device)].long()  # (count, T+1)
    return [(window[i:i + batch_size, :-1].contiguous(), window[i:i + batch_size, 1:].contiguous())
            for i in range(0, count, batch_size)]
