"""The CLI under torchrun on two gloo ranks: DDP and FSDP2 (--shard) train on slices of the same
global batches and report what a single process reports; only rank 0 prints and writes; a bad
input is one line and a non-zero exit, with no rank left hanging."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynlora_fx.cli import build_parser, run

REPO = Path(__file__).resolve().parents[1]

MODEL = '''
import torch, torch.nn as nn, torch.nn.functional as F

ROWS = {rows}

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

def example_inputs():
    return (torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),)

def batches():
    g = torch.Generator().manual_seed(1)
    while True:
        x = torch.randn(ROWS, 16, generator=g)
        yield x, (x[:, :4] > 0).long().argmax(1)

def loss_fn(out, batch):
    return F.cross_entropy(out, batch[1])

def killing(stream):
    """The batches, but rank KILL_RANK dies by SIGKILL when asked for batch KILL_AT, on torchrun's
    first attempt only (a deterministic lost rank)."""
    import os, signal
    at, rank = int(os.environ.get("KILL_AT", "-1")), os.environ.get("KILL_RANK", "1")
    for i, b in enumerate(stream):
        if i == at and os.environ.get("RANK") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        yield b

if __import__("os").environ.get("KILL_AT"):
    batches = (lambda plain: lambda: killing(plain()))(batches)

def val_batches():
    g = torch.Generator().manual_seed(2)
    return [(x, (x[:, :4] > 0).long().argmax(1)) for x in (torch.randn(8, 16, generator=g) for _ in range(2))]
'''

def train_args(steps):
    return ["--rank", "4", "--interval", "4", "--freeze-steps", "1", "--lr", "1e-2", "--train", str(steps)]


ARGS = train_args(10)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "mlp.py"
    path.write_text(MODEL.format(rows=8))
    return path


def single(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(build_parser().parse_args([str(a) for a in argv]), out, err)
    return code, out.getvalue(), err.getvalue()


def torchrun(*argv, nproc=2, restarts=0, env=None):
    """``torchrun --standalone --nproc-per-node 2 -m dynlora_fx.cli ...`` from the repository."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "-m", "dynlora_fx.cli", *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)


@pytest.fixture(scope="module")
def reference(model_file, tmp_path_factory):
    """The single-process run of the same command: its report and weights (and its --out folder)."""
    tmp = tmp_path_factory.mktemp("single")
    code, _, err = single(model_file, *ARGS, "--out", tmp / "out", "--json", tmp / "r.json")
    assert code == 0, err
    return json.loads((tmp / "r.json").read_text()), load_file(tmp / "out" / "weights.safetensors"), tmp / "out"


def _check_like_single(proc, tmp_path, reference, label):
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints: one plan, one progress bar, one summary
    assert proc.stdout.count("Summary") == 1 and proc.stdout.count("Adapted weights (3)") == 1, proc.stdout
    assert proc.stderr.count(label) == 1 and proc.stderr.count("capturing") == 1, proc.stderr
    assert "[rank1]" not in proc.stderr and "Traceback" not in proc.stderr
    want, weights, _ = reference
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["distributed"]["world_size"] == 2
    tr, ref = got["training"], want["training"]
    assert tr["steps"] == 10 and sum(tr["switched"]) == sum(ref["switched"]) > 0
    # the same global batches, each rank on half of each: the single process's numbers
    assert max(abs(a - b) for a, b in zip(tr["losses"], ref["losses"])) < 1e-5
    assert abs(tr["val_loss"] - ref["val_loss"]) < 1e-5
    trained = load_file(tmp_path / "out" / "weights.safetensors")
    assert set(trained) == set(weights)
    for k, v in weights.items():
        assert torch.allclose(trained[k].float(), v.float(), atol=1e-5), k
    return got


def test_ddp_matches_single_process(model_file, reference, tmp_path):
    proc = torchrun(model_file, *ARGS, "--out", tmp_path / "out", "--json", tmp_path / "r.json")
    _check_like_single(proc, tmp_path, reference, "×2 DDP")
    assert not list(tmp_path.glob("out/*.tmp*"))


