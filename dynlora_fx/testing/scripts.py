"""Files of the source tree that are scripts, not package modules, loaded as modules.

``examples/`` are self-contained user examples and ``benchmarks/`` are run as
``python benchmarks/x.py``; neither is installed. Tests and benchmarks that need one load it
by its path here instead of putting its folder on ``sys.path``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["SOURCE_ROOT", "load_script"]

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding dynlora_fx/, examples/, benchmarks/


@functools.cache
def load_script(path: str) -> types.ModuleType:
    """The file ``path`` (relative to the source checkout, e.g. ``"examples/tiny_llama.py"``) as a
    module, executed once per process. Its ``__main__`` block does not run. Needs a source
    checkout: an installed wheel has no ``examples/``."""
    file = SOURCE_ROOT / path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file; load_script needs a source checkout of dynlora-fx "
                                f"(examples/ and benchmarks/ are not installed)")
    # one flat name per file (a dotted one would need parent packages for pickle to import it)
    name = "dynlora_script_" + "_".join(file.with_suffix("").relative_to(SOURCE_ROOT).parts)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickle look a class's module up by name
    spec.loader.exec_module(module)
    return module
