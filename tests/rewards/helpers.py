"""Response builders for reward tests, and a deliberately slow verifier run inside the worker process."""
import time

BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"


def respond(box: str, style: str = "glm41v", think: str = "Let me work it out.", before: str = "The answer is ",
            after: str = ".") -> str:
    """A well-formed response whose single box holds `box`."""
    answer = f"{before}{BOX_OPEN}{box}{BOX_CLOSE}{after}"
    if style == "glm41v":
        return f"<think>{think}</think><answer>{answer}</answer>"
    if style in ("glm45v", "glm46v"):
        return f"<think>{think}</think>\n{answer}"
    if style == "glm45v_nothink":
        return answer
    raise ValueError(style)


def sleep_then_equal(reference: str, prediction: str) -> dict:
    """Stands in for math_worker.equivalent; far slower than any time limit."""
    time.sleep(60)
    return {"equal": True}


def echo(value):
    return value


def fail_loudly(reference: str, prediction: str) -> dict:
    raise ArithmeticError(f"cannot compare {reference} and {prediction}")


def sleep_with_alarm_blocked(reference: str, prediction: str) -> dict:
    """Stands in for work the worker's alarm cannot interrupt (a long C-level call): only a kill ends it."""
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)
    return {"equal": True}


def worker_pid(*args) -> int:
    import os
    return os.getpid()
