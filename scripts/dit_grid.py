"""Issue 17's exhaustive grid: DiT-XL/2 256 throughput under a budget, every combination measured once.

    python scripts/dit_grid.py OUT.jsonl [--budget 8GB] [--steps 50] [--model dit-xl-2-256]
    python scripts/dit_grid.py /tmp/g.jsonl --model tiny-dit --steps 2 --batches 2,4 --device cpu   # smoke

batch (images per call: 8, 16, 32, 64, two class labels) x transformer quantization (none, int8 weight,
int8 dynamic, fp8) x offload (none, partial: half the blocks resident, the rest streamed) x compile (off,
regional; inductor flags off unless --inductor-flags). Each (quantization, compile) pair gets a freshly built pipeline; offload and batch are
re-applied on it (reversible knobs), so a compile is paid once per shape. The workload is the search's
DiT workload (class labels 207 and 360 cycled to the batch, seed 0) at ``--steps``; the warm-up runs 2 steps (same shapes,
so compilation happens there) and each timed call is pruned when its first warm steps project it past
``--stop-above`` seconds (int8 dynamic without compile is ~25x slower than bf16 on the H200). One JSON
row per cell is appended to OUT (a re-run skips the cells already there) and a table is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.measure import measure
from fluxtune.measure.workload import Workload
from fluxtune.units import parse_bytes

QUANT = ["none", "int8_weight", "int8_dynamic", "fp8_dynamic"]
COMPILE = ["off", "regional"]
OFFLOAD = ["none", "partial"]


def cell_key(quant: str, comp: str, off: str, batch: int) -> str:
    return f"{quant}/{comp}/{off}/{batch}"


def profile_for(quant: str, comp: str, off: str, batch: int, budget: str, blocks: int,
                inductor_flags: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"offload": {"mode": "none"} if off == "none" else
                         {"mode": "partial", "resident_blocks": blocks // 2}}
    if quant != "none":
        t["quantize"] = {"method": quant}
    return {"name": cell_key(quant, comp, off, batch).replace("/", "-"), "family": "dit",
            "budget": {"vram": budget}, "transformer": t,
            "compile": {"mode": comp, "inductor_flags": inductor_flags},
            "generation": {"images_per_prompt": batch}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget", default="8GB")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", default="dit-xl-2-256")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--quant", default=",".join(QUANT))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--stop-above", type=float, default=8.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--inductor-flags", action="store_true",
                    help="flux-fast's inductor flags (coordinate-descent tuning of every kernel: a much longer compile)")
    a = ap.parse_args()
    done = {}
    if a.out.exists():
        done = {r["cell"]: r for r in map(json.loads, a.out.read_text().splitlines()) if r.get("cell")}
    batches = [int(b) for b in a.batches.split(",")]
    budget_bytes = parse_bytes(a.budget)
    for quant in a.quant.split(","):
        for comp in COMPILE:
            todo = [(off, b) for off in OFFLOAD for b in batches if cell_key(quant, comp, off, b) not in done]
            if not todo:
                continue
            pipe, built = None, 0.0
            for off, batch in todo:
                if pipe is None:  # first cell, or the last one failed and may have left the pipeline changed
                    t0 = time.perf_counter()
                    pipe = pipelines.load(a.model)
                    built = time.perf_counter() - t0
                    blocks = len(pipe.transformer.transformer_blocks)
                key = cell_key(quant, comp, off, batch)
                row: dict[str, Any] = {"cell": key, "quant": quant, "compile": comp, "offload": off, "batch": batch,
                                       "steps": a.steps, "budget": a.budget, "build_s": round(built, 1)}
                try:
                    t1 = time.perf_counter()
                    fluxtune.apply(profile_for(quant, comp, off, batch, a.budget, blocks, a.inductor_flags), pipe, device=a.device)
                    row["apply_s"] = round(time.perf_counter() - t1, 2)
                    # As the search's worker does: a DiT call's batch is its labels, the two cycled.
                    labels = tuple((207, 360)[i % 2] for i in range(batch))
                    wl = Workload(class_labels=labels, seeds=(0,), steps=a.steps, runs=a.runs, warmup=1,
                                  warmup_steps=2)
                    m = measure(pipe, wl, budget_bytes=budget_bytes, keep_images=False, stop_above_s=a.stop_above)
                    row.update(status=str(m.status), latency_s=m.latency_s, first_call_s=m.first_call_s,
                               images_per_call=m.images_per_call, throughput=m.throughput,
                               projected_latency_s=m.projected_latency_s, peak=m.peak, error=m.error)
                    if m.projected_latency_s and m.images_per_call:
                        row["projected_throughput"] = m.images_per_call / m.projected_latency_s
                except Exception as e:  # a cell that cannot apply is a result too
                    row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    pipe = None
                    gc.collect()
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[key] = row
                tp = row.get("throughput") or row.get("projected_throughput")
                print(f"{key:32s} {row.get('status'):8s} {tp or 0:8.2f} img/s  peak "
                      f"{(row.get('peak') or 0) / 1e9:5.2f} GB  {row.get('error') or ''}"[:200], flush=True)
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    ok = [r for r in done.values() if r.get("status") == "ok" and r.get("throughput")]
    if ok:
        best = max(ok, key=lambda r: r["throughput"])
        print(f"best of {len(done)} cells: {best['cell']} at {best['throughput']:.2f} images/s "
              f"({a.steps} steps, budget {a.budget})")


if __name__ == "__main__":
    main()
