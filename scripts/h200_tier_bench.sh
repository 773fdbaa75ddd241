#!/usr/bin/env bash
# The tier presets under the emulation of a typical card of each tier (issue 14), on the FLUX.1-dev replica.
# Run from the repository root on a CUDA machine with fluxtune importable:
#   bash scripts/h200_tier_bench.sh OUTDIR 'flux-dev-8gb|RTX 4060|1024x1024|28' 'flux-dev-8gb|RTX 4060|768x512|20' ...
# Each case is PRESET|CARD|WIDTHxHEIGHT|STEPS; CARD "none" runs the preset unemulated under its own budget.
# Every case is one `fluxtune bench` (a fresh process per candidate: one warm-up call, then RUNS timed
# generations back to back under the card's budget). Rows go to OUTDIR/tier.jsonl and the logs to
# OUTDIR/tier.log (few files: a device run brings back at most 8); scripts/tier_measured.py turns the
# rows into the presets' measured blocks. MODEL=tiny-flux RUNS=2 makes a CPU smoke of the loop (no --emulate).
set -uo pipefail
out=${1:?OUTDIR}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
model=${MODEL:-flux-dev-replica}
python3 -c 'import json; from fluxtune.hardware import library_versions; print(json.dumps(library_versions()))' \
    > "$out/versions.json"
for case in "$@"; do
    IFS='|' read -r preset card size steps <<< "$case"
    tag=$(echo "$preset-$card-$size-$steps" | tr -c 'A-Za-z0-9.-' '_')
    yaml="/tmp/fluxtune-tier/$tag.yaml"
    mkdir -p /tmp/fluxtune-tier
    python3 -m fluxtune show "$preset" "generation.width=${size%x*}" "generation.height=${size#*x}" \
        "generation.steps=$steps" > "$yaml" || { echo "case $case: show failed" | tee -a "$out/tier.log"; continue; }
    args=(--model "$model" --runs "${RUNS:-10}" --no-reference --out ".fluxtune/tier/$tag" --fresh)
    if [ "$card" = none ]; then
        budget=$(python3 -c "from fluxtune.presets import load_profile; v=load_profile('$preset').budget.vram; print(f'{v/1e9:g}GB' if v else 'none')")
        args+=(--budget "$budget")
    else
        args+=(--emulate "$card")
    fi
    echo "== case $case ($(date -u +%T))" | tee -a "$out/tier.log"
    python3 -m fluxtune bench "$yaml" "${args[@]}" 2>&1 | grep --line-buffered -v -e Warning -e 'warnings.warn' \
        | tee -a "$out/tier.log"
    python3 - "$case" ".fluxtune/tier/$tag/bench.json" >> "$out/tier.jsonl" <<'PY'
import json, sys
case, path = sys.argv[1], sys.argv[2]
try:
    rows = json.load(open(path))
except OSError:
    rows = []
rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
for row in rows:
    if row.get("kind") == "profile":
        print(json.dumps({"case": case, "row": row}))
PY
done
