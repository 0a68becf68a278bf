#!/usr/bin/env bash
# One short epoch of a 1-billion-parameter model on one GPU: sequences per second and peak GPU memory.
#
#     bash benchmarks/gpu_check.sh [WORKDIR]        (PYTHON=.venv/bin/python to pick the interpreter)
#
# The model: the `large` size with 3,000,000 items (1,076,857,344 parameters: a 3-million-row item table of
# width 256 and a 24-block, 1024-wide Llama backbone), trained in bf16 by `rec-train pretrain` on one GPU
# worker (ZeRO-2, no offload) for one epoch over a synthetic prepared dataset of 20,000 users with up to 200
# items each (benchmarks/train_throughput.py's generator), then evaluated. Prints the run's epoch record
# (sequences_per_s, peak_memory_mb: the GPU's peak allocated memory) as ONE JSON line. Exits 2 without a GPU.
# CHECK_SIZE, CHECK_ITEMS and CHECK_USERS change the model and data; CHECK_CPU=1 runs the same commands on
# CPU workers in fp32 (a smoke run of the script with a small size, as its test does).
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
SIZE=${CHECK_SIZE:-large} ITEMS=${CHECK_ITEMS:-3000000} USERS=${CHECK_USERS:-20000}
DEVICE=(scaling.cpus_per_worker=4)
if [[ "${CHECK_CPU:-0}" == 1 ]]; then
  DEVICE=(scaling.use_gpu=false scaling.cpus_per_worker=1 deepspeed.precision=fp32)
elif ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)"; then
  echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine" >&2
  exit 2
fi
WORK=${1:-$(mktemp -d -t rayrec-gpu-check-XXXX)}
mkdir -p "$WORK"
"$PYTHON" - "$WORK/data" "$HERE" "$USERS" "$ITEMS" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[2])
from train_throughput import synthetic_dataset

if not Path(sys.argv[1], "manifest.json").exists():
    synthetic_dataset(Path(sys.argv[1]), users=int(sys.argv[3]), items=int(sys.argv[4]), max_len=200)
PY
"$PYTHON" -m rec_train.cli pretrain --config "$HERE/../configs/pretrain/large-zero3.yaml" \
  "data.path=$WORK/data" "run.storage=$WORK/runs" run.name=gpu-check run.max_failures=0 "model.size=$SIZE" \
  "model.overrides={max_seq_len: 200}" train.epochs=1 train.batch_size=64 train.grad_accum=1 \
  scaling.num_workers=1 deepspeed.zero_stage=2 eval.ks=[10] eval.batch_size=256 "${DEVICE[@]}" >&2
"$PYTHON" - "$WORK/runs/gpu-check" <<'PY'
import json
import sys

from rec_train.train.run_log import read_metrics

records = read_metrics(sys.argv[1])
started = next(r for r in records if r.get("event") == "started")
epoch = [r for r in records if "loss" in r][-1]
keys = ("sequences_per_s", "peak_memory_mb", "train_s", "loss", "valid_ndcg@10")
print(json.dumps({"benchmark": "gpu_check", "parameters": started.get("parameters"),
                  **{k: epoch.get(k) for k in keys}}))
PY
