#!/usr/bin/env bash
# The GPU benchmark in parts of at most 9 minutes each (one H100 80GB, Python 3.12, no internet):
#
#   bash benchmarks/gpu.sh part1   # Llama-3 1B: train for fastload, recipe, unsloth, fastload-nolora; loads; then each engine
#                                  # lever off (fastload-no*) and recipe-noupcast
#   bash benchmarks/gpu.sh part2   # Llama-3 8B: train 2048x2 for fastload, recipe, unsloth, fastload without fused
#                                  # LoRA; then loads for fastload, recipe
#   bash benchmarks/gpu.sh part3   # Llama-3 8B: train 8192x1 for fastload, unsloth; 2048x2 with engine levers off
#   bash benchmarks/gpu.sh headline  # 1B and 8B 2048x2 for fastload, recipe, unsloth, then fastload-graphs (the
#                                    # opt-in CUDA graphs) if the budget allows (the README's table)
#   bash benchmarks/gpu.sh long      # 8B 8192x1 for fastload, unsloth only
#   bash benchmarks/gpu.sh profile   # 1B and 8B, fastload and unsloth, with a torch.profiler table each
#   bash benchmarks/gpu.sh graphs    # 1B and 8B 2048x2: fastload with and without CUDA graphs, and unsloth
#   bash benchmarks/gpu.sh families  # Qwen2.5-7B and a Qwen3-MoE (8 of 30B-A3B's layers) 2048x2: fastload, recipe,
#                                    # unsloth (3 warm-up + 5 timed steps; checkpoints ~15 and ~11 GB, made on the GPU);
#                                    # on the MoE also fastload-noexperts (expert_lora off: peft's W + s B A path)
#   bash benchmarks/gpu.sh moe       # the Qwen3-MoE shape alone, 2048x2: fastload, unsloth, fastload-jitlaunch
#                                    # (every Triton launch through Triton's JIT), fastload-tritonadam (the
#                                    # Triton 8-bit update), then the recipe (3 + 5 steps)
#   bash benchmarks/gpu.sh longest   # 8B batch 1, doubling from 8192 until a step fails (out of memory) or MAX_SEQ
#                                    # (default 131072), 1 step per length, each in a fresh process; IMPLS picks the
#                                    # implementations (default fastload,unsloth), APPEND=1 adds to an earlier run's
#                                    # table: IMPLS=fastload, then IMPLS=unsloth APPEND=1, when one part's budget is
#                                    # too short for both
#   bash benchmarks/gpu.sh verify    # the GPU tests of code not yet run on a GPU (VERIFY_TESTS overrides the list);
#                                    # pytest's output in $OUT/verify-tests.log
#   bash benchmarks/gpu.sh long32k   # 8B 32768x1 at steady state (2 warm-up + 3 timed steps): fastload, unsloth
#   bash benchmarks/gpu.sh llama4    # one Llama-4 Scout-wide MoE layer, 4096 tokens: every expert vs the routed layer
#
# bitsandbytes and unsloth come from .gpu-site; fastload is used from this checkout (not pip-installed).
# Each part stops starting jobs when its time budget (BUDGET, default 520 s) is spent, records the rest as skipped,
# and copies results.json, results.md, bench.png and bench.log (every worker's output) into $OUT.
# Random checkpoints are created on the GPU and kept in bench-out/models (8B: ~16 GB, its time is in results.json).
set -uo pipefail

part=${1:?usage: bash benchmarks/gpu.sh part1|part2|part3|headline|long|profile|graphs|families|moe|longest|verify|long32k|llama4}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.gpu-site:$PWD
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/bench-out/gpu-out-$part}
PY=${PYTHON:-python}
BUDGET=${BUDGET:-520}
WORK=$PWD/bench-out/$part
mkdir -p "$OUT" "$WORK"

