#!/usr/bin/env python
"""Train the built-in mini models flux-mini and dit-mini (see fluxtune/minimodels/README.md).

    python scripts/train_minimodels.py --out fluxtune/minimodels/checkpoints            # GPU: ~7 min
    python scripts/train_minimodels.py --out /tmp/mini --device cpu --steps 300         # CPU smoke run

Renders its own training pictures (coloured shapes), trains a VAE, then flux-mini (FluxPipeline) and
dit-mini (DiTPipeline), saves them with save_pretrained under --out, reloads them with from_pretrained,
renders the evaluation prompts and prints their mean prompt adherence (sample grids: --out/*.png).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run from a checkout without installing the package. The import stays under the guard so that the
    # scene-rendering worker processes (spawned, they re-import this file) do not load torch.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fluxtune.minimodels.training import main

    sys.exit(main())
