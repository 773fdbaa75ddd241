"""Does a worker session free the GPU after a partial-residency bf16 run when the next profile needs
pristine weights? (issue 15: a search's trials ran out of memory after a streamed bf16 reference.)

    python scripts/restore_leak_check.py [MODEL_DIR]     # default: tiny-flux saved to a temp dir
"""

from __future__ import annotations

import gc
import sys
import tempfile
import weakref

import torch

from fluxtune import pipelines
from fluxtune.profile import validate_profile
from fluxtune.worker.protocol import RunRequest, WorkerSpec
from fluxtune.worker.session import TrialSession


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else None
    if directory is None:
        directory = tempfile.mkdtemp()
        pipelines.load("tiny-flux", dtype="bfloat16").save_pretrained(directory)
    spec = WorkerSpec(model=directory, device="cuda:0", dtype="bfloat16",
                      workload={"prompts": ["a red fox"], "seeds": [0], "steps": 4, "height": 256, "width": 256,
                                "runs": 1, "warmup": 0}, budget_bytes=None, study_dir=tempfile.mkdtemp())
    s = TrialSession(spec)
    base = {"family": "flux", "compile": {"mode": "off"}}
    partial = validate_profile({**base, "transformer": {"offload": {"mode": "partial", "resident_blocks": 1}},
                                "text_encoder_2": {"offload": {"mode": "partial", "resident_blocks": 0}}}, source="check")
    fp8 = validate_profile({**base, "transformer": {"quantize": {"method": "fp8_dynamic"}}}, source="check")
    print("after load", torch.cuda.memory_allocated() >> 20, "MiB")
    out = s.run(RunRequest(partial))
    print("partial bf16:", out.status, out.error, torch.cuda.memory_allocated() >> 20, "MiB")
    old = weakref.ref(s.pipe.transformer)
    s._restore()
    gc.collect()
    print("after restore", torch.cuda.memory_allocated() >> 20, "MiB; old transformer alive:", old() is not None)
    if old() is not None:
        for r in gc.get_referrers(old()):
            print("  referrer:", type(r).__name__, str(r)[:200])
            for r2 in gc.get_referrers(r)[:5]:
                print("    <-", type(r2).__name__, str(r2)[:200])
    out = s.run(RunRequest(fp8))
    print("fp8:", out.status, out.error, torch.cuda.memory_allocated() >> 20, "MiB")


if __name__ == "__main__":
    main()
