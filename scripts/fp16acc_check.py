"""What float16 accumulation does to a diffusion transformer's GEMMs: error and time, at FLUX's shapes.

``matmul.fp16_accumulation`` makes cuBLAS accumulate float16 GEMMs in float16: twice the rate on GeForce
cards, and a rounding error that grows with the reduction length K. FLUX.1's GEMMs reduce over 3072
(projections), 12288 (the MLP's down projection) and 15360 (a single block's output projection). For each
K this runs one GEMM of 4096 rows (1024x1024's image tokens) in bfloat16, float16 and float16 with float16
accumulate, and prints each one's relative error against float32 (the norm of the difference over the
norm of the result) and its time with CUDA events. Inputs are unit Gaussian (LayerNorm'd activations),
weights scaled by 1/sqrt(K) (a trained layer's output scale). One JSON object per line to ``--out``.

    python scripts/fp16acc_check.py --out fp16acc.jsonl [--ks 3072,12288,15360] [--rows 4096]

On a data-center GPU (A100, H100, H200) both accumulations run at one rate, so the time column says
nothing about a GeForce card; the error column is the same arithmetic everywhere. On CPU the flag has
no effect (the script says so): a smoke of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _time_ms(fn: Any, repeats: int = 20) -> float:
    if DEVICE != "cuda":
        return float("nan")
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure(k: int, rows: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """One GEMM (rows x k) @ (k x n) per arithmetic: relative error against float32 and milliseconds."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, k, device=DEVICE, generator=g)
    w = torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5
    exact = torch.nn.functional.linear(x.double(), w.double()).float()
    flag = torch.backends.cuda.matmul
    out = []
    for name, dtype, acc16 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                               ("fp16 acc16", torch.float16, True)):
        xs, ws = x.to(dtype), w.to(dtype)
        before = flag.allow_fp16_accumulation
        flag.allow_fp16_accumulation = acc16
        try:
            y = torch.nn.functional.linear(xs, ws).float()
            ms = _time_ms(lambda xs=xs, ws=ws: torch.nn.functional.linear(xs, ws))
        finally:
            flag.allow_fp16_accumulation = before
        err = ((y - exact).norm() / exact.norm()).item()
        tflops = 2 * rows * k * n / (ms * 1e-3) / 1e12 if ms == ms else None
        out.append({"k": k, "rows": rows, "n": n, "arith": name, "rel_error": err, "ms": ms, "tflops": tflops,
                    "finite": bool(torch.isfinite(y).all()), "device": torch.cuda.get_device_name() if DEVICE == "cuda"
                    else "cpu"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ks", default="3072,12288,15360", help="reduction lengths (FLUX.1: 3072, 12288, 15360)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--n", type=int, default=3072, help="output width")
    args = ap.parse_args()
    if DEVICE != "cuda":
        print("no CUDA GPU: float16 accumulation is a cuBLAS setting and has no effect here (a smoke run)")
    rows = []
    with args.out.open("a") as f:
        for k in (int(v) for v in args.ks.split(",")):
            for r in measure(k, args.rows, args.n):
                f.write(json.dumps(r) + "\n")
                rows.append(r)
    print(f"{'K':>6} {'arithmetic':<11} {'rel. error vs fp32':>19} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        print(f"{r['k']:>6} {r['arith']:<11} {r['rel_error']:>19.2e} {r['ms']:>8.3f} {tf:>8}")


if __name__ == "__main__":
    main()
