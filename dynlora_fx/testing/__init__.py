"""Support shared by the test suite and the benchmarks (as ``torch.testing`` is for torch).

Not imported by ``import dynlora_fx``. Submodules:

- :mod:`.zoo`: small real models (Hugging Face, torchvision, timm, hand-written) and an
  independent oracle of their weight-bearing parameters;
- :mod:`.fuzz_models`: seeded random models and the invariants ``dl.transform`` must keep;
- :mod:`.probes`: :class:`SavedTensors`, the bytes autograd saves for backward;
- :mod:`.scripts`: :func:`load_script`, a file of the source tree (``examples/``,
  ``benchmarks/``) loaded as a module;
- :mod:`.galore`: :func:`load_galore`, galore-torch's AdamW with or without bitsandbytes.

The model libraries the zoo and GaLore need are imported when used, never here.
"""

from .galore import load_galore
from .probes import SavedTensors
from .scripts import load_script

__all__ = ["SavedTensors", "load_galore", "load_script"]
