#!/usr/bin/env bash
# Issue 17's GPU targets, one stage per call (each fits the lent machine's 10-minute limit; studies and
# grid rows live under OUTDIR, so re-running a stage continues it and nothing measured is lost):
#   bash scripts/h200_issue17.sh OUTDIR grid          # DiT-XL/2 256 under 8 GB: the exhaustive grid (scripts/dit_grid.py)
#   bash scripts/h200_issue17.sh OUTDIR dit           # DiT search, --no-warm-start, 12 trials (structure + sampler)
#   bash scripts/h200_issue17.sh OUTDIR dit-tpe       # the same start, space and workload: the sampler alone
#   bash scripts/h200_issue17.sh OUTDIR flux [LIMIT]  # FLUX.1-dev replica under 12 GB, latency, --no-warm-start, 15 trials
# MODEL/DIT/STEPS override the models and DiT's steps (DIT=tiny-dit STEPS=2 for a CPU smoke run).
set -uo pipefail
out=${1:?OUTDIR}; stage=${2:?grid|dit|dit-tpe|flux}; limit=${3:-9m}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
dit=${DIT:-dit-xl-2-256}; steps=${STEPS:-50}
# Random-weight replicas cannot judge quality, so the space keeps the knobs whose cost on real checkpoints
# is known (as the preset searches did): no caches, no layerwise casting, no kept-sensitive layers (whose
# scans cost minutes and can only buy quality), and flux-fast's inductor flags off (minutes of autotuning).
pins=(--pin cache=none --pin transformer.layerwise_fp8=False --pin transformer.keep_sensitive=0 --sensitivity off
      --pin compile.inductor_flags=False)
[ -n "${PINS:-}" ] && read -ra pins <<< "$PINS"   # CPU smoke: PINS="--pin cache=none"
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date -u +%T)" "$l"; done; }
case "$stage" in
  grid)
    python3 scripts/dit_grid.py "$out/dit-grid.jsonl" --model "$dit" --steps "$steps" 2>&1 | stamp | tee -a "$out/dit-grid.log" ;;
  dit|dit-tpe)
    extra=(); [ "$stage" = dit-tpe ] && extra=(--no-descent)
    python3 -m fluxtune search --model "$dit" --budget 8GB --objective throughput --steps "$steps" --no-warm-start \
        "${pins[@]}" "${extra[@]}" --trials 12 --timeout "$limit" --home "$out/search" --study "$stage" --out "$out/$stage.yaml" \
        2>&1 | grep --line-buffered -v -e Warning -e warnings.warn | stamp | tee -a "$out/$stage.log" ;;
  flux)
    python3 -m fluxtune search --model "${MODEL:-flux-dev-replica}" --budget 12GB --no-warm-start --trials 15 "${pins[@]}" \
        --timeout "$limit" --home "$out/search" --study flux-12gb --out "$out/flux-12gb.yaml" \
        2>&1 | grep --line-buffered -v -e Warning -e warnings.warn | stamp | tee -a "$out/flux.log" ;;
  *) echo "stage: $stage is not one of grid, dit, dit-tpe, flux" >&2; exit 2 ;;
esac
