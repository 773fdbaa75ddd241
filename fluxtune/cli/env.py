"""fluxtune env: what this machine is and which knobs it supports."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", type=int, default=0, help="GPU index (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")


def knob_support(hw: object) -> dict[str, str]:
    """Each knob family -> 'yes' or why not, for this machine."""
    has_cuda = getattr(hw, "has_cuda", False)
    no_gpu = "no (needs a CUDA GPU)"
    cc = getattr(hw, "compute_capability", None)
    cc_text = f"{cc[0]}.{cc[1]}" if cc else "none"
    return {
        "offload (model/sequential/group/partial)": "yes" if has_cuda else no_gpu,
        "quantize int8_weight / int8_dynamic": "yes",
        "quantize int4_weight": "yes" if has_cuda else no_gpu,
        "quantize fp8_weight / fp8_dynamic tensorwise": "yes" if getattr(hw, "supports_fp8", False)
        else f"no (needs SM 8.9, this is {cc_text})",
        "quantize fp8_dynamic rowwise": "yes" if getattr(hw, "supports_fp8_rowwise", False)
        else f"no (needs SM 9.0, this is {cc_text})",
        "layerwise_casting (fp8 storage)": "yes",
        "cache (first_block/taylorseer/magcache)": "yes",
        "compile": "yes" + ("" if has_cuda else " (CPU inductor; CUDA-graph modes need a GPU)"),
        "budget enforcement": "yes (process memory cap)" if has_cuda else "no GPU: the budget bounds host memory in search",
    }


def run(args: argparse.Namespace) -> int:
    from fluxtune.hardware import detect_hardware, library_versions

    hw = detect_hardware(args.gpu)
    versions, knobs = library_versions(), knob_support(hw)
    data = {"hardware": hw.fingerprint(), "versions": versions, "knobs": knobs}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]hardware[/]: {hw.describe()}")
    console.print("[bold]versions[/]: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    table = Table("knob", "supported here")
    for k, v in knobs.items():
        table.add_row(k, v)
    console.print(table)
    return 0
