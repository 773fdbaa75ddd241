#!/usr/bin/env bash
# generation.batch_cfg on a CUDA machine: Qwen-Image with true CFG (negative prompt "", as diffusers' example
# runs it), a preset's two passes a step one after the other against one batched forward, in one bench under
# the card's emulation, with what the latency model predicted for both beside it (~8 min with the replica's build):
#   bash scripts/h200_cfg_batch.sh OUTDIR [PRESET] [CARD] [STEPS]     # defaults: qwen-image-24gb "RTX 4090" 20
set -uo pipefail
out=${1:?OUTDIR}; preset=${2:-qwen-image-24gb}; card=${3:-RTX 4090}; steps=${4:-20}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
log="$out/cfg_batch.log"
for batched in false true; do
    name="$preset-cfg$([ $batched = true ] && echo -batched)"
    python3 -m fluxtune show "$preset" "name=$name" "generation.negative_prompt=" "generation.batch_cfg=$batched" \
        > "$out/$name.yaml" || exit 2
    for on in "" "--emulated-on H200"; do
        # shellcheck disable=SC2086
        python3 -m fluxtune predict "$out/$name.yaml" --gpu "$card" $on --steps "$steps" --json \
            | python3 -c "import json,sys; d=json.load(sys.stdin); print('predicted', '$name', d['emulated_on'] or 'on the card', round(d['total_s'], 2))" \
            | tee -a "$log"
    done
done
python3 -m fluxtune bench --model qwen-image-replica --emulate "$card" --steps "$steps" --runs 3 --no-reference \
    --timeout 9m --out "$out/bench" "$out/$preset-cfg.yaml" "$out/$preset-cfg-batched.yaml" 2>&1 \
    | grep --line-buffered -v -e Warning -e warnings.warn | tee -a "$log"
