#!/usr/bin/env bash
# Loading on one GPU, 8B Llama-3 shape (random bf16, 4 safetensors shards): `fastload bench --phase load`, which runs
# fastload (first load, from its store, on the fly), the plain recipe and unsloth, each load in its own fresh process,
# median of $REPEATS, warm and cold page cache (cold: the checkpoint's files evicted with fadvise; the disk's own read
# time for the same files beside it). Each run goes on to one optimizer step: import, load, ready, first step, process
# start to first step, peak anonymous host RSS, GPU peak allocated/reserved, fastload's load phases. The GPU
# bit-identity test runs first. Prints the README's loading table at the end; everything goes to $OUT.
#
#   bash benchmarks/load_gpu.sh                 # PYTHONPATH must hold this checkout and .gpu-site
#   REPEATS=1 COLD=off bash benchmarks/load_gpu.sh   # a quick look: one warm run each
#   FASTLOAD_EARLY_LORA=0 IMPLS=fastload bash ...  # peft injected after the weights, as before (A/B)
set -uo pipefail
OUT=${OUT:-$PWD/bench-out/load-gpu}
MODEL=${MODEL:-/tmp/fastload-bench/llama3-8b}
REPEATS=${REPEATS:-3}
COLD=${COLD:-fadvise}
IMPLS=${IMPLS:-fastload,recipe,unsloth}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the GPU machine sets PYTHONDONTWRITEBYTECODE: every fresh process then compiled torch and transformers from source
# (imports of 13-21 s). A user's machine writes the bytecode once; so does this run, before anything is timed
unset PYTHONDONTWRITEBYTECODE
# and where site-packages is read-only (the GPU machine's /opt venv) nothing can be written beside the sources: the
# bytecode then goes under a prefix of its own, as a user's own venv would hold it
if ! "$PY" -c "import os, sysconfig, sys; sys.exit(not os.access(sysconfig.get_paths()['purelib'], os.W_OK))"; then
    export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/fastload-pycache}
fi
"$PY" -c "import torch, transformers, peft, bitsandbytes" >/dev/null 2>&1 || true
case ",$IMPLS," in *,unsloth,*) "$PY" -c "import unsloth" >/dev/null 2>&1 || true ;; esac
mkdir -p "$OUT"
LOG=$OUT/load.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$LOG"
if [ ! -f "$MODEL/config.json" ]; then
    "$PY" -c "from fastload.bench.models import create_checkpoint as c; print(c('llama3-8b', '$MODEL', device='cuda'))" \
        2>&1 | tee -a "$LOG"
fi
"$PY" -m pytest -q -m gpu tests/load/test_fast_load.py tests/load/test_early_injection.py -p no:cacheprovider 2>&1 | tee -a "$LOG" | grep -E "^E |passed|failed" | head -20
echo "\$ python -m fastload.bench --phase load --model $MODEL --impl $IMPLS --repeats $REPEATS --cold $COLD" | tee -a "$LOG"
"$PY" -m fastload.bench --phase load --model "$MODEL" --impl "$IMPLS" --repeats "$REPEATS" --cold "$COLD" \
    --out "$OUT/bench" --time-budget "$BUDGET" 2>&1 | tee -a "$LOG" | grep -E "^\[|^fastload bench"
echo; cat "$OUT/bench/results.md"
