"""Is cuDNN attention right and faster than flash attention here, at FLUX.1-dev's attention shape?

The presets ask for ``attention.backend: _native_cudnn``; a GPU run checks it before benching them
(``scripts/h200_flux_bench.sh``). Prints one JSON line: the two kernels' medians, their largest
difference, and ``use_cudnn`` (right to bf16 rounding and at least 3 % faster).

    python scripts/attention_check.py [--seq 4608] [--heads 24] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa


def time_backend(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int = 30) -> float:
    with sdpa_kernel(backend):
        for _ in range(3):
            sdpa(q, k, v)
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            sdpa(q, k, v)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000.0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096 + 512, help="image + text tokens (1024x1024, 512 T5 tokens)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq, args.dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "shape": [1, args.heads, args.seq, args.dim]}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = sdpa(q, k, v).float()
    out["flash_s"] = time_backend(SDPBackend.FLASH_ATTENTION, q, k, v)
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            got = sdpa(q, k, v).float()
        out["max_abs_diff"] = float((got - ref).abs().max())
        out["cudnn_s"] = time_backend(SDPBackend.CUDNN_ATTENTION, q, k, v)
        out["use_cudnn"] = bool(out["max_abs_diff"] < 2e-2 and out["cudnn_s"] < 0.97 * out["flash_s"])  # type: ignore[operator]
    except RuntimeError as e:
        out.update(cudnn_error=str(e).splitlines()[0], use_cudnn=False)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
