"""dynlora_fx.testing.load_galore (the benchmarks' GaLore baseline) works when called again, with and without bitsandbytes.

Without bitsandbytes the first call leaves a bare ``galore_torch`` package in ``sys.modules``;
the second call used to raise ImportError on it (benchmarks/speed.py calls it after pretrain's
GaLore run). Each case runs in a fresh interpreter: what is in ``sys.modules`` is the point.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("galore_torch") is None,
                                reason="galore-torch is not installed (the test extra installs it)")

# Calls load_galore twice, then takes one GaLore step with what the second call returned.
# With hide, a finder ahead of all others raises for bitsandbytes the ModuleNotFoundError a
# machine without it raises.
PROGRAM = """
import sys
class NoBitsandbytes:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "bitsandbytes":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
if {hide!r}:
    sys.meta_path.insert(0, NoBitsandbytes())
import torch
from dynlora_fx.testing import load_galore
first, how_first = load_galore()
second, how_second = load_galore()
assert second is first, (first, second)
assert how_second == how_first, (how_first, how_second)
w = torch.nn.Parameter(torch.randn(8, 6))
opt = second([{{"params": [w], "rank": 2, "update_proj_gap": 1, "scale": 0.25, "proj_type": "std"}}], lr=1e-2)
before = w.detach().clone()
(w ** 2).sum().backward()
opt.step()
assert not torch.equal(before, w.detach())
print(how_second)
"""


def _run(hide: bool) -> subprocess.CompletedProcess:
    code = PROGRAM.format(hide=hide)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_load_galore_twice_without_bitsandbytes():
    proc = _run(hide=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bitsandbytes missing" in proc.stdout


def test_load_galore_twice_with_bitsandbytes():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: only the path without it can run here")
    proc = _run(hide=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "galore_torch.GaLoreAdamW"
