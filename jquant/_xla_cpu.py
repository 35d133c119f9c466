"""XLA:CPU's process-level settings: a guard against its collective deadlock with more fake
devices than cores, and (:func:`trim_host_memory`) the host memory of its freed arrays.

With ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` every one of the N CPU "devices"
runs its part of a ``shard_map``/``psum`` program, and a collective (all-reduce, all-gather)
blocks the thread that reaches it until all N participants arrive. XLA:CPU may run that
collective on a worker of its shared intra-op thread pool, whose size defaults to the number
of cores. On a 2-core machine two participants waiting in an all-reduce take both workers,
and the six others, queued on the same pool, never run: the process hangs, or after 40 s
aborts with "Termination timeout for `all reduce RendezvousKey...`" (seen in CI, and
reproduced here in 2 of 4 runs of the 8-device test under load, 0 of 13 with the guard).

XLA sizes that pool from the ``NPROC`` environment variable when it is set (read once, when
the CPU client is created). :func:`guard` sets ``NPROC`` to N + the number of cores, so that
with N - 1 participants waiting there are still as many workers as cores. It changes
nothing when ``NPROC`` is already set or no fake device count is asked for, and it must run
before JAX creates its CPU client: ``import jquant`` calls it first thing.
"""

import os
import re


def pool_size(devices: int) -> int:
    """The pool size that keeps a collective over ``devices`` CPU devices from deadlocking."""
    return devices + (os.cpu_count() or 1)


def guard(environ=os.environ) -> int | None:
    """Set ``NPROC`` for ``--xla_force_host_platform_device_count=N`` (N > 1); returns what it set."""
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    if not m or int(m.group(1)) < 2 or environ.get("NPROC"):
        return None
    n = pool_size(int(m.group(1)))
    environ["NPROC"] = str(n)
    return n


def trim_host_memory() -> bool:
    """Return the free memory in glibc malloc's heaps to the system (``malloc_trim(0)``).

    XLA:CPU allocates every array with malloc. Below glibc's dynamic mmap threshold (which
    grows to 32 MiB) a calibration job's batches of activations, 10-30 MiB each, come from
    heaps; freed, their pages stay resident, and as the heaps fragment block after block the
    resident memory climbs by hundreds of MiB (GPTQ W4 of SmolLM2 on 128 windows: 2.9 GiB at
    the end against 1.8 GiB in the first blocks). The calibration pipeline calls this
    between stages, where it costs milliseconds; mapping every large array on its own
    (``mallopt(M_MMAP_THRESHOLD)``) would do the same at the cost of page faults on every
    allocation (15% more forward time, measured). Returns False where the C library has no
    ``malloc_trim`` (not glibc).
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim = None
