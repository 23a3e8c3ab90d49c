"""Helpers shared by the benchmark scripts: the model, method configs and batches they train,
machine info, memory probes, statistics, and one report renderer (rows -> markdown or rich).

Nothing here times anything by itself; the scripts decide what to measure. All memory
figures are host RSS (Linux ``/proc/self/statm``), which is process-wide: a delta taken
while one variant is built says what *that* variant added, not what it would need alone.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

import dynlora_fx as dl
from dynlora_fx.console import human_bytes as _human_bytes
from dynlora_fx.testing import load_script

__all__ = ["code_version", "machine_info", "current_rss", "max_rss", "trim_heap", "RssSampler",
           "optimizer_state_bytes", "median", "quantile", "human_bytes", "write_json", "markdown_table", "rich_table",
           "print_table", "settle", "log", "tiny_llama", "llama_config", "build_llama", "ABLATIONS", "method_config",
           "random_tokens", "token_batches"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# -- what the benchmarks train ---------------------------------------------------------------

def tiny_llama() -> Any:
    """``examples/tiny_llama.py``, the LLaMA-style byte-level model every tiny-LLaMA benchmark trains."""
    return load_script("examples/tiny_llama.py")


def llama_config(dim: int, layers: int, heads: int, max_seq_len: int = 256) -> Any:
    """The tiny LLaMA's config (its ``LlamaConfig``; ``ffn_hidden`` follows from ``dim``)."""
    return tiny_llama().LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, max_seq_len=max_seq_len)


def build_llama(config: Any, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny LLaMA: seed 0 is ``build_model``'s own init (the same in every
    benchmark and variant); another seed re-initialises it from that seed."""
    model = tiny_llama().build_model(config)
    if seed != 0:
        torch.manual_seed(seed)
        model.reset_parameters()
    return model


ABLATIONS = {  # SwitchLoRA ablation name -> the fields it changes (seeded candidates otherwise)
    "switchlora-freeze0": {"freeze_steps": 0},
    "switchlora-noreset": {"reset_vector_state": False},
    "switchlora-lorainit": {"init": "lora"},
    "switchlora-interval80": {"interval": 80.0},
    "switchlora-decay0.2": {"decay_ratio": 0.2},
}

# benchmark method name -> (config class, the fields the name fixes); None: no adapters (full-rank, GaLore).
# speed.py's switchlora-keep and -reference differ from -seeded in how they run, not in their config
# (the reference keeps its own stored tables, so its config must not store a second copy).
_SEEDED = (dl.SwitchLoRA, {"candidates": "seeded"})
_METHODS: dict[str, tuple[type, dict[str, Any]] | None] = {
    "full": None, "full-rank": None, "galore": None,
    "lora": (dl.LoRA, {}), "relora": (dl.ReLoRA, {}),
    "switchlora": _SEEDED, "switchlora-seeded": _SEEDED, "switchlora-keep": _SEEDED, "switchlora-reference": _SEEDED,
    "switchlora-stored": (dl.SwitchLoRA, {"candidates": "stored"}),
    **{name: (dl.SwitchLoRA, {**_SEEDED[1], **fields}) for name, fields in ABLATIONS.items()},
}


def method_config(method: str, rank: int, **fields: Any) -> Any:
    """The adapter config of a benchmark method at ``rank`` (None for full-rank and GaLore), with
    ``fields`` (tokens_per_step, form, seed, ReLoRA's schedule...) set on top of what the name fixes."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_METHODS)}")
    entry = _METHODS[method]
    if entry is None:
        return None
    cls, fixed = entry
    return cls(rank=rank, **fixed, **fields)


def random_tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """(batch, seq) seeded random bytes: content does not matter where only sizes and switching do."""
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def token_batches(batch: int, seq: int, n: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded random byte batches (x, y), y = x shifted by one, drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (batch, seq + 1), generator=g)
        out.append((ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)))
    return out


# -- machine, memory, statistics, output -------------------------------------------------------

