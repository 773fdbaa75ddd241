"""Fit fluxtune.predict's constants on our H200 measurements (FLUX.1-dev replica, 1024x1024, 28 steps).

CPU only (counts work on the meta device, ~30 s). Prints each stage's fitted constants and the
measured-vs-predicted table of every H200 run used; paste the values into ``fluxtune/predict.py``.

The stages, each solving for its constants with the earlier ones fixed:

0. ``conv_eff`` and ``call_overhead_s``: flux-dev-fast's measured decode (0.088 s) and text-encoding (0.044 s)
   phases (docs/results/2026-12-01/speed-probe-2.jsonl).
1. ``bw_eff``, ``compiled_traffic``, ``gemm_eff_bf16``: eager bf16 (5.00 s), compiled fp8 (flux-dev-fast,
   2.94 s) and compiled bf16 with fused QKV (3.83 s), three equations in three unknowns; ``gemm_eff_fp8``
   is fixed at 0.62 from the kernel profile and ``attn_eff`` at 0.63 from cuDNN at FLUX's shape.
2. ``launch_s``: eager bf16 at 512x512 (1.67 s), which only a per-kernel CPU floor explains.
4. ``h2d_eff_partial`` and ``overlap_penalty``: the 12 GB (3.46 s) and 8 GB (4.52 s) presets, grid search.
5. ``h2d_eff_group`` (leaf group offload, 15.29 s), ``h2d_eff_model`` (model offload, 23.3 s),
   ``h2d_eff_sequential`` (sequential offload, 123 s), ``weight_only_bytes_per_param`` (int8 weight-only
   eager, 6.64 s).
6. ``gemm_eff_int8``: at a FLUX / Qwen-Image block's shapes (3072 wide, 4096 rows), from the kernel bench
   (docs/results/2026-12-04/session15/kernels.jsonl): compiled int8_dynamic against compiled fp8_dynamic, which
   quantize their activations alike, so their difference is the GEMMs'. The DiT-XL/2-256 runs (int8_dynamic
   5.33 s, bf16 3.52 s; 1152 wide, where int8 does worse) are printed as checks, no longer fitted.

Usage: ``python scripts/predict_fit.py``
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluxtune.gpus import find_gpu
from fluxtune.predict import CONSTANTS, predict_latency
from fluxtune.presets import load_profile
from fluxtune.profile import Profile

H200 = find_gpu("H200")
BASE: dict[str, Any] = {"name": "h200-recipe", "family": "flux", "generation": {"height": 1024, "width": 1024}}


def profile(name: str, **changes: Any) -> Profile:
    return load_profile({**BASE, "name": name, **changes})


def leaf_all() -> dict[str, Any]:
    off = {"offload": {"mode": "group", "level": "leaf", "use_stream": True}}
    return {c: off for c in ("transformer", "text_encoder", "text_encoder_2")} | {"vae": off}


def streamed(name: str, resident: str, **extra: Any) -> Profile:
    """The streamed presets as they were when measured (2026-12-01; the shipped files have changed since)."""
    return profile(name, transformer={"offload": {"mode": "partial", "resident": resident},
                                      "quantize": {"method": "fp8_dynamic"}},
                   text_encoder={"offload": {"mode": "partial", "resident_blocks": 0}},
                   text_encoder_2={"offload": {"mode": "partial", "resident_blocks": 0}, "quantize": "int8_weight"},
                   attention={"backend": "_native_cudnn"}, compile={"mode": "regional"}, **extra)


FAST = profile("flux-dev-fast", transformer={"quantize": {"method": "fp8_dynamic"}},
               compile={"mode": "regional", "fullgraph": True, "fuse_qkv": True})

RUNS: list[tuple[str, Profile, dict[str, Any], float]] = [
    ("bf16 eager", profile("bf16"), {}, 5.00),
    ("bf16 eager 512x512", profile("bf16-512"), {"height": 512, "width": 512}, 1.67),
    ("bf16 fuse_qkv + regional compile", profile("bf16-compiled", compile={"mode": "regional", "fuse_qkv": True,
                                                                         "fullgraph": True}), {}, 3.83),
    ("flux-dev-fast (fp8 rowwise, compiled)", FAST, {}, 2.94),
    ("flux-dev-12gb (streamed, 7.7 GB resident)", streamed("12gb", "7.7GB"), {}, 3.46),
    ("flux-dev-8gb (streamed, 4.5 GB resident)", streamed("8gb", "4.5GB", vae={"tiling": True, "tile_size": 512}),
     {}, 4.52),
    ("leaf group offload, streams, bf16", profile("leaf", **leaf_all()), {}, 15.29),
    ("model offload, bf16", profile("model", **{c: {"offload": "model"} for c in
                                               ("transformer", "text_encoder", "text_encoder_2", "vae")}), {}, 23.3),
    ("sequential offload, bf16", profile("seq", **{c: {"offload": "sequential"} for c in
                                                  ("transformer", "text_encoder", "text_encoder_2", "vae")}), {},
     123.0),
    ("int8 weight-only transformer, eager", profile("int8w", transformer={"quantize": "int8_weight"}), {}, 6.64),
    # DiT-XL/2 256, batch 64, 50 steps, regional compile (README, docs/results/2026-12-01/dit_int8.json).
    ("DiT-XL/2-256 int8_dynamic compiled, batch 64", load_profile(
        {"name": "dit-int8", "family": "dit", "transformer": {"quantize": "int8_dynamic"}, "compile": {"mode": "regional"},
         "generation": {"steps": 50, "images_per_prompt": 64}}), {"model": "dit-xl-2-256"}, 5.33),
    ("DiT-XL/2-256 bf16 compiled, batch 64 (check)", load_profile(
        {"name": "dit-bf16", "family": "dit", "compile": {"mode": "regional"},
         "generation": {"steps": 50, "images_per_prompt": 64}}), {"model": "dit-xl-2-256"}, 3.52),
]


def pred(i: int, k: dict[str, float]) -> float:
    _, p, kw, _ = RUNS[i]
    return predict_latency(p, H200, **{"model": "flux-dev-replica", **kw}, constants=k).total_s


def solve(f: Callable[[float], float], lo: float, hi: float, it: int = 24) -> float:
    """Root of a monotone f on [lo, hi] by bisection (clamped to the interval)."""
    flo = f(lo)
    for _ in range(it):
        mid = (lo + hi) / 2
        fmid = f(mid)
        if (fmid > 0) == (flo > 0):
            lo, flo = mid, fmid
        else:
            hi = mid
    return (lo + hi) / 2


KERNELS = Path(__file__).resolve().parent.parent / "docs/results/2026-12-04/session15/kernels.jsonl"


def int8_from_kernels(fp8_eff: float, path: Path = KERNELS) -> float:
    """Stage 6: int8 W8A8's GEMM efficiency from the compiled kernel bench at 4096 rows. fp8's GEMMs take
    flops / (peak x ``fp8_eff``); the rest of its time (activation quantization, epilogues) is taken to be
    int8's too, so int8's GEMMs take the remainder of its time."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pick = {r["method"]: r for r in rows if r["mode"] == "compiled" and r["rows"] == 4096}
    fp8, int8 = pick["fp8_dynamic"], pick["int8_dynamic"]
    flops = fp8["tflops"] * 1e12 * fp8["ms"] / 1e3
    peak = (H200.rate("fp8") or 0.0) * 1e12
    fp8_gemm_ms = flops / (peak * fp8_eff) * 1e3
    shared = fp8["ms"] - fp8_gemm_ms
    eff = flops / (peak * (int8["ms"] - shared) / 1e3)
    print(f"stage 6: {flops / 1e9:.1f} GFLOP; fp8 {fp8['ms']:.3f} ms = GEMMs {fp8_gemm_ms:.3f} + other {shared:.3f}; "
          f"int8 {int8['ms']:.3f} ms -> GEMMs {int8['ms'] - shared:.3f} ms: gemm_eff_int8 {eff:.3f}")
    return eff


