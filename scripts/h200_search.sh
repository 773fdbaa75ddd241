#!/usr/bin/env bash
# The searches behind the presets (issue 5): FLUX.1-dev replica under each cap, then DiT-XL/2 for
# throughput. Run from the repository root on a CUDA machine with fluxtune importable:
#   bash scripts/h200_search.sh OUTDIR [BUDGETS] [TIMEOUT_EACH] [DIT_TIMEOUT]
#   e.g. bash scripts/h200_search.sh out 8GB,24GB 4m 2m      (DIT_TIMEOUT 0 skips DiT; BUDGETS "" only DiT)
# MODEL, DIT, SIZE, STEPS and RUNS override the workload (MODEL=tiny-flux DIT=tiny-dit SIZE=64x64 STEPS=2
# for a CPU smoke). Studies live in .fluxtune/search: re-running continues them, nothing measured is lost.
# The space is pinned to the knobs whose quality cost on real checkpoints is known to be small (fp8
# rowwise, int8, offload, tiling, compile; no caches, no layerwise casting), because a random-weight
# replica cannot judge quality; flux-fast's inductor flags are pinned off (minutes of compile, same speed).
set -uo pipefail
out=${1:?OUTDIR}; budgets=${2-8GB,12GB,24GB}; limit=${3:-4m}; dit_limit=${4:-2m}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
home=.fluxtune/search
mkdir -p "$home/logs"
quant="[none,fp8_dynamic,int8_weight]"
[ "${FP8:-1}" = 0 ] && quant="[none,int8_weight]"   # CPU smoke: fp8 needs a GPU
pins=(--pin cache=none --pin transformer.layerwise_fp8=False --pin "transformer.quantize=$quant"
      --pin transformer.keep_sensitive=0 --sensitivity off)
[ "${FP8:-1}" = 0 ] || pins+=(--pin transformer.granularity=row --pin compile.inductor_flags=False)
quiet() { grep --line-buffered -v -e Warning -e 'warnings.warn'; }  # line-buffered: a killed run keeps its log

for b in ${budgets//,/ }; do
    python3 -m fluxtune search --model "${MODEL:-flux-dev-replica}" --budget "$b" --objective latency \
        --size "${SIZE:-1024x1024}" --steps "${STEPS:-28}" --runs "${RUNS:-2}" --trials 40 --timeout "$limit" \
        "${pins[@]}" --home "$home" --study "flux-$b" --out "$out/best-flux-$b.yaml" 2>&1 | quiet | tee "$home/logs/search-flux-$b.log"
done
if [ "$dit_limit" != 0 ]; then
    python3 -m fluxtune search --model "${DIT:-dit-xl-2-256}" --budget 8GB --objective throughput \
        --runs "${RUNS:-2}" --trials 40 --timeout "$dit_limit" "${pins[@]}" --home "$home" --study dit-8gb \
        --out "$out/best-dit-8gb.yaml" 2>&1 | quiet | tee "$home/logs/search-dit-8gb.log"
fi
# What comes back (at most 8 files): the best profiles, and every study's logs, trials and plots.
tar czf "$out/studies.tgz" --exclude='*.pt' "$home" 2>/dev/null