def test_shard_matches_single_process_and_exports(model_file, reference, tmp_path):
    proc = torchrun(model_file, *ARGS, "--shard", "--out", tmp_path / "out", "--json", tmp_path / "r.json",
                    "--onnx", tmp_path / "m.onnx")
    got = _check_like_single(proc, tmp_path, reference, "×2 FSDP2")
    assert got["distributed"]["mode"] == "fsdp2"
    assert got["onnx"]["max_rel_error"] < 1e-4  # merged from the gathered shards, exported by rank 0
    assert (tmp_path / "out" / "checkpoint.dcp" / "loop.pt").exists()  # torch.distributed.checkpoint
    # resume the sharded checkpoint (dcp.load into the shards) for 4 more steps: a single process
    # resuming its own checkpoint.pt the same way reports the same losses
    more = train_args(14)
    proc = torchrun(model_file, *more, "--shard", "--out", tmp_path / "out", "--resume", "--json", tmp_path / "r2.json")
    assert proc.returncode == 0 and proc.stderr.count("resuming from step 10") == 1, proc.stderr[-3000:]
    shutil.copytree(reference[2], tmp_path / "single")
    code, _, err = single(model_file, *more, "--out", tmp_path / "single", "--resume", "--json", tmp_path / "s2.json")
    assert code == 0, err
    sharded, one = (json.loads((tmp_path / f).read_text())["training"] for f in ("r2.json", "s2.json"))
    assert len(sharded["losses"]) == 14 and max(abs(a - b) for a, b in zip(sharded["losses"], one["losses"])) < 1e-5


def test_shard_without_torchrun_is_a_one_rank_fsdp2_run(model_file, reference, tmp_path):
    code, out, err = single(model_file, *ARGS, "--shard", "--json", tmp_path / "r.json")
    assert code == 0, err
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["distributed"] == {"world_size": 1, "mode": "fsdp2"}
    assert max(abs(a - b) for a, b in zip(got["training"]["losses"], reference[0]["training"]["losses"])) < 1e-5
    assert not torch.distributed.is_initialized()  # the CLI's own group is gone


def test_bad_input_is_one_line_and_no_rank_hangs(tmp_path):
    odd = tmp_path / "odd.py"
    odd.write_text(MODEL.format(rows=7))  # 7 rows do not split over 2 ranks
    proc = torchrun(odd, *ARGS)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    lines = [ln for ln in text.splitlines() if "dynlora-transform: error" in ln]
    assert len(lines) == 1 and "7 rows" in lines[0] and "2 ranks" in lines[0] and "Remedy" in lines[0], text
    assert "[rank0]" not in text and "[rank1]" not in text  # no worker traceback (torchrun adds its own summary)


def test_hsdp_run_survives_a_lost_rank(model_file, reference, tmp_path):
    """2 replica groups x 2 shards under torchrun --max-restarts 1: rank 1 is SIGKILLed after step 7
    (checkpoints every 3 steps); torchrun restarts the group, which resumes from step 6 and ends with
    the losses, switches and weights of the uninterrupted single-process run."""
    out = tmp_path / "out"
    proc = torchrun(model_file, *ARGS, "--shard", "--replicate", "2", "--save-every", "3", "--out", out, "--resume",
                    "--json", tmp_path / "r.json", nproc=4, restarts=1, env={"KILL_AT": "7"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("starting fresh") == 1 and proc.stderr.count("resuming from step 6") == 1, proc.stderr
    assert "×4 FSDP2 HSDP 2x2" in proc.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["distributed"] == {"world_size": 4, "mode": "hsdp", "replicas": 2}
    want, weights, _ = reference
    tr, ref = got["training"], want["training"]
    assert len(tr["losses"]) == 10 and tr["switched"] == ref["switched"]
    assert max(abs(a - b) for a, b in zip(tr["losses"], ref["losses"])) < 1e-5
    trained = load_file(out / "weights.safetensors")
    for k, v in weights.items():
        assert torch.allclose(trained[k].float(), v.float(), atol=1e-5), k
    # the summary gives what each rank holds: 4 ranks in 2 groups of 2, each about half the model's state
    per_rank = got["memory"]["per_rank"]
    assert len(per_rank["adapted_bytes"]) == 4 and per_rank["shard_group"] == 2
    assert max(per_rank["adapted_bytes"]) < 0.7 * got["memory"]["adapted_bytes"]
    assert "training state per rank" in proc.stdout
    # a checkpoint folder missing a rank's shard is refused, naming it
    (out / "checkpoint.dcp" / "__1_0.distcp").unlink()
    code, _, err = single(model_file, *train_args(12), "--shard", "--out", out, "--resume")
    assert code == 1 and "__1_0.distcp" in err and "rank 1" in err and "incomplete" in err, err


def test_replicate_needs_shard_and_a_divisible_world(model_file):
    code, _, err = single(model_file, *ARGS, "--replicate", "2")
    assert code == 1 and "needs --shard" in err and "Remedy" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = single(model_file, *ARGS, "--shard", "--replicate", "2")  # a 1-rank group: no 2 groups
    assert code == 1 and "1 ranks do not split into 2" in err, err
