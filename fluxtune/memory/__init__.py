"""The analytic VRAM (and host RAM) model: predict a profile's peak before running it.

The search uses it to skip trials that certainly cannot fit a budget, and to say what the smallest
budget the model can predict is. It is arithmetic over :class:`ModelFacts` (parameter counts per
component, per layer and per block, and the shapes that size activations), so importing this module
and calling :func:`predict` never needs torch; only building facts from modules does.

How the peak is modelled. A call runs in phases, one component active at a time: ``text_encoder``
(CLIP), ``text_encoder_2`` (T5), ``transformer`` (all denoising steps), ``vae`` (decode). In each
phase the GPU holds (a) the weights of every component that is resident at that moment, which
depends on its offload mode, and (b) the activations of the active component. The allocator peak
is the largest phase. The constants below were fitted to allocator peaks of the FLUX.1-dev replica
on an H200 (reference/h200-measurements.md; its "GB" columns are GiB: at 512x512 the peak, 32.1,
is above the 31.4 GiB of weights only when read as GiB), all in GiB:

  profile (FLUX 1024x1024, 512 text tokens, bf16)      measured   predicted
  everything resident                                  33.9       33.8
  everything resident, 512x512                         32.1       32.0
  model offload                                        22.7       22.7
  group offload, leaf level, streams                    2.4        2.4
  group offload, block level, streams                   9.1        9.1  (T5 has no block list)
  int8 weight-only transformer                         22.8       22.7
  fuse_qkv + compile + fp8 rowwise transformer         24.8       24.7  (fusing keeps q/k/v too)
  DiT-XL/2 256x256, batch 1 / batch 16           1.77 / 3.62  1.70 / 3.90

Three numbers come out: ``peak_allocated`` (what ``torch.cuda.max_memory_allocated`` reports),
``peak_reserved`` = allocated x a fragmentation factor (what ``set_per_process_memory_fraction``
caps, so what must fit under an enforced budget), and ``peak_vram`` = reserved + a constant CUDA
context/workspace overhead (what NVML reports for the process, and what the budget is compared with).
Uncapped runs reserve more than they need (cached blocks are not returned), so measured
``peak_reserved`` of an uncapped run overstates the need; calibrate on allocated peaks.
"""

from __future__ import annotations

from fluxtune.memory.calibration import Calibration
from fluxtune.memory.facts import ComponentFacts, Leaf, ModelFacts
from fluxtune.memory.model import (
    DEFAULT_FRAGMENTATION,
    DEFAULT_OVERHEAD,
    HOST_PROCESS,
    Prediction,
    check_host_ram,
    default_host_budget,
    offload_family,
    predict,
    smallest_feasible_budget,
    transfer_bytes,
)

__all__ = [
    "DEFAULT_FRAGMENTATION",
    "DEFAULT_OVERHEAD",
    "HOST_PROCESS",
    "Calibration",
    "ComponentFacts",
    "Leaf",
    "ModelFacts",
    "Prediction",
    "check_host_ram",
    "default_host_budget",
    "offload_family",
    "predict",
    "smallest_feasible_budget",
    "transfer_bytes",
]
