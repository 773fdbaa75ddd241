"""fluxtune env: what this machine is and which knobs it supports."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", type=int, default=0, help="GPU index (default 0)")
    p.add_argument("--gpus", action="store_true", help="list the GPU table (the cards --emulate and predict know)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _fp16acc_support(hw: object) -> str:
    from fluxtune.tuning.matmul import speedup_note

    return "yes: " + speedup_note(hw)


def knob_support(hw: object) -> dict[str, str]:
    """Each knob family -> 'yes' or why not, for this machine."""
    from fluxtune.tuning.nf4 import available as nf4_available

    has_cuda = getattr(hw, "has_cuda", False)
    no_gpu = "no (needs a CUDA GPU)"
    cc = getattr(hw, "compute_capability", None)
    cc_text = f"{cc[0]}.{cc[1]}" if cc else "none"
    return {
        "offload (model/sequential/group/partial)": "yes" if has_cuda else no_gpu,
        "quantize int8_weight / int8_dynamic": "yes",
        "quantize int4_weight": "yes" if has_cuda else no_gpu,
        "quantize nf4 (bitsandbytes)": "yes" if nf4_available() else "no (pip install 'fluxtune[nf4]')",
        "quantize fp8_weight / fp8_dynamic tensorwise": "yes" if getattr(hw, "supports_fp8", False)
        else f"no (needs SM 8.9, this is {cc_text})",
        "quantize fp8_dynamic rowwise": "yes" if getattr(hw, "supports_fp8_rowwise", False)
        else f"no (needs SM 9.0, this is {cc_text})",
        "layerwise_casting (fp8 storage)": "yes",
        "matmul.fp16_accumulation": _fp16acc_support(hw) if has_cuda else "no effect on CPU (a cuBLAS setting)",
        "cache (first_block/taylorseer/magcache)": "yes",
        "compile": ("yes" if getattr(hw, "can_compile", True) else
                    "no (Triton is not installed: pip install triton, or triton-windows on Windows)")
        + ("" if has_cuda else " (CPU inductor; CUDA-graph modes need a GPU)"),
        "budget enforcement": "yes (process memory cap)" if has_cuda else "no GPU: the budget bounds host memory in search",
    }


def _gpu_table(as_json: bool) -> int:
    from fluxtune.gpus import gpu_table
    from fluxtune.presets import preset_for_card

    specs = gpu_table()
    if as_json:
        print(json.dumps([s.model_dump() | {"class": s.capability} for s in specs], indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("card", "SM", "class", "memory", "bf16 / fp8 / int8 TFLOPS (dense)", "PCIe", "host->device",
                  "FLUX preset", title="fluxtune's GPU table (fluxtune/data/gpus.yaml, sources inside)")
    for s in specs:
        rates = " / ".join(f"{s.rate(k):g}" if s.rate(k) else "-" for k in ("bf16", "fp8", "int8"))
        link = f"{s.pcie_gen}.0 x{s.pcie_lanes}" if s.pcie_gen else "?"
        table.add_row(s.name, f"{s.sm[0]}.{s.sm[1]}", s.capability, f"{s.memory_gib:g} GiB", rates, link,
                      f"{s.h2d_gbs:g} GB/s", preset_for_card(s.memory_gib) or "-")
    Console(width=160).print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    from fluxtune.hardware import detect_hardware, emulation_note, library_versions, probe

    if args.gpus:
        return _gpu_table(args.json)
    hw = detect_hardware(args.gpu)
    versions, knobs = library_versions(), knob_support(hw)
    spec = hw.spec()
    card: dict[str, object] | None = None
    if spec is not None:
        card = {"table": spec.name, "class": spec.capability, "h2d_gbs": spec.h2d_gbs, "tflops": spec.tflops}
    elif hw.has_cuda:
        # Not in the table: a short measured probe stands in for the table's figures.
        card = {"table": None, "class": hw.capability, "probe": probe(hw.gpu_index or 0)}
    data = {"hardware": hw.fingerprint(), "card": card, "versions": versions, "knobs": knobs}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    from fluxtune.presets import preset_for_card

    console = Console()
    console.print(f"[bold]hardware[/]: {hw.describe()}")
    note = emulation_note(hw)
    if note:
        console.print(note)
    if spec is not None:
        console.print(f"[bold]GPU table[/]: {spec.describe()}")
        console.print(f"[bold]FLUX preset for this card[/]: {preset_for_card(spec.memory_gib) or 'none (< 8 GB)'} "
                      f"(variant for class {spec.capability})")
    elif card is not None:
        p = card["probe"]
        console.print(f"[bold]GPU table[/]: {hw.gpu_name} is not listed; measured probe: host->device "
                      f"{p['h2d_gbs']} GB/s, bf16 matmul {p['bf16_tflops']} TFLOPS (4096^3)")  # type: ignore[index]
    console.print("[bold]versions[/]: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    table = Table("knob", "supported here")
    for k, v in knobs.items():
        table.add_row(k, v)
    console.print(table)
    return 0
