"""How fast each quantize method's linear layers run on this GPU, at a diffusion transformer's shapes.

One MLP-and-projection triple of the model's blocks (hidden -> hidden, hidden -> 4 x hidden,
4 x hidden -> hidden: most of a DiT step's GEMM FLOPs) is quantized with fluxtune's own
``quantize_module`` (torchao; NF4 through bitsandbytes) and timed with CUDA events at the image
tokens' row count (a transformer call) and at a few rows (the text stream, modulation), eager and,
for the methods presets compile, under ``torch.compile``. One JSON object per line to ``--out``
(a run cut short keeps what it measured), then a table: milliseconds, TFLOP/s and the ratio to bf16.

    python scripts/quant_kernels.py --out kernels.jsonl [--hidden 3072] [--rows 4096,64]
        [--methods bf16,fp8_dynamic,fp8_dynamic:tensor,int8_weight,int8_dynamic,int4_weight,nf4] [--compile fp8_dynamic,int4_weight]

Defaults are Qwen-Image's and FLUX.1's block width (3072) at 1024x1024 (4096 image tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from fluxtune.knobs import Quantize
from fluxtune.tuning import nf4
from fluxtune.tuning.quantize import quantize_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke of the script, not a measurement


def _layers(hidden: int, mult: int) -> torch.nn.Sequential:
    """Three bf16 linears as a block uses them (no nonlinearity: the GEMMs are what is timed)."""
    return torch.nn.Sequential(
        torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, mult * hidden), torch.nn.Linear(mult * hidden, hidden)
    ).to(DEVICE, torch.bfloat16)


def _storage_bytes(t: Any) -> int:
    """Bytes a weight occupies: a torchao tensor subclass counts its inner tensors, not its logical shape."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = flatten()
        return sum(_storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _flops(rows: int, hidden: int, mult: int) -> float:
    return 2.0 * rows * (hidden * hidden + 2 * hidden * mult * hidden)


def _time(fn: Any, x: torch.Tensor, iters: int) -> float:
    """Median milliseconds of ``iters`` calls after warm-up (CUDA events, one per call)."""
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        if DEVICE == "cpu":
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x)
            return (time.perf_counter() - t0) * 1e3 / iters
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _build(method: str, hidden: int, mult: int) -> torch.nn.Module:
    mod = _layers(hidden, mult)
    if method == "bf16":
        return mod
    name, _, gran = method.partition(":")
    q = Quantize(method=name, granularity=gran or "row")  # type: ignore[arg-type]
    quantize_module(mod, q, on_cuda=DEVICE == "cuda")
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--mult", type=int, default=4)
    ap.add_argument("--rows", default="4096,64")
    ap.add_argument("--methods", default="bf16,fp8_dynamic,fp8_dynamic:tensor,int8_weight,int8_dynamic,int4_weight,nf4")
    ap.add_argument("--compile", default="bf16,fp8_dynamic,fp8_dynamic:tensor,int8_weight,int8_dynamic,int4_weight")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    compiled = set(args.compile.split(",")) if args.compile else set()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        if method == "nf4" and not nf4.available():
            print(f"{method}: skipped (bitsandbytes not installed)")
            continue
        for mode in ("eager", "compiled") if method in compiled else ("eager",):
            t0 = time.perf_counter()
            try:
                mod = _build(method, args.hidden, args.mult)
                fn: Any = torch.compile(mod, dynamic=False) if mode == "compiled" else mod
                for r in rows:
                    x = torch.randn(r, args.hidden, device=DEVICE, dtype=torch.bfloat16)
                    ms = _time(fn, x, args.iters)
                    row = {"gpu": gpu, "method": method, "mode": mode, "rows": r, "hidden": args.hidden,
                           "ms": round(ms, 4), "tflops": round(_flops(r, args.hidden, args.mult) / ms / 1e9, 1),
                           "weight_bytes": sum(_storage_bytes(p.data) for p in mod.parameters())}
                    results.append(row)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
            except Exception as e:  # one method failing must not lose the others' numbers
                row = {"gpu": gpu, "method": method, "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
            finally:
                print(f"  {method} {mode}: {time.perf_counter() - t0:.1f} s", flush=True)
                torch._dynamo.reset()
    base = {(r["mode"], r["rows"]): r["ms"] for r in results if r["method"] == "bf16"}
    print(f"\n{gpu}, hidden {args.hidden}, MLP x{args.mult}: median of {args.iters} calls")
    print(f"{'method':22} {'mode':9} {'rows':>6} {'ms':>9} {'TFLOP/s':>8} {'vs bf16':>8}")
    for r in results:
        b = base.get((r["mode"], r["rows"])) or base.get(("eager", r["rows"]))
        ratio = f"{r['ms'] / b:.2f}x" if b else "-"
        print(f"{r['method']:22} {r['mode']:9} {r['rows']:>6} {r['ms']:>9.3f} {r['tflops']:>8.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
