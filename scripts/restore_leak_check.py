"""Does a worker session free the old pipeline when the next profile needs pristine weights? (issue 15:
a search's trial ran out of memory after a streamed bf16 reference; an H200 search reported every
component of the reference's pipeline alive after the restore.)

    python scripts/restore_leak_check.py [MODEL_DIR]     # default: tiny-flux saved to a temp dir

Runs three first requests on fresh sessions (a partial-residency bf16 trial, the search's streamed
reference with diffusers' leaf group offload, the same with fluxtune's streamer), restores, and prints
what still holds the old transformer, then an fp8 trial.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import types
import weakref

import torch

from fluxtune import pipelines
from fluxtune.profile import validate_profile
from fluxtune.worker.protocol import RunRequest, WorkerSpec
from fluxtune.worker.session import TrialSession


def _chain(obj: object, depth: int = 5, seen: set[int] | None = None, indent: str = "  ") -> None:
    """Print who refers to ``obj``, ``depth`` levels up (skipping frames and this module's lists)."""
    seen = seen if seen is not None else {id(obj)}
    if depth == 0:
        return
    for r in gc.get_referrers(obj):
        if id(r) in seen or isinstance(r, types.FrameType) or r is globals():
            continue
        seen.add(id(r))
        text = str(r)[:150].replace("\n", " ") if not isinstance(r, dict) else f"dict keys {list(r)[:8]}"
        print(f"{indent}<- {type(r).__module__}.{type(r).__name__}: {text}")
        _chain(r, depth - 1, seen, indent + "  ")


def _check(directory: str, role: str, first: dict, name: str) -> None:
    spec = WorkerSpec(model=directory, device="cuda:0", dtype="bfloat16",
                      workload={"prompts": ["a red fox"], "seeds": [0], "steps": 4, "height": 256, "width": 256,
                                "runs": 1, "warmup": 0}, budget_bytes=None, study_dir=tempfile.mkdtemp())
    s = TrialSession(spec)
    base = {"family": "flux", "compile": {"mode": "off"}}
    fp8 = validate_profile({**base, "transformer": {"quantize": {"method": "fp8_dynamic"}}}, source="check")
    out = s.run(RunRequest(validate_profile({**base, **first}, source="check"), role=role))
    print(f"== {name} ({role}):", out.status, out.error, torch.cuda.memory_allocated() >> 20, "MiB")
    old = weakref.ref(s.pipe.transformer)
    s._restore()
    gc.collect()
    print("after restore", torch.cuda.memory_allocated() >> 20, "MiB; old transformer alive:", old() is not None,
          "held:", s.held_after_restore)
    if old() is not None:
        _chain(old())
    out = s.run(RunRequest(fp8))
    print("fp8:", out.status, out.error, torch.cuda.memory_allocated() >> 20, "MiB")
    del s
    gc.collect()


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else None
    if directory is None:
        directory = tempfile.mkdtemp()
        pipelines.load("tiny-flux", dtype="bfloat16").save_pretrained(directory)
    leaf = {"mode": "group", "level": "leaf", "use_stream": True}
    _check(directory, "trial", {"transformer": {"offload": {"mode": "partial", "resident_blocks": 1}},
                                "text_encoder_2": {"offload": {"mode": "partial", "resident_blocks": 0}}}, "partial")
    _check(directory, "reference", {"transformer": {"offload": leaf}, "text_encoder": {"offload": leaf},
                                    "text_encoder_2": {"offload": leaf}, "vae": {"tiling": True}}, "leaf reference")
    _check(directory, "reference", {"transformer": {"offload": {"mode": "partial", "resident_blocks": 1}},
                                    "text_encoder_2": {"offload": {"mode": "partial", "resident_blocks": 0}}},
           "partial reference")


if __name__ == "__main__":
    main()
