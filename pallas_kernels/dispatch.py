"""Which matmul a QTensor weight takes: the Pallas kernel on GPU, the chunked XLA path elsewhere.

Backends:

- ``auto`` (default): ``pallas`` on a GPU, ``xla`` on any other platform;
- ``pallas``: :func:`pallas_kernels.wq_matmul.wq_matmul` compiled for the device (GPU);
- ``interpret``: the same kernel in Pallas interpret mode (any platform; for tests);
- ``xla``: :func:`pallas_kernels.xla_matmul.xla_matmul`, the chunked dequantize-and-dot;
- ``dequant``: ``x @ qt.dequantize()``, the reference.

Pick one with ``$JQUANT_MATMUL``, :func:`set_backend` or the :func:`use_backend` context
manager. The choice is read when a function is traced, so functions already jitted keep the
backend they were traced with.

A weight no packed path can read (a codebook format, a ragged group, no power-of-two K tile,
``g_idx`` act-order not converted by :func:`prepare`) takes ``dequant`` on every backend;
:func:`explain` says which path a weight gets and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import jax
import jax.numpy as jnp

from jquant.qtensor import QTensor, act_order_to_perm, is_qtensor
from pallas_kernels.layout import KernelUnsupported, kernel_weight

BACKENDS = ("auto", "pallas", "interpret", "xla", "dequant")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown matmul backend {name!r}; one of {BACKENDS}")
    return name


_default = _check(os.environ.get("JQUANT_MATMUL", "auto"))
_local = threading.local()  # use_backend() is per thread; set_backend() sets the process default


def set_backend(name: str) -> None:
    """Set the process-wide default backend for packed matmuls (see module doc)."""
    global _default
    _default = _check(name)


def get_backend() -> str:
    return getattr(_local, "backend", None) or _default


@contextlib.contextmanager
def use_backend(name: str):
    """Use ``name`` for packed matmuls traced inside the ``with`` block (this thread only)."""
    old = getattr(_local, "backend", None)
    _local.backend = _check(name)
    try:
        yield
    finally:
        _local.backend = old


def resolve(backend: str | None = None) -> str:
    """The concrete backend ``auto`` (or ``None``: the current one) stands for here."""
    b = _check(backend or get_backend())
    on_gpu = jax.default_backend() == "gpu"
    if b == "auto":
        return "pallas" if on_gpu else "xla"
    if b == "pallas" and not on_gpu:
        raise ValueError(f"the 'pallas' matmul backend compiles for a GPU; this is {jax.default_backend()!r} "
                         "(use 'interpret' to run the kernels here, or 'auto')")
    return b


def _route(qt: QTensor, backend: str | None) -> tuple[str, str]:
    """``(path, reason)``: the one decision both :func:`qmatmul` and :func:`explain` follow."""
    b = resolve(backend)
    if b == "dequant":
        return b, "requested"
    try:
        kernel_weight(qt)
    except KernelUnsupported as e:
        return "dequant", f"no packed path: {e}"
    return b, ""


def explain(qt: QTensor, backend: str | None = None) -> str:
    """Which path ``x @ qt`` takes with ``backend``, and why."""
    path, why = _route(qt, backend)
    return f"{path} ({why})" if why else path


def qmatmul(x, w, backend: str | None = None):
    """``x @ w`` for a float array or a QTensor ``w`` ``(K, N)``, in ``x``'s dtype."""
    if not is_qtensor(w):
        return x @ jnp.asarray(w).astype(x.dtype)
    if w.outlier_idx is not None:  # rows kept in float (LLM.int8): the quantized part plus the float part
        base = dataclasses.replace(w, outlier_idx=None, outlier_w=None)
        return qmatmul(x, base, backend) + jnp.take(x, w.outlier_idx, axis=-1) @ w.outlier_w.astype(x.dtype)
    from pallas_kernels.wq_matmul import wq_matmul, wq_matmul_reference
    from pallas_kernels.xla_matmul import xla_matmul

    path, _ = _route(w, backend)
    if path in ("pallas", "interpret"):
        return wq_matmul(x, w, interpret=path == "interpret")
    if path == "xla":
        return xla_matmul(x, w)
    return wq_matmul_reference(x, w)


def prepare(tree):
    """Convert every act-order QTensor (``g_idx``) in a tree to the kernel layout (``perm``).

    Run once after quantizing or loading; the dequantized values do not change, and the
    kernels then read scales group by group with the activations permuted.
    """
    return jax.tree_util.tree_map(lambda x: act_order_to_perm(x) if is_qtensor(x) else x, tree, is_leaf=is_qtensor)
