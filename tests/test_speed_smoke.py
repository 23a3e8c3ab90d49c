"""Smoke run of benchmarks/speed.py (``--quick``: tiny model, eager, every variant, the form sweep).

Checks the JSON it writes: every variant measured, finite positive times, the switching variants
switched, ratios present, saved-for-backward and peak memory for every variant and for the memory
probe (forms, GaLore, with and without per-block checkpointing), the form sweep covering every
shape x rank x tokens. No assertion on which variant is faster. Runs in a subprocess: the script
sets threads and denormal flushing.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    setting = result["settings"][0]  # --quick: two small settings, the memory probe on the first
    assert all(not s["failed"] for s in result["settings"])
    by = {r["method"]: r for r in setting["variants"]}
    assert set(by) == {"full-rank", "lora", "switchlora-seeded", "switchlora-keep", "switchlora-stored",
                       "switchlora-reference"}
    for r in by.values():
        assert r["mode"] == "eager" and r["timed_steps"] > 0
        assert all(math.isfinite(x) and x > 0 for x in (r["step_ms"], r["tokens_per_s"], r["state_bytes"],
                                                         r["saved_bytes"]))
        assert r["peak_bytes"] == r["state_bytes"] + r["saved_bytes"]
        assert math.isfinite(r["step_vs_full"]) and r["step_vs_full"] > 0
    for m in ("switchlora-seeded", "switchlora-keep", "switchlora-stored", "switchlora-reference"):
        assert by[m]["switched_per_adapter_step"] > 0 and 0 < by[m]["switch_share"] < 1
    assert by["switchlora-stored"]["state_bytes"] > by["switchlora-seeded"]["state_bytes"]  # candidate tables
    # keeping every merged W' for backward costs saved bytes; recomputing them does not (the activation
    # form has no W': where form="auto" picks it for every weight, both save the same)
    keep, seeded = by["switchlora-keep"], by["switchlora-seeded"]
    if keep["adapter_forms"].get("weight"):
        assert keep["saved_bytes"] > seeded["saved_bytes"]
    else:
        assert keep["saved_bytes"] == seeded["saved_bytes"]
    assert by["switchlora-seeded"]["step_vs_kept"] > 0
    memory = setting["memory"]
    assert memory and all("error" not in r for r in memory), memory
    assert {(r["method"], r["checkpoint"]) for r in memory} >= {
        (m, c) for m in ("full-rank", "galore", "lora", "switchlora-seeded") for c in (False, True)}
    for r in memory:
        assert r["peak_bytes"] == r["state_bytes"] + r["saved_bytes"] > 0 and r["peak_vs_full"] > 0
    full = {r["checkpoint"]: r for r in memory if r["method"] == "full-rank"}
    assert full[True]["saved_bytes"] < full[False]["saved_bytes"]  # checkpointing keeps block inputs only
    sweep = result["form_sweep"]
    shapes = {(x["rows"], x["cols"]) for x in sweep["rows"]}
    assert len(sweep["rows"]) == len(shapes) * len(result["args"]["form_ranks"]) * len(result["args"]["form_tokens"])
    assert all(x["auto_picks"] in ("activation", "weight") and x["activation_ms"] > 0 and x["weight_ms"] > 0
               for x in sweep["rows"])
