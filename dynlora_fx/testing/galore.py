"""galore-torch's AdamW for the benchmarks' GaLore baseline, with or without bitsandbytes."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

__all__ = ["load_galore"]

_BARE = "_dynlora_bare_package"  # marks the galore_torch package load_galore put in sys.modules


def load_galore() -> tuple[Any, str]:
    """GaLoreAdamW and how it was imported. galore-torch 1.0's ``__init__`` also imports its
    8-bit optimizer, which needs bitsandbytes; without bitsandbytes the plain AdamW module is
    loaded on its own (it needs only torch and transformers). Safe to call again: a later call
    finds the package the first one left in ``sys.modules``."""
    bypassed = "galore_torch.adamw.AdamW (bitsandbytes missing: package __init__ bypassed)"
    loaded = sys.modules.get("galore_torch")
    if loaded is not None and getattr(loaded, _BARE, False):
        # an earlier call's bare package: `from galore_torch import GaLoreAdamW` would raise
        # ImportError (the bare package has no such name), and __init__ would fail as before
        return importlib.import_module("galore_torch.adamw").AdamW, bypassed
    try:
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW, "galore_torch.GaLoreAdamW"
    except ModuleNotFoundError as exc:
        if exc.name != "bitsandbytes":
            raise
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("galore_torch", name="galore_torch")
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    setattr(pkg, _BARE, True)
    sys.modules["galore_torch"] = pkg  # bare package: __init__ (and its bitsandbytes import) skipped
    mod = importlib.import_module("galore_torch.adamw")
    return mod.AdamW, bypassed
