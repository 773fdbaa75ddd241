"""Build hook: ship the presets of the top-level ``profiles/`` (their one source) inside the package as
``fluxtune/profiles/*.yaml``, so that a wheel or a non-editable ``pip install .`` has them too.

Everything else is in pyproject.toml. An editable install reads ``profiles/`` in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProfiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fluxtune" / "profiles"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / "profiles").glob("*.yaml")):
            shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithProfiles})
