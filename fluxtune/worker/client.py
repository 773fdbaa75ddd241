"""The parent's side of a worker: start the process, send requests, follow their progress, notice when it dies."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from fluxtune.errors import SearchError
from fluxtune.worker.protocol import (
    Fatal,
    Progress,
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
    """The worker process exited (crash, kill, OOM-killer) while it had a job, or timed out.

    The message says where the job was (``... timed out during run 4 of 10 (3 finished: ...)``);
    ``progress`` is the last :class:`Progress` the worker sent for it (None: none came).
    """

    def __init__(self, message: str, *, timed_out: bool = False, progress: Progress | None = None) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.progress = progress


class Worker:
    """A worker process and the pipe to it."""

    def __init__(self, spec: WorkerSpec) -> None:
        """Start the process and wait until its model is loaded.

        Raises:
            SearchError: the worker could not load the model.
        """
        self.spec = spec
        self.ready: Ready | None = None
        self.last_progress: Progress | None = None
        """The last :class:`Progress` of the current (or last) job; None: none came."""
        self._progress_at = 0.0
        self._on_progress: Callable[[Progress], None] | None = None
        self._loading = False
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
        self._loading = True
        try:
            msg = self._recv(timeout=START_TIMEOUT_S)
        finally:
            self._loading = False
        if isinstance(msg, Fatal):
            self.stop()
            raise SearchError(f"worker on {self.spec.device} could not load {self.spec.model}: {msg.error}")
        assert isinstance(msg, Ready), msg
        self.ready = msg

    def _recv(self, timeout: float) -> Any:
        """The next answer that is not a :class:`Progress` (those are kept, and shown to the job's callback)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.5):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    break
                if not isinstance(msg, Progress):
                    return msg
                self.last_progress, self._progress_at = msg, time.monotonic()
                if self._on_progress is not None:
                    self._on_progress(msg)
                continue
            if not self.proc.is_alive():
                break
        if time.monotonic() < deadline:
            # EOF on the pipe comes before the exit status: reap the dying process, or a crash
            # would read as a time-out.
            self.proc.join(5)
        code = self.proc.exitcode
        if code is None:
            # Timed out: the worker is inside its job and reads no Stop before it ends; kill it now rather
            # than after stop()'s grace period (on a GPU that also frees its memory at once).
            self.abandon()
        self.stop()
        why = "timed out" if code is None else f"exited with code {code}"
        if self._loading:
            why += f" while loading {self.spec.model}"
        elif self.last_progress is not None:  # a time-out also says how long the last stage had been running
            stuck = time.monotonic() - self._progress_at if code is None else None
            why += " " + self.last_progress.where(stuck)
        raise WorkerDied(f"worker on {self.spec.device} {why}", timed_out=code is None, progress=self.last_progress)

    def _job(self, request: RunRequest | ScanRequest, timeout: float,
             on_progress: Callable[[Progress], None] | None) -> Any:
        self.last_progress, self._on_progress = None, on_progress
        try:
            self.conn.send(request)
            return self._recv(timeout)
        finally:
            self._on_progress = None

    def run(self, request: RunRequest, timeout: float,
            on_progress: Callable[[Progress], None] | None = None) -> RunOutcome:
        """Run one profile; raises :class:`WorkerDied` when the process dies or ``timeout`` passes.

        Args:
            on_progress: called (in this thread) with each :class:`Progress` the worker sends before its
                outcome; the last one is ``last_progress`` either way.
        """
        out = self._job(request, timeout, on_progress)
        assert isinstance(out, RunOutcome), out
        return out

    def scan(self, request: ScanRequest, timeout: float) -> ScanOutcome:
        out = self._job(request, timeout, None)
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
