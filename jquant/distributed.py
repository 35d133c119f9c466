"""Devices, meshes and processes: how jquant spreads a job with JAX's own runtime.

Everything here is a thin layer over ``jax.sharding`` / ``jax.shard_map`` /
``jax.distributed``; jquant has no scheduler of its own.

- :func:`make_mesh` builds a :class:`jax.sharding.Mesh` from ``"data=2,model=4"`` (the
  CLI's ``--mesh``, a recipe's ``mesh:``), a mapping, or nothing (all devices on ``data``).
  Axis ``data`` splits calibration batches (statistics are reduced with ``psum``);
  every axis together splits a GPTQ solve's output columns.
- :func:`shard_map` is ``jax.shard_map`` for functions that take or return
  :class:`~jquant.QTensor`\\ s: a QTensor's ``shape`` is static metadata, so a plain
  ``shard_map`` hands the body global metadata over local arrays (and a QTensor's own
  shape check refuses it). Here the ``PartitionSpec`` given for a QTensor is that of the
  float weight it stands for (Flax layout ``(in, out)``, e.g. ``P(None, "model")``); its
  codes, scales, zeros and float outlier rows are split along the same logical axis, and
  the body sees QTensors of the local shape; QTensors it returns get the global shape back.
- :func:`shard_qtensor` places a QTensor on a mesh the same way (for ``jit``).
- :func:`initialize` starts ``jax.distributed`` for multi-process runs (CPU collectives over
  gloo), :func:`is_writer` says whether this process writes shared files.

Fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``): ``import jquant``
sizes XLA:CPU's thread pool for them (``NPROC``, see ``jquant/_xla_cpu.py``), since with a
pool of one thread per core a collective over more devices than cores can hang; import
jquant before any JAX call, or :func:`make_mesh` warns.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jquant import _xla_cpu
from jquant.errors import ShapeError, SpecError, at
from jquant.qtensor import QTensor, is_qtensor

AXES = ("data", "model")  # the axis names jquant's pipeline knows


# ----------------------------------------------------------------------------- meshes
def parse_mesh(text: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,model=4"`` (or a mapping) as ``{"data": 2, "model": 4}``.

    A size of ``-1`` (at most one) takes the devices the others leave. Raises SpecError for
    unknown axis names, non-integer or non-positive sizes and repeated axes.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        if not isinstance(text, str):
            raise SpecError(f"mesh: expected 'data=N,model=M' or a mapping, got {type(text).__name__} {text!r}")
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, size = part.partition("=")
            if not eq:
                raise SpecError(f"mesh {text!r}: {part!r} is not 'axis=size' (e.g. 'data=2,model=4')")
            items.append((name.strip(), size.strip()))
    out: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise SpecError(f"mesh: unknown axis {name!r}; jquant's axes are {', '.join(AXES)}")
        if name in out:
            raise SpecError(f"mesh: axis {name!r} given twice")
        try:
            n = int(size)
            if isinstance(size, float) or isinstance(size, bool) or str(n) != str(size).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise SpecError(f"mesh: size of axis {name!r} must be an integer, got {size!r}") from None
        if n == 0 or n < -1:
            raise SpecError(f"mesh: size of axis {name!r} must be >= 1 (or -1 for the rest), got {n}")
        out[name] = n
    if sum(v == -1 for v in out.values()) > 1:
        raise SpecError(f"mesh: at most one axis may have size -1, got {out}")
    return out


def make_mesh(axes: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all of ``jax.devices()``, every process's).

    Args:
      axes: ``"data=2,model=4"``, a mapping, or None for ``data`` over all devices. An axis
        left out has size 1; the sizes must multiply to the number of devices.
    Returns:
      a ``Mesh`` with axes ``("data", "model")``.
    Raises:
      SpecError: a bad mesh string, or sizes whose product is not the number of devices
        (the message lists the sizes that would fit).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = parse_mesh(axes)
    if not sizes:
        sizes = {"data": n}
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            if n % known:
                raise SpecError(f"mesh {_show(sizes)}: the other axes ({known} devices) do not divide the {n} devices")
            sizes[k] = n // known
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != n:
        fits = [f"data={d},model={n // d}" for d in range(1, n + 1) if n % d == 0]
        raise SpecError(f"mesh {_show(sizes)} needs {math.prod(shape)} devices, but there are {n}; "
                        f"valid meshes: {'; '.join(fits)}")
    _warn_cpu_pool(devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def _warn_cpu_pool(devices) -> None:
    """Warn when XLA:CPU's thread pool may be too small for a collective over ``devices``.

    See ``jquant/_xla_cpu.py``: with more local CPU devices than cores and ``NPROC`` unset
    (JAX started before ``import jquant``), a ``psum`` can hang.
    """
    local = sum(1 for d in devices if d.platform == "cpu" and d.process_index == jax.process_index())
    cores = os.cpu_count() or 1
    if local > cores and not os.environ.get("NPROC"):
        warnings.warn(f"{local} CPU devices on {cores} cores: XLA:CPU's collectives can deadlock when its thread "
                      f"pool ({cores} threads) is smaller than the device count; set NPROC={_xla_cpu.pool_size(local)} "
                      "before JAX starts (importing jquant before any JAX call does it)", RuntimeWarning, stacklevel=3)


def _show(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def axis_size(mesh: Mesh, names) -> int:
    """Devices along one mesh axis name, a tuple of names, or None (1)."""
    if names is None:
        return 1
    if isinstance(names, str):
        names = (names,)
    return math.prod(mesh.shape[a] for a in names)


# ----------------------------------------------------------------------------- QTensors on meshes
_PARTS = ("codes", "scale", "zero", "g_idx", "perm", "outlier_idx", "outlier_w")


def _check_spec(qt: QTensor, spec: P, mesh: Mesh, path: str | None) -> tuple:
    spec = tuple(spec) + (None,) * (qt.ndim - len(tuple(spec)))
    if len(spec) != qt.ndim:
        raise ShapeError(at(path, f"PartitionSpec {P(*spec)} has more entries than the QTensor's {qt.ndim} axes"))
    for d, names in enumerate(spec):
        if names is None:
            continue
        if d == qt.axis and qt.granularity != "tensor":
            raise SpecError(at(path, f"cannot split a QTensor along axis {d}, the axis its groups and packed codes run "
                                     f"along; split another axis (e.g. the output axis: {P(None, names)})"))
        k = axis_size(mesh, names)
        if qt.shape[d] % k:
            raise ShapeError(at(path, f"axis {d} of size {qt.shape[d]} does not divide over the {k} devices of mesh "
                                      f"axis {names!r}; pad it to a multiple of {k} or use a mesh whose axis divides it"))
    return spec


def _part_spec(part, qt: QTensor, spec: tuple) -> P:
    """The PartitionSpec of one stored part: its dimensions align with the logical ones from
    the right (a ``bcq`` scale has a leading bit-plane axis); a dimension of another size
    (packed codes, groups, a per-tensor scale) or a part of fewer axes (g_idx) is not split."""
    off = part.ndim - qt.ndim
    if off < 0:
        return P()
    out = [None] * part.ndim
    for d, names in enumerate(spec):
        if names is not None and part.shape[off + d] == qt.shape[d]:
            out[off + d] = names
    return P(*out)


def qtensor_specs(qt: QTensor, spec: P, mesh: Mesh, *, path: str | None = None) -> QTensor:
    """A QTensor-shaped pytree of the ``PartitionSpec`` of each stored part, for a QTensor
    split like a float weight with ``spec``. Raises SpecError/ShapeError (see :func:`shard_map`)."""
    spec = _check_spec(qt, spec, mesh, path)
    return jax.tree_util.tree_map(lambda a: _part_spec(a, qt, spec), qt)


def shard_qtensor(qt: QTensor, mesh: Mesh, spec: P, *, path: str | None = None) -> QTensor:
    """``qt`` placed on ``mesh``, its parts split as the float weight would be with ``spec``
    (e.g. ``P(None, "model")``: codes, scales, zeros split by output column)."""
    specs = qtensor_specs(qt, spec, mesh, path=path)
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), qt, specs)


def take(qt: QTensor, dim: int, n: int) -> QTensor:
    """The first ``n`` entries of ``qt`` along logical axis ``dim`` (not its grouped axis):
    every part aligned with that axis is sliced (drops the padding of a padded split)."""
    if dim == qt.axis and qt.granularity != "tensor":
        raise SpecError(f"take: axis {dim} is the grouped axis of the QTensor")
    spec = [None] * qt.ndim
    spec[dim] = "x"

    def cut(a):
        s = _part_spec(a, qt, tuple(spec))
        if "x" not in tuple(s):
            return a
        d = tuple(s).index("x")
        return a[(slice(None),) * d + (slice(0, n),)]

    parts = [None if getattr(qt, p) is None else cut(getattr(qt, p)) for p in _PARTS]
    shape = qt.shape[:dim] + (n,) + qt.shape[dim + 1:]
    return _Meta.of(qt, shape).build(parts)


def shard_params(state, mesh: Mesh, axis: str = "model"):
    """A parameter tree placed on ``mesh`` for a sharded forward: every kernel ``(in, out)``
    (float or QTensor) split by output column over ``axis`` where its width divides, every
    other leaf (embedding, norms, kernels that do not divide) replicated. ``jit`` of the
    model's forward on the result runs tensor-parallel (XLA inserts the collectives) and
    gives the unsharded logits."""
    k = axis_size(mesh, axis)
    rep = NamedSharding(mesh, P())

    def place(kp, x):
        from jquant.spec import path_str

        kernel = path_str(kp).endswith("kernel")
        if is_qtensor(x):
            if x.ndim == 2 and x.axis == 0 and x.shape[1] % k == 0:
                return shard_qtensor(x, mesh, P(None, axis))
            return jax.tree_util.tree_map(lambda a: put(a, rep), x)
        if kernel and getattr(x, "ndim", 0) == 2 and x.shape[1] % k == 0:
            return put(x, NamedSharding(mesh, P(None, axis)))
        return put(x, rep) if hasattr(x, "shape") else x

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=is_qtensor)


def _local(qt: QTensor, spec: tuple, mesh: Mesh) -> tuple[int, ...]:
    return tuple(n // axis_size(mesh, s) for n, s in zip(qt.shape, spec))


def _global(shape: tuple, spec: tuple, mesh: Mesh) -> tuple[int, ...]:
    return tuple(n * axis_size(mesh, s) for n, s in zip(shape, spec))


@dataclasses.dataclass(frozen=True)
class _Meta:
    """A QTensor's static fields, with the shape of one side of the shard_map boundary."""

    fields: tuple

    @classmethod
    def of(cls, qt: QTensor, shape: tuple) -> _Meta:
        return cls(tuple((f.name, shape if f.name == "shape" else getattr(qt, f.name))
                         for f in dataclasses.fields(qt) if f.name not in _PARTS))

    def build(self, parts: Sequence) -> QTensor:
        return QTensor(**dict(zip(_PARTS, parts)), **dict(self.fields))


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, P)


