#!/usr/bin/env bash
# The GPU benchmark: train.py on one GPU with a ~1B Llama-style model from random init
# (bench/llama-1b.json's shape: 16 layers, hidden 2048, GQA 32/8; SmolLM2's tokenizer and vocabulary),
# mixed precision, micro-batch 4 x 2048 tokens, with activation checkpointing none and full:
# tokens/s, MFU (fsdp/flops.py's peak table), the time split, and the measured memory ledger beside
# the analytic model with CUDA's max allocated. Sized for under 5 minutes on one H200.
#
#   bench/gpu.sh [out-dir]            (default: $OUT if set, else runs/gpu-bench)
#   GPU_BENCH_CPU=1 bench/gpu.sh      the same logic on CPU with a tiny model, 3 steps (a dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${1:-${OUT:-runs/gpu-bench}}
mkdir -p "$OUT_DIR"
STEPS=12
SHAPE=(+model.config_overrides.hidden_size=2048 +model.config_overrides.intermediate_size=8192
       +model.config_overrides.num_hidden_layers=16 +model.config_overrides.num_attention_heads=32
       +model.config_overrides.num_key_value_heads=8 +model.config_overrides.head_dim=64)
MICRO=4
SEQ=2048
if [ "${GPU_BENCH_CPU:-0}" = 1 ]; then
  STEPS=3; MICRO=2; SEQ=128
  SHAPE=(model=tiny)
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name(0))"
fi
for AC in none full; do
  RUN="$OUT_DIR/ac-$AC"
  # Packed medical terms fill every 2048-token sequence; checkpoint, export and evaluation are off,
  # memory.track measures steps 1 and the last.
  "$PY" train.py preset=none data=medical "${SHAPE[@]}" model.random_init=true \
      run_dir="$RUN" overwrite=true precision=mixed activation_checkpointing.mode=$AC \
      batch.micro_batch_size=$MICRO batch.grad_accum_steps=1 batch.max_seq_length=$SEQ \
      train.max_steps=$STEPS schedule.warmup_steps=2 memory.track=true \
      eval.sets=[] eval.max_new_tokens=0 export.enabled=false checkpoint.at_end=false \
      2>&1 | tr '\r' '\n' | grep -v '^train:' | tee "$RUN.log"
done
"$PY" - "$OUT_DIR" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for run in sorted(out.glob("ac-*/metrics.jsonl")):
    rows = [json.loads(line) for line in run.read_text().splitlines()]
    # The steps the ledger did not slow down (it tracks the first and the last).
    steps = [r for r in rows if "train/loss" in r and "memory/sharded params" not in r]
    memory = json.loads((run.parent / "memory.json").read_text())
    ledger = memory["ranks"][0]
    last = ledger[sorted(ledger)[-1]]
    summary[run.parent.name] = {
        "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steps),
        "model_tflops": statistics.median(r["perf/model_tflops_per_rank"] for r in steps),
        "mfu": statistics.median(r["perf/mfu"] for r in steps) if "perf/mfu" in steps[0] else None,
        "time_s": {k: statistics.median(r[k] for r in steps) for k in steps[0] if k.startswith("time/")},
        "peak_gib": {"analytic": memory["analytic"]["peak"] / 2**30, "ledger": last["peak"] / 2**30,
                     "cuda max allocated": last.get("cuda max allocated", 0) / 2**30},
        "last_loss": steps[-1]["train/loss"],
    }
(out / "gpu-bench.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF
