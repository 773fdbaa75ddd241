"""Where a preset's time goes on this GPU: apply broken down by knob, and the
no-cap pipeline under attention/compile variants with a per-kernel-class profile of one step.

Every variant starts from a freshly built pipeline (compile and quantization are irreversible).
Writes one JSON object per line to --out (and prints it), so a run cut short keeps what it measured.

    python scripts/speed_probe.py --out probe.jsonl [--model flux-dev-replica] [--size 1024x1024]
        [--steps 28] [--runs 3] [--parts apply,variants] [--variants native,cudnn,...]
        [--profile PROFILE]    # the variants' base (default profiles/flux-dev-fast.yaml; any family's)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.measure import Workload, measure


def _cudnn_only() -> None:
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


# name -> (profile overrides on the base profile, global setup before apply)
VARIANTS: dict[str, tuple[list[str], Callable[[], None] | None]] = {
    "native": (["attention.backend=native"], None),
    "cudnn": ([], None),
    "cudnn-only": (["attention.backend=native"], _cudnn_only),
    "cudnn-vae": (["compile.vae_decode=true"], None),
    # Autotuning the fp8 GEMMs took minutes per shape on the H200 and cuBLAS won anyway (2026-12-01).
    "cudnn-autotune": (["compile.inductor_mode=max-autotune-no-cudagraphs"], None),
    # (CUDA graphs on the regional blocks overwrite each other's outputs: apply refuses them.)
    "full-cudagraphs": (["compile.inductor_mode=reduce-overhead", "compile.mode=full"], None),
}


def emit(path: str, row: dict[str, Any]) -> None:
    line = json.dumps(row, default=str)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def fresh(model: str) -> Any:
    torch.compiler.reset()
    torch.cuda.set_per_process_memory_fraction(1.0)  # a budget knob capped the last one
    torch.cuda.empty_cache()
    pipe = pipelines.load(model, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kernel_class(name: str) -> str:
    """A kernel's class by its name. Inductor's fused kernels are named after the ops they fuse (an RMS
    norm fused into the attention prologue mentions attention), so they are one class of their own."""
    n = name.lower()
    if n.startswith("triton_") and not n.startswith("triton_tem"):
        return "triton (fused elementwise/reductions)"
    if any(s in n for s in ("sdpa", "flash", "fmha")):
        return "attention"
    if any(s in n for s in ("fprop", "nchw", "nhwc", "conv")):
        return "conv (VAE)"
    if any(s in n for s in ("gemm", "scaled_mm", "cutlass", "nvjet", "triton_tem")):
        return "gemm"
    return "copy" if "memcpy" in n or "copy" in n else "other"


def kernel_classes(pipe: Any, workload: Workload) -> dict[str, Any]:
    """CUDA time per kernel class over one 2-step call, halved: ms per denoising step plus half of one
    text encoding and one VAE decode (they run once per call)."""
    from torch.profiler import ProfilerActivity, profile

    w = Workload.from_dict({**workload.to_dict(), "steps": 2, "runs": 1, "warmup": 0})
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure(pipe, w, keep_images=False)
    out: dict[str, Any] = {}
    top: list[tuple[float, str]] = []
    for e in prof.key_averages():
        t = e.device_time_total / 1000.0 / 2
        if t <= 0:
            continue
        cls = kernel_class(e.key)
        out[cls] = out.get(cls, 0.0) + t
        top.append((t, e.key[:90]))
    out = {k: round(v, 2) for k, v in out.items()}
    out["top"] = [f"{t:.2f} ms {k}" for t, k in sorted(top, reverse=True)[:12]]
    return out


def run_variant(name: str, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    overrides, setup = VARIANTS[name]
    pipe = fresh(args.model)
    flash, eff = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()
    try:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        report = fluxtune.apply(args.profile, pipe, overrides=overrides)
        apply_s = time.perf_counter() - t0
        m = measure(pipe, workload, keep_images=False)
        row: dict[str, Any] = {"part": "variant", "variant": name, "overrides": overrides, "status": m.status,
                               "error": m.error, "apply_s": round(apply_s, 3), "first_call_s": m.first_call_s,
                               "latency_s": m.latency_s, "latency_runs": m.latency_runs, "step_s": m.step_s,
                               "text_encode_s": m.text_encode_s, "decode_s": m.decode_s,
                               "peak_reserved": m.peak_reserved, "report": str(report)}
        if m.status == "ok":
            row["kernels"] = kernel_classes(pipe, workload)
        row["sdp_priority"] = [str(b) for b in torch._C._get_sdp_priority_order()]
        return row
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
        torch.backends.cuda.enable_mem_efficient_sdp(eff)
        del pipe


def apply_breakdown(args: argparse.Namespace, preset: str, label: str) -> dict[str, Any]:
    pipe = fresh(args.model)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = fluxtune.apply(preset, pipe)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    per_knob: dict[str, float] = {}
    for a in report.actions:
        per_knob[a.knob] = round(per_knob.get(a.knob, 0.0) + a.seconds, 3)
    row = {"part": "apply", "preset": preset, "label": label, "apply_s": round(total, 3), "per_knob": per_knob,
           "actions": [f"{a.knob} {a.component} {a.seconds:.3f}s {a.detail}" for a in report.actions]}
    del pipe
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="flux-dev-replica")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--presets", default="profiles/flux-dev-8gb.yaml,profiles/flux-dev-12gb.yaml,profiles/flux-dev-fast.yaml",
                    help="presets whose apply is broken down (the first pays the imports)")
    ap.add_argument("--parts", default="apply,variants")
    ap.add_argument("--profile", default="profiles/flux-dev-fast.yaml", help="the variants' base profile")
    ap.add_argument("--variants", default="native,cudnn,cudnn-vae,full-cudagraphs")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds; no variant starts after 80%% of it")
    args = ap.parse_args()
    start = time.perf_counter()
    w, h = (int(x) for x in args.size.lower().split("x"))
    workload = Workload(prompts=("a photo of a red fox in the snow, detailed fur, morning light",), steps=args.steps,
                        height=h, width=w, runs=args.runs, warmup=1)
    parts = args.parts.split(",")
    emit(args.out, {"part": "meta", "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    if "apply" in parts:
        for preset in args.presets.split(","):
            emit(args.out, apply_breakdown(args, preset, "first" if preset == args.presets.split(",")[0] else "later"))
    if "variants" in parts:
        for name in args.variants.split(","):
            if time.perf_counter() - start > 0.8 * args.deadline:
                emit(args.out, {"part": "variant", "variant": name, "status": "not run: deadline"})
                continue
            try:
                emit(args.out, run_variant(name, args, workload))
            except Exception as e:  # one variant's failure must not lose the others
                emit(args.out, {"part": "variant", "variant": name, "status": "error",
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    emit(args.out, {"part": "done", "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
