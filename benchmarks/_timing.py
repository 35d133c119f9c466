"""Timing helper shared by the benchmarks (run as scripts: ``python benchmarks/NAME.py``)."""

import statistics
import time


def median_time(fn, reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` (the caller blocks on async results)."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