def _broadcast(spec, tree) -> list:
    """One spec per leaf of ``tree`` (QTensors are leaves) from a spec pytree that is a prefix
    of it (None means replicated)."""
    per = jax.tree_util.tree_map(
        lambda s, sub: [s or P()] * len(jax.tree_util.tree_leaves(sub, is_leaf=is_qtensor)),
        spec, tree, is_leaf=_is_spec_leaf)
    return [s for lst in jax.tree_util.tree_leaves(per, is_leaf=lambda x: isinstance(x, list)) for s in lst]


def _full(spec: P, ndim: int) -> tuple:
    spec = tuple(spec)
    return spec + (None,) * (ndim - len(spec))


def _parts_of(qt: QTensor) -> tuple:
    return tuple(getattr(qt, p) for p in _PARTS)


def _parts_specs(qt: QTensor, full: tuple) -> tuple:
    return tuple(P() if getattr(qt, p) is None else _part_spec(getattr(qt, p), qt, full) for p in _PARTS)


def shard_map(f: Callable, *, mesh: Mesh, in_specs, out_specs, axis_names=frozenset(), check_vma: bool = True):
    """``jax.shard_map`` that carries QTensors across the boundary with their metadata.

    ``in_specs``/``out_specs`` are as for ``jax.shard_map`` (a PartitionSpec is a prefix of
    the pytree it describes, None means replicated), except that at a QTensor the spec is
    the float weight's: the body gets (and may return) QTensors of the local shape, and
    returned QTensors have the global shape outside. Raises SpecError when a spec splits a
    QTensor along its grouped axis, ShapeError when an axis does not divide over the mesh.
    """
    in_specs_t = tuple(in_specs) if isinstance(in_specs, (tuple, list)) else (in_specs,)

    def wrapped(*args):
        if len(args) != len(in_specs_t):
            raise SpecError(f"shard_map: {len(args)} arguments but {len(in_specs_t)} in_specs")
        leaves, tdef = jax.tree_util.tree_flatten(args, is_leaf=is_qtensor)
        specs = _broadcast(in_specs_t, args)
        flat, flat_specs, metas = [], [], []
        for x, sp in zip(leaves, specs):
            if is_qtensor(x):
                full = _check_spec(x, sp, mesh, None)
                flat.append(_parts_of(x))
                flat_specs.append(_parts_specs(x, full))
                metas.append(_Meta.of(x, _local(x, full, mesh)))
            else:
                flat.append(x)
                flat_specs.append(sp)
                metas.append(None)
        traced: dict = {}

        def body(flat):
            args = tdef.unflatten([m.build(x) if m is not None else x for x, m in zip(flat, metas)])
            out = f(*args)
            oleaves, otdef = jax.tree_util.tree_flatten(out, is_leaf=is_qtensor)
            traced["tdef"], traced["out"] = otdef, out
            traced["metas"] = [x if is_qtensor(x) else None for x in oleaves]
            return [_parts_of(x) if is_qtensor(x) else x for x in oleaves]

        # Trace the body once on the local shapes: the output's structure and its QTensors'
        # local metadata decide the out_specs of their parts.
        # (out_specs P() is a prefix of any output; unchecked, it only serves this trace.)
        jax.eval_shape(jax.shard_map(body, mesh=mesh, in_specs=(flat_specs,), out_specs=P(),
                                     axis_names=axis_names, check_vma=False), flat)
        otdef, local_q = traced["tdef"], traced["metas"]
        ospecs = _broadcast(out_specs, traced["out"])
        flat_out_specs = [sp if q is None else _parts_specs(q, _full(sp, q.ndim)) for sp, q in zip(ospecs, local_q)]
        res = jax.shard_map(body, mesh=mesh, in_specs=(flat_specs,), out_specs=flat_out_specs,
                            axis_names=axis_names, check_vma=check_vma)(flat)
        out = []
        for x, sp, q in zip(res, ospecs, local_q):
            if q is None:
                out.append(x)
            else:
                out.append(_Meta.of(q, _global(q.shape, _full(sp, q.ndim), mesh)).build(x))
        return otdef.unflatten(out)

    return wrapped


