#!/usr/bin/env bash
# Several GPUs through PyTorch's own engines (issue 23), fastload beside the plain recipe in one run. Needs a
# machine with >= 2 GPUs (nvidia-h200-x2 or larger); nothing here was run yet (the multi-GPU kinds were withheld).
#
#   bash benchmarks/multi_gpu.sh ddp    # Llama-3 8B QLoRA, DDP on 1 then 2 GPUs: tokens/s scaling (target >= 1.85x)
#   bash benchmarks/multi_gpu.sh fsdp   # Llama-3 70B shape (LAYERS decoder layers, default 20: a 70B's 80 would
#                                       # need ~140 GB of random bf16 checkpoint on disk), FSDP2-QLoRA on 2 GPUs:
#                                       # peak memory per GPU; per-layer memory scales linearly, so 80 layers
#                                       # ~ embeddings + 4 x (the 20-layer peak - embeddings) / 2 shards (see docs)
#   bash benchmarks/multi_gpu.sh all
#
# Results: one JSON line per run in $OUT/multi_gpu.jsonl (median step, tokens/s over all GPUs, peak GiB per GPU).
set -uo pipefail

part=${1:?usage: bash benchmarks/multi_gpu.sh ddp|fsdp|all}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.gpu-site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
OUT=${OUT:-$PWD/bench-out/multi-gpu}
MODELS=${MODELS:-$PWD/bench-out/models}
GPUS=${GPUS:-2}
LAYERS=${LAYERS:-20}
mkdir -p "$OUT" "$MODELS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

checkpoint() {  # shape name, folder: a random bf16 checkpoint written on the GPU (fastload.bench.models)
    "$PY" - "$1" "$2" "$LAYERS" <<'PY'
import sys
from fastload.bench import models
shape, folder, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
models.SHAPES["llama3-70b-shape"] = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                                         num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                         max_position_embeddings=131072, tie_word_embeddings=False)
directory = models.checkpoint_dir(shape, folder)
if not models.is_complete(directory):
    models.create_checkpoint(shape, directory, device="cuda")
print(directory)
PY
}

run() {  # nproc kind impl model_dir
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$1" benchmarks/multi_gpu.py "$2" "$3" "$4" \
        "$OUT/multi_gpu.jsonl" 2>&1 | tail -5
}

if [[ $part == ddp || $part == all ]]; then
    dir=$(checkpoint llama3-8b "$MODELS" | tail -1)
    for impl in fastload recipe; do
        run 1 ddp "$impl" "$dir"
        run "$GPUS" ddp "$impl" "$dir"
    done
fi
if [[ $part == fsdp || $part == all ]]; then
    dir=$(checkpoint llama3-70b-shape "$MODELS/70b-shape-$LAYERS" | tail -1)
    for impl in fastload recipe; do
        run "$GPUS" fsdp "$impl" "$dir"
    done
fi
"$PY" - "$OUT/multi_gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"{r['kind']:5} {r['impl']:9} {r['gpus']} GPU(s): {r['tokens_per_s']:9.0f} tok/s, "
          f"peak {max(r['peak_gib_per_gpu']):6.1f} GiB/GPU, step {r['median_step_s']:.3f} s")
for impl in ("fastload", "recipe"):
    one = [r for r in rows if r["kind"] == "ddp" and r["impl"] == impl and r["gpus"] == 1]
    many = [r for r in rows if r["kind"] == "ddp" and r["impl"] == impl and r["gpus"] > 1]
    if one and many:
        print(f"DDP scaling {impl}: {many[-1]['tokens_per_s'] / one[-1]['tokens_per_s']:.2f}x on {many[-1]['gpus']} GPUs")
PY
