"""Measuring a pipeline honestly: timings, peak memory and image quality against a reference.

One module per concern: :mod:`.workload` (what is rendered), :mod:`.result` (the Measurement),
:mod:`.timing` (``measure`` and the per-call split), :mod:`.sampler` (NVML/RSS sampling thread),
:mod:`.quality` (PSNR/SSIM), :mod:`.reference` (the reference run on disk), :mod:`.dynamo`
(recompilation counting). Import the public names from here.

``measure(pipe, workload)`` runs warm-up calls (reported apart, as ``first_call_s``: compile happens
there), then ``workload.runs`` timed repeats of the whole workload, and returns a :class:`Measurement`.
Nothing escapes it but ``KeyboardInterrupt``: running out of memory is ``status="oom"``, a peak above
the budget ``"over_budget"``, any other failure ``"error"`` with a one-line message.

Definitions (all seconds are per ``pipe()`` call, medians over the timed calls):

* ``latency_s``: wall time of one call (clock read after ``torch.cuda.synchronize``).
* ``text_encode_s``: inside ``pipe.encode_prompt`` (wrapped for the measurement).
* ``step_s``: one denoising step; steps are delimited by ``callback_on_step_end`` (FLUX), or by
  the scheduler's ``step`` for pipelines without callbacks (DiT). The first step starts where text
  encoding ends (or at the call's start), so it also holds latent preparation.
* ``denoise_s``: from the start of the first step to the end of the last.
* ``decode_s``: from the end of the last step to the end of the call (VAE decode + postprocess).

On a GPU the split is timed with CUDA events (no synchronisation inside the call, so prefetching
overlaps as it would unmeasured); on CPU with ``time.perf_counter``. Generators are CPU generators
(``torch.Generator().manual_seed(seed)``), so the same seeds give comparable images on any device and
profile.
"""

from __future__ import annotations

from fluxtune.measure.dynamo import DynamoWatch
from fluxtune.measure.quality import PSNR_CAP, compare, quality_drop
from fluxtune.measure.reference import Reference
from fluxtune.measure.result import Measurement, classify_peak
from fluxtune.measure.timing import measure
from fluxtune.measure.workload import DEFAULT_CLASS_LABELS, DEFAULT_PROMPTS, Workload
from fluxtune.status import Status

__all__ = [
    "DEFAULT_CLASS_LABELS",
    "DEFAULT_PROMPTS",
    "PSNR_CAP",
    "DynamoWatch",
    "Measurement",
    "Reference",
    "Status",
    "Workload",
    "classify_peak",
    "compare",
    "measure",
    "quality_drop",
]
