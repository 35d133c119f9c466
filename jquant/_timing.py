"""Wall-clock timing shared by the benchmarks and the kernel autotuner."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` (the caller blocks on async results)."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def device_time(fn: Callable[[], object], reps: int) -> float:
    """Median time of ``fn()`` with its results ready: one untimed call first (compile, warm up),
    then ``reps`` timed calls each blocked on the device."""
    import jax

    jax.block_until_ready(fn())
    return median_time(lambda: jax.block_until_ready(fn()), reps)
