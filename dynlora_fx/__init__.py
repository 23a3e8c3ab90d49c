"""dynlora-fx: SwitchLoRA low-rank pre-training as a torch.fx compiler pass plus a training runtime.

    import dynlora_fx as dl
    gm = dl.transform(model, example_inputs, dl.SwitchLoRA(rank=64))
"""

from .api import merge, merge_and_unload, transform
from .compile import compile
from .distributed import fully_shard
from .parallel import parallelize
from .config import LoRA, ReLoRA, SwitchLoRA, config_from_json
from .errors import DynLoRAError
from .adapter import AdapterInfo
from .module import DynLoRAModule, adapters
from .export import export_onnx
from .runtime import AdamW, Switcher, attach

__all__ = ["transform", "merge", "merge_and_unload", "compile", "fully_shard", "parallelize", "export_onnx", "adapters", "AdapterInfo", "DynLoRAModule", "SwitchLoRA", "LoRA", "ReLoRA",
           "config_from_json", "DynLoRAError", "AdamW", "attach", "Switcher"]
# the one place the version lives is pyproject.toml, read back from the installed metadata
from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

try:
    __version__ = _version("dynlora-fx")
except _NotInstalled:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
