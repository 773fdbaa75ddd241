"""nox sessions: tests (CPU), lint (ruff), typecheck (mypy), gpu (off by default; run on a CUDA machine)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# The local CPU build of torch: an unpinned torch would pull several GB of CUDA packages.
TORCH = "torch==2.13.0"


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (what CI runs)."""
    _install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "fluxtune", "tests", "examples", "scripts", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy", "fluxtune")


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """GPU tests on the FLUX.1-dev replica; needs a CUDA build of torch already in the environment."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "gpu", "-q", *session.posargs)
