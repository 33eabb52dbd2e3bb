#!/usr/bin/env bash
# The GPU check of the memory model: a ~1B Llama-style model from random init (Llama-3.2-1B's shapes)
# on one GPU, mixed precision, 2 micro-batches of 2 x 2048 tokens a step. The base run (no
# checkpointing), then each memory lever of fsdp/memory/levers.py alone over it that runs on one
# GPU: the checkpointing modes, activation offload (alone and with them), CPU offload, fp32 and
# bf16, bf16 moments, AdamW foreach (also with the embeddings decayed) and fused, split root, no resharding, reducing every
# micro-batch, bf16 reductions. For each: the analytic prediction, the fake-tensor estimate and the
# real step's ledger (FSDPMemTracker), with torch.cuda.max_memory_allocated beside them, and a
# PASS/FAIL line per run: the ledger's device peak within 3% of CUDA's count. 18 runs, each a few
# seconds on one H200 (not yet run).
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
RUNS=base,ac-selective,ac-every_k,ac-full,activation-offload,ac-selective-activation-offload
RUNS=$RUNS,ac-full-activation-offload,cpu-offload,fp32,bf16,bf16-moments,adamw-foreach,adamw-fused
RUNS=$RUNS,adamw-foreach-with-embeddings-decayed
RUNS=$RUNS,split-root,no-resharding,reduce-every-micro-batch,bf16-reductions
"$PY" bench/memory_check.py --config bench/llama-1b.json --device cuda --precision mixed \
    --runs "$RUNS" --micro-batch 2 --seq 2048 --chunk-tokens 1024 --accum 2 \
    --out "$OUT_DIR/gpu-memory.json" 2>&1 | tee "$OUT_DIR/gpu-memory.txt"
