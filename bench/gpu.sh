#!/usr/bin/env bash
# The GPU benchmark: train.py on one GPU with a ~1B Llama-style model from random init
# (bench/llama-1b.json's shape: 16 layers, hidden 2048, GQA 32/8; SmolLM2's tokenizer and vocabulary),
# micro-batch 4 x 2048 packed tokens, and a sweep of train.py's levers, one run each:
#
#   baseline        precision=mixed, activation_checkpointing.mode=full (and memory.track: the ledger)
#   compile         + compile=true                 (torch.compile per decoder layer)
#   reduce-bf16     + fsdp.reduce_dtype=bf16       (gradients reduced in bf16)
#   split-root      + fsdp.split_root=true         (torchtitan's root units)
#   adamw-foreach   + optim.impl=foreach
#   adamw-fused     + optim.impl=fused
#   all             + all of the above, AdamW fused
#
# Prints one table: tokens/s, MFU (fsdp/flops.py's peak table) and the median step over steps 2..N
# (leaving out the steps memory.track measures and those that compiled), the first step and the
# seconds torch.compile took (its one-time cost: each run has a fresh inductor cache), peak memory
# (CUDA's max allocated) and each setting's ratio to the baseline;
# writes gpu-bench.json with the same and the baseline's memory ledger beside the analytic model.
# Sized for under 8 minutes on one H200: 8 steps of 8192 tokens (~0.2 s each) per setting, so the
# ~30 s start of each run (imports, data, a 1B random init) and the two compiles (~1-2 min each)
# are most of it.
#
#   bench/gpu.sh [out-dir]                        (default: $OUT if set, else runs/gpu-bench)
#   GPU_BENCH_ONLY="baseline compile" bench/gpu.sh   a subset (the baseline is always run: the ratios)
#   GPU_BENCH_CPU=1 bench/gpu.sh                  the same logic on CPU with a tiny model, 3 steps (a dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${1:-${OUT:-runs/gpu-bench}}
mkdir -p "$OUT_DIR"
STEPS=8
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
ALL="compile=true fsdp.reduce_dtype=bf16 fsdp.split_root=true optim.impl=fused"
NAMES=(baseline compile reduce-bf16 split-root adamw-foreach adamw-fused all)
LEVERS=("memory.track=true" "compile=true" "fsdp.reduce_dtype=bf16" "fsdp.split_root=true"
        "optim.impl=foreach" "optim.impl=fused" "$ALL")
