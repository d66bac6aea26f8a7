"""WorkerPool: results, errors, both timeout layers, replacement, threads, start-up failures."""
import threading

import pytest

from glmv_jax.rewards.workers import WorkerPool

HELPERS = "tests.rewards.helpers"


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(max_workers=2)  # nothing preloaded: starts in well under a second
    yield pool
    pool.close()


def test_call_returns_the_value(pool):
    assert pool.call(f"{HELPERS}:echo", [{"a": [1, 2.5, "x"]}], timeout_s=30).value == {"a": [1, 2.5, "x"]}


def test_exceptions_come_back_as_errors(pool):
    result = pool.call(f"{HELPERS}:fail_loudly", ["1", "2"], timeout_s=30)
    assert result.error == "ArithmeticError: cannot compare 1 and 2" and result.value is None
    assert pool.call(f"{HELPERS}:no_such_function", [], timeout_s=30).error.startswith("AttributeError")


def test_alarm_timeout_keeps_the_worker(pool):
    pid = pool.call(f"{HELPERS}:worker_pid", [], timeout_s=30).value
    result = pool.call(f"{HELPERS}:sleep_then_equal", ["a", "b"], timeout_s=0.3)
    assert result.timed_out and not result.killed
    assert pool.call(f"{HELPERS}:worker_pid", [], timeout_s=30).value == pid


def test_uninterruptible_work_gets_the_worker_killed_and_replaced(pool):
    result = pool.call(f"{HELPERS}:sleep_with_alarm_blocked", ["a", "b"], timeout_s=0.3, grace_s=0.2)
    assert result.timed_out and result.killed
    assert isinstance(pool.call(f"{HELPERS}:worker_pid", [], timeout_s=30).value, int)


def test_many_threads_share_the_pool(pool):
    results = [None] * 8

    def work(i):
        results[i] = pool.call(f"{HELPERS}:echo", [i], timeout_s=30).value

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == list(range(8))


def test_start_up_failures_are_clear_errors():
    broken = WorkerPool(preload=("glmv_jax.no_such_module",))
    with pytest.raises(RuntimeError, match="reward worker failed to start: ModuleNotFoundError.*no_such_module"):
        broken.call(f"{HELPERS}:echo", [1], timeout_s=30)
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        WorkerPool(max_workers=0)