def main() -> None:
    k = dict(CONSTANTS)  # non_hopper_scale is not used on the H200 (and is fitted in predict_check.py)
    # 0. conv_eff and call_overhead_s from flux-dev-fast's measured phases (speed-probe-2.jsonl, cuDNN run):
    #    text encoding 0.044 s, decode 0.088 s; they run eager in every run below.
    fast = RUNS[3][1]

    def phase(kk: dict[str, float]) -> tuple[float, float]:
        r = predict_latency(fast, H200, model="flux-dev-replica", constants=kk)
        return r.text_encode_s, r.decode_s

    def stage0() -> None:
        for _ in range(2):
            k["conv_eff"] = solve(lambda e: 0.088 - phase({**k, "conv_eff": e})[1], 0.01, 1.0)
            k["call_overhead_s"] = max(0.0, k["call_overhead_s"] + 0.044 - phase(k)[0])

    # 1. gemm_eff_bf16 (compiled bf16), bw_eff (eager bf16), compiled_traffic (compiled fp8): nested
    #    bisection. For a trial bw_eff, compiled fp8 gives compiled_traffic, compiled bf16 then gives
    #    gemm_eff_bf16, and eager bf16's residual picks bw_eff (monotone in it). gemm_eff_fp8 is taken
    #    from the kernel profile, not solved.
    def inner(bw: float) -> dict[str, float]:
        kk = {**k, "bw_eff": bw}
        kk["compiled_traffic"] = solve(lambda f: pred(3, {**kk, "compiled_traffic": f}) - RUNS[3][3], 0.0, 1.5)
        kk["gemm_eff_bf16"] = solve(lambda e: RUNS[2][3] - pred(2, {**kk, "gemm_eff_bf16": e}), 0.2, 1.0)
        return kk

    # 2. launch_s: eager 512x512 is bound by the CPU (its GPU terms are a third of 1024x1024's, yet it
    #    takes 0.33 of the time, with a fixed 0.13 s of text encoding and decoding): solved there after
    #    the GPU terms (1024x1024 eager stays GPU-bound). Stages 0-2 repeated until they settle.
    k["launch_s"] = 1e-6
    for _ in range(3):
        stage0()
        k.update(inner(solve(lambda bw: RUNS[0][3] - pred(0, inner(bw)), 0.2, 1.0)))
        k["launch_s"] = solve(lambda s: pred(1, {**k, "launch_s": s}) - RUNS[1][3], 1e-7, 1e-4)
    # 4. grid search over (h2d_eff_partial, overlap_penalty), squared relative error of both presets.
    best = (float("inf"), 0.0, 0.0)
    for he in [x / 100 for x in range(50, 101, 2)]:  # <= 1: never faster than the measured link
        for pen in [x / 100 for x in range(0, 51, 2)]:
            kk = {**k, "h2d_eff_partial": he, "overlap_penalty": pen}
            err = sum((pred(i, kk) / RUNS[i][3] - 1) ** 2 for i in (4, 5))
            best = min(best, (err, he, pen))
    k["h2d_eff_partial"], k["overlap_penalty"] = best[1], best[2]
    # 5.
    k["h2d_eff_group"] = solve(lambda e: RUNS[6][3] - pred(6, {**k, "h2d_eff_group": e}), 0.2, 1.0)
    k["h2d_eff_model"] = solve(lambda e: RUNS[7][3] - pred(7, {**k, "h2d_eff_model": e}), 0.005, 1.0)
    k["h2d_eff_sequential"] = solve(lambda e: RUNS[8][3] - pred(8, {**k, "h2d_eff_sequential": e}), 0.005, 1.0)
    k["gemm_eff_int8"] = int8_from_kernels(k["gemm_eff_fp8"])
    k["weight_only_bytes_per_param"] = solve(
        lambda b: pred(9, {**k, "weight_only_bytes_per_param": b}) - RUNS[9][3], 0.0, 60.0)

    print("fitted constants:")
    for key, value in k.items():
        print(f"  {key:30s} {value:.4g}   (was {CONSTANTS[key]:.4g})")
    print(f"\n{'H200 run':45s} {'measured':>9s} {'predicted':>9s} {'error':>7s}  bound")
    for label, p, kw, measured in RUNS:
        r = predict_latency(p, H200, **{"model": "flux-dev-replica", **kw}, constants=k)
        print(f"{label:45s} {measured:8.2f}s {r.total_s:8.2f}s {100 * (r.total_s / measured - 1):+6.1f}%  "
              f"{r.step.bound} (step {r.step.seconds:.3f} s: gemm {r.step.gemm_s:.3f} attn {r.step.attn_s:.3f} "
              f"mem {r.step.memory_s:.3f} launch {r.step.launch_s:.3f} copy {r.step.transfer_s:.3f}; "
              f"text {r.text_encode_s:.2f} decode {r.decode_s:.2f})")


if __name__ == "__main__":
    main()
