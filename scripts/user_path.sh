#!/usr/bin/env bash
# The user path of issue 15 on a CUDA machine: save the FLUX.1-dev replica once, then one fresh process per case.
#   bash scripts/user_path.sh OUTDIR 'load flux-dev-12gb 11' 'plain flux-dev-12gb 1' 'leaf none 0' ...
# Rows go to OUTDIR/user_path.jsonl, logs to OUTDIR/user_path.log. The saved directory is .fluxtune/flux-dev-saved;
# MODEL=flux2-klein-4b-replica saves that replica instead (in .fluxtune/MODEL-saved), and FLUXTUNE_EMULATE="RTX 4060"
# runs every case as that card (its budget, capability class and host->device rate).
set -uo pipefail
out=${1:?OUTDIR}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
model=${MODEL:-flux-dev-replica}
dir=.fluxtune/${model%-replica}-saved
log="$out/user_path.log"
if [ ! -f "$dir/model_index.json" ]; then
    echo "== save ($(date -u +%T))" >> "$log"
    python3 scripts/user_path.py save "$dir" "$model" >> "$log" 2>&1 || { echo "save failed"; tail -30 "$log"; exit 1; }
fi
for case in "$@"; do
    read -r kind preset n extra <<< "$case"
    echo "== case $case ($(date -u +%T))" | tee -a "$log"
    timeout "${CASE_TIMEOUT:-240}" python3 scripts/user_path.py case "$kind" "$preset" "$dir" "$n" "$out/user_path.jsonl" $extra \
        2>&1 | grep --line-buffered -v -e Warning -e 'warnings.warn' >> "$log"
    tail -3 "$log" | cut -c1-400
done