bench() {  # every call gets what is left of the part's budget
    "$PY" -m fastload.bench --device cuda --dtype bfloat16 --seq 2048 --batch 2 --warmup 3 --steps 10 \
        --out "$WORK" --cache-dir "$PWD/bench-out/models" --time-budget $((BUDGET - SECONDS)) "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h "$PWD" | tail -1
case "$part" in
    part1)
        bench --model llama3-1b --phase train --impl fastload,recipe,unsloth,fastload-nolora
        bench --model llama3-1b --impl fastload,recipe,unsloth --phase load --append
        bench --model llama3-1b --phase train --append --plot \
            --impl fastload-noengine,fastload-nofused,fastload-nooffload,fastload-nokernels,recipe-noupcast
        ;;
    part2)
        bench --model llama3-8b --impl fastload,recipe,unsloth,fastload-nolora --phase train
        bench --model llama3-8b --impl fastload,recipe --phase load --append --plot
        ;;
    headline)  # the README's table in one run: 1B and 8B at 2048x2 for fastload, recipe, unsloth (+ graphs)
        bench --model llama3-1b --phase train --impl fastload,recipe,unsloth,fastload-graphs
        bench --model llama3-8b --phase train --impl fastload,recipe,unsloth,fastload-graphs --append --plot
        ;;
    profile)  # where the step time goes: fastload and unsloth, 1B and 8B, 2 steps under torch.profiler each
        rm -f "$WORK"/profile-*.txt  # no tables of an earlier run copied out with this one's
        bench --model llama3-1b --phase train --impl fastload,unsloth --steps 4 --warmup 2 --profile
        bench --model llama3-8b --phase train --impl fastload,unsloth --steps 4 --warmup 2 --profile --append
        cp "$WORK"/profile-*.txt "$OUT"/ 2>/dev/null
        ;;
    graphs)  # the opt-in CUDA graphs against the default and Unsloth, each pair from one run
        bench --model llama3-1b --phase train --impl fastload,fastload-graphs,unsloth
        bench --model llama3-8b --phase train --impl fastload,fastload-graphs,unsloth --append --plot
        ;;
    families)  # a non-Llama shape and an MoE beside Llama's: fastload, the recipe and unsloth, same LoRA for each
        bench --model qwen2.5-7b --phase train --impl fastload,recipe,unsloth --warmup 3 --steps 5
        bench --model qwen3-moe-small --phase train --impl fastload,fastload-noexperts,unsloth,recipe --warmup 3 \
            --steps 5 --append --plot
        ;;
    moe)  # the MoE row alone: fastload and unsloth first (the pair the issue's target compares), then the recipe
        bench --model qwen3-moe-small --phase train --impl fastload,unsloth,fastload-jitlaunch,fastload-tritonadam,recipe \
            --warmup 3 --steps 5 --plot
        ;;
    longest)  # the longest trainable sequence at batch 1: speed, peak allocated and reserved at every length
        bench --model llama3-8b --phase longest --impl "${IMPLS:-fastload,unsloth}" --seq 8192 \
            --max-seq "${MAX_SEQ:-131072}" --warmup 0 --steps 1 ${APPEND:+--append}
        ;;
    long)  # 8B at 8192x1: fastload and unsloth (the recipe needs ~48 GiB and minutes here)
        bench --model llama3-8b --phase train --impl fastload,unsloth --seq 8192 --batch 1
        ;;
    verify)  # what landed since the last GPU run: tests first, so a failure shows before any benchmark time
        # shellcheck disable=SC2086
        timeout $((BUDGET - SECONDS)) "$PY" -m pytest -m gpu -q -rP -p no:cacheprovider ${VERIFY_TESTS:-\
            tests/test_gpu.py tests/engine/test_router.py tests/engine/test_engine.py tests/engine/test_expert_lora.py tests/engine/test_expert_4bit.py tests/train/test_families.py tests/load/test_fast_load.py tests/load/test_prequantized_experts.py tests/engine/test_rotary.py tests/engine/test_llama4_moe.py} \
            -k "${VERIFY_K:-lean_launch or merge_of_fp32 or router or routes or ties or fp32_matmul or triton_update or queues_its_updates or bf16_4bit or gpu_bf16 or bench_shape or routed_layer or kernel_matches_transformers_rotation or engine_levers_keep or cached_memory or retained or triton or probes or phi or rwkv or gpt2 or gpt_bigcode or bloom or mpt or falcon or gpt_neox or mamba or gptj or codegen or glm_moe_dsa or sarvam_mla or bailing_hybrid or ergo or roc_bert or qwen3_moe or gemma4 or qwen3_5 or llama4 or more_layouts or one_by_one}" \
            2>&1 | tee "$OUT/verify-tests.log" | tail -40
        ;;
    llama4)  # Llama-4's MoE layer at Scout's widths: transformers + peft (every expert) against the routed layer
        for v in dense routed; do "$PY" benchmarks/llama4_routed.py $v --device cuda --scout | tee -a "$OUT/llama4.txt"; done
        ;;
    long32k)  # the issue's 32k target needs steady-state steps, not one step with its compilation
        bench --model llama3-8b --phase train --impl fastload,unsloth --seq 32768 --batch 1 --warmup 2 --steps 3
        ;;
    part3)
        bench --model llama3-8b --impl fastload,unsloth --phase train --seq 8192 --batch 1
        bench --model llama3-8b --impl fastload-nofused,fastload-nooffload,fastload-nokernels,recipe-noupcast \
            --phase train --append --plot
        ;;
    *)
        echo "unknown part '$part': use part1, part2, part3, headline, long, profile, graphs, families, moe, longest, verify, long32k or llama4" >&2
        exit 2
        ;;
esac
for f in results.json results.md bench.png bench.log; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$part-$f"
done
echo "gpu.sh $part: done in ${SECONDS} s; files in $OUT"
