#!/usr/bin/env bash
# Issue 19's presets on a CUDA machine, one candidate per call (fits the lent machine's 10 minutes):
#   python scripts/family_candidates.py OUTDIR/candidates          # memory-model-sized candidates (CPU, seconds)
#   bash scripts/h200_issue19.sh OUTDIR NAME [LIMIT]               # e.g. flux2-klein-4b-8gb 9m
# Each candidate runs 10 timed generations (after one warm-up) under its tier's cap in one bench beside the
# diffusers recipes that fit the same cap (NF4 + model offload included when bitsandbytes is installed), under
# the emulation of the tier's card where the H200 can emulate it;
# re-running continues the bench, nothing measured is lost. Wheels: ../shared/tools/gpu-wheels.sh bitsandbytes==0.50.2
set -uo pipefail
out=${1:?OUTDIR}; name=${2:?NAME}; limit=${3:-9m}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cand="$out/candidates/$name.yaml"
[ -f "$cand" ] || python3 scripts/family_candidates.py "$out/candidates" "$name" || exit 2
read -r model budget card < <(python3 scripts/family_candidates.py --which "$name") || exit 2
# Under the tier card's emulation (its memory, capability class and PCIe rate; compute is the H200's),
# else under the cap alone. RECIPES picks the diffusers recipes (sequential offload is left out: it moves
# the same bytes as leaf-level group offload without overlapping them, so it is never the faster).
emu=(); [ "$card" != none ] && emu=(--emulate "$card")
# EXTRA="name=NAME2 KEY=VALUE ..." benches a second profile beside the candidate (an A/B in the same bench),
# e.g. EXTRA="name=flux2-dev-24gb-es transformer.offload.resident=15GB budget.expandable_segments=true".
# Qwen-Image 16 GB's A/B (fp8 streamed, right for a real RTX 4080, against NF4 kept whole, which only the H200's
# compute favours; README "Qwen-Image at 16 GB"):
#   EXTRA="name=qwen-image-16gb-nf4 transformer.quantize.method=nf4 transformer.offload=none variants=[]" RECIPES=bf16,model
# modulation.cache (the shipped qwen-image-16gb sets it; docs/results/2026-12-05/session20): ONLY_EXTRA=1 benches
# the EXTRA profile alone beside the recipes (RECIPE_RUNS=3: the recipe's spread is wide); the same command without
# ONLY_EXTRA then adds the candidate without the cache to that bench:
#   ONLY_EXTRA=1 RECIPE_RUNS=3 EXTRA="name=qwen-image-16gb-modcache modulation.cache=true" RECIPES=bf16,model
# RUNS=2 times a candidate twice instead of ten times: a speed probe, not a preset's run. (torchao int4 needs no
# probe any more: scripts/quant_kernels.py measured its kernel at 27x bf16 at a DiT's rows.)
profiles=("$cand")
if [ -n "${EXTRA:-}" ]; then
    # shellcheck disable=SC2086
    python3 -m fluxtune show "$cand" $EXTRA > "$out/candidates/$name-extra.yaml" || exit 2
    profiles+=("$out/candidates/$name-extra.yaml")
    [ "${ONLY_EXTRA:-0}" = 1 ] && profiles=("$out/candidates/$name-extra.yaml")
fi
python3 -m fluxtune bench --model "$model" --budget "$budget" "${emu[@]}" --recipes "${RECIPES:-bf16,leaf,block,model}" \
    --runs "${RUNS:-10}" --recipe-runs "${RECIPE_RUNS:-2}" --recipe-warmup-steps 2 --recipe-time-box 90 --no-reference --timeout "$limit" \
    --out "$out/$name" "${profiles[@]}" 2>&1 | grep --line-buffered -v -e Warning -e warnings.warn | tee -a "$out/$name.log"
