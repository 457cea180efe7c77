#!/usr/bin/env bash
# fastload at several git revisions, and Unsloth, on one machine: one process per measurement, so a lever's effect
# is read within one run (machines differ by up to ~20% on the host-bound 1B step).
#
#   bash benchmarks/ab.sh prepare REV [REV ...]      # here, with git: export each revision to bench-out/revs/REV
#   bash benchmarks/ab.sh run "REV MODEL IMPL [bench options]" ...   # there: one line per measurement
#
# REV "." is this checkout. On the GPU machine (no git history) carry bench-out/revs next to .gpu-site:
#   run carry [".gpu-site", "bench-out/revs"]: bash benchmarks/ab.sh run ". llama3-8b fastload" "abc123 llama3-8b fastload"
# Each run prints one line (tokens/s, peak GiB, first loss, levers); records stay in bench-out/ab-runs/.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
mode=${1:?usage: bash benchmarks/ab.sh prepare REV... | run "REV MODEL IMPL [options]"...}
shift
case "$mode" in
    prepare)
        for rev in "$@"; do
            [ "$rev" = . ] && { echo ".: this checkout, used as it is (nothing to prepare)"; continue; }
            dest=$REPO/bench-out/revs/$rev
            rm -rf "$dest" && mkdir -p "$dest"
            git archive "$rev" fastload registry | tar -x -C "$dest" || exit 1
            echo "bench-out/revs/$rev: $(git log -1 --format='%h %s' "$rev")"
        done
        ;;
    run)
        export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
        mkdir -p "$REPO/bench-out/ab-runs"
        for spec in "$@"; do
            set -- $spec
            rev=$1 model=$2 impl=$3
            shift 3
            root=$REPO
            [ "$rev" != . ] && root=$REPO/bench-out/revs/$rev
            [ -d "$root/fastload" ] || { echo "$rev: no bench-out/revs/$rev (run 'prepare $rev' where git is)"; continue; }
            name=$(echo "$rev-$model-$impl-$*" | tr -c 'a-zA-Z0-9.\n-' '_')
            dir=$REPO/bench-out/ab-runs/$name
            SECONDS=0
            # run from the revision's root: python -m puts the working directory first on the path
            (cd "$root" && PYTHONPATH=$root:$REPO/.gpu-site python -m fastload.bench --dtype bfloat16 --seq 2048 \
                --batch 2 --warmup 3 --steps 8 --out "$dir" --cache-dir "$REPO/bench-out/models" --model "$model" \
                --phase train --impl "$impl" "$@" > "$dir.log" 2>&1)
            python3 - "$dir/results.json" "$rev" "$SECONDS" <<'PY'
import json, sys
try:
    records = [r for r in json.load(open(sys.argv[1]))["records"] if r.get("phase") == "train"]
except (OSError, ValueError, KeyError) as e:
    print(f"{sys.argv[2]}: no results ({e}); see the .log beside it")
    sys.exit()
for r in records:
    print(f"{sys.argv[2]:10} {r['model']:10} {r['impl']:18} {r.get('seq')}x{r.get('batch')}  "
          f"{r.get('tokens_per_s') or 0:8.0f} tok/s  {r.get('peak_allocated_gib') or 0:5.2f} GiB  "
          f"loss1 {r.get('first_loss') or 0:.4f}  {r.get('engine_levers')}  {r.get('error', '')} ({sys.argv[3]} s)")
PY
        done
        ;;
    *)
        echo "unknown mode '$mode': prepare or run" >&2
        exit 2
        ;;
esac
