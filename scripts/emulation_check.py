"""Card emulation on a real GPU: the emulated description, paced copies, and the process footprint outside
PyTorch's allocator (issue 14). Prints one JSON object.

    python scripts/emulation_check.py ["RTX 4060"]
"""

from __future__ import annotations

import json
import sys

import torch

from fluxtune.hardware import activate_emulation, detect_hardware, process_memory_used
from fluxtune.tuning.streaming import CopyPacer


def _copy_seconds(host: torch.Tensor, pacer: CopyPacer | None) -> float:
    side = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(side)
    with torch.cuda.stream(side):
        host.to("cuda", non_blocking=True)
        if pacer is not None:
            pacer.pace(host.numel())
    end.record(side)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def main() -> None:
    card = sys.argv[1] if len(sys.argv) > 1 else "RTX 4060"
    real = detect_hardware()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    context = {"nvml_process": process_memory_used(0), "reserved": torch.cuda.memory_reserved(0)}
    hw = activate_emulation(card)
    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    pacer = CopyPacer(hw.h2d_gbs or 1.0, torch.device("cuda", 0))
    plain = min(_copy_seconds(host, None) for _ in range(3))
    paced = min(_copy_seconds(host, pacer) for _ in range(3))
    out = {
        "real": real.describe(), "emulated": detect_hardware().describe(), "fingerprint": hw.fingerprint(),
        "context_after_init": context,
        "copy_1GiB_s": {"plain": plain, "paced": paced, "expected_paced": 2**30 / (hw.h2d_gbs * 1e9)},  # type: ignore[operator]
        "rates_gbs": {"plain": 2**30 / plain / 1e9, "paced": 2**30 / paced / 1e9, "target": hw.h2d_gbs},
        "sleep_cycles_per_s": pacer.cycles_per_s, "native_gbs": pacer.native_gbs,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
