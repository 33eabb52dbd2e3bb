#!/usr/bin/env bash
# The GPU check of the memory model: a ~1B Llama-style model from random init on one GPU, mixed
# precision, micro-batch 2 x 2048: without activation checkpointing, then full and selective
# checkpointing, activation offload, CPU offload and bf16 moments (each lever alone). For each: the
# analytic prediction, the fake-tensor estimate and the real step's ledger (FSDPMemTracker), with
# torch.cuda.max_memory_allocated beside them, and a PASS/FAIL line per run: the ledger's device
# peak within 5% of CUDA's count. A few minutes on one H200.
#
#   bench/gpu-memory.sh [out-dir]        (default: $OUT if set, else runs/gpu-memory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${1:-${OUT:-runs/gpu-memory}}
mkdir -p "$OUT_DIR"
"$PY" - <<'PYEOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.version.cuda}")
assert torch.cuda.is_available(), "no GPU visible"
print(torch.cuda.get_device_name(0))
PYEOF
"$PY" bench/memory_check.py --config bench/llama-1b.json --device cuda --precision mixed \
    --runs none,full,selective,act-offload,cpu-offload,bf16-moments --micro-batch 2 --seq 2048 --chunk-tokens 1024 \
    --out "$OUT_DIR/gpu-memory.json" 2>&1 | tee "$OUT_DIR/gpu-memory.txt"
