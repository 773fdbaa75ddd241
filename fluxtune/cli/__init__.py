"""The ``fluxtune`` command. One module per subcommand; heavy imports happen inside the commands,
so ``fluxtune --help`` answers without importing torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fluxtune import __version__, quiet
from fluxtune.errors import (
    FluxtuneError,
    IncompatibleKnobsError,
    PipelineError,
    ProfileError,
    UnsupportedHardwareError,
)

COMMANDS = {
    "env": "hardware, library versions and which knobs this machine supports",
    "show": "validate a profile (with overrides) and print it resolved",
    "knobs": "every key a profile sets: choices, default and what it does",
    "presets": "list the shipped profiles",
    "generate": "apply a profile to a model and draw images; prints latency and peak memory",
    "search": "find the best profile for a budget and objective by measuring real runs",
    "bench": "profiles side by side with the plain diffusers recipes, under one memory cap",
    "report": "rebuild the tables and plots of a search study",
    "sensitivity": "rank a transformer's layer groups by the harm quantization does, for quantize.exclude",
    "predict": "a profile's predicted latency on a named GPU from the GPU table (not a measurement)",
}

# Bad input exits 2, a failure while running exits 1 (DESIGN.md, CLI rules).
_USAGE_ERRORS = (ProfileError, IncompatibleKnobsError, PipelineError, UnsupportedHardwareError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxtune",
        description="Measured, budget-constrained profiles for diffusion transformer pipelines (FLUX.1, FLUX.2, "
                    "Qwen-Image, DiT).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and the libraries' own log lines and warnings")
    parser.add_argument("--version", action="version", version=f"fluxtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"fluxtune.cli.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    return parser


def _one_line_warnings() -> None:
    """fluxtune's own warnings as ``fluxtune: warning: ...`` lines (not file:line plus source)."""
    import warnings

    from fluxtune.errors import FluxtuneWarning

    shown = warnings.showwarning
    if getattr(shown, "_fluxtune", False):
        return

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        if isinstance(category, type) and issubclass(category, FluxtuneWarning):
            print(f"fluxtune: warning: {message}", file=sys.stderr)
            return
        shown(message, category, filename, lineno, file, line)  # type: ignore[arg-type]

    show._fluxtune = True  # type: ignore[attr-defined]
    warnings.showwarning = show
    warnings.simplefilter("default", FluxtuneWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad usage or input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # how the command was invoked, for its records
    if args.command is None:
        parser.print_help()
        return 2
    if args.debug:
        quiet.loud()
    else:
        quiet.quiet()
    _one_line_warnings()
    module = importlib.import_module(f"fluxtune.cli.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("fluxtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (``fluxtune knobs | head``): not an error; stdout is closed, so flush nowhere.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FluxtuneError as e:
        if args.debug:
            raise
        print(f"fluxtune {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, _USAGE_ERRORS) else 1
    except Exception as e:  # a bug or a library failure: one line unless --debug
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"fluxtune {args.command}: failed: {type(e).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
