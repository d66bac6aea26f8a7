"""Time-limited calls in child processes: the hard per-response budget of the sympy work.

A pure-Python computation (sympy simplification, a big-integer power) cannot be interrupted from another
thread, and signal alarms work only in the main thread. So the work runs in persistent child processes
(worker_main.py, started with subprocess: no fork of a multithreaded JAX parent, no re-import of the
caller's __main__). Two layers enforce the budget: the child's own SIGALRM timer interrupts the function
at timeout_s and replies "timed out" (the worker survives); the parent waits on the reply pipe until
timeout_s + grace_s and, past that (C-level work the alarm cannot interrupt), kills the child, starts a
replacement in the background and reports the timeout itself. Safe to call from many threads: each call
holds one worker; up to `max_workers` exist.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class CallResult:
    """value: the function's JSON result; timed_out: stopped at the deadline (killed: by killing the worker,
    because its own alarm did not end the call in time); error: the function raised or the worker died."""
    value: Any = None
    timed_out: bool = False
    killed: bool = False
    error: str | None = None


class _Worker:
    """One child process and its reply buffer."""

    def __init__(self, preload: tuple[str, ...], memory_limit_mb: int):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glmv_jax.rewards.worker_main", str(memory_limit_mb), *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)
        self.ready = False
        self.warmed: tuple[str, ...] = ()  # preload modules whose warm_up() ran, from the ready message
        self._buffer = b""

    def read_message(self, deadline: float) -> dict | None:
        """The next reply, or None at the deadline. Raises EOFError if the child exited."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"worker exited with code {self.proc.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            message = self.read_message(time.monotonic() + timeout_s)
        except EOFError as error:
            self.kill()
            raise RuntimeError(f"reward worker failed to start: {error}") from None
        if message is None:
            self.kill()
            raise RuntimeError(f"reward worker did not start within {timeout_s} s")
        if "fatal" in message:
            self.kill()
            raise RuntimeError(f"reward worker failed to start: {message['fatal']}")
        self.ready, self.warmed = True, tuple(message.get("warmed", ()))

    def call(self, fn: str, args: list, timeout_s: float, grace_s: float) -> tuple[CallResult, bool]:
        """(result, whether the worker must be replaced)."""
        self.proc.stdin.write((json.dumps({"fn": fn, "args": args, "timeout_s": timeout_s}) + "\n").encode())
        self.proc.stdin.flush()
        message = self.read_message(time.monotonic() + timeout_s + grace_s)
        if message is None:
            return CallResult(timed_out=True, killed=True), True
        if message.get("timed_out"):
            return CallResult(timed_out=True), False
        if "error" in message:
            return CallResult(error=message["error"]), False
        return CallResult(value=message["value"]), False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


class WorkerPool:
    """Up to `max_workers` child processes that import `preload` modules once (and call their warm_up()).

    call(fn, args, timeout_s) runs "module:function"(*args) (JSON-serialisable in and out) in a worker;
    the clock starts when the request is sent, after the worker is ready (startup is not charged).
    """

    def __init__(self, preload: tuple[str, ...] = (), max_workers: int = 1, startup_timeout_s: float = 300.0,
                 memory_limit_mb: int = 2048):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.preload, self.max_workers = tuple(preload), max_workers
        self.startup_timeout_s, self.memory_limit_mb = startup_timeout_s, memory_limit_mb
        self._idle: list[_Worker] = []
        self._count = 0
        self._condition = threading.Condition()
        _POOLS.add(self)

    def _acquire(self) -> _Worker:
        with self._condition:
            while not self._idle and self._count >= self.max_workers:
                self._condition.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return _Worker(self.preload, self.memory_limit_mb)
        except BaseException:
            self._release(None)
            raise

    def _release(self, worker: _Worker | None) -> None:
        with self._condition:
            if worker is None:
                self._count -= 1
            else:
                self._idle.append(worker)
            self._condition.notify()

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker and start its successor now, so it is warm by the next call."""
        worker.kill()
        try:
            successor = _Worker(self.preload, self.memory_limit_mb)
        except OSError:
            self._release(None)
            return
        self._release(successor)

    def warm_up(self) -> tuple[str, ...]:
        """Start one worker and wait until it is ready; the preload modules it warmed up (ran warm_up() of)."""
        worker = self._acquire()
        try:
            worker.wait_ready(self.startup_timeout_s)
        except BaseException:
            self._release(None)
            raise
        self._release(worker)
        return worker.warmed

    def call(self, fn: str, args: list, timeout_s: float, grace_s: float = 0.2) -> CallResult:
        """Run fn(*args) in a worker; a timed-out result comes back within about timeout_s + grace_s."""
        worker = self._acquire()
        try:
            worker.wait_ready(self.startup_timeout_s)
        except BaseException:
            self._release(None)
            raise
        try:
            result, unresponsive = worker.call(fn, list(args), timeout_s, grace_s)
        except (EOFError, BrokenPipeError) as error:
            self._replace(worker)
            return CallResult(error=f"worker died: {error}")
        except BaseException:
            self._replace(worker)
            raise
        if unresponsive:
            self._replace(worker)
        else:
            self._release(worker)
        return result

    def close(self) -> None:
        """Stop idle workers (busy ones finish their call first)."""
        with self._condition:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close()
