"""The CLI: in-process (parse separate from run) and as a subprocess; bad input; resume; ONNX."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dynlora_fx.cli import build_parser, run

REPO = Path(__file__).resolve().parents[1]

MLP_FILE = '''
import os
import torch, torch.nn as nn, torch.nn.functional as F

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

def example_inputs():
    return (torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),)

def batches():
    g = torch.Generator().manual_seed(1)
    stop = int(os.environ.get("DYNLORA_TEST_INTERRUPT_AT", "-1"))  # simulates Ctrl-C at that batch
    i = 0
    while True:
        if i == stop:
            raise KeyboardInterrupt
        i += 1
        x = torch.randn(8, 16, generator=g)
        yield x, (x[:, :4] > 0).long().argmax(1)

def loss_fn(out, batch):
    return F.cross_entropy(out, batch[1])

def val_batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2):
        x = torch.randn(8, 16, generator=g)
        out.append((x, (x[:, :4] > 0).long().argmax(1)))
    return out
'''


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(build_parser().parse_args([str(a) for a in argv]), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.py"
    path.write_text(MLP_FILE)
    return path


def test_dry_run_and_json_report(mlp_file, tmp_path):
    report_path = tmp_path / "r.json"
    code, out, err = cli(mlp_file, "--rank", "2", "--form", "activation", "--dry-run", "--json", report_path)
    assert code == 0, err
    assert "Adapted weights (2)" in out and "0.weight" in out and "activation" in out
    report = json.loads(report_path.read_text())
    assert {"adapters", "skipped", "params", "memory"} <= set(report)
    assert report["adapters"][0] == {"weight": "0.weight", "op": "linear", "shape": [32, 16], "rank": 2,
                                     "form": "activation"}
    code, out, err = cli(mlp_file, "--rank", "2", "--json", report_path)
    report = json.loads(report_path.read_text())
    assert code == 0 and report["equivalence"]["ok"] and report["equivalence"]["max_rel_error"] < 1e-5
    assert report["params"]["trainable"] + report["params"]["frozen"] == report["params"]["total"]


def test_train_checkpoint_and_bit_identical_resume(mlp_file, tmp_path, monkeypatch):
    common = ["--rank", "2", "--interval", "10", "--freeze-steps", "2", "--train", "12", "--checkpoint-every", "4",
              "--baseline"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    code, _, err = cli(mlp_file, *common, "--out", straight, "--json", tmp_path / "a.json")
    assert code == 0, err
    assert {"checkpoint.pt", "weights.safetensors", "config.json", "graph_train.py"} <= set(os.listdir(straight))
    monkeypatch.setenv("DYNLORA_TEST_INTERRUPT_AT", "7")  # Ctrl-C while fetching the 8th batch
    code, _, err = cli(mlp_file, *common, "--out", resumed)
    assert code == 130 and "interrupted at step 7" in err and "--resume" in err, err
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["adapted"]["step"] == 4
    monkeypatch.delenv("DYNLORA_TEST_INTERRUPT_AT")
    code, _, err = cli(mlp_file, *common, "--out", resumed, "--resume", "--json", tmp_path / "b.json")
    assert code == 0 and "resuming from step 4" in err, err
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    for part in ("adapted_module", "baseline_module"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    la = json.loads((tmp_path / "a.json").read_text())["training"]
    lb = json.loads((tmp_path / "b.json").read_text())["training"]
    assert la["losses"] == lb["losses"] and la["val_loss"] == lb["val_loss"]
    assert la["baseline_val_loss"] == lb["baseline_val_loss"]


@pytest.mark.parametrize("content,argv,message", [
    (None, [], "no such file"),
    ("def build_model(:\n", [], "syntax error"),
    ("x = 1\n", [], "defines no build_model()"),
    ("def build_model():\n    raise ValueError('boom')\ndef example_inputs():\n    return ()\n", [],
     "build_model(): raised ValueError: boom"),
    ("import torch\ndef build_model():\n    return torch.nn.LayerNorm(4)\n"
     "def example_inputs():\n    return (torch.randn(2, 4),)\n", [], "no weight can carry an adapter"),
    (MLP_FILE, ["--rank", "0"], "rank"),
    (MLP_FILE, ["--out", "/proc/dynlora-cannot-write"], "cannot write there"),
    (MLP_FILE, ["--resume"], "needs the --out folder"),
], ids=["missing", "syntax", "no-build-model", "build-raises", "no-matrix", "rank-0", "unwritable-out",
        "resume-without-out"])
def test_bad_input_is_one_clear_line(tmp_path, content, argv, message):
    path = tmp_path / "model.py"
    if content is not None:
        path.write_text(content)
    code, out, err = cli(path, *argv)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip() and "capturing" not in ln]
    assert len(lines) == 1 and message in lines[0] and "Remedy" in lines[0], err
    assert "Traceback" not in err and out == ""


def test_usage_errors_exit_2(mlp_file):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([str(mlp_file), "--method", "dora"])
    assert exc.value.code == 2


def _cli_command(*argv):
    """argv and environment of ``python -m dynlora_fx.cli ...`` run from the repository."""
    return [sys.executable, "-m", "dynlora_fx.cli", *map(str, argv)], {**os.environ, "PYTHONPATH": str(REPO)}


def _subprocess(*argv, **kw):
    cmd, env = _cli_command(*argv)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, **kw)


def test_subprocess_run_and_debug_traceback(mlp_file, tmp_path):
    proc = _subprocess(mlp_file, "--rank", "2", "--dry-run")
    assert proc.returncode == 0 and "Adapted weights" in proc.stdout and proc.stdout.count("\n") > 5
    bad = tmp_path / "bad.py"
    bad.write_text("def build_model():\n    raise ValueError('boom')\ndef example_inputs():\n    return ()\n")
    proc = _subprocess(bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    proc = _subprocess(bad, "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_ctrl_c_keeps_last_checkpoint_resumable(mlp_file, tmp_path):
    out = tmp_path / "run"
    cmd, env = _cli_command(mlp_file, "--rank", "2", "--train", "100000", "--checkpoint-every", "5", "--out", out)
    log = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: a full pipe would block the child
    # a shell running this suite in the background starts children with SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: restore the default disposition, as a terminal has it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ckpt = out / "checkpoint.pt"
        deadline = time.time() + 300  # a loaded CI machine can take long to import torch and transform
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    err = log.read()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    state = torch.load(ckpt, weights_only=False)
    assert state["adapted"]["step"] % 5 == 0 and state["adapted"]["step"] > 0
    assert not [p for p in os.listdir(out) if ".tmp" in p]


@pytest.mark.parametrize("example", ["tiny_llama", "resnet", "gpt2"])
def test_examples_export_onnx_matching_merged_model(example, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = cli(REPO / "examples" / f"{example}.py", "--onnx", tmp_path / "m.onnx", "--json", report)
    assert code == 0, err
    onnx_report = json.loads(report.read_text())["onnx"]
    assert onnx_report["max_rel_error"] < 1e-4 and onnx_report["dynamic_batch"]


def test_output_folders_are_created_and_bad_ones_fail_before_work(mlp_file, tmp_path):
    code, _, err = cli(mlp_file, "--rank", "2", "--dry-run", "--json", tmp_path / "new" / "deeper" / "r.json")
    assert code == 0 and (tmp_path / "new" / "deeper" / "r.json").exists(), err
    code, out, err = cli(mlp_file, "--rank", "2", "--onnx", "/proc/dynlora/x.onnx")
    assert code == 1 and "--onnx" in err and "cannot write there" in err and "capturing" not in err


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16"])
def test_precision_and_checkpoint_options(mlp_file, tmp_path, precision):
    report_path = tmp_path / "r.json"
    code, out, err = cli(mlp_file, "--train", 4, "--baseline", "--precision", precision, "--checkpoint", "on",
                         "--json", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["precision"] == precision and report["equivalence"]["ok"]
    assert report["checkpointed"] == ["0", "2"]  # a Sequential of Linear, ReLU, Linear: the Linears repeat
    assert report["training"]["throughput_unit"] == "samples" and "samples/s" in out
    assert out.index("Adapted weights") < out.index("Summary")  # the plan comes before training
