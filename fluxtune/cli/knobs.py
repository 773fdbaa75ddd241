"""fluxtune knobs: every key a profile sets, its choices, default and what it does (from the profile's models)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", default=None, help="only keys containing this text, e.g. offload or cache")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    from fluxtune.errors import ProfileError
    from fluxtune.profile import knob_reference

    rows = [r for r in knob_reference() if args.filter is None or args.filter.lower() in r[0].lower()]
    if not rows:
        sections = sorted({r[0].split(".")[0].split("[")[0] for r in knob_reference()})
        raise ProfileError(f"knobs: no key contains {args.filter!r}; sections: {', '.join(sections)}")
    if args.json:
        print(json.dumps([dict(zip(("key", "type", "default", "description"), r, strict=True)) for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("key", "type / choices", "default", "what it does", title="profile keys (text_encoder and "
                  "text_encoder_2 take the transformer's)", title_justify="left")
    for r in rows:
        table.add_row(*(Text(cell) for cell in r))  # plain text: keys hold brackets (offload[mode=partial])
    Console(width=160).print(table)
    print("dotted keys work as overrides: fluxtune show PROFILE transformer.quantize=int8_weight; a union's member "
          "keys (offload[mode=partial].resident) are written without the brackets: transformer.offload.resident")
    return 0
