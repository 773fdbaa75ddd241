#!/usr/bin/env bash
# The presets against the diffusers recipes on the FLUX.1-dev replica, every budget in one bench
# (issue 5). Run from the repository root on a CUDA machine with fluxtune importable:
#   bash scripts/h200_flux_bench.sh OUTDIR [TIMEOUT]
# (MODEL, SIZE, STEPS and RUNS override the workload, e.g. MODEL=tiny-flux SIZE=64x64 STEPS=2 for a CPU smoke.)
# Re-running it continues a bench that stopped at TIMEOUT (the rows live in .fluxtune/bench-flux).
# Steps: check cuDNN attention (the presets fall back to native where it is not right and faster),
# then `fluxtune bench` with --write-measured, then pack the results and the measured presets.
set -uo pipefail
out=${1:?OUTDIR}; limit=${2:-500s}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
presets=(profiles/flux-dev-fast.yaml profiles/flux-dev-24gb.yaml profiles/flux-dev-12gb.yaml profiles/flux-dev-8gb.yaml)

python3 scripts/attention_check.py | tee "$out/attention.json"
if ! grep -q '"use_cudnn": true' "$out/attention.json"; then
    echo "cuDNN attention is not right and faster here: the presets run with native attention"
    sed -i 's/backend: _native_cudnn/backend: native/' "${presets[@]}"
fi

python3 -m fluxtune bench "${presets[@]}" --baselines --budget 8GB,12GB,24GB,none \
    --model "${MODEL:-flux-dev-replica}" --size "${SIZE:-1024x1024}" --steps "${STEPS:-28}" --runs "${RUNS:-10}" \
    --recipe-runs 2 --recipe-warmup-steps 2 --recipe-time-box 50 --timeout "$limit" \
    --out .fluxtune/bench-flux --write-measured 2>&1 | grep --line-buffered -v -e Warning -e 'warnings.warn' | tee "$out/bench.log"

# What comes back (at most 8 files): the tables, the plot, the log, and the state a later run resumes from.
b=.fluxtune/bench-flux
cp "$b/bench.md" "$b/bench.png" "$b/reference.pt" "$out"/ 2>/dev/null
tar czf "$out/measured-presets.tgz" "${presets[@]}" "$b/bench.json" "$b/reference.json"
