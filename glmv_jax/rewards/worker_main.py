"""Child process of workers.WorkerPool: runs named functions on request, one at a time.

    python -m glmv_jax.rewards.worker_main MEMORY_LIMIT_MB MODULE [MODULE ...]

imports each MODULE (calling its `warm_up()` if it has one), then speaks newline-delimited JSON on its
original stdout: first {"ready": true, "warmed": [the MODULEs whose warm_up() ran]} (or {"fatal": "..."} and
exit 1), so every library is imported before the first timed call; then for each request
{"fn": "package.module:function", "args": [...], "timeout_s": t} on stdin one reply {"value": ...},
{"error": "..."} or {"timed_out": true}. The timeout is a SIGALRM timer (this process is single-threaded)
raising a BaseException, which library `except Exception` blocks cannot swallow; work that never yields
to the interpreter (one huge C-level big-integer operation) is left to the parent, which kills us.
Library output is sent to stderr so it cannot corrupt the protocol. Exits when stdin closes.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys


class _Alarm(BaseException):
    """Raised inside the running function when its time is up."""


def _on_alarm(signum, frame):
    raise _Alarm()


def _resolve(path: str):
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _limit_memory(megabytes: int) -> None:
    if megabytes > 0:
        import resource
        limit = megabytes * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str]) -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    warmed = []
    try:
        _limit_memory(int(argv[0]))
        for module_name in argv[1:]:
            module = importlib.import_module(module_name)
            if hasattr(module, "warm_up"):
                module.warm_up()
                warmed.append(module_name)
    except Exception as error:  # reported to the parent, which raises it as a setup error
        send({"fatal": f"{type(error).__name__}: {error}"})
        return 1
    signal.signal(signal.SIGALRM, _on_alarm)
    send({"ready": True, "warmed": warmed})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            fn = _resolve(request["fn"])
            signal.setitimer(signal.ITIMER_REAL, request["timeout_s"])
            try:
                value = fn(*request["args"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            send({"value": value})
        except _Alarm:
            send({"timed_out": True})
        except Exception as error:  # a failure on one input must not end the worker
            send({"error": f"{type(error).__name__}: {error}"[:500]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
