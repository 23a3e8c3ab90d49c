"""End-to-end smoke run of benchmarks/pretrain.py (the ``smoke`` preset, every method).

Checks the JSON schema, that every number is finite and that each method's validation loss
at the end is below its step-0 value. No assertion on timing or on which method wins.
The benchmark runs in a subprocess: it flushes denormals and sets seeds process-wide.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pretrain.py"


def _galore_installed() -> bool:
    return importlib.util.find_spec("galore_torch") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    json_path, png_path = out / "pretrain.json", out / "pretrain.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--methods", "all", "--seeds", "1",
         "--out", str(json_path), "--plot", str(png_path), "--markdown", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(json_path.read_text()), png_path, proc.stdout


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_schema(smoke):
    report, png, stdout = smoke
    assert report["schema"] == "dynlora-fx/benchmarks/pretrain/v1"
    assert report["preset"] == "smoke"
    for key in ("environment", "settings", "methods", "checks", "warnings", "wall_s"):
        assert key in report
    assert set(report["methods"]) == {"full", "lora", "relora", "switchlora", "switchlora-stored", "galore",
                                      "switchlora-freeze0", "switchlora-noreset", "switchlora-lorainit",
                                      "switchlora-interval80", "switchlora-decay0.2"}
    assert png.is_file() and png.stat().st_size > 1000
    assert stdout.lstrip().startswith("**pretrain (smoke)")  # --markdown table
    assert "| full |" in stdout


def test_every_method_ran_and_learned(smoke):
    report, _, _ = smoke
    steps = report["settings"]["steps"]
    for name, entry in report["methods"].items():
        if name == "galore" and (not _galore_installed() or entry["status"].startswith("skipped")):
            # only GaLore may be skipped, and only for want of (an importable) galore-torch
            assert entry["status"] == "skipped: galore-torch not installed"
            continue
        assert entry["status"] == "ok", (name, entry["status"])
        assert _finite(entry["lr"]) and entry["lr"] > 0
        assert entry["lr_other"] == report["settings"]["lr_other"]  # the same in every method
        assert entry["sweep"], name  # the smoke preset sweeps two values
        for point in entry["sweep"]:
            assert _finite(point["lr"])
        for key in ("final_val_loss", "final_val_bpb", "mean_step_s", "state_bytes"):
            assert _finite(entry[key]), (name, key)
        assert math.isclose(entry["final_val_bpb"], entry["final_val_loss"] / math.log(2), rel_tol=1e-9)
        for run in entry["runs"]:
            assert not run["diverged"]
            curve = run["curve"]
            assert curve[0]["step"] == 0 and curve[-1]["step"] == steps
            for point in curve:
                assert _finite(point["val_loss"]) and _finite(point["val_bpb"])
            assert curve[-1]["val_loss"] < curve[0]["val_loss"], (name, curve)
            assert run["final_val_loss"] == curve[-1]["val_loss"]


def test_methods_start_from_the_same_function(smoke):
    report, _, _ = smoke
    starts = [run["curve"][0]["val_loss"] for e in report["methods"].values() if e["status"] == "ok"
              for run in e["runs"]]
    assert max(starts) - min(starts) < 1e-3


def test_checks_recorded(smoke):
    report, _, _ = smoke
    assert report["checks"]["rank_binds"]["ok"] in (True, False)
    assert report["checks"]["stored_matches_seeded"]["ok"] is True