ONLY=" baseline ${GPU_BENCH_ONLY:-${NAMES[*]}} "
rm -f "$OUT_DIR"/failed-* "$OUT_DIR"/*.wall_s  # what this invocation runs, not a previous one
START=$SECONDS
for i in "${!NAMES[@]}"; do
  NAME=${NAMES[$i]}
  [[ "$ONLY" == *" $NAME "* ]] || continue
  RUN="$OUT_DIR/$NAME"
  CACHE=$(mktemp -d)  # a cold inductor cache: compile's first step is what a first run pays
  T0=$SECONDS
  echo "== $NAME: ${LEVERS[$i]}"
  # Packed medical terms fill every 2048-token sequence; checkpoint, export and evaluation are off.
  # shellcheck disable=SC2086  # the levers word-split on purpose
  if ! TORCHINDUCTOR_CACHE_DIR="$CACHE" "$PY" train.py preset=none data=medical "${SHAPE[@]}" \
      model.random_init=true run_dir="$RUN" overwrite=true precision=mixed activation_checkpointing.mode=full \
      batch.micro_batch_size=$MICRO batch.grad_accum_steps=1 batch.max_seq_length=$SEQ \
      train.max_steps=$STEPS schedule.warmup_steps=2 \
      eval.sets=[] eval.max_new_tokens=0 export.enabled=false checkpoint.at_end=false ${LEVERS[$i]} \
      2>&1 | tr '\r' '\n' | grep -v '^train:' > "$RUN.log"; then
    tail -n 20 "$RUN.log"
    echo "${LEVERS[$i]}" > "$OUT_DIR/failed-$NAME"
  fi
  rm -rf "$CACHE"
  echo "$((SECONDS - T0))" > "$RUN.wall_s"
  echo "   $((SECONDS - T0)) s"
done
echo "== all settings: $((SECONDS - START)) s"
"$PY" - "$OUT_DIR" "$STEPS" "${NAMES[@]}" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, steps, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
summary = {}
for name in names:
    run = out / name
    wall = int((out / f"{name}.wall_s").read_text()) if (out / f"{name}.wall_s").is_file() else None
    if (out / f"failed-{name}").is_file():
        summary[name] = {"failed": (out / f"failed-{name}").read_text().strip(), "wall_s": wall}
        continue
    if wall is None:
        continue  # not in GPU_BENCH_ONLY
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    every = [r for r in rows if "train/loss" in r]
    # Steps 2..N that the ledger did not slow down (memory.track measures the first and the last)
    # and that did not compile (compile=true: the first step and any new input shape), if any are left.
    timed = [r for r in every[1:] if "memory/sharded params" not in r]
    timed = [r for r in timed if "time/compile_s" not in r] or timed
    peak_key = "memory/cuda max allocated" if "memory/cuda max allocated" in every[0] else "memory/host peak RSS"
    result = {
        "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in timed),
        "model_tflops": statistics.median(r["perf/model_tflops_per_rank"] for r in timed),
        "mfu": statistics.median(r["perf/mfu"] for r in timed) if "perf/mfu" in timed[0] else None,
        "step_s": statistics.median(r["time/step_s"] for r in timed),
        "first_step_s": every[0]["time/step_s"],
        "compile_s": sum(r.get("time/compile_s", 0.0) for r in every),
        "time_s": {k: statistics.median(r[k] for r in timed if k in r)
                   for k in sorted(set().union(*timed)) if k.startswith("time/")},
        "peak_gib": max(r[peak_key] for r in every),
        "peak_of": peak_key.removeprefix("memory/"),
        "last_loss": every[-1]["train/loss"],
        "steps_timed": len(timed),
        "wall_s": wall,
    }
    if (run / "memory.json").is_file():
        memory = json.loads((run / "memory.json").read_text())
        ledger = memory["ranks"][0]
        last = ledger[sorted(ledger)[-1]]
        result["memory_gib"] = {"analytic": memory["analytic"]["peak"] / 2**30, "ledger": last["peak"] / 2**30,
                                "cuda max allocated": last.get("cuda max allocated", 0) / 2**30}
    summary[name] = result
base = summary.get("baseline", {})
for result in summary.values():
    if "tokens_per_s" in result and "tokens_per_s" in base:
        result["ratio"] = result["tokens_per_s"] / base["tokens_per_s"]
(out / "gpu-bench.json").write_text(json.dumps(summary, indent=1))
print(f"\n{steps} steps each; medians over steps 2-{steps}, leaving out those memory.track measured and "
      "those that compiled; first s: step 1; compile s: torch.compile's seconds over the run\n")
print(f"{'setting':<14} {'tokens/s':>10} {'ratio':>6} {'MFU':>6} {'TFLOP/s':>8} {'step s':>7} "
      f"{'first s':>8} {'compile s':>9} {'peak GiB':>9} {'loss':>7} {'wall s':>7}")
for name, r in summary.items():
    if "failed" in r:
        print(f"{name:<14} FAILED ({r['failed']}); see {out / name}.log")
        continue
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    print(f"{name:<14} {r['tokens_per_s']:>10.0f} {r.get('ratio', float('nan')):>6.2f} {mfu:>6} "
          f"{r['model_tflops']:>8.1f} {r['step_s']:>7.3f} {r['first_step_s']:>8.2f} {r['compile_s']:>9.1f} "
          f"{r['peak_gib']:>9.2f} "
          f"{r['last_loss']:>7.3f} {r['wall_s'] if r['wall_s'] is not None else '-':>7}")
if "memory_gib" in base:
    print("\nbaseline memory (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in base["memory_gib"].items()))
print(f"written to {out / 'gpu-bench.json'}")
PYEOF
