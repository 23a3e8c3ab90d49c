"""Smoke run of benchmarks/fsdp.py (``--quick``: 2 gloo ranks, tiny model, 2 timed steps per setup).

Checks the JSON it writes: every setup measured on every rank, state and step time positive, the
collectives counted (> 0) and equal to the dispatcher audit and to the prediction from parameter
shapes, SwitchLoRA FSDP2 reduce-scattering less than full-rank FSDP2, the DDP comm hook's buckets
equal to the all-reduce bytes, and the summary ratios present. No assertion on which setup is
faster. ``--policies`` gets a smaller smoke run of its own (2 ranks as 2 nodes). Each runs in a
subprocess: the script spawns its own ranks.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_benchmark_quick(tmp_path):
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["torch_threads_per_rank"] == 1
    (world,) = result["worlds"]
    assert world["world"] == 2 and not world["errors"], world["errors"]
    by = {s["setup"]: s for s in world["setups"]}
    assert set(by) == {"full-rank-fsdp2", "switchlora-fsdp2", "switchlora-ddp", "full-rank-ddp"}
    for name, s in by.items():
        assert [p["rank"] for p in s["per_rank"]] == [0, 1], name
        for p in s["per_rank"]:
            assert p["timed_steps"] == 2 and math.isfinite(p["step_ms"]) and p["step_ms"] > 0, name
            st = p["state"]
            assert st["total"] == st["params"] + st["grads"] + st["optimizer"] > 0, name
            assert st["grads"] > 0 and st["optimizer"] > 0, name
        assert s["ranks_agree_on_comm"], name
        for kind, check in s["cross_check"].items():  # measured == audit == predicted (== DDP hook)
            assert check["match"], (name, kind, check)
    ff, sf = by["full-rank-fsdp2"]["comm_per_step"], by["switchlora-fsdp2"]["comm_per_step"]
    for c in (ff, sf):
        assert c["all_gather"] > 0 and c["reduce_scatter"] > 0
    assert ff["all_reduce"] == 0  # (switching on shards may all-reduce a few vectors: not asserted)
    assert sf["reduce_scatter"] < ff["reduce_scatter"]  # frozen W is not reduce-scattered
    sp = by["switchlora-fsdp2"]["per_rank"][0]
    assert sp["state"]["frozen_params"] > 0 and sp["predicted_per_step"]["all_gather_frozen"] > 0
    # sharded: each of the 2 ranks holds about half of what a DDP replica holds
    assert sp["state"]["params"] < 0.6 * by["switchlora-ddp"]["per_rank"][0]["state"]["params"]
    fd, sd = by["full-rank-ddp"], by["switchlora-ddp"]
    for s in (fd, sd):
        c = s["comm_per_step"]
        assert c["all_reduce"] > 0 and c["all_gather"] == 0 and c["reduce_scatter"] == 0
        assert s["per_rank"][0]["ddp_hook_bytes_per_step"] == c["all_reduce"]
    assert sd["comm_per_step"]["all_reduce"] < fd["comm_per_step"]["all_reduce"]
    f, d = world["claims"]["fsdp2"], world["claims"]["ddp"]
    assert 0 < f["reduce_scatter_ratio"] < 1 and 0 < d["all_reduce_ratio"] < 1
    assert f["total_ratio"] > 0 and f["frozen_w_all_gather_vs_full_total"] > 0
    assert f["frozen_w_reduce_scatter_avoided_vs_full_total"] > 0


def test_fsdp_benchmark_policies_quick(tmp_path):
    """``--policies`` on 2 ranks as 2 nodes of 1: FSDP2 1x2 and HSDP 2x1, reshard True and False, full-rank
    and SwitchLoRA r8, 1 timed step each. Under HSDP only what has a gradient crosses between the nodes,
    so SwitchLoRA sends less across them than full-rank."""
    out = tmp_path / "policies.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp.py"), "--policies", "--quick", "--worlds",
                           "2", "--node-size", "1", "--policy-ranks", "8", "--steps-per-round", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reshard policies" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["layout"], r["policy"], r["model"]) for r in rows} == {
        (layout, policy, model) for layout in ("FSDP2", "HSDP") for policy in (True, False)
        for model in ("full-rank", "switchlora r8")}
    for r in rows:
        assert [p["timed_steps"] for p in r["per_rank"]] == [1, 1], r["name"]
        assert r["peak_bytes_max"] > 0 and math.isfinite(r["step_ms_max"]) and r["step_ms_max"] > 0, r["name"]
        assert r["cross_bytes_per_step"] > 0 and r["inside_bytes_per_step"] == 0, r["name"]  # every group spans nodes
        if r["layout"] == "HSDP" and r["model"] != "full-rank":
            assert 0 < r["cross_vs_full_rank"] < 1, r["name"]
