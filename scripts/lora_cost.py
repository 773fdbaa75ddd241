"""The latency cost of a LoRA under each mode, against the same profile without LoRA, in one process.

Target (issue): a LoRA on a quantized, compiled profile costs at most 5% latency and no recompilation
on a swap. Cases (each on a freshly loaded pipeline, GPU memory freed in between):

* ``fp8``: the transformer quantized (fp8 rowwise dynamic on CUDA) + regional compile, no LoRA;
* ``fp8_fuse``: the same + a LoRA fused before quantization (what ``auto`` picks here), then ``set_loras``
  to the second LoRA and back (re-quantizing from the host copy), counting recompilations as below;
* ``fp8_hotswap``: the same + a LoRA as a hot-swappable adapter (``max_rank``), then ``set_loras`` to a
  second LoRA and back, one call after each swap, counting TorchDynamo (re)compilations meanwhile;
* ``bf16``: no quantization, no compile, no LoRA (the baseline of the next);
* ``bf16_adapter``: the same + the LoRA as a peft adapter.

Each case is timed by :func:`fluxtune.measure.measure` (one warm-up call, reported as the first call,
then ``--runs`` timed calls). The two LoRA files (rank ``--rank`` on to_q/to_k/to_v/to_out.0, random
non-zero B) are written next to the results. Results go to ``--out`` (default ``$OUT`` or ``out/``) as
``lora_cost.json`` and ``lora_cost.md``, rewritten after every case so a cut-off run keeps what it did.

GPU: ``python scripts/lora_cost.py`` (flux-dev-replica, 1024x1024, 28 steps, 2 runs). CPU smoke:
``python scripts/lora_cost.py --model tiny-flux --size 64x64 --steps 2 --runs 1``; without CUDA the
fp8 cases quantize with int8_weight instead (fp8 needs a GPU), as the output says.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fluxtune
from fluxtune.measure import DynamoWatch, Measurement, Workload, compare, measure
from fluxtune.pipelines import load

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CASES = ("fp8", "fp8_fuse", "fp8_hotswap", "bf16", "bf16_adapter")
BASELINE = {"fp8_fuse": "fp8", "fp8_hotswap": "fp8", "bf16_adapter": "bf16"}
TARGET_COST_PCT = 5.0
PROMPT = "a red fox standing in fresh snow, soft morning light, photograph"


def say(msg: str) -> None:
    print(f"[lora_cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ LoRAs


def make_lora_files(transformer: torch.nn.Module, root: Path, rank: int) -> list[str]:
    """Two LoRA files for ``transformer``'s architecture (peft's naming, diffusers' file layout).

    peft places the adapters on a copy of the transformer built on the meta device (no memory), and
    the weights are drawn on the CPU: A ~ N(0, 1/in_features), B ~ N(0, 0.02^2), seeds 1 and 2.
    """
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    with torch.device("meta"):
        shadow: Any = type(transformer).from_config(transformer.config)  # type: ignore[attr-defined]
        shadow.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), adapter_name="x")
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(shadow, adapter_name="x").items()}
    del shadow
    paths = []
    for name, seed in (("lora_a", 1), ("lora_b", 2)):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for key, shape in sorted(shapes.items()):
            w = torch.randn(shape, generator=g)
            w = w / math.sqrt(shape[1]) if ".lora_A." in key else w * 0.02
            sd[key] = w.to(torch.bfloat16)
        FluxPipeline.save_lora_weights(str(root), transformer_lora_layers=sd, weight_name=f"{name}.safetensors")
        paths.append(str(root / f"{name}.safetensors"))
    say(f"wrote 2 LoRA files (rank {rank}, {len(shapes) // 2} layers each) to {root}")
    return paths


# ------------------------------------------------------------------------------------- recompiles


# ------------------------------------------------------------------------------------------ cases


def quantize_config(on_cuda: bool) -> tuple[dict[str, Any], str]:
    if on_cuda:
        return {"method": "fp8_dynamic", "granularity": "row"}, "fp8_dynamic rowwise"
    return {"method": "int8_weight"}, "int8_weight (no CUDA here: fp8 needs a GPU)"


def profile_for(case: str, args: argparse.Namespace, quant: dict[str, Any]) -> dict[str, Any]:
    if case.startswith("fp8"):
        return {"name": case, "transformer": {"quantize": quant},
                "compile": {"mode": "regional", "inductor_flags": not args.no_inductor_flags}}
    return {"name": case}


def loras_for(case: str, lora_a: str, rank: int) -> list[dict[str, Any]]:
    if case == "fp8_fuse":
        return [{"path": lora_a, "adapter_name": "lora", "mode": "fuse"}]
    if case == "fp8_hotswap":
        return [{"path": lora_a, "adapter_name": "lora", "mode": "hotswap", "max_rank": rank}]
    if case == "bf16_adapter":
        return [{"path": lora_a, "adapter_name": "lora", "mode": "adapter"}]
    return []


def summary(m: Measurement) -> dict[str, Any]:
    return {"status": m.status, "error": m.error, "latency_s": m.latency_s, "latency_runs": m.latency_runs,
            "first_call_s": m.first_call_s, "step_s": m.step_s, "denoise_s": m.denoise_s, "decode_s": m.decode_s,
            "peak_allocated": m.peak_allocated, "peak_reserved": m.peak_reserved, "host_ram_peak": m.host_ram_peak}


def psnr(a: Measurement, b: Measurement) -> float | None:
    if a.images is None or b.images is None:
        return None
    return round(compare(a, b)["psnr"], 2)


def free_memory() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_case(case: str, args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    workload = Workload(prompts=(PROMPT,), steps=args.steps, height=args.height, width=args.width,
                        runs=args.runs, warmup=1)
    row: dict[str, Any] = {"case": case, "baseline": BASELINE.get(case)}
    pipe: Any = None
    try:
        t0 = time.perf_counter()
        pipe = load(args.model, device=args.device, dtype=args.dtype)
        row["load_s"] = round(time.perf_counter() - t0, 2)
        say(f"{case}: loaded {args.model} in {row['load_s']} s")
        if state.get("loras") is None:
            state["loras"] = make_lora_files(pipe.transformer, args.out, args.rank)
        lora_a, lora_b = state["loras"]
        profile = profile_for(case, args, state["quant"])
        loras = loras_for(case, lora_a, args.rank)
        row["profile"], row["loras"] = profile, loras
        report = fluxtune.apply(profile, pipe, loras=loras)
        row["apply_s"] = round(report.seconds(), 2)
        row["apply"] = [f"{a.knob} {a.component}: {a.detail}" for a in report.applied
                        if a.knob in ("loras", "quantize", "compile")]
        for line in row["apply"]:
            say(f"{case}:   {line}")

        def progress(msg: str) -> None:
            say(f"{case}: {msg}")

        with DynamoWatch() as watch:
            m = measure(pipe, workload, progress=progress)
        row.update(summary(m))
        row["compiled_frames"] = watch.frames
        say(f"{case}: {m.summary()}; step {m.step_s or 0:.4f} s; dynamo frames compiled {watch.frames}")
        base = state["measured"].get(row["baseline"]) if row["baseline"] else None
        if base is not None:
            row["psnr_vs_baseline"] = psnr(m, base)
        if m.ok and case in ("fp8", "bf16"):
            state["measured"][case] = m
        if case in ("fp8_hotswap", "fp8_fuse") and m.ok:
            row.update(swap_round_trip(pipe, case, lora_a, lora_b, m, args))
    except Exception as e:  # one failed case must not lose the others
        row.update(status="error", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        say(f"{case}: FAILED {row['error']}")
    finally:
        del pipe
        free_memory()
        if torch.cuda.is_available():
            say(f"{case}: freed, {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated")
    return row


def swap_round_trip(pipe: Any, case: str, lora_a: str, lora_b: str, first: Measurement,
                    args: argparse.Namespace) -> dict[str, Any]:
    """set_loras to B, one call, back to A, one call; (re)compilations counted over all of it."""
    once = Workload(prompts=(PROMPT,), steps=args.steps, height=args.height, width=args.width, runs=1, warmup=0)
    out: dict[str, Any] = {}
    with DynamoWatch() as watch:
        try:
            for label, path in (("b", lora_b), ("a", lora_a)):
                t0 = time.perf_counter()
                mode = "hotswap" if case.endswith("hotswap") else "fuse"
                fluxtune.set_loras(pipe, [{"path": path, "adapter_name": "lora", "mode": mode}])
                out[f"swap_to_{label}_s"] = round(time.perf_counter() - t0, 3)
                m = measure(pipe, once)
                if not m.ok:
                    raise RuntimeError(f"call after the swap to {label}: {m.error}")
                out[f"after_swap_to_{label}_latency_s"] = m.latency_s
                out[f"after_swap_to_{label}_psnr_vs_a"] = psnr(m, first)
                say(f"{case}: swapped to LoRA {label} in {out[f'swap_to_{label}_s']} s, next call {m.latency_s:.3f} s, "
                    f"PSNR vs LoRA a {out[f'after_swap_to_{label}_psnr_vs_a']} dB")
        except Exception as e:
            out["swap_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            say(f"{case}: swap FAILED {out['swap_error']}")
    out["swap_compiled_frames"], out["swap_recompiles"] = watch.frames, watch.recompiles
    say(f"{case}: during swaps and the calls after them: {watch.frames} frame(s) compiled, "
        f"{watch.recompiles} guard failure(s)")
    return out


# ---------------------------------------------------------------------------------------- results


def add_costs(rows: list[dict[str, Any]]) -> None:
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        base = by_case.get(r.get("baseline") or "")
        if base and r.get("latency_s") and base.get("latency_s"):
            r["cost_pct"] = round(100.0 * (r["latency_s"] / base["latency_s"] - 1.0), 2)
            if base.get("step_s") and r.get("step_s"):
                r["step_cost_pct"] = round(100.0 * (r["step_s"] / base["step_s"] - 1.0), 2)
        if r["case"].startswith("fp8_") and "cost_pct" in r:
            ok = r["cost_pct"] <= TARGET_COST_PCT
            if r["case"] in ("fp8_hotswap", "fp8_fuse"):
                ok = ok and "swap_error" not in r and r.get("swap_compiled_frames") == 0 \
                    and r.get("swap_recompiles") == 0
            r["target_met"] = ok


def fmt(v: Any, spec: str = ".3f", suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def gib(v: int | None) -> str:
    return "" if v is None else f"{v / 2**30:.2f}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# LoRA cost: {meta['model']}, {meta['size']}, {meta['steps']} steps, {meta['runs']} timed run(s)",
             "", f"device: {meta['device']}; quantization of the fp8 cases: {meta['quantize']}; "
             f"regional compile, inductor flags {'off' if meta['no_inductor_flags'] else 'on'}; LoRA rank "
             f"{meta['rank']}; torch {meta['torch']}, diffusers {meta['diffusers']}", "",
             "| case | status | latency s | cost vs baseline | first call s | step s | peak alloc GiB | "
             "peak reserved GiB | PSNR vs baseline dB | recompiles on swap | target met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        swap = ""
        if r["case"] in ("fp8_hotswap", "fp8_fuse") and "swap_compiled_frames" in r:
            swap = f"{r.get('swap_compiled_frames', '')} frames / {r.get('swap_recompiles', '')} guard failures"
            if r.get("swap_error"):
                swap += f" (swap failed: {r['swap_error'][:120]})"
        cost = fmt(r.get("cost_pct"), "+.1f", "%")
        if cost:
            cost += f" (vs {r['baseline']})"
        status = r.get("status", "") + (f": {r['error'][:120]}" if r.get("error") else "")
        met = r.get("target_met")
        target = "" if met is None else ("yes" if met else "NO")
        lines.append(f"| {r['case']} | {status} | {fmt(r.get('latency_s'))} | {cost} | {fmt(r.get('first_call_s'), '.1f')} "
                     f"| {fmt(r.get('step_s'), '.4f')} | {gib(r.get('peak_allocated'))} | {gib(r.get('peak_reserved'))} "
                     f"| {fmt(r.get('psnr_vs_baseline'), '.1f')} | {swap} | {target} |")
    lines += ["", f"Target: a LoRA on the quantized, compiled profile costs at most {TARGET_COST_PCT:g}% latency "
              "and nothing recompiles on a swap. Cost = latency / the no-LoRA baseline's latency - 1."]
    for hot in (r for r in rows if r["case"] in ("fp8_hotswap", "fp8_fuse") and "after_swap_to_b_latency_s" in r):
        lines.append(f"{hot['case']} after swaps: swap to B took {hot.get('swap_to_b_s')} s, the call after it "
                     f"{hot['after_swap_to_b_latency_s']:.3f} s (PSNR vs A {hot.get('after_swap_to_b_psnr_vs_a')} dB); "
                     f"back to A {hot.get('swap_to_a_s')} s, then {hot.get('after_swap_to_a_latency_s', 0):.3f} s "
                     f"(PSNR vs A {hot.get('after_swap_to_a_psnr_vs_a')} dB).")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    add_costs(rows)
    (out / "lora_cost.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=2, default=str))
    (out / "lora_cost.md").write_text(markdown(meta, rows))


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev-replica")
    p.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-inductor-flags", action="store_true",
                   help="compile without flux-fast's inductor flags (shorter compile; the default keeps them)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    args = p.parse_args(argv)
    try:
        args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size {args.size!r}: give HEIGHTxWIDTH, e.g. 1024x1024")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    args.cases = [c for c in CASES if c in cases]  # baselines first
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = Path(args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers

    on_cuda = args.device.startswith("cuda")
    quant, quant_label = quantize_config(on_cuda)
    meta = {"model": args.model, "size": args.size, "steps": args.steps, "runs": args.runs, "rank": args.rank,
            "dtype": args.dtype, "device": torch.cuda.get_device_name() if on_cuda else "cpu",
            "quantize": quant_label, "no_inductor_flags": args.no_inductor_flags, "cases": args.cases,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "prompt": PROMPT}
    say(f"{args.model} {args.size} {args.steps} steps, runs={args.runs}, cases {','.join(args.cases)}; "
        f"fp8 cases quantize with {quant_label}; results in {args.out}")
    state: dict[str, Any] = {"quant": quant, "loras": None, "measured": {}}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for case in args.cases:
        rows.append(run_case(case, args, state))
        write(args.out, meta, rows)
        say(f"{case}: done ({time.perf_counter() - t0:.0f} s so far)")
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    write(args.out, meta, rows)
    print(markdown(meta, rows), flush=True)
    return 0 if all(r.get("status") == "ok" and "swap_error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
