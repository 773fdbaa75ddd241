"""The parent's side of a worker: start the process, send requests, notice when it dies."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from typing import Any

from fluxtune.errors import SearchError
from fluxtune.worker.protocol import (
    Fatal,
    Ready,
    RunOutcome,
    RunRequest,
    ScanOutcome,
    ScanRequest,
    Stop,
    WorkerSpec,
)
from fluxtune.worker.session import worker_main

START_TIMEOUT_S = 1800.0
"""Loading a model in a fresh process: the FLUX checkpoint from a cold disk can take minutes."""


class WorkerDied(Exception):
    """The worker process exited (crash, kill, OOM-killer) while it had a job, or timed out."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Worker:
    """A worker process and the pipe to it."""

    def __init__(self, spec: WorkerSpec) -> None:
        """Start the process and wait until its model is loaded.

        Raises:
            SearchError: the worker could not load the model.
        """
        self.spec = spec
        self.ready: Ready | None = None
        self._start()

    @property
    def info(self) -> Ready:
        """What the worker reported once its model was loaded."""
        assert self.ready is not None
        return self.ready

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh CUDA context and allocator per worker
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.spec), daemon=True)
        # A terminal's Ctrl-C reaches the whole process group: the worker must not die of it (the parent
        # decides what an interrupt means). A child started with SIGINT ignored keeps it ignored from its
        # first line; signal handlers can only be changed from the main thread.
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.proc.start()
            finally:
                signal.signal(signal.SIGINT, previous)
        else:
            self.proc.start()
        child.close()
        msg = self._recv(timeout=START_TIMEOUT_S)
        if isinstance(msg, Fatal):
            self.stop()
            raise SearchError(f"worker on {self.spec.device} could not load {self.spec.model}: {msg.error}")
        assert isinstance(msg, Ready), msg
        self.ready = msg

    def _recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.5):
                try:
                    return self.conn.recv()
                except EOFError:
                    break
            if not self.proc.is_alive():
                break
        if time.monotonic() < deadline:
            # EOF on the pipe comes before the exit status: reap the dying process, or a crash
            # would read as a time-out.
            self.proc.join(5)
        code = self.proc.exitcode
        self.stop()
        why = "timed out" if code is None else f"exited with code {code}"
        raise WorkerDied(f"worker on {self.spec.device} {why}", timed_out=code is None)

    def run(self, request: RunRequest, timeout: float) -> RunOutcome:
        """Run one profile; raises :class:`WorkerDied` when the process dies or ``timeout`` passes."""
        self.conn.send(request)
        out = self._recv(timeout)
        assert isinstance(out, RunOutcome), out
        return out

    def scan(self, request: ScanRequest, timeout: float) -> ScanOutcome:
        self.conn.send(request)
        out = self._recv(timeout)
        assert isinstance(out, ScanOutcome), out
        return out

    def restart(self) -> None:
        self.stop()
        self._start()

    def abandon(self) -> None:
        """Kill the worker now, whatever it is running (an interrupted search); a run in flight in
        another thread ends with :class:`WorkerDied`."""
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(Stop())
                self.proc.join(5)
        except (OSError, BrokenPipeError, ValueError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
