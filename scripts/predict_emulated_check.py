"""Check fluxtune's latency model against the shipped presets' emulated measurements.

    python scripts/predict_emulated_check.py [--markdown]      # CPU, ~10 s (work counted on meta tensors)

An emulated measurement ran on the H200 with the card's memory, capability class and host->device rate:
its latency is the H200's compute with the card's link, so it is predicted on the H200's row of the GPU
table with the card's ``h2d_gbs`` (:func:`fluxtune.predict.check_against_emulated`). This checks the work
counting and the copy/compute overlap on every family (FLUX.2 and Qwen-Image are in no fit), not the
per-card efficiencies (scripts/predict_check.py does that against published real-card figures).
"""

from __future__ import annotations

import argparse

from fluxtune.predict import check_against_emulated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.markdown:
        print("| preset / variant | card emulated | model | measured | predicted | error |")
        print("|---|---|---|---|---|---|")
    for c in check_against_emulated():
        if args.markdown:
            print(f"| `{c.preset}` / {c.variant} | {c.card} | {c.model} | {c.measured_s:.2f} s | {c.predicted_s:.2f} s "
                  f"| {100 * c.error:+.0f} % |")
        else:
            print(f"{c.preset:22s} {c.variant:7s} {c.card:10s} {c.model:24s} measured {c.measured_s:7.2f} s  "
                  f"predicted {c.predicted_s:7.2f} s  {100 * c.error:+5.0f} %")


if __name__ == "__main__":
    main()
