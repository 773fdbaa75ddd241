"""DiT-XL/2 INT8 table: bf16, plain INT8 and fluxtune's mixed-precision INT8 at 256 and 512, one run.

For each resolution: a per-block sensitivity scan of the quantization method (the same procedure
as ``fluxtune sensitivity``), the number of sensitive groups kept in bf16 chosen by measured error
on the scan's workload, then each row applied through ``fluxtune.apply`` to a freshly built
pipeline and measured with ``fluxtune.measure``: latency at batch 1, throughput at a large batch,
peak VRAM, PSNR/SSIM against the bf16 images, and the distribution shift (``fluxtune.distribution``)
over a few hundred samples. On the random-weight replicas the speed and memory are real and the
quality columns only say how far quantization moves the outputs, not how good they are.

    python scripts/dit_int8_table.py --out out/dit            # GPU: dit-xl-2-256 and dit-xl-2-512
    python scripts/dit_int8_table.py --models dit-mini --device cpu --samples 32 --steps 10 --batch 8 --compile
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.distribution import compare_sets
from fluxtune.knobs import Quantize
from fluxtune.measure import Workload, measure
from fluxtune.sensitivity import SensitivityResult, image_errors, quantize_matching, render, scan


def _fresh(model: str, device: str) -> Any:
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    pipe = pipelines.load(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _profile(method: str | None, exclude: tuple[str, ...], batch: int, steps: int, compile_: bool) -> dict[str, Any]:
    p: dict[str, Any] = {"name": "dit-table", "family": "dit",
                         "generation": {"steps": steps, "images_per_prompt": batch}}
    if compile_:  # torchao's int8 kernels are meant to run compiled; every row compiles alike
        # Blocks whose groups stay bf16 differ from the int8 ones: each such variant is one more compile.
        p["compile"] = {"mode": "regional", "inductor_flags": False, "recompile_limit": 64}
    if method:
        p["transformer"] = {"quantize": {"method": method, "exclude": list(exclude)}}
    return p


def _samples(pipe: Any, n: int, steps: int, batch: int) -> torch.Tensor:
    """``n`` images over spread-out class labels, deterministic (CPU generators per image)."""
    labels = [(i * 37) % 1000 for i in range(n)]
    out = [render(pipe, labels[i:i + batch], seeds=[i // batch], steps=steps) for i in range(0, n, batch)]
    return torch.from_numpy(np.concatenate(out)).permute(0, 3, 1, 2).contiguous()


def _ranking(model: str, device: str, args: argparse.Namespace, say: Any) -> tuple[SensitivityResult, int]:
    """The sensitivity ranking and the number of groups to keep in bf16: scanned and chosen here, or read
    from ``--scan-file`` (written by another run of this script, e.g. the 256 run for the 512 one)."""
    path = Path(args.scan_file) if args.scan_file else None
    if path is not None and args.wait_for_scan:
        deadline = time.monotonic() + args.wait_for_scan
        while not path.with_suffix(".keep.json").exists() and time.monotonic() < deadline:
            time.sleep(5)
    if path is not None and path.with_suffix(".keep.json").exists():
        keep = json.loads(path.with_suffix(".keep.json").read_text())["keep"]
        sens = SensitivityResult.load(path)
        say(f"{model}: ranking from {path} (scanned on {sens.model}), keep {keep}")
        return sens, int(keep)
    labels = [207, 360]
    pipe = _fresh(model, device)
    t0 = time.perf_counter()
    sens = scan(pipe, args.method, class_labels=labels, seeds=[0], steps=args.scan_steps, per_block=True, model=model)
    say(f"{model}: scan of {len(sens.groups)} groups in {time.perf_counter() - t0:.0f}s; most sensitive: "
        + ", ".join(f"{g.name} {g.psnr:.1f}dB" for g in sens.groups[:4])
        + f"; all quantized {sens.all_quantized.get('psnr', float('nan')):.1f}dB")
    ref_small = render(pipe, labels, [0], args.scan_steps)
    choice: dict[int, float] = {}
    pristine = pipe.transformer
    for n in args.keep:  # how many groups to keep: measured, since the benefit is not monotonic
        cand = copy.deepcopy(pristine)
        keep = set(sens.exclude_patterns(n))
        pats = [g.pattern for g in sens.groups if g.pattern not in keep]
        quantize_matching(cand, Quantize(method=args.method), pats, device.startswith("cuda"))
        pipe.transformer = cand
        choice[n] = image_errors(render(pipe, labels, [0], args.scan_steps), ref_small)["psnr"]
        pipe.transformer = pristine
        del cand
        _free()
    best_n = max(choice, key=lambda k: (choice[k], -k))
    say(f"{model}: PSNR by groups kept in bf16: {', '.join(f'{k}: {v:.1f}' for k, v in choice.items())} -> keep {best_n}")
    del pipe, pristine
    _free()
    if path is not None:
        sens.save(path)
        path.with_suffix(".keep.json").write_text(json.dumps({"keep": best_n, "psnr_by_keep": choice}))
    return sens, best_n


def run_model(model: str, device: str, args: argparse.Namespace, say: Any) -> list[dict[str, Any]]:
    method = args.method
    sens, best_n = _ranking(model, device, args, say)
    rows_spec = [("bf16", None, ()), (f"plain INT8 ({method})", method, ()),
                 (f"fluxtune mixed INT8 (top {best_n} groups bf16)", method, sens.exclude_patterns(best_n))]
    rows: list[dict[str, Any]] = []
    ref_set: torch.Tensor | None = None
    batch_labels = tuple((i * 37) % 1000 for i in range(args.batch))
    for label, meth, excl in rows_spec:
        pipe = _fresh(model, device)
        prof = _profile(meth, excl, args.batch, args.steps, args.compile)
        t0 = time.perf_counter()
        report = fluxtune.apply(prof, pipe)
        apply_s = time.perf_counter() - t0
        # One shape per row (batch ``--batch``): a compiled row compiles once, in the warm-up call.
        big = measure(pipe, Workload(class_labels=batch_labels, seeds=(0,), steps=args.steps, runs=args.runs, warmup=1))
        t1 = time.perf_counter()
        dist_set = _samples(pipe, args.samples, args.dist_steps, args.batch)
        render_s = time.perf_counter() - t1
        row: dict[str, Any] = {
            "model": model, "row": label, "method": meth, "kept_bf16": len(excl), "compiled": args.compile,
            "apply_s": apply_s, "quantize_s": report.seconds("quantize"), "first_call_s": big.first_call_s,
            "latency_batch_s": big.latency_s, "latency_per_image_s": (big.latency_s or 0) / args.batch,
            "batch": args.batch, "throughput": big.throughput, "steps": args.steps,
            "peak_allocated": big.peak_allocated, "peak_reserved": big.peak_reserved,
            "status": big.status, "error": big.error, "samples": args.samples, "samples_s": render_s,
        }
        if ref_set is None:
            ref_set = dist_set
        n = min(16, len(dist_set))
        err = image_errors(dist_set[:n].permute(0, 2, 3, 1).numpy(), ref_set[:n].permute(0, 2, 3, 1).numpy())
        row.update(psnr=err["psnr"], ssim=err["ssim"])
        shift = compare_sets(dist_set, ref_set)
        row.update(fd=shift.fd, kid=shift.kid_mean, kid_std=shift.kid_std)
        say(f"{model} | {label} | batch {args.batch}: {big.latency_s:.2f}s/call = {big.throughput or 0:.1f} img/s "
            f"(first call {big.first_call_s or 0:.1f}s) | peak {((big.peak_reserved or 0) / 1e9):.2f}GB | "
            f"PSNR {err['psnr']:.1f} SSIM {err['ssim']:.3f} | FD {shift.fd:.4g} KID {shift.kid_mean:.3g}")
        rows.append(row)
        del pipe
        _free()
        if args.compile:
            torch.compiler.reset()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| model | variant | latency per call (batch) | throughput | peak VRAM | first call | PSNR vs bf16 | SSIM | "
            "FD (random features) | KID |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['row']} | {r['latency_batch_s'] or 0:.2f} s ({r['batch']}) | "
            f"{r['throughput'] or 0:.1f} img/s | {(r['peak_reserved'] or 0) / 1e9:.2f} GB | {r['first_call_s'] or 0:.1f} s | "
            f"{min(r['psnr'], 100):.1f} dB | {r['ssim']:.3f} | {r['fd']:.3g} | {r['kid']:.2g} ± {r['kid_std']:.1g} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dit-xl-2-256,dit-xl-2-512")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", default="int8_dynamic", choices=["int8_dynamic", "int8_weight", "fp8_dynamic"])
    ap.add_argument("--steps", type=int, default=50, help="steps of the timed runs")
    ap.add_argument("--scan-steps", type=int, default=5)
    ap.add_argument("--dist-steps", type=int, default=25, help="steps of the distribution sample sets")
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--batch", default="64", help="images per call: one count, or one per model (64,32)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--keep", default="2,4", help="group counts to try keeping in bf16")
    ap.add_argument("--compile", action="store_true", help="regional compile for every row")
    ap.add_argument("--scan-file", default=None, help="ranking JSON: read if present, else scanned and written")
    ap.add_argument("--wait-for-scan", type=float, default=0, help="seconds to wait for --scan-file to appear")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/dit"))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    args.keep = [int(k) for k in args.keep.split(",")]
    models = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) not in (1, len(models)):
        ap.error(f"--batch {args.batch}: give one count or one per model ({len(models)})")
    batches = batches * len(models) if len(batches) == 1 else batches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, flush=True)

    rows: list[dict[str, Any]] = []
    for model, batch in zip(models, batches, strict=True):
        rows += run_model(model, args.device, argparse.Namespace(**{**vars(args), "batch": batch}), say)
        (out / f"dit_int8{args.tag}.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / f"dit_int8{args.tag}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
