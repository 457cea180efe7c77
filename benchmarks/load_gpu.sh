#!/usr/bin/env bash
# Loading on one GPU, 8B Llama-3 shape (random bf16, 4 safetensors shards, page cache warm), each load in its own
# fresh process (fastload.bench.loadtime): fastload first load / from the store / on the fly, with the direct 4-bit
# load and with FASTLOAD_DIRECT_LOAD=0 (transformers' from_pretrained, the path before it), the plain recipe and
# unsloth; then the GPU bit-identity test. Prints a table at the end; logs go to $OUT.
#
#   bash benchmarks/load_gpu.sh            # PYTHONPATH must hold this checkout and .gpu-site
#   PART=short bash benchmarks/load_gpu.sh # fastload's direct load only (and the first step beside the background write)
set -uo pipefail
OUT=${OUT:-$PWD/bench-out/load-gpu}
MODEL=${MODEL:-/tmp/fastload-bench/llama3-8b}
HOME_STORE=/tmp/fastload-bench/home
BUDGET=${BUDGET:-500}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/load.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
if [ ! -f "$MODEL/config.json" ]; then
    "$PY" -c "from fastload.bench.models import create_checkpoint as c; print(c('llama3-8b', '$MODEL', device='cuda'))" \
        2>&1 | tee -a "$LOG"
fi
"$PY" -m pytest -q -m gpu tests/test_fast_load.py -p no:cacheprovider 2>&1 | tee -a "$LOG" | grep -E "^E |passed|failed" | head -20
one() {  # one fresh process: one LABEL DIRECT(0|1) loadtime-args...
    local label=$1 direct=$2; shift 2
    if [ $SECONDS -gt "$BUDGET" ]; then echo "SKIPPED $label (budget)" | tee -a "$LOG"; return; fi
    echo "===== $label" >>"$LOG"
    FASTLOAD_DIRECT_LOAD=$direct "$PY" -m fastload.bench.loadtime "$MODEL" --home "$HOME_STORE" \
        --t0 "$(date +%s.%N)" "$@" 2>&1 | tee -a "$LOG" | grep -E "^LOADTIME|direct 4-bit|ready in|stored|Error" \
        | cut -c1-400 | sed "s/^/[$label] /"
}
if [ "${PART:-all}" = "short" ]; then  # the direct load's figures and the first step beside the background write
    one first-direct-bg 1 --variant first --step
    one first-direct-bg-again 1 --variant first --step
    one store-direct-1 1 --variant store --step
    one store-direct-2 1 --variant store
    one store-direct-3 1 --variant store
    one onthefly-direct-1 1 --variant onthefly
    one onthefly-direct-2 1 --variant onthefly
    one store-old 0 --variant store
else
    one first-direct-bg 1 --variant first --step
    one store-direct-1 1 --variant store --step
    one store-direct-2 1 --variant store
    one store-direct-3 1 --variant store
    one onthefly-direct-1 1 --variant onthefly
    one onthefly-direct-2 1 --variant onthefly
    one onthefly-direct-3 1 --variant onthefly
    one store-old 0 --variant store
    one onthefly-old 0 --variant onthefly
    if [ $SECONDS -lt "$BUDGET" ]; then  # where the old path's time goes, by function
        FASTLOAD_DIRECT_LOAD=0 "$PY" -m cProfile -o "$OUT/old_store.prof" -m fastload.bench.loadtime "$MODEL" \
            --home "$HOME_STORE" --variant store >>"$LOG" 2>&1
        "$PY" -c "import pstats; pstats.Stats('$OUT/old_store.prof').sort_stats('cumulative').print_stats(40)" \
            >"$OUT/old_store_profile.txt" 2>&1
        rm -f "$OUT/old_store.prof"
    fi
    one recipe 1 --impl recipe --variant onthefly
    one unsloth 1 --impl unsloth --variant onthefly
fi
"$PY" - "$LOG" <<'EOF'
import json, sys
rows, label = [], None
for line in open(sys.argv[1]):
    if line.startswith("===== "):
        label = line.strip()[6:]
    elif line.startswith("LOADTIME ") and label:
        rows.append((label, json.loads(line.split("LOADTIME ", 1)[1])))
keys = ["import_s", "ready_s", "first_step_s", "start_to_first_step_s", "background_store_wait_s", "background_write_s",
        "anon_rss_above_start_gib", "gpu_peak_allocated_gib", "gpu_peak_reserved_gib"]
print("| run | source | " + " | ".join(keys) + " |")
for label, r in rows:
    cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else "" for k in keys]
    print(f"| {label} | {r.get('source', '')} | " + " | ".join(cells) + " |")
EOF