def log(msg: str) -> None:
    """One line of progress on stderr (results go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def code_version(root: str | os.PathLike) -> dict[str, Any]:
    """Git commit of ``root`` and the files that differ from it (numbers are of the working tree)."""
    import subprocess
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain")
    commit = git("rev-parse", "HEAD")
    return {"commit": commit.strip() if commit else None,
            "modified": [line[3:] for line in status.splitlines() if line.strip()] if status else []}


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def current_rss() -> int:
    """Resident set size of this process now, in bytes (falls back to the peak off Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return max_rss()


def max_rss() -> int:
    """Peak RSS of this process so far (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_libc = None


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that
    RSS deltas taken afterwards are not hidden by memory an earlier variant freed."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        try:
            _libc.malloc_trim(0)
        except AttributeError:
            pass


class RssSampler:
    """Context manager: samples RSS from a background thread and keeps the maximum.

    Torch kernels release the GIL, so a 1-2 ms period catches activation peaks of steps
    that take tens of milliseconds or more; shorter peaks may be missed.
    """

    def __init__(self, period_s: float = 0.002):
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssSampler":
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())


def optimizer_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Measured training state: parameters, gradients of trained ones, every tensor in the
    optimizer's state, and GaLore's projection matrices (its ``GaLoreProjector.ortho_matrix``)."""
    total = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in module.parameters())
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif getattr(v, "ortho_matrix", None) is not None:
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, (list, tuple)) else [v.ortho_matrix]
                total += sum(m.numel() * m.element_size() for m in mats)
    return total


def settle(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def quantile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile (q in [0, 1])."""
    if not xs:
        return None
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def human_bytes(n: float | None) -> str:
    """``dynlora_fx.console.human_bytes``, with "–" for a figure that was not measured."""
    return "–" if n is None else _human_bytes(n)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (creating the folder); NaN/Inf become null."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(p)
    return p


def benchmark_parser(doc: str, out: str | os.PathLike, quick: str) -> argparse.ArgumentParser:
    """The options every table benchmark shares: ``--quick`` (a smoke run; ``quick`` says what it
    is), ``--out`` (the JSON, default ``out``) and ``--markdown``; described by ``doc``'s first paragraph."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", default=str(out), help="JSON output path")
    p.add_argument("--markdown", action="store_true", help="print the tables as GitHub markdown")
    return p


def add_model_flags(p: argparse.ArgumentParser, *, rank: str, batch: str, seq: str) -> None:
    """The tiny LLaMA's size and the batch shape, left None for :func:`fill_defaults`."""
    p.add_argument("--dim", type=int, help="model width (default 256; quick 64)")
    p.add_argument("--layers", type=int, help="decoder blocks (default 4; quick 2)")
    p.add_argument("--heads", type=int, help="attention heads (default 4; quick 2)")
    p.add_argument("--rank", type=int, help=rank)
    p.add_argument("--batch", type=int, help=batch)
    p.add_argument("--seq", type=int, help=seq)


def chosen(p: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> list[str]:
    """The names in the comma list ``text`` given to ``flag``, each one of ``allowed`` (else a usage error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        p.error(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    return names


def fill_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Each option in ``defaults`` left unset takes its (quick, full) value, by ``args.quick``."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def publish(path: str | os.PathLike, result: dict[str, Any], render: Any, markdown: bool) -> dict[str, Any]:
    """A benchmark's last step: write ``result`` as JSON to ``path``, print it with ``render(result,
    markdown)`` and log where it went and how long the run took (``result["runtime_s"]``)."""
    written = write_json(path, result)
    render(result, markdown)
    log(f"wrote {written} ({result['runtime_s']:.0f} s)")
    return result


def rich_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]],
               align: Sequence[str] | None = None) -> Any:
    """The same table for a terminal: a ``rich`` Table, ``align`` as in :func:`markdown_table`."""
    from rich.table import Table
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    table = Table(title=title, title_justify="left")
    for h, a in zip(headers, align):
        table.add_column(h, justify="left" if a == "l" else "right")
    for row in rows:
        table.add_row(*map(str, row))
    return table


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]],
                align: Sequence[str] | None = None, *, markdown: bool, console: Any = None) -> None:
    """Print one report table: with ``markdown``, a bold title line and a GitHub markdown table (for
    the README); else a ``rich`` table on ``console`` (default: stdout, 200 columns unless a terminal)."""
    if markdown:
        print(f"**{title}**\n\n{markdown_table(headers, rows, align)}\n")
        return
    if console is None:
        from rich.console import Console
        console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    console.print(rich_table(title, headers, rows, align))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` holds "l" or "r" per column."""
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
