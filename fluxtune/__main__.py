"""python -m fluxtune ..."""

from fluxtune.cli import run

run()
