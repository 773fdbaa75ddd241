"""A throwaway PostgreSQL cluster on loopback, for tests of ``--storage postgresql://...``.

Uses the server binaries of the Debian ``postgresql`` package (``/usr/lib/postgresql/*/bin``, or
``initdb``/``pg_ctl`` on PATH) and psycopg 3 (``pip install -e ".[postgres]"``). The cluster lives
in a fresh temporary folder, listens only on 127.0.0.1 on a free port with ``trust`` auth, and is
stopped and deleted by :meth:`PgCluster.stop`. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` user (which the Debian package creates) through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres``, newest version first; None if absent."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key, reverse=True)
    for initdb in candidates:
        if (initdb.parent / "pg_ctl").exists() and (initdb.parent / "postgres").exists():
            return initdb.parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    return None


def skip_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (3) is not installed (pip install -e '.[postgres]' or 'psycopg[binary]')"
    if find_bindir() is None:
        return ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin or initdb on PATH); "
                "install the Debian package: apt-get install -y postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return f"running as root but there is no {SUPERUSER!r} user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing: cannot drop privileges for the server"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """A running cluster; ``url`` points at database ``db`` as the trust-authenticated superuser."""

    bindir: Path
    root: Path
    port: int
    db: str
    as_user: str | None  # run the binaries as this user (root only)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        # The URL the README documents: SQLAlchemy 2.1 opens postgresql:// with psycopg 3 (the extra's driver).
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{self.db}"

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.as_user, "--", *cmd] if self.as_user else cmd

    def _run(self, *args: str, timeout: float = 120) -> None:
        res = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-1500:]}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.datadir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "server.log"), "-o", opts,
                  "-w", "-t", "60", "start")
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                                       autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.db}"')
        conn.close()

    def stop(self) -> None:
        """Stop the server (fast mode) and delete its folder."""
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        log = self.root / "server.log"
        return log.read_text(errors="replace")[-n:] if log.exists() else ""


@contextlib.contextmanager
def cluster(db: str = "fluxtune") -> Iterator[PgCluster]:
    """Start a cluster with database ``db``, yield it, stop and delete it.

    Raises:
        RuntimeError: the binaries are missing or the server did not start (see ``skip_reason`` first).
    """
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    # Not under pytest's tmp_path: as root that tree is private to root and the server user cannot enter it.
    root = Path(tempfile.mkdtemp(prefix="fluxtune-pg-"))
    as_user = None
    if os.geteuid() == 0:
        as_user = SUPERUSER
        pw = pwd.getpwnam(SUPERUSER)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    os.chmod(root, 0o700)
    c = PgCluster(bindir=bindir, root=root, port=free_port(), db=db, as_user=as_user)
    try:
        c.start()
        yield c
    finally:
        c.stop()