# ----------------------------------------------------------------------------- processes
def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` for a multi-process run; True when it was started.

    Arguments default to the environment: ``JQUANT_COORDINATOR`` (``host:port`` of process
    0), ``JQUANT_NUM_PROCESSES``, ``JQUANT_PROCESS_ID`` (and ``JQUANT_SHUTDOWN_TIMEOUT``, seconds
    the processes wait at exit for process 0 to finish writing; default 3600); without them (and without JAX's own
    cluster detection: SLURM, Open MPI, Kubernetes, TPU pods) this is a single-process run
    and nothing happens. On CPU, collectives across processes go over gloo. Must be called
    before any other JAX call (the CLI does it first).

    Raises:
      SpecError: a non-integer process count or id, or an id outside ``[0, count)``.
    """
    coordinator = coordinator or os.environ.get("JQUANT_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("JQUANT_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JQUANT_PROCESS_ID")
    if coordinator is None and num_processes is None:
        return False
    if num_processes is not None and (num_processes < 1 or process_id is None
                                      or not 0 <= process_id < num_processes):
        raise SpecError(f"multi-process run: process id {process_id!r} must be in [0, {num_processes}) "
                        "(set JQUANT_PROCESS_ID for every process)")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Process 0 writes every file after the last collective (a 70B checkpoint takes a while):
    # the others wait for it at exit, so the shutdown barrier gets an hour, not JAX's 5 minutes.
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               shutdown_timeout_seconds=_env_int("JQUANT_SHUTDOWN_TIMEOUT") or 3600)
    return True


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise SpecError(f"environment variable {name}={v!r} must be an integer") from None


def to_host(tree):
    """``tree`` with every array that spans devices of other processes gathered whole onto
    this one (``process_allgather``; a collective: every process must call it). Arrays this
    process holds whole are returned as they are; QTensors keep their metadata."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # this process's copy is the whole array
                return x.addressable_data(0)
            from jax.experimental import multihost_utils

            return jax.numpy.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree_util.tree_map(get, tree)


def put(tree, sharding):
    """``tree``'s arrays placed with ``sharding`` (one for all leaves). Every process holds
    the whole value (as after :func:`to_host`); on a mesh spanning several processes each
    one contributes the shards of its own devices (``jax.device_put`` moves only onto
    devices this process can address)."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: a reshard
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree)


def process_zero_says(value: bool) -> bool:
    """Process 0's ``value`` on every process (a collective), so decisions made from clocks
    (when to write a resume point) are the same everywhere; ``value`` itself in one process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def barrier(name: str) -> None:
    """Wait until every process got here (a no-op in one process): e.g. until process 0 has
    written the files the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def every_process(value: int) -> list[int]:
    """``value`` of every process, in process order (a collective; ``[value]`` in one process)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64))).reshape(-1)]


def is_writer() -> bool:
    """True on the one process that writes shared files (process 0)."""
    return jax.process_index() == 0
