#!/usr/bin/env bash
# The one-GPU benchmark set, run from the repository root on a CUDA machine:
#   1. the tests that take the `device` fixture, on CUDA (bf16 switching, checkpointing);
#   2. benchmarks/pretrain.py --preset gpu, shortened to fit a short lease: full-rank, LoRA and
#      SwitchLoRA, one seed, no LR sweep (each family's middle grid value), STEPS steps;
#   3. benchmarks/speed.py --preset gpu: step time, switching time and memory at d=1024, rank 256,
#      16k tokens/step, bf16 autocast, eager and compiled: full-rank, SwitchLoRA and the reference
#      per-vector switching loop (3 interleaved rounds, no form sweep).
# Results (JSON, PNG, logs) go to $OUT (default benchmarks/results/gpu). Each stage has its own time
# limit so that one failing or slow stage leaves the others their time.
#   STEPS=600 OUT=/tmp/gpu bash benchmarks/gpu.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
STEPS=${STEPS:-600}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{
  nvidia-smi -L
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name())'
  # a transform + switching step on CUDA before the long stages: a failure here ends the run early
  $PY - <<'PY' || exit 3
import torch, dynlora_fx as dl
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
x = torch.randn(4, 64, device="cuda")
gm = dl.transform(m, (x,), dl.SwitchLoRA(rank=8, interval=2, freeze_steps=1))
opt = dl.AdamW(gm.parameters(), lr=1e-3); dl.attach(gm, opt, total_steps=10)
for _ in range(3):
    gm(x).sum().backward(); opt.step(); opt.zero_grad()
print("smoke: transform + 3 switching steps on", x.device, "ok")
PY
} 2>&1 | tee "$OUT/env.txt" || exit 3

timeout 80 $PY -m pytest -q -k cuda tests/test_precision.py tests/test_checkpoint.py 2>&1 | tee "$OUT/tests.log"
timeout 200 $PY benchmarks/pretrain.py --preset gpu --methods full,lora,switchlora --seeds 1 --steps "$STEPS" \
  --sweep-steps 0 --eval-every 100 --markdown --out "$OUT/pretrain_gpu.json" --plot "$OUT/pretrain_gpu.png" \
  2>&1 | tee "$OUT/pretrain.log"
timeout 230 $PY benchmarks/speed.py --preset gpu --variants full-rank,switchlora-seeded,switchlora-reference \
  --rounds 3 --no-form-sweep --markdown --out "$OUT/speed_gpu.json" 2>&1 | tee "$OUT/speed.log"
exit 0
